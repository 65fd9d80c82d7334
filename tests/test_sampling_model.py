"""The KoboldCpp samplers on a real model file (the demo model: random weights, so greedy output loops)."""
from __future__ import annotations

import math

import pytest

from airobackend.types import GenerationRequest, SamplingParams

PROMPT = "Once upon a time"
GREEDY = dict(temperature=0.0, top_k=1, repeat_penalty=1.0, logit_bias={2: -100.0})   # EOS pushed away


@pytest.fixture(scope="module")
def llm(demo_model):
    from airobackend.llama import Llama
    return Llama(str(demo_model), n_ctx=512, verbose=False)


def repeated_4gram_rate(ids: list[int]) -> float:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    seen: set = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def completion_ids(llm, **kw) -> list[int]:
    text = llm(PROMPT, max_tokens=100, **kw)["choices"][0]["text"]
    return llm.tokenizer.encode(text, add_bos=False)


def test_dry_breaks_a_greedy_loop(llm):
    plain = repeated_4gram_rate(completion_ids(llm, **GREEDY))
    dry = repeated_4gram_rate(completion_ids(llm, dry_multiplier=0.8, **GREEDY))
    assert plain > 0.5                                   # the model loops
    assert dry < plain / 4


def test_dry_off_when_llama_cpp_last_n_is_zero(llm):
    assert completion_ids(llm, dry_multiplier=0.8, dry_penalty_last_n=0, **GREEDY) == completion_ids(llm, **GREEDY)


def test_xtc_at_probability_one_never_picks_the_top_token_when_another_passes(llm):
    thr = 0.1
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=3,
                              xtc_probability=1.0, xtc_threshold=thr)
    req = GenerationRequest(prompt=PROMPT, max_tokens=80, sampling=sampling, n_probs=5)
    entries = [e for ev in llm.engine.generate(req) for e in (ev.logprobs or [])]
    checked = 0
    for e in entries:                                    # raw model distribution = what XTC sees at temperature 1
        passing = [t for t in e["top_logprobs"] if math.exp(t["logprob"]) >= thr]
        if len(passing) >= 2:
            checked += 1
            assert e["id"] != passing[0]["id"]
    assert checked >= 5


def test_smoothing_and_top_n_sigma_change_sampled_output(llm):
    base = dict(temperature=1.5, top_k=0, top_p=1.0, seed=5, max_tokens=40)
    plain = llm(PROMPT, **base)["choices"][0]["text"]
    assert llm(PROMPT, smoothing_factor=3.0, **base)["choices"][0]["text"] != plain
    assert llm(PROMPT, top_n_sigma=0.5, **base)["choices"][0]["text"] != plain


def test_a_banned_phrase_from_a_greedy_output_never_appears_again(llm):
    text = llm(PROMPT, max_tokens=100, **GREEDY)["choices"][0]["text"]
    words = text.split()
    phrase = " ".join(words[4:6])                         # two words the greedy output does write
    assert phrase and phrase in text
    for variant in (phrase, phrase.upper()):              # KoboldCpp compares case-insensitively
        again = llm(PROMPT, max_tokens=100, banned_strings=[variant], **GREEDY)["choices"][0]["text"]
        assert phrase.lower() not in again.lower()
        assert again.startswith(text[:text.index(phrase)].rstrip())   # the same until the phrase would begin
    streamed = "".join(c["choices"][0]["text"] for c in
                       llm(PROMPT, max_tokens=100, banned_strings=[phrase], stream=True, **GREEDY))
    assert phrase.lower() not in streamed.lower()
