"""Token sampling with KoboldCpp's semantics (engine.md section 6.3; each filter is llama.cpp's `llama_sample_*`).

One `Sampler` per generation::

    sampler = Sampler(req.sampling, tokenizer=tok, n_vocab=model.n_vocab)   # validates; RequestError on bad values
    tid = sampler.sample(logits, history)       # history: every token in the context so far (prompt + generated)

`sample` also advances the grammar (if any) with the chosen token. `sampler.seed` is the seed actually used
(a random one when the request had none), `sampler.last_ids` / `sampler.last_probs` the final candidate
distribution of the last call (for n_probs / logprobs).

Order of work per token (KoboldCpp `SampleLogits`):

1. logit_bias is added; banned token ids, tokens matching banned strings and (with ban_eos) EOS are set to -inf.
2. The candidates are cut to the 5000 best logits (KoboldCpp's speed pre-filter; ties at a cut go to the lower id).
   Samplers that need the order sort them (best first, ties by lower id); top_k selects in O(n) first.
3. Mirostat 1/2 when enabled: repetition penalty -> temperature -> mirostat (sampler_order ignored, as KoboldCpp).
   Otherwise the samplers run in `sampler_order` (KoboldCpp ids): 0 top_k, 1 top_a, 2 top_p then min_p, 3 tfs,
   4 typical, 5 temperature (dynamic temperature when dynatemp_range > 0), 6 repetition penalty
   (+ presence/frequency penalties). A sampler whose value disables it does nothing; an id left out of the order is
   not applied. temperature <= 0 means greedy: only the best candidate survives the temperature step (or the end
   of the chain when 5 is not in the order).
4. A token is drawn from the survivors' softmax with a seeded PCG64 generator (same seed + same logits + same
   history = same token).
5. Grammar: the drawn candidate is checked against the grammar; a rejected one is removed and the draw repeated
   among the rest (that is the grammar-restricted distribution of the surviving candidates), so grammar work is only
   spent on candidates, as in llama.cpp's sampler. When no surviving candidate is allowed, the grammar's allowed set
   over the whole vocabulary is computed and the whole chain runs again on it. EOS is allowed only where the
   grammar may end.

Repetition penalty (KoboldCpp since 2024): the window is the last `repetition_penalty_range` tokens of `history`
(0 or -1: all of it). A candidate seen in the nearer half of the window is penalised by `repetition_penalty`, one
seen only in the farther half by `1 + (repetition_penalty - 1) * repetition_penalty_slope` (slope 1 = uniform):
logit * pen when logit <= 0, else logit / pen. Then `presence_penalty` is subtracted once from every seen candidate
and `frequency_penalty` times its count in the window (llama.cpp's rule).

Banned strings (KoboldCpp's original `banned_tokens`): every vocabulary token whose printed text contains one of the
strings, compared case-insensitively, can never be sampled. A phrase that spans several tokens is not prevented;
use stop strings for that.
"""
from __future__ import annotations

import math
import secrets
from typing import Any, Optional, Sequence

import numpy as np

from airobackend.errors import RequestError
from airobackend.types import SamplingParams

TOP_K, TOP_A, TOP_P, TFS, TYPICAL, TEMPERATURE, REP_PEN = range(7)
SAMPLER_NAMES = {TOP_K: "top_k", TOP_A: "top_a", TOP_P: "top_p", TFS: "tfs", TYPICAL: "typical",
                 TEMPERATURE: "temperature", REP_PEN: "rep_pen"}
PREFILTER_TOP_K = 5000            # KoboldCpp's hard pre-filter before the sampler chain
MIROSTAT_M = 100
GREEDY_TEMPERATURE = 1.0 / 256    # what KoboldCpp divides by before keeping the top candidate


def _finite(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise RequestError(f"{name} must be finite, got {v!r}")
    return f


def _in_range(name: str, v: Any, lo: float, hi: float) -> float:
    f = _finite(name, v)
    if not lo <= f <= hi:
        raise RequestError(f"{name} must be in [{lo}, {hi}], got {v!r}")
    return f


def _int(name: str, v: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise RequestError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        raise RequestError(f"{name} must be in [{lo}, {'inf' if hi is None else hi}], got {v}")
    return v


def validate_sampling(params: SamplingParams, n_vocab: Optional[int] = None) -> None:
    """Raise RequestError for NaN/inf, out-of-range values, unknown sampler ids, bad token ids or a bad grammar.

    Ranges: temperature finite (<= 0 greedy); top_k >= -1 (<= 0 off); top_p, min_p, typical_p, tfs in [0, 1];
    top_a in [0, 100]; repetition_penalty in (0, 100]; repetition_penalty_range >= -1; slope in [0, 100]; presence
    and frequency penalties in [-100, 100]; mirostat 0/1/2 with tau, eta >= 0; dynatemp_range, dynatemp_exponent >= 0;
    sampler_order: distinct ids 0..6; seed None or an integer (negative = random); logit_bias values finite in
    [-100, 100] or -inf; token ids in [0, n_vocab) when n_vocab is given.
    """
    p = params
    _finite("temperature", p.temperature)
    _int("top_k", p.top_k, -1)
    _in_range("top_p", p.top_p, 0.0, 1.0)
    _in_range("min_p", p.min_p, 0.0, 1.0)
    _in_range("typical_p", p.typical_p, 0.0, 1.0)
    _in_range("tfs", p.tfs, 0.0, 1.0)
    _in_range("top_a", p.top_a, 0.0, 100.0)
    if not 0.0 < _finite("repetition_penalty", p.repetition_penalty) <= 100.0:
        raise RequestError(f"repetition_penalty must be in (0, 100], got {p.repetition_penalty!r}")
    _int("repetition_penalty_range", p.repetition_penalty_range, -1)
    _in_range("repetition_penalty_slope", p.repetition_penalty_slope, 0.0, 100.0)
    _in_range("presence_penalty", p.presence_penalty, -100.0, 100.0)
    _in_range("frequency_penalty", p.frequency_penalty, -100.0, 100.0)
    _int("mirostat", p.mirostat, 0, 2)
    _in_range("mirostat_tau", p.mirostat_tau, 0.0, 1e6)
    _in_range("mirostat_eta", p.mirostat_eta, 0.0, 1e6)
    _in_range("dynatemp_range", p.dynatemp_range, 0.0, 1e6)
    _in_range("dynatemp_exponent", p.dynatemp_exponent, 0.0, 1e6)
    order = p.sampler_order
    if order is None or isinstance(order, (str, bytes)):
        raise RequestError(f"sampler_order must be a list of sampler ids, got {order!r}")
    seen = set()
    for s in order:
        sid = _int("sampler_order entry", s, 0, None)
        if sid not in SAMPLER_NAMES:
            raise RequestError(f"unknown sampler id {sid} in sampler_order (known: 0 top_k, 1 top_a, 2 top_p, "
                               f"3 tfs, 4 typical, 5 temperature, 6 rep_pen)")
        if sid in seen:
            raise RequestError(f"sampler id {sid} appears twice in sampler_order")
        seen.add(sid)
    if p.seed is not None:
        _int("seed", p.seed, -(1 << 63))
    hi = None if n_vocab is None else n_vocab - 1
    for k, v in dict(p.logit_bias or {}).items():
        _int("logit_bias token id", k, 0, hi)
        f = float(v) if isinstance(v, (int, float, np.floating)) else None
        if f is None or math.isnan(f) or f == math.inf or (f != -math.inf and abs(f) > 100.0):
            raise RequestError(f"logit_bias for token {k} must be a number in [-100, 100] (or -inf), got {v!r}")
    for t in p.banned_tokens or ():
        _int("banned token id", t, 0, hi)
    for s in p.banned_strings or ():
        if not isinstance(s, str):
            raise RequestError(f"banned strings must be strings, got {s!r}")
    if p.grammar:
        from airobackend.grammar import Grammar, GrammarError
        if not isinstance(p.grammar, str):
            raise GrammarError(f"grammar must be a string, not {type(p.grammar).__name__}")
        Grammar.cached(p.grammar)


def _softmax(lg: np.ndarray) -> np.ndarray:
    e = np.exp(lg - lg.max())
    return e / e.sum()


def _is_sorted(ids: np.ndarray, lg: np.ndarray) -> bool:
    if lg.size < 2:
        return True
    d = lg[:-1] - lg[1:]
    return bool(np.all((d > 0) | ((d == 0) & (ids[:-1] < ids[1:]))))


def _sorted(ids: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best logit first, ties by lower id (deterministic whatever the sort algorithm)."""
    if _is_sorted(ids, lg):
        return ids, lg
    order = np.lexsort((ids, -lg))
    return ids[order], lg[order]


def _select_top(ids: np.ndarray, lg: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates (ties at the cut: lower ids), in no particular order; O(n)."""
    n = lg.size
    if k >= n:
        return ids, lg
    kth = np.partition(lg, n - k)[n - k]
    above = np.flatnonzero(lg > kth)
    eq = np.flatnonzero(lg == kth)
    if above.size + eq.size > k:
        eq = eq[np.argsort(ids[eq], kind="stable")[:k - above.size]]
    sel = np.concatenate((above, eq))
    return ids[sel], lg[sel]


def _top(ids: np.ndarray, lg: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates, sorted."""
    if _is_sorted(ids, lg):
        return ids[:k], lg[:k]
    return _sorted(*_select_top(ids, lg, k))


class Sampler:
    """Samples one token per call with KoboldCpp's chain; see the module docstring for the semantics."""

    def __init__(self, params: SamplingParams, tokenizer: Any = None, n_vocab: Optional[int] = None) -> None:
        if n_vocab is None:
            if tokenizer is None:
                raise ValueError("Sampler needs n_vocab or a tokenizer")
            n_vocab = tokenizer.n_vocab
        validate_sampling(params, n_vocab)
        self.params = p = params
        self.n_vocab = int(n_vocab)
        self.tokenizer = tokenizer
        self.seed = int(p.seed) if p.seed is not None and int(p.seed) >= 0 else secrets.randbits(63)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.order = tuple(int(s) for s in p.sampler_order)
        self.mu = 2.0 * float(p.mirostat_tau)
        self.eos_id = tokenizer.eos_id if tokenizer is not None else 2
        self._bias_ids = np.array([int(k) for k in (p.logit_bias or {})], dtype=np.int64)
        self._bias_vals = np.array([float(v) for v in (p.logit_bias or {}).values()], dtype=np.float64)
        banned = {int(t) for t in (p.banned_tokens or ())}
        if p.ban_eos:
            banned.add(self.eos_id)
        if p.banned_strings:
            if tokenizer is None:
                raise RequestError("banned strings need the model's tokenizer")
            banned.update(banned_string_ids(tokenizer, p.banned_strings))
        self._banned = np.array(sorted(t for t in banned if t < self.n_vocab), dtype=np.int64)
        self.grammar = None
        if p.grammar:
            if tokenizer is None:
                raise RequestError("a grammar needs the model's tokenizer")
            from airobackend.grammar import Grammar, GrammarMatcher
            self.grammar = GrammarMatcher(Grammar.cached(p.grammar), tokenizer)
        self.last_ids = np.zeros(0, dtype=np.int64)
        self.last_probs = np.zeros(0, dtype=np.float64)

    # ------------------------------------------------------------------ public
    def sample(self, logits: np.ndarray, history: Sequence[int] = (), accept: bool = True) -> int:
        """Draw the next token from `logits` (float [n_vocab]) given the context `history`; with a grammar the
        token is accepted into the grammar state unless `accept=False`."""
        x = self._prepare(logits)
        tid = self._choose(x, history)
        if self.grammar is not None and accept:
            self.grammar.accept(tid)
        return tid

    def accept(self, token_id: int) -> None:
        """Advance the grammar with a token chosen elsewhere (sample() does this itself)."""
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The candidates and probabilities the next draw would use (without the grammar), best first.
        Does not draw and does not change any state (mirostat's mu included)."""
        x = self._prepare(logits)
        mu = self.mu
        ids, probs = self._chain(x, history)
        self.mu = mu
        return ids, probs

    # ------------------------------------------------------------------ steps
    def _prepare(self, logits: np.ndarray) -> np.ndarray:
        x = np.array(logits, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.n_vocab:
            raise RequestError(f"logits have {x.shape[0]} entries, expected n_vocab = {self.n_vocab}")
        x[np.isnan(x)] = -np.inf
        x[x == np.inf] = 1e30                       # a broken model row must not turn the softmax into NaN
        if self._bias_ids.size:
            np.add.at(x, self._bias_ids, self._bias_vals)
        if self._banned.size:
            x[self._banned] = -np.inf
        return x

    def _choose(self, x: np.ndarray, history: Sequence[int]) -> int:
        g = self.grammar
        mu0 = self.mu
        ids, probs = self._chain(x, history)
        if g is None:
            if ids.size == 0:
                raise RequestError("every token is banned: nothing to sample")
            i = self._draw(probs)
            self._finish(ids, probs, i)
            return int(ids[i])
        probs = probs.copy()
        while ids.size and probs.sum() > 0:
            i = self._draw(probs)
            if g.allows(ids[i]):
                probs = probs / probs.sum()
                self._finish(ids, probs, i)
                return int(ids[i])
            probs[i] = 0.0
        # no cheap candidate fits the grammar: restrict the whole vocabulary and run the chain again
        allowed = g.allowed_ids()
        masked = np.full_like(x, -np.inf)
        masked[allowed] = x[allowed]
        self.mu = mu0
        ids, probs = self._chain(masked, history)
        if ids.size == 0:
            if g.can_end:
                return self.eos_id                  # the grammar is complete and everything else is banned
            raise RequestError("grammar: no allowed token can follow (all allowed tokens are banned)")
        i = self._draw(probs)
        self._finish(ids, probs, i)
        return int(ids[i])

    def _draw(self, probs: np.ndarray) -> int:
        cum = np.cumsum(probs)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        i = min(i, probs.size - 1)
        if probs[i] <= 0.0:                         # u*total == total at the edge: take the last live entry
            i = int(np.flatnonzero(probs > 0.0)[-1])
        return i

    def _finish(self, ids: np.ndarray, probs: np.ndarray, i: int) -> None:
        self.last_ids, self.last_probs = ids, probs
        if self.params.mirostat in (1, 2):
            # mu -= eta * (observed surprise - tau)
            self.mu -= self.params.mirostat_eta * (-math.log2(max(float(probs[i]), 1e-300)) - self.params.mirostat_tau)

    def _chain(self, x: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        ok = np.flatnonzero(x > -np.inf)
        ids, lg = _select_top(ok, x[ok], PREFILTER_TOP_K)     # unsorted: each sampler sorts only if it must
        if ids.size == 0:
            return ids, lg
        greedy = p.temperature <= 0
        if p.mirostat in (1, 2):
            ids, lg = self.rep_pen(ids, lg, history)
            ids, lg = _sorted(*self.temperature(ids, lg))
            if ids.size > 1:
                ids, lg = (self.mirostat_v1 if p.mirostat == 1 else self.mirostat_v2)(ids, lg)
            return ids, _softmax(lg)
        for s in self.order:
            if s == TOP_K:
                ids, lg = self.top_k(ids, lg, p.top_k)
            elif s == TOP_A:
                ids, lg = self.top_a(ids, lg, p.top_a)
            elif s == TOP_P:
                ids, lg = self.top_p(ids, lg, p.top_p)
                ids, lg = self.min_p(ids, lg, p.min_p)
            elif s == TFS:
                ids, lg = self.tail_free(ids, lg, p.tfs)
            elif s == TYPICAL:
                ids, lg = self.typical(ids, lg, p.typical_p)
            elif s == TEMPERATURE:
                ids, lg = self.temperature(ids, lg)
            elif s == REP_PEN:
                ids, lg = self.rep_pen(ids, lg, history)
        if greedy and TEMPERATURE not in self.order:
            ids, lg = _top(ids, lg, 1)
        ids, lg = _sorted(ids, lg)
        return ids, _softmax(lg)

    # ------------------------------------------------------------------ the samplers: (ids, logits) in and out;
    # the candidates may arrive unsorted, and a sampler that needs the order sorts them first (best first)

    def rep_pen(self, ids: np.ndarray, lg: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        pen, pres, freq = float(p.repetition_penalty), float(p.presence_penalty), float(p.frequency_penalty)
        if pen == 1.0 and pres == 0.0 and freq == 0.0:
            return ids, lg
        rng = int(p.repetition_penalty_range)
        hist = np.asarray(history, dtype=np.int64).reshape(-1)
        window = hist[-rng:] if rng > 0 else hist
        window = window[(window >= 0) & (window < self.n_vocab)]
        if window.size == 0:
            return ids, lg
        half = window.size // 2
        near, far = window[half:], window[:half]
        mask = np.zeros(self.n_vocab, dtype=np.int8)       # 2: nearer half, 1: only the farther half
        mask[far] = 1
        mask[near] = 2
        m = mask[ids]
        in_near = m == 2
        seen = m > 0
        if not seen.any():
            return ids, lg
        pen_far = 1.0 + (pen - 1.0) * float(p.repetition_penalty_slope) if pen > 1.0 else pen
        penalty = np.where(in_near, pen, pen_far)[seen]
        lg = lg.copy()
        v = lg[seen]
        v = np.where(v <= 0, v * penalty, v / penalty)
        v -= pres
        if freq != 0.0:
            uniq, counts = np.unique(window, return_counts=True)
            v -= freq * counts[np.searchsorted(uniq, ids[seen])]
        lg[seen] = v
        return ids, lg

    @staticmethod
    def top_k(ids: np.ndarray, lg: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0 or k >= ids.size:
            return ids, lg
        return _top(ids, lg, k)

    @staticmethod
    def top_a(ids: np.ndarray, lg: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
        if a <= 0 or ids.size <= 1:
            return ids, lg
        ids, lg = _sorted(ids, lg)
        probs = _softmax(lg)
        below = np.flatnonzero(probs[1:] < a * probs[0] * probs[0])
        n = below[0] + 1 if below.size else ids.size
        return ids[:n], lg[:n]

    @staticmethod
    def top_p(ids: np.ndarray, lg: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
        if top_p >= 1.0:
            return ids, lg
        ids, lg = _sorted(ids, lg)
        cum = np.cumsum(_softmax(lg))
        reached = np.flatnonzero(cum >= top_p)
        n = reached[0] + 1 if reached.size else ids.size
        return ids[:n], lg[:n]

    @staticmethod
    def min_p(ids: np.ndarray, lg: np.ndarray, min_p: float) -> tuple[np.ndarray, np.ndarray]:
        if min_p <= 0 or ids.size == 0:
            return ids, lg
        ids, lg = _sorted(ids, lg)
        probs = _softmax(lg)
        below = np.flatnonzero(probs[1:] < min_p * probs[0])
        n = below[0] + 1 if below.size else ids.size
        return ids[:n], lg[:n]

    @staticmethod
    def tail_free(ids: np.ndarray, lg: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        if z >= 1.0 or ids.size <= 2:
            return ids, lg
        ids, lg = _sorted(ids, lg)
        probs = _softmax(lg)
        d2 = np.abs(np.diff(probs, 2))                 # |(p_i - p_i+1) - (p_i+1 - p_i+2)|
        total = d2.sum()
        d2 = d2 / total if total > 1e-6 else np.full_like(d2, 1.0 / d2.size)
        over = np.flatnonzero((np.cumsum(d2) > z) & (np.arange(d2.size) >= 1))
        n = over[0] if over.size else ids.size
        return ids[:n], lg[:n]

    def typical(self, ids: np.ndarray, lg: np.ndarray, typ: float) -> tuple[np.ndarray, np.ndarray]:
        if typ >= 1.0 or ids.size == 0:
            return ids, lg
        ids, lg = _sorted(ids, lg)
        probs = _softmax(lg)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(probs)
            entropy = -np.nansum(probs * logp)
            shifted = np.abs(-logp - entropy)
        order = np.argsort(shifted, kind="stable")
        cum = np.cumsum(probs[order])
        over = np.flatnonzero(cum > typ)
        n = over[0] + 1 if over.size else ids.size
        keep = order[:n]
        return ids[keep], lg[keep]

    def temperature(self, ids: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        temp = float(p.temperature)
        if temp <= 0:
            ids, lg = _top(ids, lg, 1)
            return ids, lg / GREEDY_TEMPERATURE
        if p.dynatemp_range > 0 and p.mirostat not in (1, 2):
            return self.dynamic_temperature(ids, lg)
        return ids, lg / temp

    def dynamic_temperature(self, ids: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """KoboldCpp sample_entropy: T = T_min + (T_max - T_min) * (H / H_max) ** exponent."""
        p = self.params
        if ids.size <= 1:
            return ids, lg
        t_min = max(0.0, p.temperature - p.dynatemp_range)
        t_max = max(0.0, p.temperature + p.dynatemp_range)
        probs = _softmax(lg)
        nz = probs[probs > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        t = t_min + (t_max - t_min) * (entropy / math.log(ids.size)) ** max(0.0, p.dynatemp_exponent)
        if t <= 0:
            return _top(ids, lg, 1)
        return ids, lg / t

    def mirostat_v1(self, ids: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Estimate the Zipf exponent from the top m probabilities, then keep the k that targets surprise mu."""
        probs = _softmax(lg)
        m = min(MIROSTAT_M - 1, ids.size - 1)
        i = np.arange(m, dtype=np.float64)
        t = np.log((i + 2) / (i + 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.log(probs[:m] / probs[1:m + 1])
            s_hat = float((t * b).sum() / (t * t).sum())
            eps = s_hat - 1.0
            k = ((eps * 2.0 ** self.mu) / (1.0 - float(self.n_vocab) ** (-eps))) ** (1.0 / s_hat)
        k = int(k) if math.isfinite(k) else ids.size
        return self.top_k(ids, lg, max(k, 1))

    def mirostat_v2(self, ids: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop candidates whose surprise -log2 p exceeds mu (keep at least one)."""
        probs = _softmax(lg)
        with np.errstate(divide="ignore"):
            over = np.flatnonzero(-np.log2(probs) > self.mu)
        n = max(over[0] if over.size else ids.size, 1)
        return ids[:n], lg[:n]


_BANNED_CACHE_ATTR = "_banned_string_cache"


def banned_string_ids(tokenizer: Any, strings: Sequence[str]) -> set[int]:
    """Token ids whose printed text contains any of `strings` (case-insensitive); cached per tokenizer."""
    cache = getattr(tokenizer, _BANNED_CACHE_ATTR, None)
    if cache is None:
        texts = [tokenizer.token_bytes(i).decode("utf-8", errors="ignore").lower()
                 for i in range(tokenizer.n_vocab)]
        cache = {"texts": texts}
        setattr(tokenizer, _BANNED_CACHE_ATTR, cache)
    out: set[int] = set()
    for s in strings:
        s = s.lower()
        if not s:
            continue
        hit = cache.get(s)
        if hit is None:
            hit = {i for i, t in enumerate(cache["texts"]) if s in t}
            cache[s] = hit
        out |= hit
    return out
