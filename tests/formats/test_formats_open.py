"""Every llama.cpp fixture model opens, in both containers, with the right hparams, vocabulary, tensor table and
weights (GGML v3 twin == GGUF twin == gguf-py's dequantization == kernels' numpy reference)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from airobackend.errors import ModelFileError
from airobackend.formats import estimate_ram, gguf_tensor_name, legacy_tensor_name, open_model

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402


def _models(fixture_index):
    return [m for m in fixture_index["models"]]


def _deq(t) -> np.ndarray:
    return gguf_dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.type))).reshape(t.shape)


def test_every_fixture_opens_with_index_hparams_and_types(fixtures_dir, fixture_index):
    for m in _models(fixture_index):
        for fmt in ("gguf", "ggmlv3"):
            path = fixtures_dir / m["files"][fmt]["path"]
            with open_model(path) as mf:
                want = m["hparams"]
                hp = mf.hparams
                for k in ("n_vocab", "n_embd", "n_head", "n_head_kv", "n_layer", "n_ff", "n_rot", "n_ctx_train"):
                    assert getattr(hp, k) == want[k], (path.name, k)
                assert hp.n_gqa == want["n_gqa"]
                assert math.isclose(hp.rms_norm_eps, want["rms_norm_eps"], rel_tol=1e-6)
                assert hp.rope_freq_base == want["rope_freq_base"] and hp.rope_freq_scale == 1.0
                assert mf.ftype == m["ftype"]
                assert mf.mix_name == m["name"].split("-", 1)[1], path.name
                assert mf.file_size == m["files"][fmt]["size"]
                assert (mf.format, mf.version) == (("gguf", 3) if fmt == "gguf" else ("ggjt", 3))
                types = {tt["gguf_name"]: tt["type"] for tt in m["tensor_types"].values()}
                assert {n: t.type.name for n, t in mf.tensors.items()} == types
                for tt in m["tensor_types"].values():
                    t = mf.tensors[tt["gguf_name"]]
                    assert t.legacy_name == tt["ggmlv3_name"]
                    assert gguf_tensor_name(tt["ggmlv3_name"]) == tt["gguf_name"]
                    assert legacy_tensor_name(tt["gguf_name"]) == tt["ggmlv3_name"]


def test_twins_hold_identical_weights_and_match_gguf_py_and_reference(fixtures_dir, fixture_index):
    try:
        from airobackend.kernels.reference import dequantize as ref_dequantize
    except ImportError:      # pragma: no cover - kernels' reference lands separately
        ref_dequantize = None
    for m in _models(fixture_index):
        a = open_model(fixtures_dir / m["files"]["gguf"]["path"])
        b = open_model(fixtures_dir / m["files"]["ggmlv3"]["path"])
        assert a.tensors.keys() == b.tensors.keys()
        for name, ta in a.tensors.items():
            tb = b.tensors[name]
            assert (ta.type, ta.ne, ta.shape, ta.nbytes) == (tb.type, tb.ne, tb.shape, tb.nbytes)
            assert not ta.data.flags.writeable and not tb.data.flags.writeable
            assert ta.data.dtype == np.uint8 and ta.data.ndim == 1 and ta.data.size == ta.nbytes
            da, db = _deq(ta), _deq(tb)
            np.testing.assert_array_equal(da, db, err_msg=f"{m['name']} {name}")
            if ref_dequantize is not None:
                r = ref_dequantize(np.asarray(ta.data), int(ta.type), ta.n_elements).reshape(ta.shape)
                np.testing.assert_array_equal(r, da, err_msg=f"reference vs gguf-py {m['name']} {name}")
        a.close()
        b.close()


def test_shape_and_numpy_order(fixtures_dir):
    with open_model(fixtures_dir / "models" / "fxgqa-q4_K_M.ggmlv3.bin") as mf:
        wk = mf.tensors["blk.0.attn_k.weight"]
        assert wk.ne == (256, 64) and wk.shape == (64, 256)       # n_embd_gqa = 256 / 4
        assert mf.tensors["output_norm.weight"].shape == (256,)
        assert wk.row_bytes * wk.shape[0] == wk.nbytes
        # zero-copy: the data is a view into the mapped file at the recorded offset
        raw = (fixtures_dir / "models" / "fxgqa-q4_K_M.ggmlv3.bin").read_bytes()
        assert bytes(wk.data) == raw[wk.offset:wk.offset + wk.nbytes]
        assert wk.offset % 32 == 0


def test_our_gguf_parser_agrees_with_gguf_py(fixtures_dir, fixture_index):
    """Header parsing is ours (GGUFReader is ~40x slower on a 32k vocabulary); check it field by field."""
    for m in _models(fixture_index)[:4] + [x for x in _models(fixture_index) if x["name"] == "fxgqa-q4_K_M"]:
        path = fixtures_dir / m["files"]["gguf"]["path"]
        r = gguf.GGUFReader(path)
        mf = open_model(path)
        for key, field in r.fields.items():
            if key.startswith("GGUF."):
                continue
            ours = mf.metadata[key]
            vt = field.types[0]
            if vt == gguf.GGUFValueType.STRING:
                assert ours == bytes(field.parts[field.data[0]]), key
            elif vt == gguf.GGUFValueType.ARRAY:
                if field.types[1] == gguf.GGUFValueType.STRING:
                    assert ours == [bytes(field.parts[i]) for i in field.data], key
                else:
                    np.testing.assert_array_equal(ours, np.concatenate([field.parts[i] for i in field.data]))
            else:
                assert ours == field.parts[field.data[0]][0], key
        assert len(r.tensors) == len(mf.tensors)
        for t in r.tensors:
            ti = mf.tensors[t.name]
            assert int(t.tensor_type) == int(ti.type) and tuple(int(x) for x in t.shape) == ti.ne
            assert int(t.data_offset) == ti.offset and int(t.n_bytes) == ti.nbytes


def test_vocab_spellings(fixtures_dir):
    with open_model(fixtures_dir / "models" / "fx32k-q4_0.ggmlv3.bin") as g, \
            open_model(fixtures_dir / "models" / "fx32k-q4_0.gguf") as u:
        assert g.vocab.spelling == "ggml" and g.vocab.types is None
        assert u.vocab.spelling == "gguf" and u.vocab.types.dtype == np.int32
        assert len(g.vocab) == len(u.vocab) == 32000
        assert g.vocab.pieces[0] == " \u2047 ".encode() and u.vocab.pieces[0] == b"<unk>"
        assert g.vocab.pieces[1] == b"" and u.vocab.pieces[1] == b"<s>"
        assert g.vocab.pieces[3 + 0xE4] == b"\xe4" and u.vocab.pieces[3 + 0xE4] == b"<0xE4>"
        assert u.vocab.types[3 + 0xE4] == 6 and u.vocab.types[1] == 3
        assert u.vocab.pieces[450] == "\u2581The".encode() and g.vocab.pieces[450] == b" The"
        np.testing.assert_array_equal(g.vocab.scores, u.vocab.scores)
        assert (u.hparams.bos_id, u.hparams.eos_id, u.hparams.unk_id, u.hparams.add_bos) == (1, 2, 0, True)
        assert (g.hparams.bos_id, g.hparams.eos_id, g.hparams.unk_id) == (1, 2, 0)


def test_vocab_only(fixtures_dir):
    mf = open_model(fixtures_dir / "vocab" / "ggml-vocab-llama-spm.gguf", vocab_only=True)
    assert len(mf.vocab) == 32000 and mf.tensors == {}
    assert mf.vocab.pieces[3] == b"<0x00>" and mf.vocab.types[0] == 2
    with pytest.raises(ModelFileError, match="needs at least 290 tensors, the file has 0"):
        open_model(fixtures_dir / "vocab" / "ggml-vocab-llama-spm.gguf")
    # vocab_only also skips the tensor table of a full model
    assert open_model(fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin", vocab_only=True).tensors == {}


def test_load_time_overrides(fixtures_dir):
    p = fixtures_dir / "models" / "fxgqa-q4_0.ggmlv3.bin"
    assert open_model(p).hparams.n_gqa == 4                       # inferred from wk's shape
    hp = open_model(p, n_gqa=4, rms_norm_eps=1e-5, rope_freq_base=1e6, rope_freq_scale=0.25,
                    n_ctx_train=4096).hparams
    assert (hp.n_head_kv, hp.rms_norm_eps, hp.rope_freq_base, hp.rope_freq_scale, hp.n_ctx_train) == \
        (2, 1e-5, 1e6, 0.25, 4096)
    with pytest.raises(ModelFileError, match=r"shape \[256, 64\] disagrees.*n_gqa=2") as e:
        open_model(p, n_gqa=2)
    assert "attn_k" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ModelFileError, match="n_gqa"):
        open_model(p, n_gqa=0)
    # GGML v3 defaults: llama.cpp's late default eps 5e-6, base 10000, scale 1, context 2048
    hp = open_model(fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin").hparams
    assert (hp.rms_norm_eps, hp.rope_freq_base, hp.rope_freq_scale, hp.n_ctx_train) == (5e-6, 1e4, 1.0, 2048)


def test_estimate_ram_matches_llama_cpp_kv_sizes(fixtures_dir):
    from airobackend.formats import HParams, kv_cache_bytes
    h65 = HParams(n_vocab=32000, n_embd=8192, n_head=64, n_head_kv=64, n_layer=80, n_ff=22016, n_rot=128)
    h70 = HParams(n_vocab=32000, n_embd=8192, n_head=64, n_head_kv=8, n_layer=80, n_ff=28672, n_rot=128)
    # llama.cpp (GGML v3 era) printed "kv self size = 5120.00 MB" for 65B and 640.00 MB for 70B at n_ctx 2048
    assert kv_cache_bytes(h65, 2048) == 5120 << 20 and kv_cache_bytes(h70, 2048) == 640 << 20
    with open_model(fixtures_dir / "models" / "fx-q4_0.gguf") as mf:
        r = estimate_ram(mf, 2048)
        assert r > mf.file_size + kv_cache_bytes(mf.hparams, 2048)
        assert estimate_ram(mf, 4096) > r
        assert estimate_ram(mf.hparams, 2048, weights_bytes=mf.file_size) == r


def test_zero_copy_views_and_close(fixtures_dir):
    mf = open_model(fixtures_dir / "models" / "fx-q8_0.gguf")
    t = mf.tensors["token_embd.weight"]
    assert t.data.base is not None          # a view, not an owned copy
    with pytest.raises(ValueError):
        t.data[0] = 1
    d = t.data
    mf.close()
    assert d.size == t.nbytes               # a view handed out stays readable after close


def test_gguf_v2_and_is_model_file(tmp_path, fixtures_dir):
    """GGUF v2 has the v3 little-endian layout; only the version field differs."""
    from airobackend.formats import is_model_file
    raw = bytearray((fixtures_dir / "models" / "fx-q4_0.gguf").read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")
    p = tmp_path / "v2.gguf"
    p.write_bytes(raw)
    mf = open_model(p)
    assert (mf.format, mf.version, mf.version_name) == ("gguf", 2, "GGUF v2") and len(mf.tensors) == 21
    assert is_model_file(p) and is_model_file(fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert not is_model_file(txt)
