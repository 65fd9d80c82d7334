"""Engine behaviour: events, stop strings, UTF-8, abort, queue, prompt cache, context shift, errors, counters.

The forward pass is a scripted fake (`ScriptedModel`) so each behaviour can be forced token by token; it also checks
the engine's bookkeeping of the KV cache (every eval must continue exactly where the cache ends, never overflow the
context, and shifts must match). The tokenizer, the incremental decoder and the sampler are the real ones, over a
small hand-made SentencePiece vocabulary whose multi-character pieces let a test split text at chosen places.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import numpy as np
import pytest

from airobackend.engine import Engine
from airobackend.errors import ContextOverflowError, EngineBusy, RequestError
from airobackend.settings import Settings
from airobackend.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, Tokenizer
from airobackend.types import FinishReason, GenerationRequest, SamplingParams

SP = "\u2581"
WORDS = [SP, SP + "Hello", SP + "world", "!", SP + "US", "ER", ":", SP + "The", SP + "llama", ".", "\n",
         SP + "A", "SSIST", "ANT", SP + "ASSISTANT", "US"]
CHARS = [chr(c) for c in range(33, 127)]


def make_tokenizer() -> Tokenizer:
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    for w in WORDS + CHARS:
        if w.encode() not in pieces:
            pieces.append(w.encode())
            types.append(NORMAL)
    scores = [0.0] * len(pieces)
    return Tokenizer(pieces, np.array(scores, np.float32), types, spelling="gguf")


TOK = make_tokenizer()


def tid(piece: str) -> int:
    return TOK._text_to_id[piece.encode()]


def byte_id(b: int) -> int:
    return TOK._byte_id[b]


class TokenCache:
    """A KV cache whose entry at a position is the token evaluated there (None: nothing valid). It moves entries as
    airobackend.kvcache.KVCache does, so a wrong move plan shows up as the wrong token at some position."""

    bytes_per_position = 100

    def __init__(self, n_ctx: int) -> None:
        self.n_ctx, self.n_past = n_ctx, 0
        self.pos: list[Optional[int]] = [None] * n_ctx
        self.removes: list[tuple[int, int, int]] = []
        self.moves: list[tuple[int, int, int]] = []

    @property
    def tokens(self) -> list[int]:
        """The tokens at positions 0..n_past-1 (all must be valid)."""
        assert None not in self.pos[:self.n_past], self.pos[:self.n_past]
        return list(self.pos[:self.n_past])

    def move(self, src_start: int, src_end: int, dst_start: int) -> None:
        assert 0 <= src_start <= src_end <= self.n_ctx and 0 <= dst_start <= self.n_ctx - (src_end - src_start)
        self.moves.append((src_start, src_end, dst_start))
        self.pos[dst_start:dst_start + src_end - src_start] = self.pos[src_start:src_end]

    def remove(self, start: int, end: int, n_past: Optional[int] = None) -> int:
        n_past = self.n_past if n_past is None else n_past
        self.removes.append((start, end - start, n_past))
        self.move(end, n_past, start)
        self.n_past = n_past - (end - start)
        return self.n_past

    def truncate(self, n: int) -> None:
        self.n_past = min(self.n_past, n)

    def snapshot(self, n: Optional[int] = None):
        n = self.n_past if n is None else n
        assert None not in self.pos[:n]
        return list(self.pos[:n])

    def compatible(self, snap) -> Optional[str]:
        return None if len(snap) <= self.n_ctx else "too long"

    def restore(self, snap) -> None:
        self.pos[:len(snap)] = snap
        self.n_past = len(snap)


class ScriptedModel:
    """A forward pass whose next token is `next_token(kv)`, where kv are the tokens in its cache.

    It asserts that the engine evaluates at `n_past` <= what is cached (overwriting from there), never beyond the
    context, and it records every evaluated token.
    """

    def __init__(self, next_token: Callable[[list[int]], int], n_ctx: int = 256, n_vocab: int = TOK.n_vocab,
                 on_eval: Optional[Callable[[int], None]] = None) -> None:
        self.next_token, self.n_ctx, self.n_vocab, self.on_eval = next_token, n_ctx, n_vocab, on_eval
        self.cache = TokenCache(n_ctx)
        self.evaluated: list[int] = []

    @property
    def kv(self) -> list[int]:
        return self.cache.tokens

    @property
    def shifts(self) -> list[tuple[int, int, int]]:
        return self.cache.removes

    def eval(self, tokens, n_past: int, logits_all: bool = False) -> np.ndarray:
        assert 0 <= n_past <= self.cache.n_past, (n_past, self.cache.n_past)
        return self.eval_spans([(n_past, tokens)])

    def eval_spans(self, spans) -> np.ndarray:
        """Each span's positions are written in order; everything before a span must hold a valid entry."""
        self.passes = getattr(self, "passes", 0) + 1
        for start, tokens in spans:
            assert None not in self.cache.pos[:start], f"evaluating at {start} over a hole in the cache"
            assert start + len(tokens) <= self.n_ctx, "the engine overflowed the context"
            self.cache.pos[start:start + len(tokens)] = [int(t) for t in tokens]
            self.cache.n_past = start + len(tokens)
            self.evaluated.extend(int(t) for t in tokens)
        if self.on_eval is not None:
            self.on_eval(self.passes)
        out = np.zeros((1, self.n_vocab), np.float32)
        out[0, self.next_token(self.kv)] = 20.0
        return out


class FakeLlama:
    def __init__(self, model: ScriptedModel, path: str = "/models/airoboros-65b-gpt4-1.4.ggmlv3.q4_K_M.bin") -> None:
        self.model, self.tokenizer, self.model_path = model, TOK, path


def script(reply: list[int], prompt_len: int, then: Optional[int] = None) -> Callable[[list[int]], int]:
    """Emit `reply` after a prompt of `prompt_len` tokens, then `then` (EOS by default) forever."""
    end = TOK.eos_id if then is None else then

    def next_token(kv: list[int]) -> int:
        i = len(kv) - prompt_len
        return reply[i] if 0 <= i < len(reply) else end
    return next_token


GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0, top_k=0, top_p=1.0)


def request(prompt: str = "Hi", **kw) -> GenerationRequest:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("max_tokens", 64)
    return GenerationRequest(prompt=prompt, **kw)


def engine_for(reply: list[int], prompt: str = "Hi", then: Optional[int] = None, n_ctx: int = 256,
               on_eval: Optional[Callable[[int], None]] = None, **settings) -> tuple[Engine, ScriptedModel]:
    p = len(TOK.encode(prompt))
    model = ScriptedModel(script(reply, p, then), n_ctx=n_ctx, on_eval=on_eval)
    return Engine(FakeLlama(model), Settings(**settings)), model


def run(engine: Engine, req: GenerationRequest):
    events = list(engine.generate(req))
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason is not None
    return events, "".join(e.text for e in events), events[-1]


# ------------------------------------------------------------------------------------------------ events

def test_text_deltas_eos_and_usage():
    reply = [tid(SP + "Hello"), tid(SP + "world"), tid("!")]
    engine, model = engine_for(reply)
    events, text, last = run(engine, request())
    assert text == " Hello world!"
    assert [e.text for e in events[:-1]] == [" Hello", " world", "!"]
    assert last.finish_reason is FinishReason.EOS
    assert (last.prompt_tokens, last.completion_tokens) == (len(TOK.encode("Hi")), 3)
    assert [t for e in events for t in e.token_ids] == reply     # EOS is not part of the output


def test_engine_is_idle_when_the_last_event_arrives():
    # A client that polls /api/extra/perf (or sends its next request) on receiving the answer must find the
    # slot free, without waiting for the worker thread to close the generator.
    engine, model = engine_for([tid(SP + "Hello"), tid("!")])
    gen = engine.generate(request())
    for event in gen:
        if event.finish_reason is not None:
            assert engine.perf()["idle"] == 1 and engine.queue_length == 0
            nxt = engine.generate(request(max_tokens=1))     # admitted and runs while `gen` is still open
            assert next(iter(nxt)).text
    gen.close()


def test_max_tokens_gives_length():
    reply = [tid(SP + "llama")] * 10
    engine, _ = engine_for(reply)
    _, text, last = run(engine, request(max_tokens=4))
    assert text == " llama" * 4 and last.finish_reason is FinishReason.LENGTH and last.completion_tokens == 4
    _, text, last = run(engine, request(max_tokens=0))
    assert text == "" and last.finish_reason is FinishReason.LENGTH and last.completion_tokens == 0


def test_echo_puts_the_prompt_first():
    engine, _ = engine_for([tid("!")], prompt="Hello there")
    events, text, _ = run(engine, request("Hello there", echo=True))
    assert events[0].text == "Hello there" and text == "Hello there!"


# ------------------------------------------------------------------------------------------------ stop strings

def test_stop_string_across_token_boundaries_is_held_back_and_trimmed():
    # " The llama" then " US" "ER" ":" — the stop string "USER:" spans three tokens.
    reply = [tid(SP + "The"), tid(SP + "llama"), tid(SP + "US"), tid("ER"), tid(":"), tid(SP + "world")]
    engine, model = engine_for(reply)
    events, text, last = run(engine, request(stop=("USER:",)))
    assert text == " The llama " and last.finish_reason is FinishReason.STOP
    # Nothing after " llama" was released before the stop string was decided (the space, "US", "ER" were held).
    assert [e.text for e in events] == [" The", " llama", " ", ""]
    assert tid(SP + "world") not in model.evaluated        # generation stopped at the match
    # trim_stop=False keeps the stop string (KoboldCpp's default), still nothing after it.
    engine, _ = engine_for(reply)
    _, text, last = run(engine, request(stop=("USER:",), trim_stop=False))
    assert text == " The llama USER:" and last.finish_reason is FinishReason.STOP


def test_stop_string_ending_inside_a_token_keeps_that_whole_token_unless_trimmed():
    # KoboldCpp 1.76 returns everything it generated, up to the end of the token that completed the stop string,
    # and trims only with trim_stop.
    reply = [tid(SP + "The"), tid(SP + "US"), tid("ER"), tid(SP + "world")]
    engine, model = engine_for(reply)
    _, text, last = run(engine, request(stop=("USE",), trim_stop=False))
    assert text == " The USER" and last.finish_reason is FinishReason.STOP
    assert tid(SP + "world") not in model.evaluated
    engine, _ = engine_for(reply)
    assert run(engine, request(stop=("USE",)))[1] == " The "


def test_stop_string_that_is_one_control_token_and_render_special():
    # A control token prints nothing, so a stop string such as "<s>" (or "<|im_end|>") stops on the token itself,
    # reported as an end token (KoboldCpp's special_stop_sequence); render_special prints control tokens, the end
    # token included.
    reply = [tid(SP + "Hello"), TOK.bos_id, tid("!")]
    engine, model = engine_for(reply)
    _, text, last = run(engine, request(stop=("<s>",)))
    assert text == " Hello" and last.finish_reason is FinishReason.EOS and tid("!") not in model.evaluated
    engine, _ = engine_for(reply)
    assert run(engine, request())[1] == " Hello!"
    engine, _ = engine_for(reply)
    _, text, last = run(engine, request(render_special=True))
    assert text == " Hello<s>!</s>" and last.finish_reason is FinishReason.EOS


def test_held_text_is_released_when_it_is_not_a_stop():
    reply = [tid(SP + "US"), tid(SP + "llama"), tid("US"), tid("!")]
    engine, _ = engine_for(reply)
    events, text, last = run(engine, request(stop=("USER:", "\nUSER")))
    assert text == " US llamaUS!" and last.finish_reason is FinishReason.EOS
    # "US" is a possible start of "USER:", so it only comes out with the next token.
    assert [e.text for e in events] == [" ", "US llama", "US!", ""]


def test_stop_string_inside_one_token_and_earliest_wins():
    reply = [tid(SP + "Hello"), tid(SP + "world"), tid("!")]
    engine, _ = engine_for(reply)
    _, text, last = run(engine, request(stop=("d!", "orl")))
    assert text == " Hello w" and last.finish_reason is FinishReason.STOP


# ------------------------------------------------------------------------------------------------ UTF-8

def test_utf8_split_across_byte_tokens_is_emitted_whole():
    llama_bytes = "🦙".encode()          # F0 9F A6 99
    reply = [tid(SP + "The")] + [byte_id(b) for b in llama_bytes] + [tid("!")]
    engine, _ = engine_for(reply)
    events, text, _ = run(engine, request())
    assert text == " The🦙!"
    assert [e.text for e in events[:-1]] == [" The", "🦙", "!"]
    assert events[1].token_ids == tuple(byte_id(b) for b in llama_bytes)   # four tokens, one event


def test_stop_string_after_multibyte_character():
    reply = [byte_id(b) for b in "é".encode()] + [tid(SP + "US"), tid("ER"), tid(":")]
    engine, _ = engine_for(reply)
    _, text, last = run(engine, request(stop=("USER:",)))
    assert text == "é " and last.finish_reason is FinishReason.STOP


# ------------------------------------------------------------------------------------------------ abort

def _background(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


class Hold:
    """Holds the model inside its `at`-th forward pass until released: the test acts while a generation is surely
    in the middle of a token, whatever the machine's speed."""

    def __init__(self, at: int) -> None:
        self.at, self.inside, self.release = at, threading.Event(), threading.Event()

    def __call__(self, n_pass: int) -> None:
        if n_pass == self.at:
            self.inside.set()
            assert self.release.wait(60), "never released"      # a guard against hanging, not a time limit


def test_abort_from_another_thread_ends_within_one_token():
    hold = Hold(at=4)
    engine, model = engine_for([], then=tid(SP + "llama"), on_eval=hold)
    seen: list = []

    def consume():
        for ev in engine.generate(request(max_tokens=-1, genkey="KCPP1234")):
            seen.append(ev)
    t, box = _background(consume)
    assert hold.inside.wait(60)
    n_at_abort = len(model.evaluated)
    assert engine.abort("KCPP1234") is True
    hold.release.set()                                    # the pass under way ends; none may follow
    t.join(60)
    assert not t.is_alive() and "error" not in box
    assert seen[-1].finish_reason is FinishReason.ABORTED
    assert len(model.evaluated) - n_at_abort <= 1
    assert engine.perf()["idle"] == 1
    assert engine.abort("KCPP1234") is False          # nothing left to abort


def test_abort_without_key_and_by_request_id():
    engine, model = engine_for([], then=tid("!"))
    gen = engine.generate(request(max_tokens=-1, request_id="req-7"))
    assert next(gen).text == "!"
    assert engine.abort("other") is False
    assert engine.abort("req-7") is True
    rest = list(gen)
    assert rest[-1].finish_reason is FinishReason.ABORTED and len(rest) == 1


# ------------------------------------------------------------------------------------------------ queue

def _blocking_engine(multiuser: int):
    """An engine whose model blocks in eval until `gate` is set."""
    gate = threading.Event()
    entered = threading.Event()

    def next_token(kv):
        entered.set()
        gate.wait(10)
        return TOK.eos_id
    model = ScriptedModel(next_token)
    return Engine(FakeLlama(model), Settings(multiuser=multiuser)), gate, entered


def test_queue_full_raises_engine_busy_immediately():
    engine, gate, entered = _blocking_engine(multiuser=1)
    t1, box1 = _background(lambda: list(engine.generate(request(genkey="A"))))
    assert entered.wait(10)
    gen_b = engine.generate(request(genkey="B"))                 # one waiting place
    assert engine.perf()["queue"] == 1 and engine.perf()["idle"] == 0
    with pytest.raises(EngineBusy):                   # at once: the test's own thread would block otherwise
        engine.generate(request(genkey="C"))
    t2, box2 = _background(lambda: list(gen_b))
    gate.set()
    t1.join(10), t2.join(10)
    assert box1["result"][-1].finish_reason is FinishReason.EOS
    assert box2["result"][-1].finish_reason is FinishReason.EOS
    assert engine.perf()["queue"] == 0 and engine.perf()["total_gens"] == 2


def test_no_waiting_places_when_multiuser_is_zero():
    engine, gate, entered = _blocking_engine(multiuser=0)
    t1, _ = _background(lambda: list(engine.generate(request())))
    assert entered.wait(10)
    with pytest.raises(EngineBusy):
        engine.generate(request())
    gate.set()
    t1.join(10)
    assert list(engine.generate(request()))[-1].finish_reason is FinishReason.EOS


def test_queued_job_aborted_by_genkey_never_runs_and_closed_generation_frees_its_place():
    engine, gate, entered = _blocking_engine(multiuser=2)
    t1, box1 = _background(lambda: list(engine.generate(request(genkey="A"))))
    assert entered.wait(10)
    gen_b = engine.generate(request(genkey="B"))
    gen_c = engine.generate(request(genkey="C"))
    with pytest.raises(EngineBusy):
        engine.generate(request())
    assert engine.abort("B") is True                      # deferred abort
    gen_c.close()                                         # gives its place back
    assert engine.perf()["queue"] == 1
    gen_d = engine.generate(request(genkey="D"))          # fits again
    tb, boxb = _background(lambda: list(gen_b))
    td, boxd = _background(lambda: list(gen_d))
    gate.set()
    for t in (t1, tb, td):
        t.join(10)
    assert [e.finish_reason for e in boxb["result"]] == [FinishReason.ABORTED]
    assert boxd["result"][-1].finish_reason is FinishReason.EOS


def test_a_generation_not_being_iterated_does_not_block_the_next():
    engine, _ = engine_for([tid("!")], multiuser=4)
    first = engine.generate(request())
    second = engine.generate(request())
    assert "".join(e.text for e in second) == "!"        # one thread, two generations: no deadlock
    assert "".join(e.text for e in first) == "!"


# ------------------------------------------------------------------------------------------------ prompt cache

def test_prompt_cache_evaluates_only_the_new_tail():
    first = TOK.encode("The llama said Hello")
    reply = [tid(SP + "Hello"), tid(SP + "world")]
    model = ScriptedModel(script(reply, len(first)))
    engine = Engine(FakeLlama(model), Settings())
    ev = list(engine.generate(GenerationRequest(tokens=first, sampling=GREEDY)))
    assert [t for e in ev for t in e.token_ids] == reply and ev[-1].finish_reason is FinishReason.EOS
    assert engine.perf()["last_process_count"] == len(first) and model.evaluated == first + reply
    # Next turn: the frontend resends the history (prompt + reply) plus new text; only the new text is evaluated.
    tail = TOK.encode(" USER: Hi", add_bos=False)
    second = first + reply + tail
    model.evaluated.clear()
    list(engine.generate(GenerationRequest(tokens=second, sampling=GREEDY, max_tokens=1)))
    assert model.evaluated == tail
    assert engine.perf()["last_process_count"] == len(tail) and engine.perf()["last_input_count"] == len(second)
    # The same prompt again: only its last token is re-evaluated (its logits are needed).
    model.evaluated.clear()
    list(engine.generate(GenerationRequest(tokens=second, sampling=GREEDY, max_tokens=0)))
    assert model.evaluated == second[-1:]
    # A different history shares only BOS and the leading '▁': everything after them is evaluated.
    other = TOK.encode("Hello world")
    assert other[:2] == second[:2] and other[2] != second[2]
    model.evaluated.clear()
    list(engine.generate(GenerationRequest(tokens=other, sampling=GREEDY, max_tokens=0)))
    assert model.evaluated == other[2:]


# ------------------------------------------------------------------------------------------------ context

def test_context_shift_keeps_bos_and_memory():
    model = ScriptedModel(lambda kv: tid(SP + "llama"), n_ctx=32)
    engine = Engine(FakeLlama(model), Settings())
    req = request("Hello world", memory="The llama.", max_tokens=60)
    memory = TOK.encode("The llama.")
    _, text, last = run(engine, req)
    assert last.finish_reason is FinishReason.LENGTH and last.completion_tokens == 60
    assert text == " llama" * 60
    assert model.shifts and all(s[0] == len(memory) for s in model.shifts)
    assert model.kv[:len(memory)] == memory               # BOS + memory survived every shift


def test_memory_and_prompt_tokenize_as_one_text():
    model = ScriptedModel(lambda kv: TOK.eos_id)
    engine = Engine(FakeLlama(model), Settings())
    run(engine, request(" USER: Hi", memory="The llama."))
    assert model.kv == TOK.encode("The llama. USER: Hi")      # no second space prefix where they meet


def test_minus_one_runs_until_the_context_is_full():
    model = ScriptedModel(lambda kv: tid("!"), n_ctx=20)
    engine = Engine(FakeLlama(model), Settings())
    p = len(TOK.encode("Hi"))
    _, _, last = run(engine, request(max_tokens=-1))
    assert last.finish_reason is FinishReason.LENGTH
    assert last.completion_tokens == 20 - p + 1 and not model.shifts     # context full, last token not evaluated


def test_context_overflow_errors():
    model = ScriptedModel(lambda kv: tid("!"), n_ctx=16)
    engine = Engine(FakeLlama(model), Settings())
    long_prompt = "a b c d e f g h i j k l m n o p q"
    with pytest.raises(ContextOverflowError):
        engine.generate(request(long_prompt, allow_context_shift=False))
    with pytest.raises(ContextOverflowError, match="exceed context window"):
        engine.generate(request("Hi", max_tokens=20, allow_context_shift=False))
    with pytest.raises(ContextOverflowError, match="memory"):
        engine.generate(request("Hi", memory=long_prompt, max_tokens=4))
    assert engine.perf()["total_gens"] == 0 and model.evaluated == []


def test_too_long_prompt_is_cut_at_the_start_when_shifting_is_allowed():
    model = ScriptedModel(lambda kv: TOK.eos_id, n_ctx=16)
    engine = Engine(FakeLlama(model), Settings())
    prompt = "a b c d e f g h i j k l m n o p q"
    full = TOK.encode(prompt)
    _, _, last = run(engine, request(prompt, max_tokens=4))
    assert last.finish_reason is FinishReason.EOS
    assert model.kv[0] == TOK.bos_id and model.kv[-5:] == full[-5:] and len(model.kv) <= 16 - 4


# ------------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("change", [
    dict(max_tokens=-2), dict(max_tokens=10 ** 9), dict(max_tokens="5"), dict(max_tokens=True),
    dict(tokens=[1, 2]), dict(stop="USER:"), dict(stop=(1,)),
    dict(sampling=SamplingParams(mirostat=3)), dict(sampling=SamplingParams(sampler_order=(6, 0, 9))),
    dict(sampling=SamplingParams(top_p=2.0)), dict(n_probs=-1), dict(n_probs=10 ** 7),
])
def test_bad_requests_raise_before_any_event(change):
    engine, model = engine_for([tid("!")])
    with pytest.raises(RequestError):
        engine.generate(request(**change))
    assert model.evaluated == [] and engine.perf()["queue"] == 0


def test_bad_token_ids_and_empty_prompt():
    engine, _ = engine_for([])
    with pytest.raises(RequestError, match="out of range"):
        engine.generate(GenerationRequest(tokens=[1, TOK.n_vocab + 5]))
    with pytest.raises(RequestError, match="empty"):
        engine.generate(GenerationRequest(prompt="", add_bos=False))


# ------------------------------------------------------------------------------------------------ counters

def test_perf_partial_text_and_seed():
    reply = [tid(SP + "Hello"), tid(SP + "world"), tid("!")]
    engine, _ = engine_for(reply)
    perf = engine.perf()
    for key in ("last_process", "last_eval", "last_token_count", "last_seed", "total_gens", "stop_reason",
                "queue", "idle", "uptime", "idletime", "last_input_count", "last_process_count",
                "last_cached_count"):
        assert key in perf
    assert perf["stop_reason"] is None and perf["idle"] == 1
    run(engine, request(genkey="KCPP0001", sampling=GREEDY.replace(seed=1234)))
    perf = engine.perf()
    assert perf["last_seed"] == 1234 and perf["last_token_count"] == 3 and perf["stop_reason"] == FinishReason.EOS
    assert perf["total_gens"] == 1 and perf["last_input_count"] == len(TOK.encode("Hi"))
    assert perf["last_process"] > 0.0 and perf["last_eval"] > 0.0        # set by this generation (0.0 before)
    # check: the key's owner sees the text, nobody else does
    assert engine.partial_text("KCPP0001") == " Hello world!"
    assert engine.partial_text("KCPP9999") == "" and engine.partial_text() == ""
    run(engine, request(max_tokens=1))
    assert engine.partial_text() == " Hello" and engine.perf()["stop_reason"] == FinishReason.LENGTH


def test_partial_text_while_generating():
    engine, model = engine_for([], then=tid("!"))
    gen = engine.generate(request(max_tokens=-1, genkey="K"))
    for _ in range(3):
        next(gen)
    assert engine.partial_text("K") == "!!!" and engine.is_running("K")
    engine.abort("K")
    list(gen)
    assert not engine.is_running()


def test_same_seed_same_text():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((TOK.n_vocab, TOK.n_vocab)).astype(np.float32) * 3

    class Noisy(ScriptedModel):
        def eval(self, tokens, n_past, logits_all=False):
            super().eval(tokens, n_past)
            return table[self.kv[-1]][None, :]
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)

    def sample(seed):
        engine = Engine(FakeLlama(Noisy(lambda kv: 0)), Settings())
        return run(engine, request(max_tokens=12, sampling=params.replace(seed=seed)))[1]
    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_model_info_template_and_tokenize():
    engine, _ = engine_for([])
    info = engine.model_info()
    assert info["name"] == "airoboros-65b-gpt4-1.4.ggmlv3.q4_K_M.bin" and info["template"] == "airoboros"
    assert info["n_ctx"] == 256 and info["n_vocab"] == TOK.n_vocab
    assert engine.format_chat([{"role": "user", "content": "Hi"}]).endswith("USER: Hi ASSISTANT:")
    ids = engine.tokenize("Hello world")
    assert ids[0] == TOK.bos_id and engine.detokenize(ids) == "Hello world"


def test_other_threads_may_poll_while_generating():
    hold = Hold(at=25)                                    # mid-way through the 50 tokens, until every poller polled
    engine, model = engine_for([], then=tid("!"), on_eval=hold)
    stop = threading.Event()
    errors: list = []
    polled_mid_way: set = set()
    lock = threading.Lock()

    def poll(i: int):
        try:
            while not stop.is_set():
                engine.perf(), engine.partial_text("K"), engine.abort("not-this-one"), engine.is_running()
                if hold.inside.is_set():
                    with lock:
                        polled_mid_way.add(i)
                        if len(polled_mid_way) == 3:
                            hold.release.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    pollers = [threading.Thread(target=poll, args=(i,)) for i in range(3)]
    for t in pollers:
        t.start()
    try:
        _, text, last = run(engine, request(max_tokens=50, genkey="K"))
    finally:
        stop.set()
        for t in pollers:
            t.join(10)
    assert not errors and text == "!" * 50 and last.finish_reason is FinishReason.LENGTH
    assert engine.partial_text("K") == text and polled_mid_way == {0, 1, 2}


def test_logprobs_of_the_raw_distribution():
    reply = [tid(SP + "Hello"), tid("!")]
    engine, _ = engine_for(reply)
    events = list(engine.generate(request(n_probs=2)))
    entries = [e for ev in events for e in (ev.logprobs or [])]
    assert [e["id"] for e in entries] == reply + [TOK.eos_id]          # one per sampled token, EOS included
    expected = 20.0 - np.log(np.exp(20.0) + TOK.n_vocab - 1)          # the fake puts 20 on one logit, 0 elsewhere
    for e in entries:
        assert e["logprob"] == pytest.approx(expected)
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["id"] == e["id"]
        assert e["top_logprobs"][1]["logprob"] == pytest.approx(-np.log(np.exp(20.0) + TOK.n_vocab - 1))
    assert entries[0]["token"] == " Hello"
