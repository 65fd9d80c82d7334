"""RoPE for a context longer than the model was trained on: the trained length, and KoboldCpp's automatic scaling.

GGML files do not store the context they were trained with: the reader takes 2048 for LLaMA-1 shaped files (all
Airoboros 65B files among them) and 4096 for the LLaMA-2 70B shape, the one grouped-query LLaMA of the GGML era.
GGUF files store it.

When the context asked for exceeds the trained one and the user gave no RoPE values, KoboldCpp raises the RoPE
frequency base by its "NTK-aware" rule, CalcGradientAIRopeFreqBase in gpttype_adapter.cpp (KoboldCpp v1.76,
2da346a5): with chi(n) = n / 2 pi,

    base' = base ^ (log10 chi(n_ctx) / log10 chi(n_ctx_train))          (only when n_ctx > n_ctx_train and > 2048)

computed in float32 (powf/log10f) from base 10000 and 2048 for pre-GGUF files, and from the file's values for a GGUF
whose base is 10000 or 500000 with no linear or YaRN scaling of its own (such a file keeps its own values). For 4096
on a LLaMA-1 file that gives 30138.9 (KoboldCpp prints "base:30138.9").
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

log = logging.getLogger("airobackend.rope")


@dataclass(frozen=True)
class RopeChoice:
    """The RoPE values a model runs with, and why."""

    n_ctx: int
    n_ctx_train: int
    rope_freq_base: float
    rope_freq_scale: float
    source: str            # 'file' | 'user' | 'auto' (KoboldCpp's NTK-aware base)

    def to_dict(self) -> dict:
        return asdict(self)


def trained_context(mf: Any) -> int:
    """The context the model was trained with (GGUF's value, or what the GGML reader takes for the shape)."""
    return int(mf.hparams.n_ctx_train)


def ntk_rope_base(base: float, n_ctx_train: int, n_ctx: int) -> float:
    """KoboldCpp's CalcGradientAIRopeFreqBase (float32 arithmetic, as its powf/log10f), non-Solar models."""
    if n_ctx <= n_ctx_train or n_ctx <= 2048:
        return float(base)
    f = np.float32
    chi_train = f(n_ctx_train) / f(6.28318)
    chi = f(n_ctx) / f(6.28318)
    return float(np.power(f(base), f(np.log10(chi)) / f(np.log10(chi_train)), dtype=np.float32))


def choose_rope(mf: Any, n_ctx: int, user_base: Optional[float] = None,
                user_scale: Optional[float] = None) -> RopeChoice:
    """The RoPE values for running `mf` with an `n_ctx` context (see the module docstring). The file's hparams
    already hold any user override."""
    hp = mf.hparams
    train = trained_context(mf)
    base, scale = float(hp.rope_freq_base), float(hp.rope_freq_scale or 1.0)
    if user_base is not None or user_scale is not None:
        return RopeChoice(n_ctx, train, base, scale, "user")
    if n_ctx <= train:
        return RopeChoice(n_ctx, train, base, scale, "file")
    if getattr(mf, "format", "") == "gguf":
        stype = (getattr(mf, "metadata", None) or {}).get("llama.rope.scaling.type")
        if base not in (10000.0, 500000.0) or scale != 1.0 or stype in (b"yarn", "yarn"):
            return RopeChoice(n_ctx, train, base, scale, "file")      # the model's own scaling wins
        auto = ntk_rope_base(base, train, n_ctx)
    else:
        auto = ntk_rope_base(10000.0, 2048, n_ctx)          # KoboldCpp: pre-GGUF files always from 10000 / 2048
    return RopeChoice(n_ctx, train, auto, 1.0, "auto" if auto != base else "file")


def apply_rope(mf: Any, n_ctx: int, user_base: Optional[float] = None, user_scale: Optional[float] = None,
               level: int = logging.INFO) -> RopeChoice:
    """choose_rope, written into mf.hparams (what the forward pass reads), and logged."""
    choice = choose_rope(mf, n_ctx, user_base, user_scale)
    mf.hparams.rope_freq_base, mf.hparams.rope_freq_scale = choice.rope_freq_base, choice.rope_freq_scale
    if choice.source == "auto":
        log.log(level, "context %d exceeds the trained %d: automatic RoPE scaling (KoboldCpp's NTK-aware rule), "
                "rope_freq_base %.1f, rope_freq_scale %g", n_ctx, choice.n_ctx_train, choice.rope_freq_base,
                choice.rope_freq_scale)
    elif n_ctx > choice.n_ctx_train:
        log.log(level, "context %d exceeds the trained %d; RoPE from the %s: base %.1f, scale %g", n_ctx,
                choice.n_ctx_train, choice.source, choice.rope_freq_base, choice.rope_freq_scale)
    return choice
