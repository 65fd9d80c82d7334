"""GBNF grammars: parsing (llama.cpp syntax and errors) and the token matcher used by constrained sampling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from airobackend.errors import RequestError
from airobackend.grammar import Grammar, GrammarError, GrammarMatcher
from airobackend.tokenizer import Tokenizer

JSON_GBNF = r'''
# llama.cpp grammars/json.gbnf
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

ws ::= | " " | "\n" [ \t]{0,20}
'''

ARITHMETIC_GBNF = r'''
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
'''


def byte_tokenizer() -> Tokenizer:
    """Byte tokens only (+ a few multi-byte pieces): any text can be fed byte by byte."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    words = ["yes", "no", "ye", "\u2581yes", "{\"", "\":", "\u00e9"]
    pieces += [w.encode() for w in words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    return Tokenizer(pieces, [0.0] * len(pieces), types)


TOK = byte_tokenizer()


def matches(g: Grammar, text: str | bytes) -> bool:
    """Feed `text` byte token by byte token; True when every byte is accepted and the grammar can end."""
    m = GrammarMatcher(g, TOK)
    data = text.encode() if isinstance(text, str) else text
    for b in data:
        if not m.allows(3 + b):
            return False
        m.accept(3 + b)
    return m.can_end and m.allows(TOK.eos_id)


def test_json_grammar() -> None:
    g = Grammar.parse(JSON_GBNF)
    good = ['{}', '{"a": 1}', '{"a": [1, 2.5, -3e7, true, null, "x\\n\\u00e9"], "b": {"c": {}}}',
            '{\n  "k": "v"\n}', '{"é": "ünïcode 🦙"}']
    bad = ['', '{', '{"a" 1}', '{"a": 01}', '[1]', '{"a": tru}', '{"a": "\x01"}', '{"a": 1}}', '{a: 1}']
    for s in good:
        json.loads(s)                                    # the cases are what they claim to be
        assert matches(g, s), s
    for s in bad:
        assert not matches(g, s), s


def test_arithmetic_grammar() -> None:
    g = Grammar.parse(ARITHMETIC_GBNF)
    for s in ["1+2=3\n", "(a +b_1) *3 = x\n", "x=1\ny=(2)\n", "((a))=b\n"]:
        assert matches(g, s), s
    for s in ["1+2=3", "+1=2\n", "1++2=3\n", "A=1\n", "(a=1\n", "=1\n"]:
        assert not matches(g, s), s


def test_yes_no_tokens_and_eos() -> None:
    g = Grammar.parse('root ::= "yes" | "no"')
    m = GrammarMatcher(g, TOK)
    ids = {TOK.piece_text(i): i for i in range(259, TOK.n_vocab)}
    assert m.allows(ids["yes"]) and m.allows(ids["no"]) and m.allows(ids["ye"])
    assert not m.allows(ids[" yes"]) and not m.allows(TOK.eos_id) and not m.can_end
    assert set(m.allowed_ids().tolist()) == {ids["yes"], ids["no"], ids["ye"], 3 + ord("y"), 3 + ord("n")}
    m.accept(ids["ye"])
    assert set(m.allowed_ids().tolist()) == {3 + ord("s")}
    m.accept(3 + ord("s"))
    assert m.can_end and m.done
    assert m.allowed_ids().tolist() == [TOK.eos_id]
    with pytest.raises(RequestError):
        m.accept(ids["no"])
    m.accept(TOK.eos_id)


def test_char_classes_negation_ranges_escapes_repetitions() -> None:
    g = Grammar.parse(r'''root ::= [a-cx]+ [^0-9\]] "\x41\u00e9\t" "q"{2,3} ("z" | "")? # trailing comment''')
    assert matches(g, "abx-Aé\tqq")
    assert matches(g, "c]".replace("]", "_") + "Aé\tqqqz")
    assert not matches(g, "d-Aé\tqq")                    # d not in [a-cx]
    assert not matches(g, "a5Aé\tqq")                    # 5 excluded by [^0-9\]]
    assert not matches(g, "a]Aé\tqq")                    # escaped ] inside the negated class
    assert not matches(g, "a-Aé\tq")                     # {2,3}: one q is too few
    assert not matches(g, "a-Aé\tqqqq")                  # four is too many
    g = Grammar.parse('root ::= "a" .{2} "b"')
    assert matches(g, "a🦙xb") and not matches(g, "axb")


def test_multibyte_character_split_across_byte_tokens() -> None:
    g = Grammar.parse('root ::= "é" [a-z]')
    m = GrammarMatcher(g, TOK)
    e_acute = "é".encode()                               # C3 A9
    assert m.allows(3 + e_acute[0])                      # a lead byte that can still become é
    assert not m.allows(3 + 0xC4)                        # C4 xx is U+0100..U+013F: never é
    assert not m.allows(3 + ord("a"))
    m.accept(3 + e_acute[0])
    assert not m.allows(3 + 0xAA)                        # completes to U+00EA, not é
    assert m.allows(3 + e_acute[1])
    m.accept(3 + e_acute[1])
    assert m.allows(3 + ord("z")) and not m.can_end


def test_allowed_ids_agrees_with_per_token_check() -> None:
    g = Grammar.parse(JSON_GBNF)
    m = GrammarMatcher(g, TOK)
    for prefix in [b"", b'{"', b'{"a', b'{"a": 1', "{\"é".encode()[:-1]]:
        m = GrammarMatcher(g, TOK)
        for b in prefix:
            m.accept(3 + b)
        brute = [t for t in range(TOK.n_vocab) if m.allows(t)]
        assert m.allowed_ids().tolist() == brute, prefix


@pytest.mark.parametrize("src, where", [
    ('root ::= "abc', 9),                      # unterminated literal: where it starts
    ('root ::= foo', 9),                       # undefined rule: where it is used
    ('root := "a"', 5),
    ('root ::= ("a" | "b"', 9),                # the unclosed group
    ('root ::= [a-z', 9),
    ('root ::= "a" | * "b"', 15),
    ('root ::= "a"{3,1}', 12),
    ('root ::= "\\q"', 10),
    ('root ::= "a"\nroot ::= "b"', 13),
    ('root ::= "a" )', 13),
])
def test_parse_errors_have_positions(src: str, where: int) -> None:
    with pytest.raises(GrammarError) as ei:
        Grammar.parse(src)
    assert isinstance(ei.value, RequestError)
    assert ei.value.position == where, str(ei.value)
    assert f"offset {where}" in str(ei.value)


def test_structural_errors() -> None:
    for src in ['item ::= "a"', 'root ::= root "a"', 'root ::= x\nx ::= "b"? root', '']:
        with pytest.raises(GrammarError):
            Grammar.parse(src)


def test_real_vocab_json_sampling(fixtures_dir: Path) -> None:
    """End to end on the LLaMA vocabulary: random logits, the JSON grammar, the output parses."""
    from airobackend.sampling import Sampler
    from airobackend.types import SamplingParams
    tok = Tokenizer.from_file(str(fixtures_dir / "vocab" / "ggml-vocab-llama-spm.gguf"))
    gsrc = 'root ::= "{\\"answer\\": " ("\\"yes\\"" | "\\"no\\"" | [0-9]{1,3}) "}"'
    for seed in range(3):
        rng = np.random.default_rng(seed)
        s = Sampler(SamplingParams(seed=seed, grammar=gsrc, top_k=40), tokenizer=tok)
        out: list[int] = []
        for _ in range(40):
            t = s.sample(rng.standard_normal(tok.n_vocab).astype(np.float32) * 3, out)
            out.append(t)
            if t == tok.eos_id:
                break
        assert out[-1] == tok.eos_id
        value = json.loads(tok.decode(out[:-1]))
        assert set(value) == {"answer"}


def test_nul_and_empty_pieces_never_allowed() -> None:
    m = GrammarMatcher(Grammar.parse('root ::= [^a]*'), TOK)
    assert not m.allows(3 + 0x00)                        # llama.cpp never feeds NUL to the grammar
    assert not m.allows(1) and not m.allows(0)           # BOS / unk print nothing
    assert m.allows(3 + 0x01) and m.allows(TOK.eos_id)
    assert 3 not in m.allowed_ids().tolist()
