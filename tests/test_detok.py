"""Streaming detokenization (whole UTF-8 characters only) and stop-string hold-back."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from airobackend.detok import IncrementalDecoder, StopStringMatcher
from airobackend.tokenizer import Tokenizer


def toy_tokenizer() -> Tokenizer:
    """A tiny GGUF-spelled vocabulary: unk, bos, eos, the 256 byte tokens, then a few pieces."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    words = ["\u2581Hello", "\u2581world", "!", "\u2581", "\u00e9", "US", "ER", ":", "\u2581USER"]
    pieces += [w.encode() for w in words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    return Tokenizer(pieces, [0.0] * len(pieces), types, spelling="gguf")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return toy_tokenizer()


def test_multibyte_char_split_over_byte_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("🦙!", add_bos=False)
    llama = "🦙".encode()
    assert ids[1:5] == [3 + b for b in llama]              # byte fallback, as in llama.cpp
    dec = IncrementalDecoder(tok)
    outs = [dec.feed(t) for t in ids]
    assert outs == [" ", "", "", "", "🦙", "!"]
    assert dec.flush() == ""


def test_never_emits_broken_utf8(tok: Tokenizer) -> None:
    rng = random.Random(5)
    alphabet = "aé€🦙 Hello world!"
    for _ in range(50):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(s, add_bos=False)
        dec = IncrementalDecoder(tok)
        pieces = [dec.feed(t) for t in ids] + [dec.flush()]
        for p in pieces:
            p.encode("utf-8")                               # no lone surrogates / partial characters
            assert "\ufffd" not in p
        assert "".join(pieces) == " " + s


def test_invalid_bytes_are_replaced_not_held(tok: Tokenizer) -> None:
    dec = IncrementalDecoder(tok)
    assert dec.feed(3 + 0xF0) == ""                          # could still become a 4-byte character
    assert dec.pending
    assert dec.feed(3 + 0x41) == "\ufffdA"                   # 'A' cannot continue it: give up on the lead byte
    assert dec.feed(3 + 0xE2) == ""
    assert dec.flush() == "\ufffd"                           # truncated at the end


def test_strip_leading_space_and_special(tok: Tokenizer) -> None:
    dec = IncrementalDecoder(tok, strip_leading_space=True)
    assert dec.feed(1) == ""                                 # BOS prints nothing
    hello = tok.encode("Hello", add_bos=False)
    assert "".join(dec.feed(t) for t in hello) == "Hello"
    assert IncrementalDecoder(tok, special=True).feed(2) == "</s>"


def test_stop_string_across_tokens_trimmed() -> None:
    m = StopStringMatcher(["USER:"], trim=True)
    assert m.feed("Hi there. U") == ("Hi there. ", None)     # "U" may start "USER:"
    assert m.held == "U"
    assert m.feed("S") == ("", None)
    assert m.feed("ER: more") == ("", "USER:")
    assert m.feed("anything") == ("", "USER:")
    assert m.flush() == ""


def test_stop_string_kept_when_not_trimming() -> None:
    m = StopStringMatcher(["\nUSER:", "</s>"], trim=False)
    assert m.feed("answer\nUS") == ("answer", None)
    assert m.feed("ER: next") == ("\nUSER: next", "\nUSER:")     # the whole token, as KoboldCpp returns it


def test_false_alarm_is_released() -> None:
    m = StopStringMatcher(["USER:"])
    assert m.feed("US") == ("", None)
    assert m.feed("A is big") == ("USA is big", None)
    assert m.feed(" U") == (" ", None)
    assert m.flush() == "U"                                  # generation ended: the held text is output


def test_earliest_and_longest_match() -> None:
    m = StopStringMatcher(["B", "AB", "ABC"], trim=True)
    assert m.feed("xxABCy") == ("xx", "ABC")
    m = StopStringMatcher(["lo", "hel"], trim=False)
    assert m.feed("shello") == ("shello", "hel")


def test_no_stops_passes_through() -> None:
    m = StopStringMatcher(["", ""])
    assert m.feed("abc") == ("abc", None)
    assert m.flush() == ""


def test_streamed_equals_whole_text() -> None:
    rng = random.Random(1)
    stops = ["\nUSER:", "###", "ASSISTANT:"]
    for _ in range(200):
        text = "".join(rng.choice(["a", "\n", "US", "ER", ":", "#", "AS", "SISTANT", " "]) for _ in range(20))
        m = StopStringMatcher(stops, trim=True)
        out, matched = "", None
        i = 0
        while i < len(text) and matched is None:
            j = i + rng.randint(1, 4)
            emit, matched = m.feed(text[i:j])
            out += emit
            i = j
        if matched is None:
            out += m.flush()
        first = min(((text.find(s), s) for s in stops if s in text), default=None)
        if first is None:
            assert out == text and matched is None
        else:
            assert matched == first[1] and out == text[:first[0]]


def test_real_vocab_llama_emoji(fixtures_dir: Path) -> None:
    t = Tokenizer.from_file(str(fixtures_dir / "vocab" / "ggml-vocab-llama-spm.gguf"))
    ids = [445, 338, 29871, 243, 162, 169, 156, 29889, 8223]    # llama.cpp: " this is 🦙.cpp"
    dec = IncrementalDecoder(t)
    outs = [dec.feed(i) for i in ids]
    assert outs == [" this", " is", " ", "", "", "", "🦙", ".", "cpp"]
