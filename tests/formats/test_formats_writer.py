"""Our writer and quantizers checked against llama.cpp's own files (../shared/fixtures), not only our reader."""
from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest

from airobackend.formats import open_model
from airobackend.formats.quantize import quantize
from airobackend.formats.writer import (synthetic_values, tensor_type_for, use_more_bits, write_model_like,
                                        write_synthetic_model)
from airobackend.quant import BLOCK, GGMLType

FX = dict(n_vocab=1024, n_embd=256, n_head=4, n_layer=2, n_ff=768, seed=11)
QUANT_TYPES = [t for t in BLOCK if t not in (GGMLType.F32, GGMLType.F16, GGMLType.Q8_1, GGMLType.Q8_K)]


@pytest.fixture(scope="module")
def f16_values(fixtures_dir):
    """The fx weights as llama-quantize saw them (the f16 file, widened to f32)."""
    mf = open_model(fixtures_dir / "models" / "fx-f16.gguf")
    out = {}
    for n, t in mf.tensors.items():
        a = np.asarray(t.data).view(np.float16 if t.type == GGMLType.F16 else np.float32)
        out[n] = a.astype(np.float32).reshape(t.shape)
    return out


def test_every_quantizer_is_bit_identical_to_llama_quantize(fixtures_dir, fixture_index, f16_values):
    """llama.cpp's reference quantizers are deterministic; ours reproduce every block of every fixture tensor."""
    seen: dict = {}
    for m in fixture_index["models"]:
        if not m["name"].startswith("fx-"):
            continue
        mf = open_model(fixtures_dir / m["files"]["gguf"]["path"])
        for n, t in mf.tensors.items():
            if t.type in (GGMLType.F32, GGMLType.F16) or (t.type, n) in seen or \
                    sum(1 for k in seen if k[0] == t.type) >= 4:      # 4 tensors per type keep this quick
                continue
            ours = quantize(f16_values[n], t.type)
            per_block, nb = BLOCK[t.type]
            diff = np.any(ours.reshape(-1, nb) != np.asarray(t.data).reshape(-1, nb), axis=1)
            assert not diff.any(), f"{m['name']} {n} {t.type.name}: {diff.sum()} of {diff.size} blocks differ"
            seen[(t.type, n)] = True
    assert {t for t, _ in seen} == set(QUANT_TYPES)


def test_quantizers_on_edge_blocks_roundtrip_sensibly():
    """All-zero, constant, single-spike and tiny blocks: no NaN, zero stays zero, error bounded."""
    import gguf
    from gguf.quants import dequantize
    rng = np.random.default_rng(5)
    x = np.zeros((6, 256), np.float32)
    x[1] = 0.5
    x[2, 17] = -3.0
    x[3] = rng.standard_normal(256).astype(np.float32) * 1e-30
    x[4] = rng.standard_normal(256).astype(np.float32)
    x[5] = np.abs(rng.standard_normal(256)).astype(np.float32)
    for t in QUANT_TYPES:
        y = dequantize(quantize(x, t), gguf.GGMLQuantizationType(int(t))).reshape(x.shape)
        assert np.isfinite(y).all(), t.name
        assert not y[0].any(), t.name
        rel = np.sqrt(np.mean((y[4] - x[4]) ** 2) / np.mean(x[4] ** 2))
        assert rel < 0.5, (t.name, rel)


def test_mix_rules_match_llama_cpp_2025_on_every_fixture(fixture_index):
    for m in fixture_index["models"]:
        mix = m["name"].split("-", 1)[1]
        hp = m["hparams"]
        for tt in m["tensor_types"].values():
            n = tt["gguf_name"]
            ne = {"token_embd": (hp["n_embd"], hp["n_vocab"]), "output": (hp["n_embd"], hp["n_vocab"])}.get(
                n.rsplit(".", 1)[0], (256,) if "norm" in n else (hp["n_embd"], 256))
            got = tensor_type_for(mix, n, ne, hp["n_layer"], n_gqa=hp["n_gqa"], rules="2025")
            assert got.name == tt["type"], (m["name"], n)


def test_mix_rules_2023_for_65b_match_the_model_cards():
    """Mid-2023 llama.cpp (GGML v3 files): 'q4_K_M uses Q6_K for half of the attention.wv and feed_forward.w2'."""
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                              30, 31]
    n = 80
    wv = [tensor_type_for("q4_K_M", f"blk.{i}.attn_v.weight", (8192, 8192), n, rules="2023") for i in range(n)]
    assert wv.count(GGMLType.Q6_K) == 40 and set(wv) == {GGMLType.Q4_K, GGMLType.Q6_K}
    t = lambda mix, name: tensor_type_for(mix, name, (8192, 8192), n, rules="2023")  # noqa: E731
    assert t("q4_0", "output.weight") == GGMLType.Q4_0 and t("q3_K_S", "output.weight") == GGMLType.Q6_K
    assert t("q2_K", "blk.3.attn_output.weight") == GGMLType.Q4_K and t("q2_K", "blk.3.ffn_up.weight") == \
        GGMLType.Q2_K
    assert t("q3_K_L", "blk.0.ffn_down.weight") == GGMLType.Q5_K and t("q3_K_M", "blk.0.attn_v.weight") == \
        GGMLType.Q4_K
    assert t("q5_K_S", "token_embd.weight") == GGMLType.Q5_K
    assert tensor_type_for("q6_K", "blk.0.attn_norm.weight", (8192,), n, rules="2023") == GGMLType.F32
    # rows that are not whole super-blocks: llama.cpp's 2023 fallbacks
    assert tensor_type_for("q4_K_M", "output.weight", (8200, 32000), n, rules="2023") == GGMLType.F16
    assert tensor_type_for("q4_K_M", "token_embd.weight", (8200, 32000), n, rules="2023") == GGMLType.Q4_0


@pytest.mark.parametrize("mix", ["f32", "f16", "q4_0", "q8_0", "q4_K_M", "q3_K_S"])
def test_synthetic_fx_equals_llama_cpp_files(tmp_path, fixtures_dir, mix):
    """The fixtures' recipe through our writer: GGUF payloads identical, GGML v3 files identical byte for byte."""
    ref_gguf = open_model(fixtures_dir / "models" / f"fx-{mix}.gguf")
    ref_v3 = fixtures_dir / "models" / f"fx-{mix}.ggmlv3.bin"
    out = tmp_path / f"fx-{mix}.gguf"
    write_synthetic_model(out, format="gguf", mix=mix, vocab=ref_gguf.vocab, rules="2025", **FX)
    ours = open_model(out)
    assert ours.mix_name == mix and ours.hparams == ref_gguf.hparams
    for n, t in ref_gguf.tensors.items():
        assert ours.tensors[n].type == t.type and np.array_equal(ours.tensors[n].data, t.data), n
    v3 = tmp_path / f"fx-{mix}.ggmlv3.bin"
    write_synthetic_model(v3, format="ggml", mix=mix, vocab=open_model(ref_v3).vocab, rules="2025", **FX)
    assert filecmp.cmp(v3, ref_v3, shallow=False)


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["q4_1", "q5_0", "q5_1", "q2_K", "q3_K_M", "q3_K_L", "q4_K_S", "q5_K_S", "q5_K_M",
                                 "q6_K"])
def test_synthetic_fx_equals_llama_cpp_files_other_mixes(tmp_path, fixtures_dir, mix):
    test_synthetic_fx_equals_llama_cpp_files(tmp_path, fixtures_dir, mix)


def test_synthetic_gqa_and_32k_payloads(tmp_path, fixtures_dir):
    ref = open_model(fixtures_dir / "models" / "fxgqa-q4_K_M.gguf")
    out = tmp_path / "g.gguf"
    write_synthetic_model(out, format="gguf", mix="q4_K_M", vocab=ref.vocab, n_vocab=1024, n_embd=256, n_head=8,
                          n_head_kv=2, n_layer=2, n_ff=768, seed=11)
    ours = open_model(out)
    assert ours.hparams.n_gqa == 4
    assert all(np.array_equal(ours.tensors[n].data, t.data) for n, t in ref.tensors.items())


def test_chunked_generation_equals_whole_tensor():
    whole = np.concatenate(list(synthetic_values(11, 3, (256, 64), f16=True, rows_per_chunk=64)))
    parts = np.concatenate(list(synthetic_values(11, 3, (256, 64), f16=True, rows_per_chunk=7)))
    assert np.array_equal(whole, parts)


def test_rewrite_between_containers_keeps_payloads(tmp_path, fixtures_dir):
    src = open_model(fixtures_dir / "models" / "fx-q5_K_M.gguf")
    write_model_like(tmp_path / "x.bin", src, format="ggml")
    write_model_like(tmp_path / "x.gguf", open_model(tmp_path / "x.bin"), format="gguf")
    for p in ("x.bin", "x.gguf"):
        mf = open_model(tmp_path / p)
        assert all(np.array_equal(mf.tensors[n].data, t.data) for n, t in src.tensors.items())
    assert filecmp.cmp(tmp_path / "x.bin", fixtures_dir / "models" / "fx-q5_K_M.ggmlv3.bin", shallow=False)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("fmt", ["ggml", "gguf"])
def test_opening_a_65b_sized_file_reads_nothing(tmp_path, fmt):
    """A sparse 39 GB 65B q4_K_M file (headers real, data holes): open is fast and RSS stays flat."""
    p = tmp_path / f"big65.{fmt}"
    write_synthetic_model(p, format=fmt, mix="q4_K_M", n_vocab=32000, n_embd=8192, n_head=64, n_layer=80,
                          n_ff=22016, sparse=True)
    size = p.stat().st_size
    assert size > 39e9
    before = _rss()
    mf = open_model(p)
    grew = _rss() - before
    assert grew < 64 << 20, grew
    assert mf.hparams.n_layer == 80 and mf.type_counts()["Q6_K"] == 81 and mf.file_size == size
    t = mf.tensors["blk.79.ffn_down.weight"]
    assert t.offset + t.nbytes <= size and t.data.size == t.nbytes     # views of holes cost nothing either
    mf.close()


def _peak_alloc_mb(fn) -> float:
    import tracemalloc              # numpy reports its buffers to tracemalloc
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_writer_memory_stays_bounded_for_wide_tensors(tmp_path):
    """token_embd is 64 MB as float32 here; written in 2 MB steps the writer's peak stays far below."""
    p = tmp_path / "w.bin"
    peak = _peak_alloc_mb(lambda: write_synthetic_model(p, format="ggml", mix="q4_0", n_vocab=16000, n_embd=1024,
                                                        n_head=8, n_layer=1, n_ff=2816, chunk_bytes=2 << 20))
    mf = open_model(p)
    assert mf.hparams.n_ff == 2816 and mf.tensors["token_embd.weight"].type == GGMLType.Q4_0
    assert peak < 40, peak


@pytest.mark.slow
def test_writer_memory_7b_wide_slice(tmp_path):
    """A 7B-wide slice (n_embd 4096, one layer, 32000 vocab: token_embd 500 MB as float32) in 8 MB steps."""
    p = tmp_path / "w.bin"
    peak = _peak_alloc_mb(lambda: write_synthetic_model(p, format="ggml", mix="q4_0", n_vocab=32000, n_embd=4096,
                                                        n_head=32, n_layer=1, n_ff=11008, chunk_bytes=8 << 20))
    assert open_model(p).hparams.n_ff == 11008
    assert peak < 160, peak


def test_tiled_benchmark_slices(tmp_path):
    """tile_rows: the first rows follow the recipe (equal to an untiled file), the rest repeats their blocks."""
    kw = dict(format="gguf", mix="q4_K_M", n_vocab=512, n_embd=256, n_head=4, n_layer=1, n_ff=768, seed=3)
    write_synthetic_model(tmp_path / "full.gguf", **kw)
    write_synthetic_model(tmp_path / "tiled.gguf", tile_rows=16, chunk_bytes=40 * 1024, **kw)
    full, tiled = open_model(tmp_path / "full.gguf"), open_model(tmp_path / "tiled.gguf")
    for n, t in tiled.tensors.items():
        a = np.asarray(t.data).reshape(t.shape[0] if len(t.shape) == 2 else 1, -1)
        b = np.asarray(full.tensors[n].data).reshape(a.shape)
        assert np.array_equal(a[:16], b[:16]), n
        if a.shape[0] > 16:
            assert np.array_equal(a[16:32], a[:16]) and np.array_equal(a[-1], a[(a.shape[0] - 1) % 16]), n
