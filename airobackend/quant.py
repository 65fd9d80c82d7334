"""GGML tensor types, their block geometry, and llama.cpp's file-type (mix) names.

The ids are ggml's and are the same in GGML v3 and GGUF files.
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

# llama_ftype -> the mix name users know from the file names ("q4_K_M").
FTYPE_NAMES: dict[int, str] = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 4: "q4_1_some_f16", 7: "q8_0", 8: "q5_0", 9: "q5_1",
    10: "q2_K", 11: "q3_K_S", 12: "q3_K_M", 13: "q3_K_L", 14: "q4_K_S", 15: "q4_K_M",
    16: "q5_K_S", 17: "q5_K_M", 18: "q6_K",
}


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    """Bytes taken by `n_elements` weights of `ggml_type` (n_elements must be a whole number of blocks)."""
    per_block, nbytes = BLOCK[ggml_type]
    return (n_elements // per_block) * nbytes


def ftype_name(ftype: int) -> str:
    """The mix name for a llama_ftype number, e.g. 15 -> 'q4_K_M' (or 'unknown(N)')."""
    return FTYPE_NAMES.get(int(ftype) % 1000, f"unknown({ftype})")


def mix_ftype(mix: str) -> int:
    """The llama_ftype number of a mix name, e.g. 'q4_K_M' -> 15 (inverse of ftype_name)."""
    for k, v in FTYPE_NAMES.items():
        if v == mix:
            return k
    raise ValueError(f"unknown mix {mix!r} (one of {', '.join(FTYPE_NAMES.values())})")
