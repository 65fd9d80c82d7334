"""Each sampler on a small hand-made logit vector, against its definition (llama.cpp's `llama_sample_*` at dadbed9,
KoboldCpp's `gpttype_adapter.cpp`) computed here in plain Python, never by calling the implementation."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from airobackend.errors import RequestError
from airobackend.sampling import Sampler, validate_sampling
from airobackend.tokenizer import Tokenizer
from airobackend.types import SamplingParams

L = [1.0, 3.0, 2.0, 0.5, 2.5, -1.0, 0.0, 1.5]           # 8-token vocabulary
N = len(L)


def sm(logits: dict[int, float]) -> dict[int, float]:
    """Reference softmax over {id: logit}."""
    m = max(logits.values())
    e = {i: math.exp(v - m) for i, v in logits.items()}
    s = sum(e.values())
    return {i: v / s for i, v in e.items()}


def ranked(logits: list[float]) -> list[int]:
    return sorted(range(len(logits)), key=lambda i: (-logits[i], i))


def params(order: tuple[int, ...], **kw) -> SamplingParams:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, tfs=1.0, top_a=0.0,
                repetition_penalty=1.0, sampler_order=order, seed=1234)
    base.update(kw)
    return SamplingParams(**base)


def dist(p: SamplingParams, logits=L, history=(), n_vocab=None) -> dict[int, float]:
    s = Sampler(p, n_vocab=n_vocab or len(logits))
    ids, probs = s.distribution(np.array(logits, dtype=np.float32), history)
    return {int(i): float(q) for i, q in zip(ids, probs)}


def assert_dist(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want)
    for i in want:
        assert got[i] == pytest.approx(want[i], rel=1e-5, abs=1e-7), i


def test_no_sampler_is_plain_softmax() -> None:
    assert_dist(dist(params(())), sm(dict(enumerate(L))))


def test_top_k() -> None:
    keep = ranked(L)[:3]
    assert_dist(dist(params((0,), top_k=3)), sm({i: L[i] for i in keep}))
    assert_dist(dist(params((0,), top_k=0)), sm(dict(enumerate(L))))      # 0 = off


def test_top_p() -> None:
    p_all = sm(dict(enumerate(L)))
    order = ranked(L)
    for top_p in (0.3, 0.6, 0.8, 0.95):
        cum, keep = 0.0, []
        for i in order:                                                    # smallest prefix reaching top_p
            keep.append(i)
            cum += p_all[i]
            if cum >= top_p:
                break
        assert_dist(dist(params((2,), top_p=top_p)), sm({i: L[i] for i in keep}))


def test_min_p() -> None:
    p_all = sm(dict(enumerate(L)))
    pmax = max(p_all.values())
    for min_p in (0.1, 0.3, 0.7):
        keep = [i for i in range(N) if p_all[i] >= min_p * pmax]
        assert_dist(dist(params((2,), min_p=min_p)), sm({i: L[i] for i in keep}))


def test_top_a() -> None:
    p_all = sm(dict(enumerate(L)))
    pmax = max(p_all.values())
    for a in (0.2, 0.5, 1.0):
        keep = [i for i in range(N) if p_all[i] >= a * pmax * pmax]
        assert_dist(dist(params((1,), top_a=a)), sm({i: L[i] for i in keep}))


def test_tail_free() -> None:
    order = ranked(L)
    p_all = sm(dict(enumerate(L)))
    p = [p_all[i] for i in order]
    d1 = [p[i] - p[i + 1] for i in range(len(p) - 1)]
    d2 = [abs(d1[i] - d1[i + 1]) for i in range(len(d1) - 1)]
    d2 = [v / sum(d2) for v in d2]
    for z in (0.3, 0.6, 0.9):
        cum, n = 0.0, len(p)
        for i, v in enumerate(d2):
            cum += v
            if cum > z and i >= 1:
                n = i
                break
        keep = order[:n]
        assert_dist(dist(params((3,), tfs=z)), sm({i: L[i] for i in keep}))


def test_typical() -> None:
    p_all = sm(dict(enumerate(L)))
    entropy = -sum(q * math.log(q) for q in p_all.values())
    by_typicality = sorted(range(N), key=lambda i: abs(-math.log(p_all[i]) - entropy))
    for typ in (0.2, 0.5, 0.9):
        cum, keep = 0.0, []
        for i in by_typicality:
            keep.append(i)
            cum += p_all[i]
            if cum > typ:
                break
        assert_dist(dist(params((4,), typical_p=typ)), sm({i: L[i] for i in keep}))


def test_temperature() -> None:
    for t in (0.5, 1.7):
        assert_dist(dist(params((5,), temperature=t)), sm({i: L[i] / t for i in range(N)}))


def test_dynamic_temperature() -> None:
    temp, rng_, expo = 1.0, 0.6, 1.3
    p_all = sm(dict(enumerate(L)))
    h = -sum(q * math.log(q) for q in p_all.values())
    t = (temp - rng_) + ((temp + rng_) - (temp - rng_)) * (h / math.log(N)) ** expo
    got = dist(params((5,), temperature=temp, dynatemp_range=rng_, dynatemp_exponent=expo))
    assert_dist(got, sm({i: L[i] / t for i in range(N)}))


def test_greedy_when_temperature_not_positive() -> None:
    best = ranked(L)[0]
    for temp in (0.0, -1.0):
        p = params((6, 0, 1, 3, 4, 2, 5), temperature=temp, seed=None, top_k=50)
        s = Sampler(p, n_vocab=N)
        assert {s.sample(np.array(L, np.float32)) for _ in range(20)} == {best}
        # temperature left out of the order: still greedy
        s = Sampler(params((0,), temperature=temp), n_vocab=N)
        assert s.sample(np.array(L, np.float32)) == best


def pen_logit(v: float, pen: float) -> float:
    return v * pen if v <= 0 else v / pen


def test_repetition_penalty_range_and_slope() -> None:
    # window = last 4 tokens of the history: far half [2, 6], near half [4, 3]; token 7 is outside the range
    history = [7, 7, 2, 6, 4, 3]
    pen, slope = 1.5, 0.4
    pen_far = 1 + (pen - 1) * slope
    want = list(L)
    for i in (4, 3):
        want[i] = pen_logit(L[i], pen)
    for i in (2, 6):
        want[i] = pen_logit(L[i], pen_far)
    got = dist(params((6,), repetition_penalty=pen, repetition_penalty_range=4, repetition_penalty_slope=slope),
               history=history)
    assert_dist(got, sm(dict(enumerate(want))))
    # range 0 = the whole history, slope 1 = uniform penalty
    want = [pen_logit(v, pen) if i in history else v for i, v in enumerate(L)]
    got = dist(params((6,), repetition_penalty=pen, repetition_penalty_range=0), history=history)
    assert_dist(got, sm(dict(enumerate(want))))


def test_presence_and_frequency_penalties() -> None:
    history = [1, 1, 1, 4, 6]
    pres, freq = 0.3, 0.25
    counts = Counter(history)
    want = [v - (pres + freq * counts[i] if counts[i] else 0.0) for i, v in enumerate(L)]
    got = dist(params((6,), presence_penalty=pres, frequency_penalty=freq, repetition_penalty_range=0),
               history=history)
    assert_dist(got, sm(dict(enumerate(want))))


def test_sampler_order_matters() -> None:
    # top_k(2) then temperature 2 vs temperature 2 then top_p 0.5: computed separately from the definitions
    got = dist(params((0, 5), top_k=2, temperature=2.0))
    keep = ranked(L)[:2]
    assert_dist(got, sm({i: L[i] / 2.0 for i in keep}))
    p_t = sm({i: L[i] / 2.0 for i in range(N)})
    cum, keep = 0.0, []
    for i in ranked(L):
        keep.append(i)
        cum += p_t[i]
        if cum >= 0.5:
            break
    got = dist(params((5, 2), top_p=0.5, temperature=2.0))
    assert_dist(got, sm({i: L[i] / 2.0 for i in keep}))
    got2 = dist(params((2, 5), top_p=0.5, temperature=2.0))
    assert set(got2) != set(got)                                           # top_p before temperature: fewer kept


def test_mirostat_v2() -> None:
    tau, eta = 1.5, 0.5
    mu = 2 * tau
    p_all = sm(dict(enumerate(L)))
    keep = [i for i in ranked(L) if -math.log2(p_all[i]) <= mu]
    want = sm({i: L[i] for i in keep})
    p = params((), mirostat=2, mirostat_tau=tau, mirostat_eta=eta, temperature=1.0)
    s = Sampler(p, n_vocab=N)
    got = s.distribution(np.array(L, np.float32))
    assert_dist({int(i): float(q) for i, q in zip(*got)}, want)
    tid = s.sample(np.array(L, np.float32))
    assert tid in keep
    assert s.mu == pytest.approx(mu - eta * (-math.log2(want[tid]) - tau))


def test_mirostat_v1() -> None:
    logits = [4.0, 3.1, 2.5, 2.0, 1.2, 0.9, 0.1, -0.5, -1.0, -2.0]
    n_vocab, tau, eta = len(logits), 3.0, 0.1
    mu = 2 * tau
    p_all = sm(dict(enumerate(logits)))
    order = ranked(logits)
    p = [p_all[i] for i in order]
    num = den = 0.0
    for i in range(min(99, len(p) - 1)):
        t_i = math.log((i + 2) / (i + 1))
        b_i = math.log(p[i] / p[i + 1])
        num += t_i * b_i
        den += t_i * t_i
    s_hat = num / den
    eps = s_hat - 1
    k = int(((eps * 2 ** mu) / (1 - n_vocab ** (-eps))) ** (1 / s_hat))
    assert 1 <= k < n_vocab                                                # the vector is chosen so k truncates
    keep = order[:k]
    want = sm({i: logits[i] for i in keep})
    s = Sampler(params((), mirostat=1, mirostat_tau=tau, mirostat_eta=eta), n_vocab=n_vocab)
    ids, probs = s.distribution(np.array(logits, np.float32))
    assert_dist({int(i): float(q) for i, q in zip(ids, probs)}, want)
    tid = s.sample(np.array(logits, np.float32))
    assert s.mu == pytest.approx(mu - eta * (-math.log2(want[tid]) - tau))


def test_logit_bias_and_bans() -> None:
    bias = {0: 2.5, 1: -1.0}
    want = {i: L[i] + bias.get(i, 0.0) for i in range(N) if i not in (3, 2)}
    got = dist(params((), logit_bias=bias, banned_tokens=(3,), ban_eos=True))   # EOS = 2 without a tokenizer
    assert_dist(got, sm(want))


def toy_tokenizer() -> Tokenizer:
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    words = ["\u2581yes", "\u2581no", "yes", "no", "\u2581maybe", "Suddenly", "\u2581sudden", "ye", "s", "\u2581", "\u2581s"]
    pieces += [w.encode() for w in words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    return Tokenizer(pieces, [-float(i) for i in range(len(pieces))], types)


def test_banned_strings_one_character_bans_tokens_longer_ones_are_phrases() -> None:
    # KoboldCpp 1.76 gpttype_adapter.cpp (banned_tokens handling in gpttype_generate): a one-byte string that is one
    # token bans every token whose printed text contains it, ASCII case-insensitively; anything else is a phrase
    tok = toy_tokenizer()
    ids = {tok.piece_text(i): i for i in range(259, tok.n_vocab)}
    s = Sampler(params((), banned_strings=("S", "Sudden", "sudden", "")), tokenizer=tok)
    assert s.phrases == (b"sudden",)
    containing_s = {i for i in range(tok.n_vocab) if b"s" in tok.token_bytes(i, special=True).lower()}
    assert {ids["Suddenly"], ids[" sudden"], ids["yes"], ids["s"], 3 + ord("s"), 3 + ord("S")} <= containing_s
    got_ids, _ = s.distribution(np.zeros(tok.n_vocab, np.float32))
    assert set(got_ids.tolist()) == set(range(tok.n_vocab)) - containing_s
    assert Sampler(params((), banned_strings=("maybe",)), tokenizer=tok).distribution(
        np.zeros(tok.n_vocab, np.float32))[0].size == tok.n_vocab                  # a phrase bans no token by itself


def test_seed_reproducible_and_draws_follow_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(N).astype(np.float32) for _ in range(30)]
    p = params((6, 0, 1, 3, 4, 2, 5), temperature=0.9, top_k=6, top_p=0.95, repetition_penalty=1.2, seed=42)

    def run(pp):
        s = Sampler(pp, n_vocab=N)
        hist: list[int] = []
        for lg in logits:
            hist.append(s.sample(lg, hist))
        return hist

    assert run(p) == run(p)
    assert run(p) != run(p.replace(seed=43))
    # empirical frequencies of many draws match the distribution (5 sigma)
    s = Sampler(params((5,), temperature=1.0, seed=7), n_vocab=N)
    n = 20000
    counts = Counter(s.sample(np.array(L, np.float32)) for _ in range(n))
    for i, q in sm(dict(enumerate(L))).items():
        assert abs(counts[i] / n - q) < 5 * math.sqrt(q * (1 - q) / n) + 1e-9


def test_random_seed_is_reported() -> None:
    s1, s2 = Sampler(params((), seed=None), n_vocab=N), Sampler(params((), seed=-1), n_vocab=N)
    assert s1.seed >= 0 and s2.seed >= 0 and s1.seed != s2.seed


def test_prefilter_keeps_best_5000() -> None:
    x = np.linspace(0, 1, 6000, dtype=np.float32)
    ids, probs = Sampler(params(()), n_vocab=6000).distribution(x)
    assert len(ids) == 5000 and set(ids.tolist()) == set(range(1000, 6000))


@pytest.mark.parametrize("bad", [
    dict(temperature=float("nan")), dict(top_p=1.5), dict(top_p=float("inf")), dict(min_p=-0.1),
    dict(top_k=-5), dict(top_k=2.5), dict(repetition_penalty=0.0), dict(repetition_penalty_range=-2),
    dict(mirostat=3), dict(mirostat_tau=float("nan")), dict(dynatemp_range=-1.0),
    dict(sampler_order=(6, 0, 7)), dict(sampler_order=(0, 0)), dict(sampler_order="0,1"),
    dict(logit_bias={100: 1.0}), dict(logit_bias={1: float("nan")}), dict(logit_bias={1: 1000.0}),
    dict(banned_tokens=(8,)), dict(grammar='root ::= "a'), dict(typical_p=2.0), dict(seed="abc"),
])
def test_validation_errors(bad: dict) -> None:
    p = params((6, 0, 1, 3, 4, 2, 5), **bad)
    with pytest.raises(RequestError):
        validate_sampling(p, n_vocab=N)
    with pytest.raises(RequestError):
        Sampler(p, n_vocab=N)


def test_defaults_are_valid() -> None:
    validate_sampling(SamplingParams(), n_vocab=32000)
    validate_sampling(SamplingParams(logit_bias={5: float("-inf")}), n_vocab=32000)


def test_grammar_forces_yes_or_no() -> None:
    tok = toy_tokenizer()
    ids = {tok.piece_text(i): i for i in range(259, tok.n_vocab)}
    for seed in range(12):
        rng = np.random.default_rng(seed)
        s = Sampler(params((6, 0, 1, 3, 4, 2, 5), top_k=40, seed=seed, grammar='root ::= ("yes" | "no") "."'),
                    tokenizer=tok)
        out: list[int] = []
        for _ in range(10):
            x = rng.standard_normal(tok.n_vocab).astype(np.float32)
            x[ids[" maybe"]] += 30.0                     # the model "wants" something the grammar forbids
            x[2] += 5.0                                  # and wants to stop early
            t = s.sample(x, out)
            out.append(t)
            if t == tok.eos_id:
                break
        assert out[-1] == tok.eos_id
        assert tok.decode(out[:-1]) in (b"yes.", b"no.")


def test_grammar_with_greedy_picks_best_allowed_token() -> None:
    tok = toy_tokenizer()
    ids = {tok.piece_text(i): i for i in range(259, tok.n_vocab)}
    rng = np.random.default_rng(3)
    x = rng.standard_normal(tok.n_vocab).astype(np.float32)
    x[ids[" maybe"]] = 50.0
    allowed = [ids["yes"], ids["no"], ids["ye"], 3 + ord("y"), 3 + ord("n")]
    best = max(allowed, key=lambda i: x[i])
    s = Sampler(params((6, 0, 1, 3, 4, 2, 5), temperature=0.0, grammar='root ::= "yes" | "no"'), tokenizer=tok)
    assert s.sample(x) == best


def test_grammar_with_mirostat() -> None:
    tok = toy_tokenizer()
    for seed in range(5):
        rng = np.random.default_rng(seed)
        s = Sampler(params((), mirostat=2, mirostat_tau=3.0, seed=seed, grammar='root ::= [a-c]{3}'), tokenizer=tok)
        out: list[int] = []
        while not out or out[-1] != tok.eos_id:
            out.append(s.sample(rng.standard_normal(tok.n_vocab).astype(np.float32), out))
            assert len(out) <= 4
        text = tok.decode(out[:-1])
        assert len(text) == 3 and set(text) <= set(b"abc")
