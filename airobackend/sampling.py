"""Token sampling with KoboldCpp's semantics (`gpttype_adapter.cpp` at 7fb809b; each filter is llama.cpp's
`llama_sample_*`).

One `Sampler` per generation::

    sampler = Sampler(req.sampling, tokenizer=tok, n_vocab=model.n_vocab)   # validates; RequestError on bad values
    tid = sampler.sample(logits, history)       # history: every token in the context so far (prompt + generated)

`sample` also advances the grammar (if any) with the chosen token. `sampler.seed` is the seed actually used
(a random one when the request had none), `sampler.last_ids` / `sampler.last_probs` the final candidate
distribution of the last call (for n_probs / logprobs).

Order of work per token (KoboldCpp 1.76 `SampleLogits`, gpttype_adapter.cpp):

1. logit_bias is added; banned token ids, tokens containing a banned character, the ids banned at this position by
   a phrase ban (`sample(..., ban=...)`) and (with ban_eos) EOS are set to -inf.
2. DRY on the whole vocabulary ("always first", before anything sorts the candidates).
3. The candidates are cut to the 5000 best logits (KoboldCpp's speed pre-filter; ties at a cut go to the lower id).
   Samplers that need the order sort them (best first, ties by lower id); top_k selects in O(n) first.
4. Mirostat 1/2 when enabled: repetition penalty -> temperature (+ smoothing) -> mirostat (sampler_order ignored, as
   KoboldCpp). Otherwise the samplers run in `sampler_order` (KoboldCpp ids): 0 top_k, 1 top_a, 2 top_p then min_p,
   3 tfs, 4 typical, 5 temperature (dynamic temperature when dynatemp_range > 0; then quadratic smoothing; then
   top-nσ, which KoboldCpp 1.85 put in the temperature step), 6 repetition penalty (+ presence/frequency penalties).
   A sampler whose value disables it does nothing; an id left out of the order is not applied. temperature <= 0
   means greedy: only the best candidate survives the temperature step (or the end of the chain when 5 is not in
   the order). Then XTC ("always last"; not with mirostat).
5. A token is drawn from the survivors' softmax with a seeded PCG64 generator (same seed + same logits + same
   history = same token). XTC's roll uses the same generator.
6. Grammar: the drawn candidate is checked against the grammar; a rejected one is removed and the draw repeated
   among the rest (that is the grammar-restricted distribution of the surviving candidates), so grammar work is only
   spent on candidates, as in llama.cpp's sampler. When no surviving candidate is allowed, the grammar's allowed set
   over the whole vocabulary is computed and the whole chain runs again on it. EOS is allowed only where the
   grammar may end.

Repetition penalty (KoboldCpp since 2024): the window is the last `repetition_penalty_range` tokens of `history`
(0 or -1: all of it). A candidate seen in the nearer half of the window is penalised by `repetition_penalty`, one
seen only in the farther half by `1 + (repetition_penalty - 1) * repetition_penalty_slope` (slope 1 = uniform):
logit * pen when logit <= 0, else logit / pen. Then `presence_penalty` is subtracted once from every seen candidate
and `frequency_penalty` times its count in the window (llama.cpp's rule).

DRY (KoboldCpp 1.76 `sample_dry`, which llama.cpp's `llama_sampler_dry` was ported from): over the last
`dry_penalty_last_n` tokens of the context (0 or -1: all of it, at most n_ctx), every token that would extend a
repeat of at least `dry_allowed_length` tokens gets `dry_multiplier * dry_base ** (length - dry_allowed_length)`
subtracted from its logit. A repeat never reaches back over a sequence breaker (a string; the token sequences that
spell it are found once per vocabulary, as KoboldCpp's `GetOverlappingTokenSequences`).

XTC (KoboldCpp 1.76 `sample_xtc`): with probability `xtc_probability`, every candidate whose probability is at least
`xtc_threshold` except the least likely of them has 999 subtracted from its logit (when two or more pass).

Smoothing (quadratic sampling, KoboldCpp 1.76 `sample_temperature`): after the temperature, with h the best logit,
each logit l becomes h - k f (l - h)^2 + s f (l - h)^3, f = smoothing_factor, k = (3 - c) / 2, s = (c - 1) / 2 for
c = smoothing_curve (c = 1 is 1.76's plain quadratic; the curve came later to KoboldCpp, from text-generation-webui).

Top-nσ (KoboldCpp 1.85 `sample_top_n_sigma`, llama.cpp `top_n_sigma`): after the temperature, candidates whose logit
is below max - nsigma * std (population standard deviation over the candidates) are dropped.

Banned strings (KoboldCpp 1.76 `banned_tokens` strings): a string of one byte that is one token bans every
vocabulary token whose printed text contains it (ASCII case-insensitive); any other string is a phrase: `phrases`
lists them, lowercased, and the engine takes a phrase back when the output contains it (see engine.py).
"""
from __future__ import annotations

import math
import secrets
from typing import Any, Optional, Sequence

import numpy as np

from airobackend.errors import RequestError
from airobackend.grammar import Grammar, GrammarError, GrammarMatcher
from airobackend.types import SamplingParams

TOP_K, TOP_A, TOP_P, TFS, TYPICAL, TEMPERATURE, REP_PEN = range(7)
SAMPLER_NAMES = {TOP_K: "top_k", TOP_A: "top_a", TOP_P: "top_p", TFS: "tfs", TYPICAL: "typical",
                 TEMPERATURE: "temperature", REP_PEN: "rep_pen"}
PREFILTER_TOP_K = 5000            # KoboldCpp's hard pre-filter before the sampler chain
MIROSTAT_M = 100
GREEDY_TEMPERATURE = 1.0 / 256    # what KoboldCpp divides by before keeping the top candidate
XTC_PENALTY = 999.0               # KoboldCpp: "infinity gets wonky results downstream"
DRY_MAX_BREAKERS = 64             # more is a client bug (KoboldCpp reads 24); each costs a vocabulary scan once
DRY_BREAKER_MAX_BYTES = 40        # KoboldCpp's MAX_CHAR_LEN: longer breakers are cut
DRY_BREAKER_MAX_TAIL = 20         # KoboldCpp's MAX_SEQ_LEN: tokens of a breaker's tail that are matched
DRY_FLOAT_MAX_LOG = 88.7228391    # log(FLT_MAX): the exponent is clamped so base ** exp stays finite
MAX_BANNED_STRINGS = 1024


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
    smoothing_factor in [0, 1000], smoothing_curve in [1, 10]; nsigma in [-100, 100] (<= 0 off); xtc_threshold and
    xtc_probability in [0, 1]; dry_multiplier, dry_base in [0, 100], dry_allowed_length >= 0, dry_penalty_last_n
    >= -1, at most 64 string sequence breakers; sampler_order: distinct ids 0..6; seed None or an integer (negative =
    random); logit_bias values finite in [-100, 100] or -inf; token ids in [0, n_vocab) when n_vocab is given; at
    most 1024 banned strings.
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
    _in_range("smoothing_factor", p.smoothing_factor, 0.0, 1000.0)
    _in_range("smoothing_curve", p.smoothing_curve, 1.0, 10.0)
    _in_range("nsigma", p.nsigma, -100.0, 100.0)
    _in_range("xtc_threshold", p.xtc_threshold, 0.0, 1.0)
    _in_range("xtc_probability", p.xtc_probability, 0.0, 1.0)
    _in_range("dry_multiplier", p.dry_multiplier, 0.0, 100.0)
    _in_range("dry_base", p.dry_base, 0.0, 100.0)
    _int("dry_allowed_length", p.dry_allowed_length, 0, 1 << 24)
    _int("dry_penalty_last_n", p.dry_penalty_last_n, -1, 1 << 24)
    _string_list("dry_sequence_breakers", p.dry_sequence_breakers, DRY_MAX_BREAKERS)
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
    _string_list("banned strings", p.banned_strings, MAX_BANNED_STRINGS)
    if p.grammar:
        if not isinstance(p.grammar, str):
            raise GrammarError(f"grammar must be a string, not {type(p.grammar).__name__}")
        Grammar.cached(p.grammar)


def _string_list(name: str, v: Any, limit: int) -> None:
    if v is None:
        return
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise RequestError(f"{name} must be a list of strings, got {type(v).__name__}")
    if len(v) > limit:
        raise RequestError(f"{name}: {len(v)} entries; at most {limit} are allowed")
    for x in v:
        if not isinstance(x, str):
            raise RequestError(f"{name} must be strings, got {x!r}"[:200])


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
    """Samples one token per call with KoboldCpp's chain; see the module docstring for the semantics.

    `n_ctx` bounds DRY's window as KoboldCpp's context size does (None: unbounded)."""

    def __init__(self, params: SamplingParams, tokenizer: Any = None, n_vocab: Optional[int] = None,
                 n_ctx: Optional[int] = None) -> None:
        if n_vocab is None:
            if tokenizer is None:
                raise ValueError("Sampler needs n_vocab or a tokenizer")
            n_vocab = tokenizer.n_vocab
        validate_sampling(params, n_vocab)
        self.params = p = params
        self.n_vocab = int(n_vocab)
        self.n_ctx = int(n_ctx) if n_ctx else None
        self.tokenizer = tokenizer
        self.seed = int(p.seed) if p.seed is not None and int(p.seed) >= 0 else secrets.randbits(63)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.order = tuple(int(s) for s in p.sampler_order)
        self.mu = 2.0 * float(p.mirostat_tau)
        self.eos_id = tokenizer.eos_id if tokenizer is not None else 2
        self._bias_ids = np.array([int(k) for k in (p.logit_bias or {})], dtype=np.int64)
        self._bias_vals = np.array([float(v) for v in (p.logit_bias or {}).values()], dtype=np.float64)
        banned = {int(t) for t in (p.banned_tokens or ())}
        if p.ban_eos:                            # every end-of-generation token (<|im_end|>, <|eot_id|>, ...)
            banned.add(self.eos_id)
            banned.update(getattr(tokenizer, "eog_ids", ()))
        self.phrases: tuple[bytes, ...] = ()
        if p.banned_strings:
            if tokenizer is None:
                raise RequestError("banned strings need the model's tokenizer")
            char_ids, self.phrases = split_banned_strings(tokenizer, p.banned_strings)
            banned.update(char_ids)
        self._banned = np.array(sorted(t for t in banned if t < self.n_vocab), dtype=np.int64)
        self._dry_on = p.dry_multiplier > 0 and p.dry_base > 0
        self._breakers: dict[int, list[tuple[int, ...]]] = {}
        if self._dry_on and p.dry_sequence_breakers:
            if tokenizer is None:
                raise RequestError("DRY sequence breakers need the model's tokenizer")
            self._breakers = dry_breaker_sequences(tokenizer, p.dry_sequence_breakers)
        self._breaker_heads: Optional[np.ndarray] = None
        if self._breakers:
            self._breaker_heads = np.zeros(self.n_vocab, dtype=bool)
            self._breaker_heads[[h for h in self._breakers if 0 <= h < self.n_vocab]] = True
        self.grammar = None
        if p.grammar:
            if tokenizer is None:
                raise RequestError("a grammar needs the model's tokenizer")
            self.grammar = GrammarMatcher(Grammar.cached(p.grammar), tokenizer)
        self.last_ids = np.zeros(0, dtype=np.int64)
        self.last_probs = np.zeros(0, dtype=np.float64)

    # ------------------------------------------------------------------ public
    def sample(self, logits: np.ndarray, history: Sequence[int] = (), accept: bool = True,
               ban: Sequence[int] = ()) -> int:
        """Draw the next token from `logits` (float [n_vocab]) given the context `history`; with a grammar the
        token is accepted into the grammar state unless `accept=False`. `ban`: more ids to exclude this once."""
        x = self._prepare(logits, ban)
        tid = self._choose(x, history)
        if self.grammar is not None and accept:
            self.grammar.accept(tid)
        return tid

    def accept(self, token_id: int) -> None:
        """Advance the grammar with a token chosen elsewhere (sample() does this itself)."""
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def snapshot(self) -> tuple:
        """The state a later `restore` returns to (mirostat's mu and the grammar's position; not the generator,
        which goes on, as KoboldCpp's does across a rewind)."""
        g = self.grammar
        return self.mu, (None if g is None else (g.stacks, g.partial))

    def restore(self, state: tuple) -> None:
        self.mu, gs = state
        if gs is not None and self.grammar is not None:
            self.grammar.stacks, self.grammar.partial = gs
            self.grammar._memo = {}

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The candidates and probabilities the next draw would use (without the grammar), best first.
        Does not draw and does not change any state (mirostat's mu and the generator included)."""
        x = self._prepare(logits)
        mu, rng = self.mu, self.rng.bit_generator.state
        ids, probs = self._chain(x, history)
        self.mu, self.rng.bit_generator.state = mu, rng
        return ids, probs

    # ------------------------------------------------------------------ steps
    def _prepare(self, logits: np.ndarray, ban: Sequence[int] = ()) -> np.ndarray:
        x = np.array(logits, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.n_vocab:
            raise RequestError(f"logits have {x.shape[0]} entries, expected n_vocab = {self.n_vocab}")
        x[np.isnan(x)] = -np.inf
        x[x == np.inf] = 1e30                       # a broken model row must not turn the softmax into NaN
        if self._bias_ids.size:
            np.add.at(x, self._bias_ids, self._bias_vals)
        if self._banned.size:
            x[self._banned] = -np.inf
        if len(ban):
            x[np.asarray(ban, dtype=np.int64)] = -np.inf
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
        if self._dry_on:
            x = self.dry(x, history)                          # first: it indexes the logits by token id
        ok = np.flatnonzero(x > -np.inf)
        ids, lg = _select_top(ok, x[ok], PREFILTER_TOP_K)     # unsorted: each sampler sorts only if it must
        if ids.size == 0:
            return ids, lg
        greedy = p.temperature <= 0
        if p.mirostat in (1, 2):
            ids, lg = self.rep_pen(ids, lg, history)
            ids, lg = _sorted(*self.temperature(ids, lg, nsigma=False))
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
        ids, lg = self.xtc(ids, lg)
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

    def temperature(self, ids: np.ndarray, lg: np.ndarray, nsigma: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """KoboldCpp's temperature step: temperature (or dynamic temperature), smoothing, then top-nσ."""
        p = self.params
        temp = float(p.temperature)
        if temp <= 0:
            ids, lg = _top(ids, lg, 1)
            return ids, lg / GREEDY_TEMPERATURE        # no smoothing when greedy (KoboldCpp)
        if p.dynatemp_range > 0 and p.mirostat not in (1, 2):
            ids, lg = self.dynamic_temperature(ids, lg)
        else:
            lg = lg / temp
        ids, lg = self.smoothing(ids, lg, float(p.smoothing_factor), float(p.smoothing_curve))
        if nsigma:
            ids, lg = self.top_n_sigma(ids, lg, float(p.nsigma))
        return ids, lg

    @staticmethod
    def smoothing(ids: np.ndarray, lg: np.ndarray, factor: float, curve: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Quadratic sampling around the best logit h: h - k f d^2 + s f d^3, d = l - h (module docstring)."""
        if factor <= 0 or ids.size <= 1:
            return ids, lg
        h = lg.max()
        d = lg - h
        k, s = (3.0 - curve) / 2.0, (curve - 1.0) / 2.0
        return ids, h - k * factor * d * d + s * factor * d * d * d

    @staticmethod
    def top_n_sigma(ids: np.ndarray, lg: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
        """Keep the candidates within n standard deviations of the best logit."""
        if n <= 0 or ids.size <= 1:
            return ids, lg
        keep = lg >= lg.max() - n * lg.std()
        return ids[keep], lg[keep]

    def xtc(self, ids: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exclude Top Choices: with probability xtc_probability, push down every candidate at or above the
        threshold except the least likely of them."""
        p = self.params
        thr, prob = float(p.xtc_threshold), float(p.xtc_probability)
        if thr > 0.5 or prob <= 0 or ids.size <= 1:
            return ids, lg
        if self.rng.random() >= prob:
            return ids, lg
        ids, lg = _sorted(ids, lg)
        below = np.flatnonzero(_softmax(lg) < thr)
        n_over = int(below[0]) if below.size else ids.size
        if n_over > 1:
            lg = lg.copy()
            lg[:n_over - 1] -= XTC_PENALTY
        return ids, lg

    def dry(self, x: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """DRY over the whole vocabulary `x` (a copy is returned when anything is penalised)."""
        p = self.params
        pen = dry_penalties(history, float(p.dry_multiplier), float(p.dry_base), int(p.dry_allowed_length),
                            int(p.dry_penalty_last_n), self._breakers, self.n_ctx, self._breaker_heads)
        if not pen:
            return x
        x = x.copy()
        toks = np.fromiter(pen.keys(), dtype=np.int64, count=len(pen))
        vals = np.fromiter(pen.values(), dtype=np.float64, count=len(pen))
        ok = (toks >= 0) & (toks < self.n_vocab)
        x[toks[ok]] -= vals[ok]
        return x

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


def dry_penalties(history: Sequence[int], multiplier: float, base: float, allowed_length: int, last_n: int,
                  breakers: dict[int, list[tuple[int, ...]]], n_ctx: Optional[int] = None,
                  heads: Optional[np.ndarray] = None) -> dict[int, float]:
    """{token: logit penalty} of DRY for the next token after `history` (KoboldCpp 1.76 `sample_dry`, steps 1-4).
    `heads`: a boolean table over the vocabulary marking the breakers' head tokens (built from `breakers` if None)."""
    if multiplier <= 0 or base <= 0:
        return {}
    hist = np.asarray(history, dtype=np.int64).reshape(-1)
    limit = n_ctx if n_ctx else hist.size
    rng = last_n if 0 < last_n <= limit else limit
    n = min(hist.size, rng, limit)
    if n <= allowed_length:
        return {}
    t = np.ascontiguousarray(hist[hist.size - n:])

    # 1. the nearest sequence breaker limits how far back a repeat may reach: a head token followed by its tail
    rep_limit = n
    if breakers:
        if heads is None:
            top = int(t.max())
            heads = np.zeros(top + 1, dtype=bool)
            heads[[h for h in breakers if 0 <= h <= top]] = True
        inside = t < heads.size
        for ix in np.flatnonzero(inside & heads[np.where(inside, t, 0)])[::-1].tolist():
            i = n - 1 - ix                                 # tokens after the head
            tails = [len(tail) for tail in breakers[int(t[ix])]
                     if len(tail) <= i and tuple(t[ix + 1:ix + 1 + len(tail)].tolist()) == tail]
            if tails:
                rep_limit = i - max(tails)
                break
    if rep_limit <= allowed_length:
        return {}

    # 2. count[j] = length of the repeat of the window's end that ends at j (at most rep_limit)
    from airobackend.kernels.seq import suffix_repeats      # Numba: the server imports this module before it
                                                            # sets Numba's cache folder (start-up)
    count = np.empty(n, dtype=np.int64)
    suffix_repeats(t, rep_limit, count)

    # 3. the token after each long enough repeat would extend it: the longest repeat per such token
    at = np.flatnonzero(count[:-1] >= allowed_length)
    if at.size == 0:
        return {}
    toks, lens = t[at + 1], count[at]
    order = np.lexsort((lens, toks))
    toks, lens = toks[order], lens[order]
    lastof = np.r_[toks[1:] != toks[:-1], True]        # the longest is the last of each token's run

    # 4. penalty = multiplier * base ** (length - allowed_length), the exponent clamped so the power stays finite
    exps = lens[lastof] - allowed_length
    if base > 1.000001:
        exps = np.minimum(exps, int(DRY_FLOAT_MAX_LOG / math.log(base)))
    return dict(zip(toks[lastof].tolist(), (multiplier * np.power(float(base), exps.astype(np.float64))).tolist()))


def _vocab_texts(tokenizer: Any) -> list[bytes]:
    """Every token's printed bytes with special tokens rendered (KoboldCpp's FileFormatTokenizeID(id, ..., true)),
    cached on the tokenizer."""
    texts = getattr(tokenizer, "_sampling_vocab_texts", None)
    if texts is None:
        texts = [bytes(tokenizer.token_bytes(i, special=True)) for i in range(tokenizer.n_vocab)]
        tokenizer._sampling_vocab_texts = texts
    return texts


def _tokenizer_cache(tokenizer: Any, name: str) -> dict:
    cache = getattr(tokenizer, name, None)
    if cache is None:
        cache = {}
        setattr(tokenizer, name, cache)
    return cache


def dry_breaker_sequences(tokenizer: Any, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
    """{head token: [tails]}: the token sequences that spell each breaker (KoboldCpp 1.76
    `GetOverlappingTokenSequences`): a token containing the breaker is a head with an empty tail; a token ending with
    a proper prefix of it is a head whose tail is the tokenization of the rest (at most 20 tokens; none when every
    byte of the breaker is non-ASCII). Breakers are cut to 40 bytes; each one's scan is cached per tokenizer."""
    cache = _tokenizer_cache(tokenizer, "_dry_breaker_cache")
    out: dict[int, list[tuple[int, ...]]] = {}
    for b in breakers:
        s = b.encode("utf-8")[:DRY_BREAKER_MAX_BYTES]
        if not s:
            continue
        seqs = cache.get(s)
        if seqs is None:
            seqs = cache[s] = _breaker_scan(tokenizer, s)
        for head, tail in seqs:
            tails = out.setdefault(head, [])
            if tail not in tails:
                tails.append(tail)
    return out


def _breaker_scan(tokenizer: Any, s: bytes) -> list[tuple[int, tuple[int, ...]]]:
    extended = all(c > 127 for c in s)
    found: dict[tuple[int, tuple[int, ...]], None] = {}
    for v, word in enumerate(_vocab_texts(tokenizer)):
        if s in word:
            found[(v, ())] = None
            continue
        if extended:
            continue
        pos = word.find(s[:1])
        while pos >= 0:
            overlap = len(word) - pos                   # the token's tail from pos must be a prefix of s
            if word[pos:] == s[:overlap]:               # (overlap < len(s): s is not inside the token)
                found[(v, tuple(tokenizer.encode(s[overlap:], add_bos=False)[:DRY_BREAKER_MAX_TAIL]))] = None
            pos = word.find(s[:1], pos + 1)
    return list(found)


def split_banned_strings(tokenizer: Any, strings: Sequence[str]) -> tuple[set[int], tuple[bytes, ...]]:
    """KoboldCpp 1.76's reading of `banned_tokens` strings: (token ids to ban, phrases). A string of one byte that is
    one token bans every token whose printed text contains it; every other string is a phrase. Both compare
    lowercased with ASCII rules (KoboldCpp's `toLowerCase`); phrases come back lowercased, in order, unique."""
    cache = _tokenizer_cache(tokenizer, "_banned_char_cache")
    ids: set[int] = set()
    phrases: list[bytes] = []
    for s in strings:
        w = s.encode("utf-8").lower()
        if not w:
            continue
        n_tok = len(tokenizer.encode(w.decode("utf-8"), add_bos=False))
        if n_tok == 0:
            continue
        if n_tok == 1 and len(w) < 2:
            hit = cache.get(w)
            if hit is None:
                hit = cache[w] = {i for i, t in enumerate(_vocab_texts(tokenizer)) if w in t.lower()}
            ids |= hit
        elif w not in phrases:
            phrases.append(w)
    return ids, tuple(phrases)
