"""GGML tensor types: their ids, their block geometry, and the error for a type the kernels cannot compute with.

The kernels need this table and so does the rest of the application (file readers, writer, quantizers); it lives
here so that the kernels depend on nothing outside this package, and `airobackend.quant` re-exports it for the core.
The ids are ggml's and are the same in GGML v3 and GGUF files (llama.cpp `ggml.h`, `enum ggml_type`, at dadbed9).
"""
from __future__ import annotations

import enum


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15


QK_K = 256

# type -> (weights per block, bytes per block)
BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
}

# Types a model file may carry as weights (Q8_1 / Q8_K exist only as activation formats).
WEIGHT_TYPES = frozenset(BLOCK) - {GGMLType.Q8_1, GGMLType.Q8_K}


class UnsupportedType(ValueError):
    """A tensor type, shape or size the kernels cannot compute with (named in the message, with the tensor if known).

    The application's `airobackend.errors.UnsupportedTensorType` derives from it; the model loader turns this one
    into that, adding the file's path."""

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        super().__init__(f"{message} (tensor {tensor!r})" if tensor is not None else message)
        self.reason, self.tensor = message, tensor


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    """Bytes taken by `n_elements` weights of `ggml_type` (n_elements must be a whole number of blocks)."""
    per_block, nbytes = BLOCK[ggml_type]
    return (n_elements // per_block) * nbytes
