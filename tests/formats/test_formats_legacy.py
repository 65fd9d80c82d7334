"""Pre-v3 GGML generations ('ggml', 'ggmf' v1, 'ggjt' v1/v2) made by the llama.cpp trees of their time
(../shared/fixtures/legacy): read, converted to the v3 block layouts, and checked against the f32 weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from airobackend.errors import ModelFileError, UnsupportedTensorType
from airobackend.formats import open_model
from airobackend.quant import GGMLType

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402


@pytest.fixture(scope="module")
def legacy(fixtures_dir):
    d = fixtures_dir / "legacy"
    if not (d / "models").is_dir():
        pytest.skip("legacy fixtures absent")
    return d, json.loads((d / "reference" / "index.json").read_text())


@pytest.fixture(scope="module")
def f32_weights(fixtures_dir):
    mf = open_model(fixtures_dir / "models" / "fx-f32.gguf")
    return {n: np.asarray(t.data).view(np.float32).reshape(t.shape) for n, t in mf.tensors.items()}


def _deq(t):
    return dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.type))).reshape(t.shape)


# (file, format, version, ftype, largest relative RMS error of a tensor vs the f32 weights; README: Q4_x <= 0.098,
#  Q5_x <= 0.043, Q8_0 0.005, "a wrong element order gives about 1.4")
CASES = [
    ("fx-f16.ggml.bin", "ggml", 0, 1, 1e-3),
    ("fx-q4_0.ggmf.bin", "ggmf", 1, 2, 0.099),
    ("fx-q4_0.ggjt1.bin", "ggjt", 1, 2, 0.099),
    ("fx-q4_1.ggjt1.bin", "ggjt", 1, 3, 0.099),
    ("fx-q5_0.ggjt1.bin", "ggjt", 1, 8, 0.044),
    ("fx-q8_0.ggjt1.bin", "ggjt", 1, 7, 0.006),
    ("fx-q4_0.ggjt2.bin", "ggjt", 2, 2, 0.099),
    ("fx-q5_0.ggjt2.bin", "ggjt", 2, 8, 0.044),
]


@pytest.mark.parametrize("name,fmt,version,ftype,tol", CASES)
def test_legacy_file_reads_close_to_the_f32_weights(legacy, f32_weights, name, fmt, version, ftype, tol):
    d, index = legacy
    entry = next(m for m in index["models"] if m["file"] and m["file"].endswith(name))
    with open_model(d / "models" / name) as mf:
        assert (mf.format, mf.version, mf.ftype) == (fmt, version, ftype)
        assert mf.hparams.rms_norm_eps == 1e-6          # hard-coded in every pre-v3 tree
        assert mf.hparams.n_ff == 768 and mf.hparams.n_gqa == 1
        assert len(mf.tensors) == len(entry["tensors"])
        for te in entry["tensors"]:
            t = next(x for x in mf.tensors.values() if x.legacy_name == te["name"])
            assert t.ne == tuple(te["ne"]) and t.offset == te["offset"], te["name"]
            w = f32_weights[t.name]
            err = np.sqrt(np.mean((_deq(t) - w) ** 2) / np.mean(w ** 2))
            assert err <= tol, (name, t.name, err)
            if t.type not in (GGMLType.F32, GGMLType.F16) and (fmt != "ggjt" or version < 3):
                conv = t.type in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0) or version < 2
                assert (t.converted_from is not None) == conv


def test_q5_0_pairs_and_halves_give_identical_blocks(legacy):
    d, _ = legacy
    a, b = open_model(d / "models" / "fx-q5_0.ggjt1.bin"), open_model(d / "models" / "fx-q5_0.ggjt2.bin")
    for n, t in a.tensors.items():
        assert np.array_equal(t.data, b.tensors[n].data), n


def test_q4_0_v1_and_v2_quantizers_differ_only_slightly(legacy):
    d, _ = legacy
    a, b = open_model(d / "models" / "fx-q4_0.ggjt1.bin"), open_model(d / "models" / "fx-q4_0.ggjt2.bin")
    worst = max(np.abs(_deq(t) - _deq(b.tensors[n])).max() for n, t in a.tensors.items())
    assert 0 < worst <= 0.0098 + 1e-3            # README: max difference 0.0098 (+ f16 rounding of the scales)


def test_conversion_is_lazy_and_cached(legacy):
    d, _ = legacy
    mf = open_model(d / "models" / "fx-q4_0.ggjt1.bin")
    t = mf.tensors["token_embd.weight"]
    assert t._data is None                        # nothing converted at open
    assert t.data is t.data and not t.data.flags.writeable
    assert t.nbytes == 1024 * 256 // 32 * 18      # v3 size, not the 20-byte file blocks


def test_q4_2_is_refused_with_the_reason(legacy):
    d, _ = legacy
    with pytest.raises(UnsupportedTensorType, match=r"Q4_2.*re-quantize") as e:
        open_model(d / "models" / "fx-q4_2.ggjt1.bin")
    assert "fx-q4_2.ggjt1.bin" in str(e.value) and "tok_embeddings.weight" in str(e.value)
    assert isinstance(e.value, ModelFileError)


def test_ggjt_v2_q8_0_and_q4_1(legacy, tmp_path):
    """Not shipped, but described by the README: 'ggjt' v2 Q8_0 is byte-identical to v1 except the version field;
    v2 Q4_1 is v1's blocks with the nibbles in halves order (f32 scales kept)."""
    d, _ = legacy
    raw = bytearray((d / "models" / "fx-q8_0.ggjt1.bin").read_bytes())
    raw[4] = 2
    (tmp_path / "q8.ggjt2.bin").write_bytes(raw)
    a, b = open_model(d / "models" / "fx-q8_0.ggjt1.bin"), open_model(tmp_path / "q8.ggjt2.bin")
    assert b.version == 2 and all(np.array_equal(t.data, b.tensors[n].data) for n, t in a.tensors.items())

    v1 = open_model(d / "models" / "fx-q4_1.ggjt1.bin")
    raw = bytearray((d / "models" / "fx-q4_1.ggjt1.bin").read_bytes())
    raw[4] = 2
    for t in v1.tensors.values():
        if t.type != GGMLType.Q4_1:
            continue
        blocks = np.frombuffer(raw, np.uint8, count=t.n_elements // 32 * 24, offset=t.offset).reshape(-1, 24)
        e = np.empty((blocks.shape[0], 32), np.uint8)
        e[:, 0::2], e[:, 1::2] = blocks[:, 8:] & 15, blocks[:, 8:] >> 4          # pairs -> element order
        halves = e[:, :16] | (e[:, 16:] << 4)
        raw[t.offset:t.offset + blocks.size] = np.concatenate([blocks[:, :8], halves], axis=1).tobytes()
    (tmp_path / "q41.ggjt2.bin").write_bytes(raw)
    v2 = open_model(tmp_path / "q41.ggjt2.bin")
    assert v2.version == 2
    for n, t in v1.tensors.items():
        assert np.array_equal(t.data, v2.tensors[n].data), n


def test_unaligned_generations_hand_out_aligned_data(legacy):
    d, _ = legacy
    mf = open_model(d / "models" / "fx-f16.ggml.bin")
    unaligned = [t for t in mf.tensors.values() if t.offset % 32]     # 'ggml' files have no alignment padding
    assert len(unaligned) > 10
    for t in unaligned:
        assert t.data.ctypes.data % 16 == 0 and not t.data.flags.writeable
        assert t.data.view(np.float16 if t.type == GGMLType.F16 else np.float32).size == t.n_elements
