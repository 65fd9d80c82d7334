"""Reuse of the KV cache for trimmed chat histories, and saved states of other conversations.

The plans are checked on token lists (what moves where, what is evaluated); the engine's execution of them on the
scripted model of test_engine.py, whose fake cache records which token sits at each position, so a wrong move or a
hole shows up as a wrong next token or an assertion in the fake.
"""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.engine import Engine
from airobackend.kernels.dequant import f16_table
from airobackend.promptcache import Chunk, PromptCache, plan_reuse
from airobackend.settings import Settings
from airobackend.types import GenerationRequest
from test_engine import GREEDY, TOK, FakeLlama, ScriptedModel

BOS = TOK.bos_id
TAB = f16_table()
_NEXT = [3]


def seq(n: int) -> list[int]:
    """n token ids not used before (the scripted vocabulary has 366: every run below is unambiguous)."""
    start = _NEXT[0]
    _NEXT[0] += n
    assert _NEXT[0] <= TOK.n_vocab
    return list(range(start, start + n))


SYSTEM = [BOS] + seq(30)                                    # system prompt / character card / memory
MSGS = [seq(20) for i in range(12)]                         # chat messages of 20 tokens
NOTE = seq(12)                                              # an author's note
DRIFT = seq(3)                                              # re-tokenized text at a cut
OTHER = [BOS] + seq(17)                                     # another conversation
OTHER_MSGS = [seq(20) for i in range(3)]


def chat(*parts: list[int]) -> list[int]:
    return [t for p in parts for t in p]


def check_plan(cached, prompt, plan):
    """The plan puts, at every reused prompt position, the cached token that is there in the prompt."""
    assert plan.prompt_len == len(prompt)
    assert cached[:plan.prefix] == prompt[:plan.prefix]
    covered = set(range(plan.prefix))
    for c in plan.chunks:
        assert cached[c.src:c.src + c.n] == prompt[c.dst:c.dst + c.n]
        assert not covered & set(range(c.dst, c.dst + c.n))
        covered |= set(range(c.dst, c.dst + c.n))
    spans = {i for s, e in plan.spans() for i in range(s, e)}
    assert spans | covered == set(range(len(prompt))) and not spans & covered
    assert len(prompt) - 1 in spans                          # the last token is always evaluated
    return plan


# ---------------------------------------------------------------------------------------------- plans

def test_one_gap_after_the_system_block():
    cached = chat(SYSTEM, *MSGS[:8])
    prompt = chat(SYSTEM, *MSGS[2:9])                        # two oldest messages dropped, one new at the end
    plan = check_plan(cached, prompt, plan_reuse(cached, prompt, 16))
    assert plan.prefix == len(SYSTEM)
    assert plan.chunks == [Chunk(src=len(SYSTEM) + 40, dst=len(SYSTEM), n=120)]
    assert plan.spans() == [(len(SYSTEM) + 120, len(prompt))] and plan.n_evaluate == 20


def test_two_gaps():
    cached = chat(SYSTEM, *MSGS[:8])
    prompt = chat(SYSTEM, MSGS[1], MSGS[2], MSGS[4], MSGS[5], MSGS[6], MSGS[7], MSGS[8])   # 0 and 3 dropped
    plan = check_plan(cached, prompt, plan_reuse(cached, prompt, 16))
    assert len(plan.chunks) == 2 and plan.n_evaluate == 20
    assert plan.moves() == plan.chunks                        # both move left: in order


def test_insertion_moves_later_runs_right():
    """KoboldAI Lite moves its author's note: new text appears between cached runs; what follows moves right."""
    note = NOTE
    cached = chat(SYSTEM, *MSGS[:6])
    prompt = chat(SYSTEM, *MSGS[:4], note, MSGS[4], MSGS[5], MSGS[6])
    plan = check_plan(cached, prompt, plan_reuse(cached, prompt, 16))
    assert plan.prefix == len(SYSTEM) + 80
    assert plan.chunks == [Chunk(src=len(SYSTEM) + 80, dst=len(SYSTEM) + 92, n=40)]
    assert plan.n_evaluate == 12 + 20
    # a note moved down: a gap where it was, an insertion where it is. Runs keep their order, so either the note
    # or the two messages it jumped over are evaluated again: the cheaper (the note).
    cached = chat(SYSTEM, MSGS[0], MSGS[1], note, MSGS[2], MSGS[3], MSGS[4])
    prompt = chat(SYSTEM, MSGS[0], MSGS[1], MSGS[2], MSGS[3], note, MSGS[4], MSGS[5])
    plan = check_plan(cached, prompt, plan_reuse(cached, prompt, 8))
    assert plan.n_evaluate == 12 + 20
    # two insertions: both later runs move right, the last one first (it must not be overwritten by the other)
    cached = chat(SYSTEM, *MSGS[:4])
    prompt = chat(SYSTEM, note, MSGS[0], MSGS[1], note[:5], MSGS[2], MSGS[3], MSGS[4])
    plan = check_plan(cached, prompt, plan_reuse(cached, prompt, 8))
    assert plan.n_evaluate == 12 + 5 + 20
    assert [(c.src, c.dst - c.src) for c in plan.moves()] == [(len(SYSTEM) + 40, 17), (len(SYSTEM), 12)]


def test_drift_at_the_cut_costs_only_the_changed_tokens():
    """The text after the cut is tokenized again: a few tokens at its start differ from the cached ones."""
    cached = chat(SYSTEM, *MSGS[:8])
    drift = DRIFT                                                 # 2 tokens -> 3 others
    prompt = chat(SYSTEM, drift, MSGS[2][2:], *MSGS[3:9])
    plan = check_plan(cached, prompt, plan_reuse(cached, prompt, 16))
    assert plan.n_evaluate == 3 + 20
    assert plan.spans()[0] == (len(SYSTEM), len(SYSTEM) + 3)


def test_short_runs_are_not_reused_and_zero_means_prefix_only():
    cached = chat(SYSTEM, *MSGS[:8])
    prompt = chat(SYSTEM, *MSGS[2:9])
    assert plan_reuse(cached, prompt, 200).chunks == []      # the run (120) is shorter than the minimum
    plan = plan_reuse(cached, prompt, 0)
    assert plan.chunks == [] and plan.prefix == len(SYSTEM) and plan.n_evaluate == len(prompt) - len(SYSTEM)
    same = plan_reuse(prompt, prompt, 16)                    # a repeat: all but the last token
    assert same.prefix == len(prompt) - 1 and same.spans() == [(len(prompt) - 1, len(prompt))]


def test_repetitive_text_stays_cheap_and_correct():
    cached = [BOS] + [5] * 600
    prompt = [BOS] + [5] * 300 + [6] + [5] * 200
    plan = check_plan(cached, prompt, plan_reuse(cached, prompt, 16))
    assert plan.n_reused >= 480


# ---------------------------------------------------------------------------------------------- the engine

def echo_model(n_ctx: int = 1024) -> ScriptedModel:
    """Predicts a token that depends on the last four cached tokens, so a wrong cache shows in the output."""
    return ScriptedModel(lambda kv: 300 + (sum(kv[-4:]) * 7 + len(kv)) % 50, n_ctx=n_ctx)


def engine(model=None, **settings) -> tuple[Engine, ScriptedModel]:
    model = model or echo_model()
    settings.setdefault("prompt_cache_mb", 0)
    return Engine(FakeLlama(model), Settings(**settings)), model


def ask(e: Engine, tokens: list[int], n: int = 3):
    events = list(e.generate(GenerationRequest(tokens=tokens, max_tokens=n, sampling=GREEDY)))
    return [t for ev in events for t in ev.token_ids], events[-1]


def reference(tokens: list[int], n: int = 3) -> list[int]:
    e, _ = engine()
    return ask(e, tokens, n)[0]


@pytest.mark.parametrize("case", ["one_gap", "two_gaps", "insertion", "drift", "memory_top"])
def test_engine_reuses_and_generates_as_from_scratch(case):
    note = NOTE
    first = chat(SYSTEM, *MSGS[:8])
    second = {
        "one_gap": chat(SYSTEM, *MSGS[2:9]),
        "two_gaps": chat(SYSTEM, MSGS[1], MSGS[2], *MSGS[4:9]),
        "insertion": chat(SYSTEM, *MSGS[:5], note, *MSGS[5:9]),
        "drift": chat(SYSTEM, DRIFT, MSGS[2][2:], *MSGS[3:9]),
        "memory_top": chat(SYSTEM, *MSGS[:8], MSGS[8]),   # plain continuation: memory and history stay in place
    }[case]
    e, model = engine()
    ask(e, first)
    before, passes = len(model.evaluated), model.passes
    out, last = ask(e, second)
    evaluated = model.evaluated[before:]
    new = {"one_gap": 20, "two_gaps": 20, "insertion": 32, "drift": 23, "memory_top": 20}[case]
    # prompt tokens evaluated: only the new ones (+ the generated ones fed back, which the fake records too)
    assert len(evaluated) - (len(out) - 1 if out else 0) == new
    assert last.cached_tokens == len(second) - new and last.prompt_tokens == len(second)
    assert model.kv[:len(second)] == second                  # every position holds the prompt's token
    assert out == reference(second)                           # the scripted model's output depends on the cache
    assert model.passes - passes == 1 + len(out) - 1         # the gaps share one pass; then one per fed-back token


def test_noshift_reuses_only_the_prefix():
    e, model = engine(context_shift=False)
    ask(e, chat(SYSTEM, *MSGS[:8]))
    before = len(model.evaluated)
    second = chat(SYSTEM, *MSGS[2:9])
    _, last = ask(e, second, 1)
    assert len(model.evaluated) - before == len(second) - len(SYSTEM) == len(second) - last.cached_tokens
    assert model.cache.moves == []


def test_generation_time_shift_still_works_after_a_reuse():
    e, model = engine(model=echo_model(n_ctx=200))
    ask(e, chat(SYSTEM, *MSGS[:6]), 40)
    out, last = ask(e, chat(SYSTEM, *MSGS[1:6]), 120)          # fills the context: shifts while generating
    assert len(out) == 120 and model.shifts and last.cached_tokens > 0
    assert model.kv[0] == BOS


def test_aborted_prompt_leaves_consistent_bookkeeping():
    e, model = engine()
    ask(e, chat(SYSTEM, *MSGS[:8]))
    gen = e.generate(GenerationRequest(tokens=chat(SYSTEM, *MSGS[2:9]), max_tokens=3, sampling=GREEDY))
    e.abort()
    gen._job.abort.set()
    events = list(gen)
    assert events[-1].finish_reason.value == "aborted"
    # whatever was moved, the engine's view equals what the cache holds
    assert model.cache.tokens[:len(e._cache)] == e._cache
    out, _ = ask(e, chat(SYSTEM, *MSGS[2:9]))
    assert out == reference(chat(SYSTEM, *MSGS[2:9]))


# ---------------------------------------------------------------------------------------------- saved states

def test_switching_conversations_restores_each_one():
    e, model = engine(prompt_cache_mb=1, cache_slots=4)      # the fake's states cost 100 bytes per position
    alice = chat(SYSTEM, *MSGS[:6])
    bob = chat(OTHER, *OTHER_MSGS)
    ask(e, alice)
    ask(e, bob)                                               # alice is saved before bob overwrites her cache
    assert len(e.prompt_cache) == 1
    before = len(model.evaluated)
    out, last = ask(e, chat(alice, MSGS[6]))                  # alice is back: her state is restored
    assert len(model.evaluated) - before - (len(out) - 1) == 20
    assert last.cached_tokens == len(alice)
    assert out == reference(chat(alice, MSGS[6]))
    assert e.prompt_cache.hits == 1 and len(e.prompt_cache) == 1      # bob waits in RAM now
    before = len(model.evaluated)
    out, last = ask(e, chat(OTHER, OTHER_MSGS[1], OTHER_MSGS[2], MSGS[11]))   # bob, trimmed: restored, shifted
    assert len(model.evaluated) - before - (len(out) - 1) == 20 and last.cached_tokens == len(OTHER) + 40


def test_budget_holds_under_eviction():
    store = PromptCache(budget_bytes=1000, max_entries=3)
    evicted = []
    for i in range(10):
        evicted += store.put([i] * (i + 1), object(), 150 + 20 * i)
        assert store.nbytes <= 1000 and len(store) <= 3
    assert [len(e.tokens) for e in evicted][:2] == [1, 2]           # least recently used first
    assert store.put([99] * 5, object(), 1001) == [] and store.nbytes <= 1000   # larger than the budget: not kept
    # superseded: an older turn of the same conversation is replaced by the newer one
    store.clear()
    store.put([1, 2, 3], object(), 10)
    store.put([1, 2, 3, 4, 5], object(), 10)
    assert [e.tokens for e in store.entries()] == [[1, 2, 3, 4, 5]]


def test_engine_budget_holds_with_many_conversations():
    e, model = engine(prompt_cache_mb=0, cache_slots=3)
    e.prompt_cache.budget_bytes = 100 * 200                    # room for about three 60-token states
    for c in range(8):
        conv = chat([BOS, 3 + c], *[[100 + c + 10 * i] * 20 for i in range(3)])
        ask(e, conv, 1)
        assert e.prompt_cache.nbytes <= e.prompt_cache.budget_bytes and len(e.prompt_cache) <= 3
    assert len(e.prompt_cache) == 3


# ---------------------------------------------------------------------------------------------- a real model

@pytest.mark.parametrize("fmt", ["gguf", "ggmlv3.bin"])
def test_reuse_on_a_one_layer_model_is_exact(fixtures_dir, fmt):
    """With one layer, a position's keys and values depend only on its token and position, so a reused, moved
    entry equals a fresh one up to fp16 rounding: after a gap, an insertion and drift, the engine's logits equal
    those of the trimmed prompt evaluated from scratch (fx32k-q4_0: the llama.cpp fixture with the real vocabulary)."""
    from airobackend.llama import Llama
    path = str(fixtures_dir / "models" / f"fx32k-q4_0.{fmt}")
    llm = Llama(path, n_ctx=512, verbose=False, cache_reuse=16)
    fresh = Llama(path, n_ctx=512, verbose=False)
    rng = np.random.default_rng(3)
    body = [int(t) for t in rng.integers(300, 30000, 400)]
    cached = [1] + body[:300]
    cases = {"gap": [1] + body[:40] + body[100:300] + body[300:320],
             "insertion": [1] + body[:150] + body[320:340] + body[150:300] + body[340:350],
             "drift": [1] + body[:40] + body[360:363] + body[102:300] + body[300:310]}
    for name, prompt in cases.items():
        llm.reset()
        list(llm.engine.generate(GenerationRequest(tokens=cached, max_tokens=1, sampling=GREEDY)))
        last = list(llm.engine.generate(GenerationRequest(tokens=prompt, max_tokens=1, sampling=GREEDY)))[-1]
        assert last.cached_tokens >= len(prompt) - 40, name
        want = fresh.model.eval(prompt, 0)[0]
        n = len(prompt)
        # the cache the engine arranged: values bit-identical, keys within fp16 rounding of fresh ones
        np.testing.assert_array_equal(llm.model.cache.v[:, :, :n], fresh.model.cache.v[:, :, :n])
        k_got, k_want = TAB[llm.model.cache.k[:, :, :n]], TAB[fresh.model.cache.k[:, :, :n]]
        assert np.abs(k_got - k_want).max() <= 2e-3 * np.abs(k_want).max(), name
        got = llm.engine._last_logits
        assert np.abs(got - want).max() < 0.02, (name, np.abs(got - want).max())     # the file's noise floor
        assert got.argmax() == want.argmax()
    llm.close()
    fresh.close()


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
@pytest.mark.parametrize("name", ["legacy/models/fx-q4_0.ggjt1.bin", "legacy/models/fx-q4_0.ggmf.bin",
                                  "legacy/models/fx-f16.ggml.bin", "split zip"])
def test_reuse_moves_entries_exactly_in_every_format(fixtures_dir, tmp_path, name):
    """A trimmed prompt reuses the cache whatever the file format: the oldest GGML generations and a model read out
    of a split zip. Layer 0's keys and values depend only on token and position, so there the moved entries equal
    those of the trimmed prompt evaluated from scratch (values bit for bit, keys within fp16 rounding); the later
    layers keep what they computed with the dropped text in view, as any context shift does."""
    import shutil
    import subprocess

    from airobackend.llama import Llama
    if name == "split zip":
        if shutil.which("zip") is None:
            pytest.skip("Info-ZIP `zip` not installed (apt-get install zip)")
        shutil.copyfile(fixtures_dir / "models" / "fx-q4_0.gguf", tmp_path / "fx-q4_0.gguf")
        subprocess.run(["zip", "-q", "-0", "-s", "512k", "fx.zip", "fx-q4_0.gguf"], cwd=tmp_path, check=True)
        (tmp_path / "fx-q4_0.gguf").unlink()
        path = str(tmp_path / "fx.zip")
    else:
        path = str(fixtures_dir / name)
    llm = Llama(path, n_ctx=256, verbose=False, cache_reuse=16)
    fresh = Llama(path, n_ctx=256, verbose=False)
    body = [int(t) for t in np.random.default_rng(5).integers(300, 1000, 200)]
    cached, prompt = [1] + body[:150], [1] + body[:20] + body[60:150] + body[150:160]
    list(llm.engine.generate(GenerationRequest(tokens=cached, max_tokens=1, sampling=GREEDY)))
    last = list(llm.engine.generate(GenerationRequest(tokens=prompt, max_tokens=1, sampling=GREEDY)))[-1]
    assert last.cached_tokens == 1 + 20 + 90 and last.prompt_tokens == len(prompt)
    fresh.model.eval(prompt, 0)
    n = len(prompt)
    np.testing.assert_array_equal(llm.model.cache.v[0, :, :n], fresh.model.cache.v[0, :, :n])
    k_got, k_want = TAB[llm.model.cache.k[0, :, :n]], TAB[fresh.model.cache.k[0, :, :n]]
    assert 0 < np.abs(k_got - k_want).max() <= 2e-3 * np.abs(k_want).max()      # rotated, not merely copied
    llm.close()
    fresh.close()


@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0"])
def test_reuse_with_a_quantized_cache(fixtures_dir, cache_type):
    """With a q8_0 / q4_0 KV cache the trimmed prompt is reused the same way: on the one-layer model the moved keys
    (dequantized, rotated, quantized again, as llama.cpp's K shift does) stay within two quantization steps of keys
    quantized at the new positions, values are copied bit for bit, and the logits stay within the cache type's own
    movement (llama.cpp's own, in the fixtures' reference/kvcache: q8_0 ~0.02, q4_0 ~0.12) of a from-scratch
    evaluation; a state saved with one cache type is refused by a model that runs another."""
    from airobackend.kernels import kvquant
    from airobackend.kvstate import StateFileError
    from airobackend.llama import Llama
    path = str(fixtures_dir / "models" / "fx32k-q4_0.gguf")
    llm = Llama(path, n_ctx=512, verbose=False, cache_reuse=16, type_k=cache_type, type_v=cache_type)
    fresh = Llama(path, n_ctx=512, verbose=False, type_k=cache_type, type_v=cache_type)
    body = [int(t) for t in np.random.default_rng(4).integers(300, 30000, 300)]
    cached, prompt = [1] + body[:250], [1] + body[:30] + body[90:250] + body[250:270]
    list(llm.engine.generate(GenerationRequest(tokens=cached, max_tokens=1, sampling=GREEDY)))
    last = list(llm.engine.generate(GenerationRequest(tokens=prompt, max_tokens=1, sampling=GREEDY)))[-1]
    assert last.cached_tokens == 1 + 30 + 160
    want = fresh.model.eval(prompt, 0)[0]
    n, t, hd = len(prompt), kvquant.TYPES[cache_type], llm.model.head_dim
    np.testing.assert_array_equal(llm.model.cache.v[:, :, :n], fresh.model.cache.v[:, :, :n])
    got_k = kvquant.dequantize_ref(llm.model.cache.k[:, :, :n], t, hd)
    want_k = kvquant.dequantize_ref(fresh.model.cache.k[:, :, :n], t, hd)
    step = np.abs(want_k).reshape(*want_k.shape[:-1], -1, 32).max(-1) / (127 if cache_type == "q8_0" else 8)
    err = np.abs(got_k - want_k).reshape(step.shape + (32,)).max(-1)
    assert (err <= 2 * step + 1e-6).all() and (err > 0).any()
    moved = {"q8_0": 0.03, "q4_0": 0.15}[cache_type]
    assert np.abs(llm.engine._last_logits - want).max() < moved
    state = llm.save_state()
    f16 = Llama(path, n_ctx=512, verbose=False)
    with pytest.raises(StateFileError, match=f"{cache_type}/{cache_type} KV cache"):
        f16.load_state(state)
    for m in (llm, fresh, f16):
        m.close()
