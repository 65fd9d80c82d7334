"""GGML tensor types and their block geometry (the kernels' table, `airobackend.kernels.ggml_types`, re-exported for
the core), and llama.cpp's file-type (mix) names, which only the application needs.
"""
from __future__ import annotations

from .kernels.ggml_types import BLOCK, QK_K, WEIGHT_TYPES, GGMLType, tensor_nbytes

__all__ = ["GGMLType", "QK_K", "BLOCK", "WEIGHT_TYPES", "FTYPE_NAMES", "tensor_nbytes", "ftype_name", "mix_ftype"]

# llama_ftype -> the mix name users know from the file names ("q4_K_M").
FTYPE_NAMES: dict[int, str] = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 4: "q4_1_some_f16", 7: "q8_0", 8: "q5_0", 9: "q5_1",
    10: "q2_K", 11: "q3_K_S", 12: "q3_K_M", 13: "q3_K_L", 14: "q4_K_S", 15: "q4_K_M",
    16: "q5_K_S", 17: "q5_K_M", 18: "q6_K",
}


def ftype_name(ftype: int) -> str:
    """The mix name for a llama_ftype number, e.g. 15 -> 'q4_K_M' (or 'unknown(N)')."""
    return FTYPE_NAMES.get(int(ftype) % 1000, f"unknown({ftype})")


def mix_ftype(mix: str) -> int:
    """The llama_ftype number of a mix name, e.g. 'q4_K_M' -> 15 (inverse of ftype_name)."""
    for k, v in FTYPE_NAMES.items():
        if v == mix:
            return k
    raise ValueError(f"unknown mix {mix!r} (one of {', '.join(FTYPE_NAMES.values())})")
