"""Tokenizer against llama.cpp's own outputs: the vocab test vectors and the fixture models' reference tokens,
for both vocabulary spellings (GGUF and the GGML v3 twins)."""
from __future__ import annotations

from pathlib import Path

import pytest

from airobackend.errors import RequestError
from airobackend.formats import open_model
from airobackend.tokenizer import BYTE, CONTROL, UNKNOWN, Tokenizer


def _open_tokenizer(path: Path) -> Tokenizer:
    """Vocabulary-only through formats.open_model (either container)."""
    return Tokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def vocab_tok(fixtures_dir: Path) -> Tokenizer:
    return _open_tokenizer(fixtures_dir / "vocab" / "ggml-vocab-llama-spm.gguf")


def _vocab_cases(fixtures_dir: Path, name: str = "llama-spm") -> list[tuple[bytes, list[int]]]:
    """llama.cpp's test-tokenizer-0 vectors for vocab/ggml-vocab-<name>.gguf: (input, expected ids without BOS)."""
    base = fixtures_dir / "vocab" / f"ggml-vocab-{name}.gguf"
    inputs = Path(str(base) + ".inp").read_bytes().split(b"\n__ggml_vocab_test__\n")
    assert inputs[-1] == b""
    outputs = Path(str(base) + ".out").read_text().split("\n")
    assert outputs[-1] == ""
    inputs, outputs = inputs[:-1], outputs[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outputs)]


def test_llama_cpp_vocab_vectors(vocab_tok: Tokenizer, fixtures_dir: Path) -> None:
    for text, expected in _vocab_cases(fixtures_dir):
        assert vocab_tok.encode(text, add_bos=False) == expected, text
        # the same through str input, with BOS
        assert vocab_tok.encode(text.decode("utf-8"), add_bos=True) == [1] + expected


def test_vocab_vectors_roundtrip(vocab_tok: Tokenizer, fixtures_dir: Path) -> None:
    for text, _ in _vocab_cases(fixtures_dir):
        assert vocab_tok.decode(vocab_tok.encode(text)) == text


def test_known_ids_and_types(vocab_tok: Tokenizer) -> None:
    t = vocab_tok
    assert (t.n_vocab, t.bos_id, t.eos_id, t.unk_id) == (32000, 1, 2, 0)
    assert [int(x) for x in t.types[:4]] == [UNKNOWN, CONTROL, CONTROL, BYTE]
    assert t.token_bytes(13) == b"\n" and t.token_bytes(3 + 0xF0) == b"\xf0"
    assert t.token_bytes(15043) == b" Hello"
    assert t.token_bytes(1) == b"" and t.token_bytes(1, special=True) == b"<s>"
    # a leading space is kept when the sequence does not start with BOS (generated text)
    assert t.decode([15043, 3186]) == b" Hello world"
    with pytest.raises(RequestError):
        t.decode([32000])
    with pytest.raises(RequestError):
        t.token_bytes(-1)


def test_special_parsing(vocab_tok: Tokenizer) -> None:
    plain = vocab_tok.encode("a</s>b", add_bos=False)
    assert 2 not in plain
    ids = vocab_tok.encode("a</s>b", add_bos=False, special=True)
    # the fragment after a special token gets the space prefix again (llama.cpp is_prev_special)
    assert ids == vocab_tok.encode("a", add_bos=False) + [2] + vocab_tok.encode("b", add_bos=False)


def test_invalid_utf8_falls_back_to_bytes(vocab_tok: Tokenizer) -> None:
    # a lone lead byte takes the following byte into its symbol (utf8 length from the lead byte), then bytes
    ids = vocab_tok.encode(b"\xc3A", add_bos=False)
    assert ids == [29871, 3 + 0xC3, 3 + 0x41]
    assert vocab_tok.decode(ids) == b" \xc3A"


def test_word_cache_matches_whole_merge(vocab_tok: Tokenizer) -> None:
    # the per-word split is an optimisation: merging the whole escaped text at once must give the same ids
    text = ("Once upon a time,  there was\ta little   robot who said: \"Führer ½ 🦙!\"\n" * 3).encode()
    escaped = (b" " + text).replace(b" ", "\u2581".encode())
    assert vocab_tok._bpe(escaped) == vocab_tok.encode(text, add_bos=False)


def test_ggml_spelling_normalised(fixtures_dir: Path) -> None:
    """The GGML v3 twin of fx32k stores plain spaces, raw bytes and empty control tokens; it must tokenize exactly
    like the GGUF vocabulary."""
    path = fixtures_dir / "models" / "fx32k-q4_0.ggmlv3.bin"
    with open_model(str(path), vocab_only=True) as mf:
        pieces = mf.vocab.pieces
        assert mf.vocab.spelling == "ggml" and mf.vocab.types is None
        assert pieces[0] == " \u2047 ".encode() and pieces[1] == b"" and pieces[2] == b""
        assert pieces[3 + 0x41] == b"A" and pieces[15043] == b" Hello"
        tg = Tokenizer.from_model_file(mf)
    tu = _open_tokenizer(fixtures_dir / "vocab" / "ggml-vocab-llama-spm.gguf")
    assert tg.texts == tu.texts
    assert list(tg.types) == list(tu.types)
    for text, expected in _vocab_cases(fixtures_dir):
        assert tg.encode(text, add_bos=False) == expected, text
        assert tg.decode(tg.encode(text)) == text


@pytest.mark.parametrize("fmt", ["gguf", "ggmlv3"])
def test_fixture_model_reference_tokens(fixtures_dir: Path, fixture_index: dict, fmt: str) -> None:
    """Every fixture family's reference prompt was tokenized by llama.cpp with the model's own vocabulary
    (1024 entries for fx/fxgqa, 32000 for fx32k)."""
    seen = set()
    for m in fixture_index["models"]:
        family = m["name"].split("-")[0]
        if family in seen:
            continue
        seen.add(family)
        path = fixtures_dir / m["files"][fmt]["path"]
        tok = _open_tokenizer(path)
        assert tok.n_vocab == m["hparams"]["n_vocab"]
        assert tok.encode(m["text"]) == m["tokens"], m["name"]
        assert tok.decode(m["tokens"]).decode() == m["text"]
    assert seen == {"fx", "fxgqa", "fx32k"}


def test_compiled_merge_matches_python_merge(vocab_tok: Tokenizer, fixtures_dir: Path) -> None:
    """Fragments over 2 KB (text without spaces) use the Numba merge loop over precomputed pair tables; it must
    give the same ids as the Python loop, including invalid UTF-8 and characters the vocabulary lacks."""
    import random
    rng = random.Random(3)
    alphabet = ["a", "b", "e", "r", "t", "h", " ", "é", "🦙", "\n", "ü", "ш", "!", "3", ".", "中", "文", "\u2581"]
    cases = [(b" " + s).replace(b" ", "\u2581".encode()) for s, _ in _vocab_cases(fixtures_dir)]
    cases += [(" " + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))).encode()
              .replace(b" ", "\u2581".encode()) for _ in range(200)]
    cases += [b"\xc3A\xf0\x9f\xe2\x96\x81x\xff\x80", b"\xe2\x96", "a".encode() * 3000]
    for c in cases:
        assert vocab_tok._bpe_fast(c) == vocab_tok._bpe_py(c), c
    long_text = "".join(rng.choice("abcdefghij") for _ in range(5000))
    assert vocab_tok.encode(long_text) == [1] + vocab_tok._bpe_py(("\u2581" + long_text).encode())
