"""Llama: the llama-cpp-python-compatible facade over a model file, its tokenizer and the forward pass.

This file holds the constructor and the low-level API (`eval`, `scores`, `n_tokens`, `reset`, `tokenize`, ...).
The high-level generation API (`create_completion`, `__call__`, `create_chat_completion`) is added to the same
class by the generation code; it builds only on the names below.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from airobackend.errors import ContextOverflowError

log = logging.getLogger("airobackend.llama")


def default_n_threads() -> int:
    """Threads to use when none are given: every CPU this process may run on (capped by Numba's pool)."""
    import numba
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


class Llama:
    """Load a LLaMA model file (GGUF or GGML v1-v3) and evaluate tokens, with llama-cpp-python's names.

    Args:
        model_path: path of the .gguf / .bin file (or a split .zip).
        n_ctx: context length (KV cache size in tokens).
        n_threads: compute threads; None or 0 = all CPUs this process may use.
        n_batch: tokens per forward pass when evaluating a prompt.
        seed: RNG seed for sampling (-1 = random); kept as `self.seed` for the generation code.
        logits_all: keep the logits of every evaluated position in `scores` (else only the last one's row).
        n_gqa, rms_norm_eps, rope_freq_base, rope_freq_scale: overrides for what GGML v3 files cannot store
            (LLaMA-2 70B needs n_gqa=8); None = from the file, else llama.cpp's defaults.
        verbose: log loading details at INFO level (else DEBUG).
        kernels: 'auto' | 'generic' | 'fast' matmul kernels (None = AIRO_KERNELS or 'auto').
        **kwargs: other llama-cpp-python arguments (n_gpu_layers, use_mlock, ...) are accepted and ignored.
    """

    def __init__(self, model_path: str, n_ctx: int = 512, n_threads: Optional[int] = None, n_batch: int = 512,
                 seed: int = -1, logits_all: bool = False, n_gqa: Optional[int] = None,
                 rms_norm_eps: Optional[float] = None, rope_freq_base: Optional[float] = None,
                 rope_freq_scale: Optional[float] = None, verbose: bool = True, kernels: Optional[str] = None,
                 **kwargs: Any) -> None:
        from airobackend.formats import open_model
        from airobackend.model import LlamaModel

        level = logging.INFO if verbose else logging.DEBUG
        if kwargs:
            log.debug("ignoring llama-cpp-python arguments without meaning here: %s", sorted(kwargs))
        t0 = time.perf_counter()
        self.model_path = str(model_path)
        self.verbose = verbose
        self.seed = seed
        self.logits_all = bool(logits_all)
        self.n_batch = int(n_batch)
        self.n_threads = int(n_threads) if n_threads else default_n_threads()
        self.model_file = open_model(self.model_path, n_gqa=n_gqa, rms_norm_eps=rms_norm_eps,
                                     rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale)
        try:
            self.model = LlamaModel(self.model_file, n_ctx=n_ctx, n_threads=self.n_threads, n_batch=self.n_batch,
                                    kernels=kernels)
        except BaseException:
            self.model_file.close()
            raise
        self._tokenizer = None
        self.n_tokens = 0
        self.input_ids = np.zeros(self.model.n_ctx, dtype=np.intc)
        self.scores = np.zeros((self.model.n_ctx, self.model.n_vocab), dtype=np.single)
        log.log(level, "loaded %s (%s %s, %d layers, n_embd %d, n_head %d/%d kv) in %.2f s; n_ctx %d, %d threads",
                self.model_path, self.model_file.format, self.model_file.mix_name, self.model.n_layer,
                self.model.n_embd, self.model.n_head, self.model.n_head_kv, time.perf_counter() - t0,
                self.model.n_ctx, self.n_threads)

    # ---- low-level API ----

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate `tokens` after the `n_tokens` already in the context; fills `scores` and `input_ids`.

        Raises ContextOverflowError (nothing is evaluated) when they do not fit in n_ctx.
        """
        tokens = np.asarray(tokens, dtype=np.intc).reshape(-1)
        n = tokens.shape[0]
        if n == 0:
            return
        if self.n_tokens + n > self.model.n_ctx:
            raise ContextOverflowError(
                f"{self.n_tokens} tokens in the context + {n} new exceed n_ctx = {self.model.n_ctx}")
        logits = self.model.eval(tokens, self.n_tokens, logits_all=self.logits_all)
        self.input_ids[self.n_tokens:self.n_tokens + n] = tokens
        if self.logits_all:
            self.scores[self.n_tokens:self.n_tokens + n] = logits
        else:
            self.scores[self.n_tokens + n - 1] = logits[-1]
        self.n_tokens += n

    @property
    def _input_ids(self) -> np.ndarray:
        """The tokens in the context: input_ids[:n_tokens]."""
        return self.input_ids[:self.n_tokens]

    @property
    def _scores(self) -> np.ndarray:
        """The valid rows of scores: scores[:n_tokens] (all of them only with logits_all)."""
        return self.scores[:self.n_tokens]

    def reset(self) -> None:
        """Forget the context (the KV cache is simply overwritten by the next eval)."""
        self.n_tokens = 0

    def n_ctx(self) -> int:
        return self.model.n_ctx

    def n_vocab(self) -> int:
        return self.model.n_vocab

    def n_embd(self) -> int:
        return self.model.n_embd

    @property
    def tokenizer(self):
        """The model's tokenizer (airobackend.tokenizer.Tokenizer), built on first use."""
        if self._tokenizer is None:
            from airobackend.tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_model_file(self.model_file)
        return self._tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` (UTF-8 bytes), with BOS first when add_bos."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """The bytes of `tokens` (control tokens such as BOS give nothing)."""
        return self.tokenizer.decode(list(tokens))

    def token_bos(self) -> int:
        return int(self.model_file.hparams.bos_id)

    def token_eos(self) -> int:
        return int(self.model_file.hparams.eos_id)

    def close(self) -> None:
        """Release the model file (its mmap). The object is unusable afterwards."""
        mf = getattr(self, "model_file", None)
        if mf is not None:
            mf.close()

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
