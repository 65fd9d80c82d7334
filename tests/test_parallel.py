"""Parallel slots (Settings.parallel, airobackend.slots): several generations share each forward pass.

Most tests run the scripted model of test_engine.py, given one fake cache per slot and a batched forward pass that
records each step's sequences; a test can hold the first step until every request it started is waiting for a slot,
so that the requests really run together. The last tests run a fixture model: a request's output with 4 slots under
load equals its output alone, greedy and sampled.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import numpy as np
import pytest

from airobackend.engine import Engine
from airobackend.errors import EngineBusy
from airobackend.settings import Settings
from airobackend.types import FinishReason, GenerationRequest, SamplingParams
from test_engine import GREEDY, SP, TOK, FakeLlama, ScriptedModel, TokenCache, request, tid

WAIT = 30.0     # seconds a test waits for an event before it fails (never reached when things work)


class SlotsModel(ScriptedModel):
    """The scripted model with one fake cache per sequence and LlamaModel.eval_batch's contract; `steps` records the
    (cache index, start, n tokens) of every sequence of every batched pass. `on_step(model, n)` runs before pass n."""

    def __init__(self, next_token: Callable[[list[int]], int], n_ctx: int = 256,
                 on_step: Optional[Callable[["SlotsModel", int], None]] = None) -> None:
        super().__init__(next_token, n_ctx=n_ctx)
        self.caches = [self.cache]
        self.steps: list[list[tuple[int, int, int]]] = []
        self.on_step = on_step

    def new_cache(self, **kw) -> TokenCache:
        self.caches.append(TokenCache(self.n_ctx))
        return self.caches[-1]

    def eval_batch(self, seqs, want=None):
        if self.on_step is not None:
            self.on_step(self, len(self.steps))
        want = [True] * len(seqs) if want is None else want
        self.steps.append([(self.caches.index(c), start, len(t)) for c, start, t in seqs])
        out = []
        for (cache, start, toks), w in zip(seqs, want):
            assert 0 <= start <= cache.n_past and None not in cache.pos[:start], "evaluated over a hole"
            assert start + len(toks) <= self.n_ctx, "the engine overflowed a slot's context"
            cache.pos[start:start + len(toks)] = [int(t) for t in toks]
            cache.n_past = start + len(toks)
            if w:
                logits = np.zeros(self.n_vocab, np.float32)
                logits[self.next_token(list(cache.pos[:cache.n_past]))] = 20.0
                out.append(logits)
            else:
                out.append(None)
        return out


def echo_after(n_prompt_tokens: Callable[[list[int]], int]) -> Callable[[list[int]], int]:
    """A next-token rule that depends on the whole sequence (so cross-talk between slots shows): a token derived
    from the sum of the sequence, never EOS."""
    def next_token(kv: list[int]) -> int:
        return 3 + (sum(kv) * 7 + len(kv)) % (TOK.n_vocab - 3)
    return next_token


def hold_until_ready(engine_ref: list, n: int) -> Callable[[SlotsModel, int], None]:
    """on_step: the first pass waits until n requests are waiting for a slot or running."""
    def on_step(model: SlotsModel, k: int) -> None:
        if k:
            return
        e = engine_ref[0]
        with e._cond:
            ok = e._cond.wait_for(lambda: sum(j.waiting for j in e._queue) + sum(s.busy for s in e.slots) >= n,
                                  timeout=WAIT)
        assert ok, "the requests never arrived together"
    return on_step


def parallel_engine(n_slots: int, next_token=None, hold: int = 0, n_ctx: int = 256, **settings):
    ref: list = [None]
    model = SlotsModel(next_token or echo_after(0), n_ctx=n_ctx, on_step=hold_until_ready(ref, hold) if hold else None)
    settings.setdefault("prompt_cache_mb", 0)
    e = Engine(FakeLlama(model), Settings(parallel=n_slots, **settings))
    ref[0] = e
    return e, model


def consume_all(engine: Engine, reqs: list[GenerationRequest]) -> list[list]:
    """Each request's events, consumed in a thread of its own."""
    out: list = [None] * len(reqs)
    errors: list = []

    def go(i: int) -> None:
        try:
            out[i] = list(engine.generate(reqs[i]))
        except BaseException as e:      # reported by the test thread
            errors.append(e)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), "a generation hung"
    if errors:
        raise errors[0]
    return out


def text(events) -> str:
    return "".join(e.text for e in events)


PROMPTS = ["Hello world!", "The llama.", "A", "USER: Hello\nASSISTANT:"]


# ------------------------------------------------------------------------------------------------ fake model

def test_slots_share_steps_and_each_output_equals_its_output_alone():
    reqs = [request(p, max_tokens=8 + 3 * i) for i, p in enumerate(PROMPTS)]
    alone = []
    for r in reqs:
        e1, m1 = parallel_engine(1)
        alone.append(list(e1.generate(r)))
        assert not m1.steps and e1._scheduler is None        # one slot: the single-sequence path, no scheduler
    e, model = parallel_engine(4, hold=4)
    together = consume_all(e, reqs)
    for a, b in zip(alone, together):
        assert text(a) == text(b) and a[-1].completion_tokens == b[-1].completion_tokens
        assert [t for ev in a for t in ev.token_ids] == [t for ev in b for t in ev.token_ids]
    # the decode steps of all four really shared passes: at least one pass held a token of every slot
    assert max(len({c for c, _, _ in step}) for step in model.steps) == 4
    assert len(model.steps) < sum(ev[-1].completion_tokens for ev in together)
    # no cross-talk: each slot's cache holds exactly one request's prompt and output (the last token sampled is
    # never evaluated: the request ends first)
    full = sorted(TOK.encode(p) + [t for ev in evs for t in ev.token_ids][:-1] for p, evs in zip(PROMPTS, together))
    assert sorted(c.tokens for c in model.caches) == full


def test_prefill_is_chunked_beside_decoding_slots():
    """A long prompt arriving while another slot decodes is evaluated prefill_chunk tokens per step, each step
    also carrying the decoding slot's token."""
    long_prompt = " ".join(["The llama."] * 12)
    e, model = parallel_engine(2, hold=2, prefill_chunk=5)
    reqs = [request("Hello world!", max_tokens=40), request(long_prompt, max_tokens=3)]
    out = consume_all(e, reqs)
    n_long = len(TOK.encode(long_prompt))
    assert out[1][-1].prompt_tokens == n_long
    chunks = [n for step in model.steps for c, _, n in step if n > 1]
    assert chunks and max(chunks) <= 5 and sum(chunks) >= n_long - 5
    mixed = [step for step in model.steps if any(n > 1 for _, _, n in step) and any(n == 1 for _, _, n in step)]
    assert len(mixed) >= n_long // 5 - 2      # the decoding slot went on during the prompt's steps


def test_abort_by_genkey_and_check_find_the_right_slot():
    seen: dict = {}

    def on_step(model, k):
        hold(model, k)
        if k == 6:
            seen["a"], seen["b"] = e.partial_text("A"), e.partial_text("B")
            seen["running"] = (e.is_running("A"), e.is_running("B"), e.is_running("C"))
            assert e.abort("A")

    e, model = parallel_engine(2, hold=2)
    hold = model.on_step
    model.on_step = on_step
    ra, rb = request("Hello world!", max_tokens=30, genkey="A"), request("The llama.", max_tokens=30, genkey="B")
    a, b = consume_all(e, [ra, rb])
    assert a[-1].finish_reason is FinishReason.ABORTED and a[-1].completion_tokens < 30
    assert b[-1].finish_reason is FinishReason.LENGTH and b[-1].completion_tokens == 30
    assert seen["running"] == (True, True, False)
    assert seen["a"] and seen["b"] and seen["a"] != seen["b"]
    assert text(a).startswith(seen["a"]) and text(b).startswith(seen["b"])
    assert e.partial_text("A") == text(a) and e.partial_text("B") == text(b)    # after the end too
    e1, _ = parallel_engine(1)
    assert text(b) == text(list(e1.generate(rb)))           # B never saw A's abort


def test_busy_only_when_all_slots_and_the_queue_are_full():
    e, _ = parallel_engine(2, multiuser=1)
    held = [e.generate(request()) for _ in range(3)]         # two slots + one waiting place
    with pytest.raises(EngineBusy):
        e.generate(request())
    for g in held:
        g.close()
    e1, _ = parallel_engine(1, multiuser=1)                  # one slot: KoboldCpp's rule, as before
    held = [e1.generate(request()) for _ in range(2)]
    with pytest.raises(EngineBusy):
        e1.generate(request())
    for g in held:
        g.close()


def test_a_client_that_goes_away_frees_its_slot_within_a_step():
    e, model = parallel_engine(2)
    gen = e.generate(request("Hello world!", max_tokens=200))
    first = next(gen)
    assert first.finish_reason is None
    gen.close()
    with e._cond:
        assert e._cond.wait_for(lambda: not any(s.busy for s in e.slots), timeout=WAIT)
    n_steps = len(model.steps)
    assert n_steps < 200
    out = consume_all(e, [request("The llama.", max_tokens=4)] * 2)     # both slots serve again
    assert all(ev[-1].finish_reason is FinishReason.LENGTH for ev in out)
    assert e.perf()["idle"] == 1 and e.perf()["queue"] == 0


def test_abort_mid_prefill_leaves_the_slot_consistent():
    long_prompt = " ".join(["The llama."] * 12)

    def on_step(model, k):
        if k == 1:
            assert e.abort("P")

    e, model = parallel_engine(2, prefill_chunk=4)
    model.on_step = on_step
    ev = list(e.generate(request(long_prompt, max_tokens=5, genkey="P")))
    assert ev[-1].finish_reason is FinishReason.ABORTED and ev[-1].completion_tokens == 0
    slot = next(s for s in e.slots if s.tokens)
    n_done = len(slot.tokens)
    assert slot.tokens == slot.cache.pos[:n_done] and 0 < n_done < len(TOK.encode(long_prompt))
    again = list(e.generate(request(long_prompt, max_tokens=2)))   # and the prompt is resumed where it stopped
    assert again[-1].finish_reason is FinishReason.LENGTH and again[-1].cached_tokens == n_done


def test_a_returning_conversation_lands_on_the_slot_that_holds_it():
    e, model = parallel_engine(2)
    x1 = request("USER: Hello\nASSISTANT:", max_tokens=6)
    first = list(e.generate(x1))
    y = list(e.generate(request("The llama. The llama.", max_tokens=6)))
    assert y[-1].cached_tokens <= 1                          # another conversation: the other slot (BOS at most)
    x2 = request("USER: Hello\nASSISTANT:" + text(first) + "\nUSER: Hi", max_tokens=3)
    again = list(e.generate(x2))
    assert again[-1].cached_tokens >= len(TOK.encode("USER: Hello\nASSISTANT:"))
    busy_slots = {c for step in model.steps for c, _, _ in step}
    assert busy_slots == {0, 1}


def test_slots_info_and_perf():
    e, _ = parallel_engine(3)
    info = e.slots_info()
    assert [s["id"] for s in info] == [0, 1, 2] and not any(s["is_processing"] for s in info)
    assert all(s["n_ctx"] == 256 for s in info)
    list(e.generate(request("Hello world!", max_tokens=4)))
    assert max(s["tokens_cached"] for s in e.slots_info()) == len(TOK.encode("Hello world!")) + 3   # the last
    # token sampled is never evaluated
    assert e.perf()["idle"] == 1 and e.counters["tokens_predicted"] == 4


def test_sixty_four_requests_on_four_slots_all_end():
    e, _ = parallel_engine(4, multiuser=6)
    results: list = []
    lock = threading.Lock()

    def go(i: int) -> None:
        try:
            ev = list(e.generate(request(PROMPTS[i % 4], max_tokens=5)))
            with lock:
                results.append(ev[-1].finish_reason)
        except EngineBusy:
            with lock:
                results.append("busy")
    threads = [threading.Thread(target=go, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    assert len(results) == 64 and results.count(FinishReason.LENGTH) >= 4
    assert set(results) <= {FinishReason.LENGTH, "busy"}
    assert e.perf()["idle"] == 1 and e.queue_length == 0


# ------------------------------------------------------------------------------------------------ fixture model

@pytest.mark.parametrize("name", ["fx-q4_0", "fxgqa-q4_K_M"])
def test_real_model_under_parallel_4_equals_alone(fixtures_dir, fixture_index, name):
    """Greedy and seeded sampling, logprobs and a stop string: each request's events with 4 slots under load equal
    its events alone (the int8 kernels give bit-identical logits batched or alone, see test_batch.py)."""
    from airobackend.llama import Llama

    entry = next(m for m in fixture_index["models"] if m["name"] == name)
    llm = Llama(str(fixtures_dir / entry["files"]["gguf"]["path"]), n_ctx=128, verbose=False)
    prompts = ["The quick brown fox", "Once upon a time", "In a land far away there lived", "Hello",
               "The quick brown fox jumps"]

    def req(i: int) -> GenerationRequest:
        sp = GREEDY if i % 2 == 0 else SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=100 + i)
        return GenerationRequest(prompt=prompts[i], max_tokens=12 + 4 * i, sampling=sp, n_probs=2 if i == 1 else 0,
                                 stop=["ure"] if i == 2 else None)
    try:
        alone = [list(Engine(llm, Settings(prompt_cache_mb=0)).generate(req(i))) for i in range(len(prompts))]
        e = Engine(llm, Settings(parallel=4, prompt_cache_mb=0, prefill_chunk=3))
        ref = [e]
        orig = llm.model.eval_batch
        gate = hold_until_ready(ref, 4)
        steps = []

        def gated(seqs, want=None):
            gate(None, len(steps))
            steps.append(len(seqs))
            return orig(seqs, want)
        llm.model.eval_batch = gated
        try:
            together = consume_all(e, [req(i) for i in range(len(prompts))])
        finally:
            del llm.model.eval_batch
            e.close()
        for a, b in zip(alone, together):
            assert text(a) == text(b)
            assert [t for ev in a for t in ev.token_ids] == [t for ev in b for t in ev.token_ids]
            assert a[-1].finish_reason == b[-1].finish_reason
            la = [x for ev in a for x in (ev.logprobs or [])]
            lb = [x for ev in b for x in (ev.logprobs or [])]
            assert la == lb
        assert max(steps) >= 4
    finally:
        llm.close()


def test_context_shift_in_a_slot_and_overflow_refused():
    """A slot whose context fills shifts as the single engine does (same output); a prompt that cannot fit in a
    slot is refused before any event."""
    from airobackend.errors import ContextOverflowError

    reqs = [request("Hello world!", max_tokens=60), request("The llama.", max_tokens=50)]
    alone = []
    for r in reqs:
        e1, _ = parallel_engine(1, n_ctx=32)
        alone.append(list(e1.generate(r)))
    e, model = parallel_engine(2, hold=2, n_ctx=32)
    together = consume_all(e, reqs)
    for a, b in zip(alone, together):
        assert text(a) == text(b) and b[-1].completion_tokens == a[-1].completion_tokens > 32
    assert any(c.removes for c in model.caches)                  # the slots really shifted
    with pytest.raises(ContextOverflowError):
        e.generate(request("The llama. " * 20, max_tokens=4, allow_context_shift=False))
    assert e.perf()["queue"] == 0


def test_speculative_settings_are_off_with_parallel_slots(tmp_path, caplog):
    """--draftmodel / --lookup-ngram with --parallel 2: the draft model is not even opened (its RAM would serve
    nothing), the engine has no drafter and the log says which flags were ignored and why; with one slot the same
    settings do read the draft file (here a missing one, so the load fails)."""
    import logging

    from airobackend.demo import demo_model_path
    from airobackend.errors import AiroError
    from airobackend.manager import ModelManager

    demo = str(demo_model_path())
    missing = str(tmp_path / "no-such-draft.gguf")
    mgr = ModelManager(Settings(n_ctx=64, parallel=2, draft_model=missing, lookup_ngram=3, prompt_cache_mb=0))
    with caplog.at_level(logging.WARNING, logger="airobackend.manager"):
        mgr.load(mgr.register(demo))
    try:
        assert mgr._engine.parallel == 2 and mgr._engine.drafter is None
        said = [r.getMessage() for r in caplog.records if "speculative" in r.getMessage()]
        assert len(said) == 1 and "--parallel 2" in said[0] and "--draftmodel and --lookup-ngram ignored" in said[0]
        ev = list(mgr.generate(request("Hello world!", max_tokens=3)))
        assert ev[-1].finish_reason is FinishReason.LENGTH
    finally:
        mgr.unload()
    one = ModelManager(Settings(n_ctx=64, parallel=1, draft_model=missing, prompt_cache_mb=0))
    with pytest.raises((AiroError, OSError)):
        one.load(one.register(demo))


def test_a_closed_stream_runs_no_pass_after_the_one_in_flight():
    """The consumer closes its stream while a pass is running (the pass waits for the close): that pass is the
    last one with the job's sequence; the slot is free before any other pass, and the other slot's request goes on
    and ends as it would alone."""
    closed, in_pass = threading.Event(), threading.Event()

    def on_step(model, k):
        if k == 3:
            in_pass.set()
            assert closed.wait(WAIT)

    e, model = parallel_engine(2, hold=2)
    hold = model.on_step
    model.on_step = lambda m, k: (hold(m, k), on_step(m, k))
    other = request("The llama.", max_tokens=12)
    results: list = []
    t = threading.Thread(target=lambda: results.append(list(e.generate(other))))
    gen = e.generate(request("Hello world!", max_tokens=200))
    t.start()
    assert next(gen).finish_reason is None
    assert in_pass.wait(WAIT)
    gen.close()
    closed.set()
    t.join(WAIT)
    assert not t.is_alive()
    gone = next(s for s in e.slots if s.tokens and s.tokens[:len(TOK.encode("Hello world!"))] ==
                TOK.encode("Hello world!"))
    later = [step for step in model.steps[4:] if any(c == model.caches.index(gone.cache) for c, _, _ in step)]
    assert later == [], "the closed stream's sequence was evaluated after the pass it was closed in"
    e1, _ = parallel_engine(1)
    assert text(results[0]) == text(list(e1.generate(other)))
    assert e.perf()["idle"] == 1 and e.perf()["queue"] == 0
