"""Phrase bans with backtracking (KoboldCpp 1.76 gpttype_adapter.cpp, "anti slop detection" in gpttype_generate):
when the generated text contains a banned phrase, generation rewinds to the token where it begins, bans that token at
that place and samples again; streamed text never shows what is taken back."""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.detok import PhraseBanBuffer
from airobackend.engine import Engine
from airobackend.settings import Settings
from airobackend.types import FinishReason, SamplingParams

from test_engine import GREEDY, SP, TOK, FakeLlama, ScriptedModel, request, run, tid


# ------------------------------------------------------------------------------------------------------ the buffer

class Pieces:
    """token_bytes over a list of byte strings (token id = index)."""

    def __init__(self, pieces):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]

    def token_bytes(self, t, special=False):
        return self.pieces[t]


def test_buffer_never_lets_a_phrase_through_and_holds_no_more_than_it_must():
    rng = np.random.default_rng(1)
    alphabet = ["a", "b", "ab", "ba", " ", "A", "bb", "aab", ""]
    tok = Pieces(alphabet)
    phrases = (b"abba", b"ba a")
    rewinds = 0
    for _ in range(300):
        buf = PhraseBanBuffer(tok, phrases)
        text = b""
        for _ in range(30):
            j = buf.push(int(rng.integers(0, len(alphabet))), None)
            held = [tok.pieces[x].lower() for x, _ in buf.held]
            if j is not None:
                # a phrase is in the text and begins in held token j, or before it when j is the first held one
                full = text + b"".join(held)
                at = max(full.rfind(p) for p in phrases if p in full)
                start_j = len(text) + len(b"".join(held[:j]))
                assert at < start_j + len(held[j]) and (j == 0 or at >= start_j)
                buf.take_back(j)
                rewinds += 1
                continue
            text += b"".join(tok.pieces[x].lower() for x, _ in buf.release())
            rest = b"".join(tok.pieces[x].lower() for x, _ in buf.held)
            assert not any(p in text + rest for p in phrases)
            if buf.held:                             # the first held token is needed: a phrase may begin by its end
                full, first_end = text + rest, len(text) + len(tok.pieces[buf.held[0][0]])
                assert any(p.startswith(full[c:]) for p in phrases for c in range(min(first_end, len(full))))
        text += b"".join(tok.pieces[x].lower() for x, _ in buf.flush())
        assert not any(p in text for p in phrases)
    assert rewinds > 50


def test_buffer_is_case_insensitive_and_forgets_after_a_shift():
    tok = Pieces(["The", " Llama", " said"])
    buf = PhraseBanBuffer(tok, (b"the llama",))
    assert buf.push(0, "s0") is None and buf.release() == []          # "the" may begin the phrase
    assert buf.push(1, "s1") == 0                                       # "The Llama": rewind to token 0
    assert [s for _, s in buf.take_back(0)] == ["s0", "s1"] and buf.held == []
    buf.push(0, "s0")
    buf.forget_text()
    assert [s for _, s in buf.release()] == ["s0"]


# ------------------------------------------------------------------------------------------------------ the engine

class RankedModel(ScriptedModel):
    """Next-token logits from `prefs(kv)`: a list of token ids, best first (20, 19, 18, ...)."""

    def __init__(self, prefs, n_ctx: int = 256) -> None:
        super().__init__(lambda kv: 0, n_ctx=n_ctx)
        self.prefs = prefs

    def eval_spans(self, spans):
        super().eval_spans(spans)
        out = np.zeros((1, self.n_vocab), np.float32)
        for rank, t in enumerate(self.prefs(self.kv)):
            out[0, t] = 20.0 - rank
        return out


def engine_with(prefs, n_ctx: int = 256):
    model = RankedModel(prefs, n_ctx=n_ctx)
    return Engine(FakeLlama(model), Settings()), model


def story(prompt_len: int, script: dict[int, list[int]]):
    """prefs by output position: script[i] (best first) at output index i, then EOS."""
    def prefs(kv):
        return script.get(len(kv) - prompt_len, [TOK.eos_id])
    return prefs


def ids(*pieces):
    return [tid(p) for p in pieces]


P = len(TOK.encode("Hi"))
# The model wants " The llama." -- second choices: " A" at 0, " world" at 1
SCRIPT = {0: ids(SP + "The", SP + "A"), 1: ids(SP + "llama", SP + "world"), 2: ids("."), 3: ids("\n")}


def test_without_bans_the_phrase_comes_out():
    engine, _ = engine_with(story(P, SCRIPT))
    _, text, last = run(engine, request("Hi"))
    assert text == " The llama.\n" and last.finish_reason is FinishReason.EOS


@pytest.mark.parametrize("phrase, want", [
    ("the llama", " A llama.\n"),        # rewind to " The" (where the phrase begins), ban it there
    ("LLAMA.", " The world.\n"),         # case-insensitive; rewind one token
    ("e ll", " A llama.\n"),             # a phrase beginning inside a token bans that whole token
])
def test_rewind_bans_the_token_where_the_phrase_begins(phrase, want):
    engine, model = engine_with(story(P, SCRIPT))
    events, text, last = run(engine, request("Hi", sampling=GREEDY.replace(banned_strings=(phrase,))))
    assert text == want and last.finish_reason is FinishReason.EOS
    assert phrase.lower() not in text.lower()
    ids_out = [t for ev in events for t in ev.token_ids]
    assert TOK.decode(ids_out).decode() == want                     # token_ids of the events: the kept tokens
    assert model.kv == TOK.encode("Hi") + ids_out                   # the cache holds exactly prompt + output
    assert last.completion_tokens == len(ids_out)


def test_streamed_text_never_shows_what_is_taken_back():
    engine, _ = engine_with(story(P, SCRIPT))
    gen = engine.generate(request("Hi", sampling=GREEDY.replace(banned_strings=("the llama",))))
    shown = ""
    for ev in gen:
        shown += ev.text
        assert " A llama.\n".startswith(shown), shown               # only ever a prefix of the final text
        assert engine.partial_text() in ("", shown) or shown.startswith(engine.partial_text())
    assert shown == " A llama.\n"


def test_token_bans_and_stop_strings_keep_working_beside_phrase_bans():
    engine, _ = engine_with(story(P, SCRIPT))
    s = GREEDY.replace(banned_strings=("llama.",), banned_tokens=(tid(SP + "The"),))
    _, text, last = run(engine, request("Hi", sampling=s))
    assert text == " A world.\n"
    _, text, last = run(engine, request("Hi", sampling=s, stop=("world",)))
    assert text == " A " and last.finish_reason is FinishReason.STOP


def test_taken_back_tokens_count_against_max_tokens_as_in_koboldcpp():
    # KoboldCpp's remaining_tokens is spent on every sampled token, rewound or not
    engine, _ = engine_with(story(P, SCRIPT))
    _, text, last = run(engine, request("Hi", max_tokens=3, sampling=GREEDY.replace(banned_strings=("the llama",))))
    assert last.finish_reason is FinishReason.LENGTH
    assert text == " A"                     # " The", " llama" (taken back), " A"


def test_logprob_entries_follow_the_kept_tokens():
    engine, _ = engine_with(story(P, SCRIPT))
    events, text, _ = run(engine, request("Hi", n_probs=2, sampling=GREEDY.replace(banned_strings=("the llama",))))
    entries = [e for ev in events for e in (ev.logprobs or [])]
    kept = [t for ev in events for t in ev.token_ids]
    assert [e["id"] for e in entries] == kept + [TOK.eos_id]


def test_a_phrase_the_model_insists_on_is_replaced_at_every_place():
    # every position prefers " llama": each " llama llama" is taken back to its first " llama", banned there
    engine, _ = engine_with(lambda kv: ids(SP + "llama", SP + "world") if len(kv) < P + 6 else [TOK.eos_id])
    _, text, last = run(engine, request("Hi", sampling=GREEDY.replace(banned_strings=("llama llama",))))
    assert text == " world" * 5 + " llama" and last.completion_tokens == 6


def test_grammar_state_is_rewound_with_the_tokens():
    # the grammar allows " The llama." or " A llama." or " The world."; banning "the llama" must leave a valid text
    g = 'root ::= (" The" | " A") (" llama" | " world") "." "\\n"'
    engine, _ = engine_with(story(P, SCRIPT))
    _, text, last = run(engine, request("Hi", sampling=GREEDY.replace(banned_strings=("the llama",), grammar=g)))
    assert text == " A llama.\n" and last.finish_reason is FinishReason.EOS
