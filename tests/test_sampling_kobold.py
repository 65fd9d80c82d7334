"""DRY, XTC, smoothing and top-nσ against small reference implementations written here from the upstream sources:

* KoboldCpp 1.76 (tag v1.76, commit 2da346a5), gpttype_adapter.cpp: `sample_dry`, `sample_xtc`, `sample_temperature`
  (quadratic smoothing), `GetOverlappingTokenSequences` (DRY sequence breakers) and `SampleLogits` (their places);
* KoboldCpp 1.85 gpttype_adapter.cpp `sample_top_n_sigma` (called in the temperature step);
* the smoothing curve (k = (3 - c) / 2, s = (c - 1) / 2) of text-generation-webui modules/sampler_hijack.py
  `QuadraticSamplingLogitsWarper` (v4.7.3, commit 1dcde41d), which later KoboldCpp adopted;
* llama.cpp tests/test-sampling.cpp (commit c392e509): the DRY, XTC and top-n-sigma vectors where llama.cpp and
  KoboldCpp agree.

The references are deliberately naive (quadratic DRY instead of the Z-algorithm) and never call the implementation.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from airobackend.errors import RequestError
from airobackend.sampling import Sampler, dry_breaker_sequences, dry_penalties, validate_sampling
from airobackend.tokenizer import Tokenizer
from airobackend.types import SamplingParams


def params(order=(), **kw) -> SamplingParams:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, tfs=1.0, top_a=0.0,
                repetition_penalty=1.0, sampler_order=order, seed=1234)
    base.update(kw)
    return SamplingParams(**base)


def sm(logits: dict[int, float]) -> dict[int, float]:
    m = max(logits.values())
    e = {i: math.exp(v - m) for i, v in logits.items()}
    s = sum(e.values())
    return {i: v / s for i, v in e.items()}


def dist(p: SamplingParams, logits, history=(), tokenizer=None, n_ctx=None) -> dict[int, float]:
    s = Sampler(p, tokenizer=tokenizer, n_vocab=len(logits), n_ctx=n_ctx)
    ids, probs = s.distribution(np.array(logits, dtype=np.float32), history)
    return {int(i): float(q) for i, q in zip(ids, probs) if q > 0}


def assert_dist(got: dict[int, float], want: dict[int, float], rel=1e-5) -> None:
    got = {i: q for i, q in got.items() if q > 1e-12}
    want = {i: q for i, q in want.items() if q > 1e-12}
    assert set(got) == set(want)
    for i in want:
        assert got[i] == pytest.approx(want[i], rel=rel, abs=1e-7), i


# ------------------------------------------------------------------------------------------------------ DRY

def ref_dry(hist, mult, base, allowed, last_n, breakers, n_ctx):
    """KoboldCpp 1.76 sample_dry, naively: {token: penalty}."""
    if mult <= 0 or base <= 0:
        return {}
    rng = last_n if 0 < last_n <= n_ctx else n_ctx
    n = min(len(hist), rng, n_ctx)
    if n <= allowed:
        return {}
    t = list(hist[len(hist) - n:])
    rep_limit = n
    for i in range(n):                                  # the nearest breaker, i tokens from the end
        ix = n - 1 - i
        lens = [len(tail) for tail in breakers.get(t[ix], ())
                if len(tail) <= i and tuple(t[ix + 1:ix + 1 + len(tail)]) == tuple(tail)]
        if lens:
            rep_limit = i - max(lens)
            break
    if rep_limit <= allowed:
        return {}
    longest: dict[int, int] = {}
    for j in range(n - 1):                              # a repeat of the window's end that ends at j
        m = 0
        while m <= j and t[j - m] == t[n - 1 - m]:
            m += 1
        m = min(m, rep_limit)
        if m >= allowed:
            longest[t[j + 1]] = max(longest.get(t[j + 1], -1), m)
    max_exp = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    return {tok: mult * base ** (min(m - allowed, max_exp) if max_exp > 0 else m - allowed)
            for tok, m in longest.items()}


def test_dry_matches_reference_on_random_histories() -> None:
    rng = np.random.default_rng(5)
    V = 12
    for trial in range(300):
        n_hist = int(rng.integers(0, 60))
        period = int(rng.integers(1, 6))
        motif = rng.integers(0, V, period)
        hist = [int(motif[i % period]) if rng.random() < 0.8 else int(rng.integers(0, V)) for i in range(n_hist)]
        mult = float(rng.choice([0.0, 0.8, 2.0]))
        base = float(rng.choice([0.5, 1.0, 1.75, 3.0]))
        allowed = int(rng.integers(0, 5))
        last_n = int(rng.choice([-1, 0, 5, 16, 40, 500]))
        n_ctx = int(rng.choice([30, 2048]))
        breakers = {}
        if rng.random() < 0.5:                           # single-token and two-token breakers
            breakers = {int(rng.integers(0, V)): [()], int(rng.integers(0, V)): [(int(rng.integers(0, V)),)]}
        logits = rng.standard_normal(V)
        want = dict(enumerate(logits))
        for tok, pen in ref_dry(hist, mult, base, allowed, last_n, breakers, n_ctx).items():
            want[tok] -= pen
        p = params(dry_multiplier=mult, dry_base=base, dry_allowed_length=allowed, dry_penalty_last_n=last_n)
        s = Sampler(p, n_vocab=V, n_ctx=n_ctx)
        s._breakers = breakers                            # token sequences given directly (no tokenizer here)
        ids, probs = s.distribution(logits.astype(np.float32), hist)
        assert_dist({int(i): float(q) for i, q in zip(ids, probs)}, sm(want))


def test_dry_exponent_is_clamped_to_stay_finite() -> None:
    hist = [1, 2] * 400                                   # a repeat of 799 tokens: 100 ** 797 would overflow
    got = dist(params(dry_multiplier=1.0, dry_base=100.0, dry_allowed_length=2, dry_penalty_last_n=0),
               [0.0, 0.0, 0.0], hist)
    assert got == {0: pytest.approx(0.5), 2: pytest.approx(0.5)}   # token 1 continues the repeat: pushed out
    assert dry_penalties(hist, 1.0, 100.0, 2, 0, {}) == {1: pytest.approx(100.0 ** int(88.7228391 / math.log(100)))}


@pytest.mark.parametrize("probs, history, want, mult, base, allowed, last_n, breakers", [
    ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, {}),
    ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.296923, 0.109232], 1.0, 1.1, 2, 5, {}),
    ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.241818, 0.241818, 0.032727], 2.0, 1.1, 2, 5, {}),
    ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 4, 7, {}),
])
def test_dry_llama_cpp_vectors(probs, history, want, mult, base, allowed, last_n, breakers) -> None:
    # llama.cpp tests/test-sampling.cpp test_dry (context 1024): the logits are log(p); the expected probabilities
    # are listed best first
    got = dist(params(dry_multiplier=mult, dry_base=base, dry_allowed_length=allowed, dry_penalty_last_n=last_n),
               [math.log(q) for q in probs], history, n_ctx=1024)
    assert sorted(got.values(), reverse=True) == pytest.approx(want, abs=1e-5)


def test_dry_breaker_token_itself_is_penalised_as_koboldcpp_1_76_does() -> None:
    # llama.cpp's vector {0,1,3,4,0,1} with breaker {3} expects no change: llama.cpp skips single-token breakers
    # in its step 4. KoboldCpp 1.76's sample_dry has no such skip: token 3 continues "0 1" and pays 1 * 1.1 ** 0.
    p = params(dry_multiplier=1.0, dry_base=1.1, dry_allowed_length=2, dry_penalty_last_n=6)
    s = Sampler(p, n_vocab=5, n_ctx=1024)
    s._breakers = {3: [()]}
    ids, probs = s.distribution(np.log(np.full(5, 0.2, np.float32)), [0, 1, 3, 4, 0, 1])
    want = sm({0: 0.0, 1: 0.0, 2: 0.0, 3: -1.0, 4: 0.0})
    assert {int(i): float(q) for i, q in zip(ids, probs)} == pytest.approx(want)


def spm_tokenizer(words: list[str]) -> Tokenizer:
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)] + [w.encode() for w in words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    return Tokenizer(pieces, [-float(i) for i in range(len(pieces))], types)


def ref_breaker_sequences(tok: Tokenizer, s: bytes) -> set[tuple[int, tuple[int, ...]]]:
    """KoboldCpp 1.76 GetOverlappingTokenSequences, naively, over every (token, start) pair."""
    out = set()
    for v in range(tok.n_vocab):
        word = tok.token_bytes(v, special=True)
        if s in word:
            out.add((v, ()))
            continue
        for pos in range(len(word)):
            rest = word[pos:]
            if rest and s.startswith(rest) and not all(c > 127 for c in s):
                out.add((v, tuple(tok.encode(s[len(rest):], add_bos=False)[:20])))
    return out


def test_dry_sequence_breakers_token_sequences() -> None:
    tok = spm_tokenizer(["\u2581yes", "\u2581no", "Ch", "apter", "\u2581Ch", "er:", ":", "\n\n", "ap", "ter"])
    for s in ("\n", ":", "Chapter", "er", "\u00e9\u00e8"):
        got = {(h, tail) for h, tails in dry_breaker_sequences(tok, [s]).items() for tail in tails}
        assert got == ref_breaker_sequences(tok, s.encode()), s
    ids = {tok.piece_text(i): i for i in range(259, tok.n_vocab)}
    got = dry_breaker_sequences(tok, ["Chapter"])
    assert got[ids["Ch"]] and all(tail for tail in got[ids["Ch"]])          # "Ch" + the tokens of "apter"
    assert () in dry_breaker_sequences(tok, [":"])[ids["er:"]]             # a token containing ':' is a breaker


def test_dry_breaker_stops_a_repeat_in_a_generation() -> None:
    tok = spm_tokenizer(["\u2581a", "\u2581b", "\u2581c", "\n"])
    a, b, c, nl = (tok.encode(w, add_bos=False)[-1] for w in (" a", " b", " c", "\n"))
    hist = [a, b, c, a, b]                              # " a b" repeats: c would extend it
    logits = np.zeros(tok.n_vocab, np.float32)
    p = params(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1, dry_penalty_last_n=0)
    plain = dist(p, logits, hist, tokenizer=tok)
    assert plain[c] < plain[a]
    with_nl = dist(p.replace(dry_sequence_breakers=("\n",)), logits, [a, b, c, nl, a, b], tokenizer=tok)
    # the breaker is 2 tokens back: repeats are cut to 2 = ... only "a b" (length 2) still counts
    assert with_nl[c] < with_nl[a]
    # " b" after a newline: without the breaker c (which followed " b" before) is penalised; with it, the repeat
    # cannot reach back over the newline and is too short to count
    hist = [a, b, c, a, nl, b]
    assert dist(p, logits, hist, tokenizer=tok)[c] < dist(p, logits, hist, tokenizer=tok)[a]
    cut = dist(p.replace(dry_sequence_breakers=("\n",)), logits, hist, tokenizer=tok)
    assert cut[c] == pytest.approx(cut[a])


# ------------------------------------------------------------------------------------------------------ XTC

def ref_xtc(logits: dict[int, float], threshold: float) -> dict[int, float]:
    """KoboldCpp 1.76 sample_xtc when the roll succeeds: every candidate with p >= threshold except the least
    likely of them loses 999 (when two or more pass)."""
    p = sm(logits)
    over = sorted((i for i in logits if p[i] >= threshold), key=lambda i: (-logits[i], i))
    out = dict(logits)
    if len(over) >= 2:
        for i in over[:-1]:
            out[i] -= 999.0
    return out


L = [1.0, 3.0, 2.0, 0.5, 2.5, -1.0, 0.0, 1.5]


def test_xtc_matches_reference() -> None:
    base = dict(enumerate(L))
    for thr in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        got = dist(params(xtc_probability=1.0, xtc_threshold=thr), L)
        assert_dist(got, sm(ref_xtc(base, thr)))


def test_xtc_llama_cpp_vectors() -> None:
    # llama.cpp test_xtc({0.4, 0.3, 0.2, 0.1}, ...): what survives, renormalised
    probs = [0.4, 0.3, 0.2, 0.1]
    lg = [math.log(q) for q in probs]
    for thr, kept in ((0.09, [3]), (0.19, [2, 3]), (0.29, [1, 2, 3]), (0.39, [0, 1, 2, 3])):
        got = dist(params(xtc_probability=0.99999, xtc_threshold=thr, seed=3), lg)
        assert set(got) == set(kept)
        total = sum(probs[i] for i in kept)
        assert [got[i] for i in kept] == pytest.approx([probs[i] / total for i in kept], rel=1e-5)


def test_xtc_is_off_above_half_and_at_probability_zero() -> None:
    assert_dist(dist(params(xtc_probability=1.0, xtc_threshold=0.51), L), sm(dict(enumerate(L))))
    assert_dist(dist(params(xtc_probability=0.0, xtc_threshold=0.01), L), sm(dict(enumerate(L))))


def test_xtc_roll_follows_probability() -> None:
    # with probability 0.3 the top choices are excluded 30 % of the time
    s = Sampler(params((5,), xtc_probability=0.3, xtc_threshold=0.1, temperature=0.7, seed=11), n_vocab=len(L))
    x = np.array(L, np.float32)
    n = 4000
    top = sum(s.sample(x) in (1, 4) for _ in range(n))
    p_top = sum(v for i, v in sm({i: L[i] / 0.7 for i in range(len(L))}).items() if i in (1, 4))
    excluded = ref_xtc({i: L[i] / 0.7 for i in range(len(L))}, 0.1)
    p_top_x = sum(v for i, v in sm(excluded).items() if i in (1, 4))
    want = 0.7 * p_top + 0.3 * p_top_x
    assert abs(top / n - want) < 5 * math.sqrt(want * (1 - want) / n)


def test_xtc_comes_after_the_chain_and_not_with_mirostat() -> None:
    # top_k 3 first: XTC then sees three candidates
    keep = sorted(range(len(L)), key=lambda i: -L[i])[:3]
    got = dist(params((0,), top_k=3, xtc_probability=1.0, xtc_threshold=0.1), L)
    assert_dist(got, sm(ref_xtc({i: L[i] for i in keep}, 0.1)))
    s = Sampler(params(mirostat=2, mirostat_tau=10.0, xtc_probability=1.0, xtc_threshold=0.0), n_vocab=len(L))
    ids, probs = s.distribution(np.array(L, np.float32))
    assert len(ids) == len(L) and probs[0] == pytest.approx(sm(dict(enumerate(L)))[1])


def test_distribution_does_not_move_the_generator() -> None:
    s = Sampler(params(xtc_probability=0.5, xtc_threshold=0.1, seed=9), n_vocab=len(L))
    first = [s.distribution(np.array(L, np.float32))[1][0] for _ in range(5)]
    assert len(set(first)) == 1


# ------------------------------------------------------------------------------------------------------ smoothing

def ref_smooth(logits: dict[int, float], f: float, c: float = 1.0) -> dict[int, float]:
    h = max(logits.values())
    k, s = (3 - c) / 2, (c - 1) / 2
    return {i: -(k * f * (v - h) ** 2) + s * f * (v - h) ** 3 + h for i, v in logits.items()}


@pytest.mark.parametrize("temp, f, curve", [(1.0, 0.3, 1.0), (0.7, 2.0, 1.0), (1.3, 0.5, 2.5), (1.0, 0.2, 10.0)])
def test_smoothing_matches_reference(temp, f, curve) -> None:
    got = dist(params((5,), temperature=temp, smoothing_factor=f, smoothing_curve=curve), L)
    assert_dist(got, sm(ref_smooth({i: L[i] / temp for i in range(len(L))}, f, curve)))


def test_smoothing_rides_with_temperature() -> None:
    # without sampler 5 in the order there is no temperature step, so no smoothing (KoboldCpp applies it there)
    assert_dist(dist(params((0,), smoothing_factor=2.0), L), sm(dict(enumerate(L))))
    # greedy: smoothing is off and one candidate is left
    assert set(dist(params((5,), temperature=0.0, smoothing_factor=2.0), L)) == {1}
    # with dynamic temperature, smoothing follows it (KoboldCpp sample_entropy)
    p_all = sm(dict(enumerate(L)))
    h = -sum(q * math.log(q) for q in p_all.values())
    t = 0.4 + 1.2 * (h / math.log(len(L)))
    got = dist(params((5,), temperature=1.0, dynatemp_range=0.6, smoothing_factor=0.4), L)
    assert_dist(got, sm(ref_smooth({i: L[i] / t for i in range(len(L))}, 0.4)))


# ------------------------------------------------------------------------------------------------------ top-nσ

def ref_nsigma(logits: dict[int, float], n: float) -> dict[int, float]:
    v = list(logits.values())
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    m = max(v)
    return {i: x for i, x in logits.items() if x >= m - n * std}


@pytest.mark.parametrize("n", [0.3, 0.7, 1.0, 2.0])
def test_top_n_sigma_matches_reference(n) -> None:
    t = 0.8
    got = dist(params((5,), temperature=t, nsigma=n), L)
    assert_dist(got, sm(ref_nsigma({i: L[i] / t for i in range(len(L))}, n)))


def test_top_n_sigma_llama_cpp_vectors() -> None:
    # llama.cpp test_top_n_sigma({0.1, 0.2, 0.3, 0.4}, ...): n = 1 keeps two, n = 3 keeps all. (n = 0 keeps only
    # the best in llama.cpp; KoboldCpp and we read nsigma <= 0 as off.)
    lg = [math.log(q) for q in (0.1, 0.2, 0.3, 0.4)]
    got = dist(params((5,), nsigma=1.0), lg)
    assert [got.get(i, 0.0) for i in range(4)] == pytest.approx([0.0, 0.0, 0.428571, 0.571429], abs=1e-5)
    assert len(dist(params((5,), nsigma=3.0), lg)) == 4
    assert len(dist(params((5,), nsigma=0.0), lg)) == 4 and len(dist(params((5,), nsigma=-1.0), lg)) == 4


def test_top_n_sigma_is_in_the_temperature_step() -> None:
    keep_all = dist(params((0,), top_k=0, nsigma=0.5), L)
    assert len(keep_all) == len(L)                        # no temperature step in the order: no top-nσ
    # after top_k 5 the deviation is taken over those five (the order decides)
    five = {i: L[i] for i in sorted(range(len(L)), key=lambda i: -L[i])[:5]}
    assert_dist(dist(params((0, 5), top_k=5, nsigma=0.8), L), sm(ref_nsigma(five, 0.8)))


# ------------------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("bad, field", [
    (dict(dry_multiplier=-1.0), "dry_multiplier"), (dict(dry_base=float("nan")), "dry_base"),
    (dict(dry_allowed_length=-1), "dry_allowed_length"), (dict(dry_allowed_length=1.5), "dry_allowed_length"),
    (dict(dry_penalty_last_n=-2), "dry_penalty_last_n"),
    (dict(dry_sequence_breakers=tuple("x" * 1 for _ in range(10_000))), "dry_sequence_breakers"),
    (dict(dry_sequence_breakers=("\n", 5)), "dry_sequence_breakers"), (dict(dry_sequence_breakers="\n"), "dry_"),
    (dict(xtc_threshold=1.5), "xtc_threshold"), (dict(xtc_probability=-0.1), "xtc_probability"),
    (dict(smoothing_factor=-1.0), "smoothing_factor"), (dict(smoothing_curve=0.5), "smoothing_curve"),
    (dict(nsigma=float("inf")), "nsigma"), (dict(banned_strings=tuple("ab" for _ in range(2000))), "banned"),
])
def test_validation_names_the_field(bad, field) -> None:
    with pytest.raises(RequestError, match=field):
        validate_sampling(params(**bad), n_vocab=8)


def test_seeded_draws_with_every_sampler_are_reproducible() -> None:
    rng = np.random.default_rng(2)
    logits = [rng.standard_normal(50).astype(np.float32) * 2 for _ in range(40)]
    p = params((6, 0, 1, 3, 4, 2, 5), top_k=30, temperature=0.9, smoothing_factor=0.3, nsigma=1.5,
               xtc_probability=0.5, xtc_threshold=0.1, dry_multiplier=0.8, repetition_penalty=1.1, seed=77)

    def run():
        s = Sampler(p, n_vocab=50)
        hist: list[int] = []
        for lg in logits:
            hist.append(s.sample(lg, hist))
        return hist

    a = run()
    assert a == run() and len(Counter(a)) > 5
