"""kernels/reference.py dequantizers vs gguf-py's independent numpy dequantizers, on llama.cpp-made tensors."""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.kernels.ggml_types import UnsupportedType
from airobackend.kernels import reference
from airobackend.quant import GGMLType

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

# One file per mix covers every weight type (q2_K holds Q2_K/Q3_K/Q4_K/Q6_K, q3_K_L adds Q5_K, ...).
FILES = ["fx-f32", "fx-f16", "fx-q4_0", "fx-q4_1", "fx-q5_0", "fx-q5_1", "fx-q8_0", "fx-q2_K", "fx-q3_K_L",
         "fx-q4_K_M", "fx-q5_K_M", "fx-q6_K"]


@pytest.mark.parametrize("name", FILES)
def test_dequantize_matches_gguf_py(fixtures_dir, name):
    reader = gguf.GGUFReader(fixtures_dir / "models" / f"{name}.gguf")
    for t in reader.tensors:
        raw = np.asarray(t.data)
        ours = reference.dequantize(raw.view(np.uint8), int(t.tensor_type), int(t.n_elements))
        theirs = gguf_dequantize(raw, t.tensor_type).reshape(-1).astype(np.float32)
        assert ours.dtype == np.float32 and ours.shape == (int(t.n_elements),)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} {t.name} {t.tensor_type.name}")


def test_all_weight_types_covered(fixtures_dir):
    seen = set()
    for name in FILES:
        seen |= {int(t.tensor_type) for t in gguf.GGUFReader(fixtures_dir / "models" / f"{name}.gguf").tensors}
    expected = {GGMLType[n] for n in "F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()}
    assert expected <= seen


def test_dequantize_rejects_bad_input():
    with pytest.raises(UnsupportedType):
        reference.dequantize(np.zeros(18, np.uint8), GGMLType.Q4_0, 33)       # not a whole block
    with pytest.raises(UnsupportedType):
        reference.dequantize(np.zeros(17, np.uint8), GGMLType.Q4_0, 32)       # truncated
    with pytest.raises(UnsupportedType):
        reference.dequantize(np.zeros(292, np.uint8), GGMLType.Q8_K, 256)     # activation-only type
