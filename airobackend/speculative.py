"""Speculative decoding: cheap guesses of the next tokens, which the model checks in one batched pass.

A *drafter* proposes the tokens that may come next; the engine (airobackend.engine) evaluates the last sampled token
and the drafted ones in one forward pass over the batch (the prompt's mat-mat path, which reads each weight once for
all of them) and keeps the logits of every position. The sampler then draws each next token from those logits as it
would without speculation; while the drawn token equals the drafted one, the logits after it are already computed
and no further pass is needed. At the first token that differs, the drafted entries after it are cut from the KV
cache (`KVCache.truncate`) and decoding goes on from the token actually drawn.

Drafts here are deterministic (the draft model's best token, or tokens copied from the context), so this is the
standard speculative-sampling rule for a draft distribution that puts all its mass on the drafted token d: d is
accepted with probability min(1, p(d) / 1) = p(d), and on rejection the token comes from the residual max(0, p - q)
normalised, which is p without d. Drawing x from p and accepting when x == d is that rule; every token therefore
follows the model's own distribution (with every sampler, grammar and penalty applied as usual), and for greedy
decoding the output is the plain output token for token. For the quantized weight types the batched pass gives
logits bit-identical to one-token passes (integer dot products, per-row activation scales), so even sampled output
with a fixed seed is unchanged; for F16 weights the two paths sum in different orders (differences ~1e-4).

Drafting is only worth it while a verifying pass yields more tokens per second than one-token passes do, and that
depends on the CPU (what a pass of a few tokens costs against one: where the AVX-512 VNNI kernels are bound by
arithmetic, 4 tokens cost ~2.1-2.5 one-token passes, 8 cost ~4-4.5) and on the text (how many drafts are accepted). `Governor` measures both as the engine runs and
pauses drafting while it loses, trying again every few tokens, so free text costs little more than plain decoding.

Two drafters, with llama-cpp-python's `LlamaDraftModel` interface (`drafter(input_ids) -> np.ndarray` of token ids,
so `Llama(..., draft_model=...)` takes either kind, or an object of llama-cpp-python's own):
  * `DraftModel`: a smaller model with the same vocabulary (llama.cpp `-md` / `--model-draft`, KoboldCpp
    `--draftmodel`); it drafts greedily, one token at a time on its own KV cache, and stops early when its best
    token's probability falls below `p_min` (llama.cpp common/speculative.cpp, c392e50: p_min 0.75).
  * `PromptLookup`: no second model; the last `ngram` tokens of the context are looked up earlier in the context and
    the tokens that followed their most recent occurrence are the draft (prompt lookup decoding, llama.cpp's lookup
    example without its n-gram cache files). It pays off when the answer copies the prompt (rewrites, code edits,
    extraction).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from airobackend.errors import ModelFileError

log = logging.getLogger("airobackend.speculative")

# llama.cpp common/speculative.cpp (c392e50): vocabularies may differ in size by this much (fine-tunes add a pad or
# chat tokens at the end), and tokens from this id on must have the same text.
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


def check_vocab(target: Any, draft: Any, draft_path: Optional[str] = None) -> None:
    """Raise ModelFileError unless the draft tokenizer can stand in for the target's (llama.cpp's
    common_speculative_are_compatible: same BOS/EOS, sizes within 128, the same text for every shared id from 5 on)."""
    where = dict(path=draft_path)
    if (target.bos_id, target.eos_id) != (draft.bos_id, draft.eos_id):
        raise ModelFileError(f"the draft model's BOS/EOS ({draft.bos_id}/{draft.eos_id}) differ from the model's "
                             f"({target.bos_id}/{target.eos_id}); speculative decoding needs the same vocabulary",
                             **where)
    diff = abs(int(target.n_vocab) - int(draft.n_vocab))
    if diff > VOCAB_MAX_SIZE_DIFFERENCE:
        raise ModelFileError(f"the draft model's vocabulary has {draft.n_vocab} tokens, the model's {target.n_vocab} "
                             f"(they may differ by at most {VOCAB_MAX_SIZE_DIFFERENCE}); speculative decoding needs "
                             f"the same vocabulary", **where)
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(target.n_vocab, draft.n_vocab)):
        if target.texts[i] != draft.texts[i]:
            raise ModelFileError(f"token {i} is {draft.texts[i]!r} in the draft model but {target.texts[i]!r} in the "
                                 f"model; speculative decoding needs the same vocabulary", **where)


class Governor:
    """Decides, from measured times, whether the next token should come with a draft, and how long the draft may be.

    The engine reports each one-token pass (`plain(seconds)`) and each verifying pass once its drafts are settled
    (`verified(seconds, tokens, drafted)`: the pass's time, drafting included, the tokens it yielded = 1 + drafts
    accepted, and how many were drafted). Both rates are exponential moving averages. While verifying passes yield
    fewer tokens per second than one-token passes, `allow()` says no for the next `probe` tokens, then lets one
    verifying pass through to measure again. The plain rate is kept across requests (it is the machine's); the
    verifying rate starts afresh with each request (`restart()`), since acceptance depends on the text.

    The draft length (`length`, a cap on what the drafter proposes) follows acceptance as in Hugging Face
    transformers' "heuristic" schedule for assisted generation (generation/candidate_generator.py, v4.46): two more
    after a pass whose drafts were all accepted, one fewer otherwise (here: at most one more than were accepted), so
    a text that copies its context earns long drafts while free text only risks short, cheap ones. It restarts at
    `start` with each request.

    Args:
        alpha: weight of the newest measurement in the averages.
        probe: tokens decoded without drafts after a losing measurement (0: never pause).
        start: the draft length a request begins with; None: no cap, the drafter's own length every time.
    """

    def __init__(self, alpha: float = 0.3, probe: int = 8, start: Optional[int] = 3) -> None:
        self.alpha, self.probe = float(alpha), int(probe)
        self.start = None if start is None else max(1, int(start))
        self.plain_s: Optional[float] = None        # seconds per one-token pass
        self.spec_tps: Optional[float] = None       # tokens per second of verifying passes
        self.wait = 0
        self.length: Optional[int] = self.start     # the most tokens the next draft may hold (None: no cap)

    @classmethod
    def always(cls) -> "Governor":
        """A governor that drafts for every token, at the drafter's full length (measuring the machinery itself)."""
        return cls(probe=0, start=None)

    def restart(self) -> None:
        self.spec_tps, self.wait, self.length = None, 0, self.start

    def plain(self, seconds: float) -> None:
        a = self.alpha
        self.plain_s = seconds if self.plain_s is None else (1 - a) * self.plain_s + a * seconds

    def verified(self, seconds: float, tokens: int, drafted: Optional[int] = None) -> None:
        a, tps = self.alpha, tokens / max(seconds, 1e-9)
        self.spec_tps = tps if self.spec_tps is None else (1 - a) * self.spec_tps + a * tps
        if self.plain_s is not None and self.spec_tps * self.plain_s < 1.0:
            self.wait = self.probe
        if self.length is not None and drafted:
            accepted = tokens - 1
            self.length = self.length + 2 if accepted >= drafted else max(1, min(self.length - 1, accepted + 1))

    def allow(self) -> bool:
        """Whether to draft for the next token (counts down a pause)."""
        if self.plain_s is None:                # measure one plain pass first: the yardstick
            return False
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def cap(self, n: int) -> int:
        """The most tokens the next draft may hold, given that `n` fit."""
        return n if self.length is None else min(n, self.length)


def _limit(num_pred_tokens: int, kwargs: dict) -> int:
    """A drafter's length for this call: its own, or less when the caller passes `num_pred_tokens`."""
    asked = kwargs.get("num_pred_tokens")
    return num_pred_tokens if asked is None else max(0, min(num_pred_tokens, int(asked)))


class PromptLookup:
    """Draft by copying from the context: after the most recent earlier occurrence of the context's last `ngram`
    tokens, the `num_pred_tokens` tokens that followed it.

    Args:
        ngram: how many final tokens must match (2-4 are typical; 1 drafts after any repeated token).
        num_pred_tokens: the most tokens one draft holds.
    """

    def __init__(self, ngram: int = 3, num_pred_tokens: int = 8) -> None:
        if int(ngram) < 1 or int(num_pred_tokens) < 1:
            raise ValueError(f"prompt lookup needs ngram >= 1 and num_pred_tokens >= 1, not {ngram}, {num_pred_tokens}")
        self.ngram, self.num_pred_tokens = int(ngram), int(num_pred_tokens)

    def __call__(self, input_ids: Any, /, **kwargs: Any) -> np.ndarray:
        h = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        g, n = self.ngram, h.shape[0]
        if n <= g:
            return np.zeros(0, dtype=np.intc)
        tail = h[n - g:]
        # candidate starts: the first token matches, the whole n-gram fits before the context's own tail
        starts = np.flatnonzero(h[:n - g] == tail[0])
        for k in range(1, g):
            starts = starts[h[starts + k] == tail[k]]
        if starts.size == 0:
            return np.zeros(0, dtype=np.intc)
        s = int(starts[-1]) + g                     # the most recent occurrence: what the text last did there
        return h[s:s + _limit(self.num_pred_tokens, kwargs)].astype(np.intc)

    def __repr__(self) -> str:
        return f"PromptLookup(ngram={self.ngram}, num_pred_tokens={self.num_pred_tokens})"


class DraftModel:
    """A smaller model of the same vocabulary that drafts greedily (see the module docstring).

    Args:
        model_path: the draft model's file (GGUF or GGML).
        num_pred_tokens: the most tokens one draft holds.
        p_min: stop a draft after a token whose probability under the draft model is below this.
        n_ctx, n_threads, n_batch, kernels: as for `Llama`; n_ctx should be the target's.
    """

    def __init__(self, model_path: str, num_pred_tokens: int = 8, p_min: float = 0.75, *, n_ctx: int = 2048,
                 n_threads: Optional[int] = None, n_batch: int = 512, kernels: Optional[str] = None,
                 **kwargs: Any) -> None:
        from airobackend.llama import Llama     # here: llama imports this module (a cycle at the top)

        if int(num_pred_tokens) < 1 or not 0.0 <= float(p_min) <= 1.0:
            raise ValueError(f"a draft model needs num_pred_tokens >= 1 and p_min in 0..1, not {num_pred_tokens}, "
                             f"{p_min}")
        self.num_pred_tokens, self.p_min = int(num_pred_tokens), float(p_min)
        self.llama = Llama(model_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, kernels=kernels,
                           verbose=False, **kwargs)
        self.model_path = str(model_path)
        self.model = self.llama.model
        self._cache: list[int] = []                 # tokens whose K/V are in the draft model's cache

    @property
    def tokenizer(self) -> Any:
        return self.llama.tokenizer

    def check_vocab(self, target_tokenizer: Any) -> None:
        check_vocab(target_tokenizer, self.tokenizer, self.model_path)

    def __call__(self, input_ids: Any, /, **kwargs: Any) -> np.ndarray:
        ids = [int(t) for t in np.asarray(input_ids).reshape(-1)]
        m = self.model
        room = m.n_ctx - len(ids)
        if not ids or room < 1:
            return np.zeros(0, dtype=np.intc)
        # Keep the cached prefix, evaluate the rest of the context (usually the one token sampled since last time).
        n = 0
        limit = min(len(self._cache), len(ids) - 1)
        while n < limit and self._cache[n] == ids[n]:
            n += 1
        del self._cache[n:]
        logits = m.eval(np.asarray(ids[n:], dtype=np.int32), n)[-1]
        self._cache.extend(ids[n:])
        out: list[int] = []
        most = min(_limit(self.num_pred_tokens, kwargs), room)
        for _ in range(most):
            x = logits.astype(np.float64)
            t = int(np.argmax(x))
            if t >= m.n_vocab:
                break
            out.append(t)
            if len(out) == most:
                break
            e = np.exp(x - x[t])
            if 1.0 / e.sum() < self.p_min:          # the draft model is unsure: more would mostly be rejected
                break
            logits = m.eval(np.asarray([t], dtype=np.int32), len(self._cache))[-1]
            self._cache.append(t)
        return np.asarray(out, dtype=np.intc)

    def warmup(self, report: Any = None) -> float:
        """Compile (or load) the draft model's kernels now (Llama.warmup); returns the seconds it took."""
        self._cache = []
        return self.llama.warmup(report)

    def close(self) -> None:
        self.llama.close()

    def __repr__(self) -> str:
        return f"DraftModel({self.model_path!r}, num_pred_tokens={self.num_pred_tokens}, p_min={self.p_min})"

