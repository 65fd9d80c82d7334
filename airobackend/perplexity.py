"""Perplexity of a model on a text, computed as llama.cpp's `perplexity` tool does (examples/perplexity/perplexity.cpp
at c392e50, `perplexity()`), so that the figures can be compared with the ones people publish for their quantizations.

The text is tokenized once (BOS / EOS as the file asks; special tokens are text) and cut into ``len(tokens) // n_ctx``
chunks of n_ctx tokens (at most `n_chunks`). Each chunk is evaluated from an empty cache; when the vocabulary adds a
BOS token its first token is *replaced* by BOS. Only the second half is scored: the logits at positions
n_ctx/2 .. n_ctx-2 predict the tokens after them, so every prediction has at least n_ctx/2 tokens of context. After
each chunk the running perplexity exp(mean NLL) is reported; at the end the estimate and its uncertainty,
ppl * sqrt(var(NLL) / (count - 1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from airobackend.errors import RequestError


@dataclass
class ChunkResult:
    """The state after `chunk` (1-based) of `n_chunk` chunks."""

    chunk: int
    n_chunk: int
    ppl: float              # running perplexity over all scored tokens so far
    count: int              # tokens scored so far
    nll: float              # sum of -log p
    nll2: float             # sum of (-log p)^2

    @property
    def error(self) -> float:
        """The uncertainty llama.cpp prints after '+/-' (0 while undefined)."""
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else 0.0


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of `logits` [n, n_vocab] (float32 logits, float64 sums as llama.cpp)."""
    mx = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - mx).sum(axis=1, dtype=np.float64)
    picked = np.take_along_axis(logits, targets[:, None], axis=1)[:, 0].astype(np.float64)
    return picked - mx[:, 0].astype(np.float64) - np.log(sum_exp)


def chunk_count(n_tokens: int, n_ctx: int, n_chunks: int = -1) -> int:
    """How many chunks llama.cpp evaluates (raises RequestError when the text is shorter than two contexts)."""
    if n_ctx < 4:
        raise RequestError(f"perplexity needs a context of at least 4 tokens, not {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise RequestError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx}; "
                           f"the text tokenizes to only {n_tokens} tokens")
    n_max = n_tokens // n_ctx
    return n_max if n_chunks < 0 else min(n_chunks, n_max)


def perplexity(model: Any, tokens: Sequence[int], n_ctx: int, *, bos_id: int | None = None,
               n_chunks: int = -1) -> Iterator[ChunkResult]:
    """Evaluate `tokens` chunk by chunk with `model` (an airobackend.model.LlamaModel whose n_ctx >= `n_ctx`) and
    yield the running result after each chunk. `bos_id`: the BOS token that replaces each chunk's first token, or
    None when the vocabulary adds none (llama_vocab_get_add_bos)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_chunk = chunk_count(tokens.size, n_ctx, n_chunks)
    if model.n_ctx < n_ctx:
        raise RequestError(f"the model was loaded with n_ctx {model.n_ctx}, smaller than {n_ctx}")
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos_id is not None:
            chunk[0] = bos_id
        # The first half only fills the cache; logits are needed from position `first` on. Splitting the
        # evaluation there changes nothing: every row is computed (and its activations quantized) on its own.
        model.eval(chunk[:first], 0)
        logits = model.eval(chunk[first:n_ctx - 1], first, logits_all=True)          # predicts first+1 .. n_ctx-1
        nlp = -log_softmax_at(np.asarray(logits, np.float32), chunk[first + 1:])
        nll += float(nlp.sum())
        nll2 += float((nlp * nlp).sum())
        count += nlp.size
        yield ChunkResult(chunk=i + 1, n_chunk=n_chunk, ppl=math.exp(nll / count), count=count, nll=nll,
                          nll2=nll2)
