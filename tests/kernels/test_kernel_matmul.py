"""Numba dequantization and generic mat-vec / mat-mat kernels vs kernels/reference.py, for every weight type,
on llama.cpp-made blocks from the fixtures: odd row counts, read-only and writable inputs."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from airobackend.kernels import dequant, reference
from airobackend.kernels.matmul import prepare
from airobackend.quant import BLOCK, GGMLType

TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# fixture file holding a 2-D tensor of each type (the types llama-quantize gives each tensor in that mix)
SOURCE = {"F32": "fx-f32", "F16": "fx-f16", "Q4_0": "fx-q4_0", "Q4_1": "fx-q4_1", "Q5_0": "fx-q5_0",
          "Q5_1": "fx-q5_1", "Q8_0": "fx-q8_0", "Q2_K": "fx-q2_K", "Q3_K": "fx-q3_K_S", "Q4_K": "fx-q4_K_S",
          "Q5_K": "fx-q5_K_S", "Q6_K": "fx-q6_K"}


@pytest.fixture(scope="module")
def blocks(fixtures_dir):
    """type name -> (uint8 [n_rows, row_bytes] read-only raw rows, n_cols) taken from a real weight matrix."""
    from airobackend.formats import open_model
    out = {}
    for tname in TYPES:
        with open_model(fixtures_dir / "models" / f"{SOURCE[tname]}.gguf") as mf:
            info = next(t for t in mf.tensors.values() if t.type == GGMLType[tname] and len(t.ne) == 2)
            n_cols, n_rows = int(info.ne[0]), int(info.ne[1])
            raw = np.array(dequant.as_rows(info.data, info.type, n_rows, n_cols))   # own the bytes past close()
            raw.setflags(write=False)
            out[tname] = (raw, n_cols)
    return out


def _ref_rows(raw: np.ndarray, tname: str, n_cols: int) -> np.ndarray:
    return reference.dequantize(raw, GGMLType[tname], raw.shape[0] * n_cols).reshape(raw.shape[0], n_cols)


@pytest.mark.parametrize("tname", TYPES)
def test_dequantize_matches_reference(blocks, tname):
    raw, n_cols = blocks[tname]
    ours = dequant.dequantize(raw, GGMLType[tname], raw.shape[0], n_cols)
    np.testing.assert_array_equal(ours, _ref_rows(raw, tname, n_cols), err_msg=tname)


@pytest.mark.parametrize("tname", TYPES)
def test_dequant_rows_embedding_lookup(blocks, tname):
    raw, n_cols = blocks[tname]
    ids = np.array([raw.shape[0] - 1, 0, 5, 5, 3], np.int64)
    out = np.empty((len(ids), n_cols), np.float32)
    dequant.dequant_rows(raw, dequant.TypeId(GGMLType[tname]), ids, out, dequant.f16_table())
    np.testing.assert_array_equal(out, _ref_rows(raw, tname, n_cols)[ids], err_msg=tname)


@pytest.mark.parametrize("n_rows", [1, 7, 37, 255])
@pytest.mark.parametrize("tname", TYPES)
def test_matvec_and_matmat(blocks, tname, n_rows):
    raw_all, n_cols = blocks[tname]
    raw = raw_all[-n_rows:]                                  # odd counts, not starting at row 0
    assert not raw.flags.writeable
    w = _ref_rows(raw, tname, n_cols).astype(np.float64)
    rng = np.random.default_rng(n_rows)
    x = rng.standard_normal((5, n_cols)).astype(np.float32)
    info = SimpleNamespace(name=f"{tname}x{n_rows}", type=GGMLType[tname], ne=(n_cols, n_rows), data=raw)
    weight = prepare(info, kernels="generic")
    assert weight.kernel_name == "generic" and (weight.n_rows, weight.n_cols) == (n_rows, n_cols)
    expect = x.astype(np.float64) @ w.T                      # [5, n_rows]
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T + 1e-30
    for n_tok in (1, 2, 5):                                  # matvec for one token, matmat for more
        got = weight(x[:n_tok])
        assert got.shape == (n_tok, n_rows) and got.dtype == np.float32
        rel = np.abs(got - expect[:n_tok]) / scale[:n_tok]
        assert rel.max() < 1e-5, f"{tname} rows={n_rows} n_tok={n_tok}: rel err {rel.max():.1e}"
    # writable, freshly allocated input gives identical results
    info.data = raw.copy()
    np.testing.assert_array_equal(prepare(info, kernels="generic")(x[:1]), weight(x[:1]))


def test_prepare_rejects_bad_tensors():
    from airobackend.kernels.ggml_types import UnsupportedType
    bad_len = SimpleNamespace(name="w", type=GGMLType.Q4_0, ne=(48, 2), data=np.zeros(64, np.uint8))
    with pytest.raises(UnsupportedType):
        prepare(bad_len, kernels="generic")
    act_only = SimpleNamespace(name="w", type=GGMLType.Q8_K, ne=(256, 1), data=np.zeros(292, np.uint8))
    with pytest.raises(UnsupportedType):
        prepare(act_only, kernels="generic")
    with pytest.raises(ValueError):
        prepare(SimpleNamespace(name="w", type=GGMLType.F32, ne=(4, 1), data=np.zeros(16, np.uint8)), kernels="x")


def test_f16_table_is_ieee_half():
    tab = dequant.f16_table()
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ok = ~np.isnan(tab)
    np.testing.assert_array_equal(tab[ok], bits.view(np.float16).astype(np.float32)[ok])
    assert np.isnan(bits.view(np.float16)[~ok]).all() and BLOCK[GGMLType.F16] == (1, 2)
