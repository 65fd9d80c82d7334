"""Byte-level BPE tokenizer against llama.cpp's own test vectors (test-tokenizer-0 with the GPT-2 and DeepSeek
vocabularies of its models/ folder), plus what the vectors do not reach: special tokens, refusal of unknown
vocabularies, the compiled merge loop and llama.cpp's Unicode category table."""
from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from airobackend.bpe import BPETokenizer
from airobackend.errors import ModelFileError
from airobackend.formats import HParams, Vocab, open_model
from airobackend.formats.writer import write_gguf
from airobackend.pretokenize import (BYTE_CHARS, CONTROL, LETTER, MARK, NUMBER, PUNCTUATION, SEPARATOR, SYMBOL,
                                     UNDEFINED, collapse_expression, decode_utf8, flags)
from airobackend.tokenizer import Tokenizer

from test_tokenizer import _vocab_cases

BPE_VOCABS = ["gpt-2", "deepseek-llm", "deepseek-coder"]


@pytest.fixture(scope="module", params=BPE_VOCABS)
def bpe_vocab(request, fixtures_dir: Path) -> tuple[str, BPETokenizer]:
    return request.param, Tokenizer.from_file(str(fixtures_dir / "vocab" / f"ggml-vocab-{request.param}.gguf"))


def test_llama_cpp_vocab_vectors(bpe_vocab, fixtures_dir: Path) -> None:
    name, tok = bpe_vocab
    assert isinstance(tok, BPETokenizer)
    for text, expected in _vocab_cases(fixtures_dir, name):
        assert tok.encode(text, add_bos=False) == expected, text
        assert tok.encode(text.decode("utf-8"), add_bos=False) == expected, text      # str input alike


def test_bos_from_the_file(bpe_vocab) -> None:
    name, tok = bpe_vocab
    ids = tok.encode("Hello", add_bos=False)
    # the DeepSeek files set tokenizer.ggml.add_bos_token; the GPT-2 file does not (llama.cpp's BPE default: no BOS)
    assert tok.add_bos == (name != "gpt-2")
    assert tok.encode("Hello", add_bos=True) == ([tok.bos_id] if tok.add_bos else []) + ids


def test_decode_restores_the_text(bpe_vocab, fixtures_dir: Path) -> None:
    name, tok = bpe_vocab
    for text, expected in _vocab_cases(fixtures_dir, name):
        assert tok.decode(expected) == text


def test_special_tokens(fixtures_dir: Path) -> None:
    tok = Tokenizer.from_file(str(fixtures_dir / "vocab" / "ggml-vocab-deepseek-coder.gguf"))
    eos = tok.eos_id                                # <｜end▁of▁sentence｜>, a control token
    eos_text = tok.texts[eos].decode()
    plain = tok.encode(f"a{eos_text}b", add_bos=False)
    assert eos not in plain                         # control tokens are text unless asked for
    assert tok.encode(f"a{eos_text}b", add_bos=False, special=True) == \
        tok.encode("a", add_bos=False) + [eos] + tok.encode("b", add_bos=False)
    # user-defined tokens are cut out of the text even without special=True (tokenizer_st_partition)
    user = tok.texts.index(b"<|EOT|>")
    assert tok.encode("x<|EOT|>y", add_bos=False) == tok.encode("x", add_bos=False) + [user] + \
        tok.encode("y", add_bos=False)
    assert tok.token_bytes(eos) == b"" and tok.token_bytes(eos, special=True) == eos_text.encode()
    assert tok.token_bytes(user) == b"<|EOT|>"
    assert tok.eog_ids == {eos} and tok.eot_id == eos        # <｜end▁of▁sentence｜> is also the end of a turn


def test_longest_special_token_first() -> None:
    """tokenizer_st_partition takes the longest special token first, whatever comes first in the text."""
    pieces = [b"a", b"b", b"c", b"<x>", b"<x>y>"]
    merges: list[str] = []
    tok = BPETokenizer(pieces, [1, 1, 1, 3, 3], merges, "gpt-2", bos_id=3, eos_id=3)
    assert tok.encode("<x>y>", add_bos=False, special=True) == [4]
    assert tok.encode("a<x>b", add_bos=False, special=True) == [0, 3, 1]


def test_compiled_merge_matches_python_merge(fixtures_dir: Path) -> None:
    """Words over _NUMBA_MIN characters use the compiled merge loop; it must agree with the Python one."""
    tok = Tokenizer.from_file(str(fixtures_dir / "vocab" / "ggml-vocab-gpt-2.gguf"))
    rng = random.Random(7)
    for _ in range(60):
        word = "".join(rng.choice("abcdeéü中🦙 ") for _ in range(rng.randint(50, 400)))
        enc = word.encode().decode("latin-1").translate(dict(enumerate(BYTE_CHARS)))
        fast = tok._merge_fast(word.encode())
        parts = list(enc)
        while True:                                  # the reference: lowest rank first, leftmost on ties
            ranks = [(tok._ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            ranks = [r for r in ranks if r[0] is not None]
            if not ranks:
                break
            _, i = min(ranks)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert fast == [tok._t2id[p] for p in parts]
    long_word = "x" * 5000
    assert tok.decode(tok.encode(long_word)) == long_word.encode()


def test_invalid_utf8_like_llama_cpp() -> None:
    # each byte that does not start a complete sequence is one U+FFFD; surrogates and overlong forms are decoded
    assert decode_utf8(b"a\xe2\x96b") == "a\ufffd\ufffdb"
    assert decode_utf8(b"\xed\xa0\x80") == "\ud800"
    assert decode_utf8(b"\xc0\xaf") == "/"
    assert decode_utf8(b"\xff\x80") == "\ufffd\ufffd"


def test_unicode_table_is_llama_cpps() -> None:
    """Categories come from llama.cpp's table, not from the running Python: they agree wherever this Python knows
    the code point, and code points newer than its Unicode version keep llama.cpp's category."""
    by_cat = {"L": LETTER, "N": NUMBER, "P": PUNCTUATION, "S": SYMBOL, "M": MARK, "Z": SEPARATOR, "C": CONTROL}
    for cp in range(0, 0x110000, 3):
        cat = unicodedata.category(chr(cp))
        if cat != "Cn":
            assert flags(cp) == by_cat[cat[0]], hex(cp)
    assert flags(0x0378) == UNDEFINED
    assert flags(0x1E030) == LETTER                  # Cyrillic modifier letters, new in Unicode 15
    assert collapse_expression("\\p{L}+|[^\\s\\p{N}]") == "[\xd2\x41-\x5A\x61-\x7A]+|[^\\s\xd1\x30-\x39]"


def _bpe_vocab_file(path: Path, pre: str, model: str = "gpt2") -> Path:
    pieces = [b"<|endoftext|>"] + [c.encode() for c in BYTE_CHARS]
    vocab = Vocab(pieces=pieces, scores=np.zeros(len(pieces), np.float32),
                  types=np.array([3] + [1] * 256, np.int32), spelling="gguf", model="gpt2", pre=pre, merges=[])
    hp = HParams(n_vocab=len(pieces), n_embd=8, n_head=1, n_head_kv=1, n_layer=0, n_ff=8, n_rot=8, bos_id=0,
                 eos_id=0, add_bos=False, add_space_prefix=False)
    write_gguf(path, hparams=hp, vocab=vocab, tensors=[], data=None,
               extra={"tokenizer.ggml.model": model} if model != "gpt2" else None)
    return path


def test_unknown_vocabularies_refused_by_name(tmp_path: Path) -> None:
    ok = Tokenizer.from_file(str(_bpe_vocab_file(tmp_path / "ok.gguf", "smollm")))
    assert ok.encode("Hi all", add_bos=False) == [1 + b for b in b"Hi all"]     # no merges: one token per byte
    with pytest.raises(ModelFileError, match="pre-tokenizer 'qwen9'"):
        open_model(_bpe_vocab_file(tmp_path / "pre.gguf", "qwen9"), vocab_only=True)
    with pytest.raises(ModelFileError, match="tokenizer model 't5'"):
        open_model(_bpe_vocab_file(tmp_path / "t5.gguf", "", model="t5"), vocab_only=True)


def _llama_tokenize(fixtures_dir: Path) -> Path:
    exe = fixtures_dir.parent / "tools" / "llama.cpp-c392e50" / "avx512" / "llama-tokenize"
    if not exe.is_file():
        pytest.skip(f"llama.cpp's llama-tokenize not found at {exe}")
    return exe


# Random text from pools that reach every branch of the expressions: contractions, digits, non-ASCII letters, marks,
# numbers, symbols, CJK, non-ASCII whitespace, unassigned and private-use code points, controls, the 'sentinel' and
# 'IMGIMG' patterns of the Chameleon list.
_POOLS = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "     ", "\n\n\r\t", "'",
          "'s't're've'm'll'd'S'T'RE'LL", "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~", "éüßàçñøÆŒ", "АБВГДабвгдЖж", "αβγδΩλ",
          "中文字符测试日本語ひらがなカタカナ", "한국어", "😀🦙👍🏽", "\u0301\u0308\u20dd", "\u00a0\u3000\u2003\u2028\u0085\u1680",
          "\u0378\u0380\ue000\U000f0000", "\x00\x01\x1c\x1d\x7f", "€©±°¶§™", "½²³٣४", "ﬀＡＢｚ！？", "…。，、।۔،",
          "<sentinel:12>IMGIMGABZ", "\u200b\u200d\ufeff", "\U0001E030𐐀𐑏"]


def _random_text(rng: random.Random) -> str:
    return "".join("".join(rng.choice(p) for _ in range(rng.randint(1, 4)))
                   for p in (rng.choice(_POOLS) for _ in range(rng.randint(1, 40))))


@pytest.mark.e2e       # llama.cpp's llama-tokenize, a subprocess
@pytest.mark.parametrize("pre", ["default", "llama-bpe", "deepseek-llm", "deepseek-v3", "deepseek-coder", "falcon",
                                 "smollm", "gpt-2", "qwen2", "poro-chat", "viking", "tekken", "chameleon"])
def test_every_pre_tokenizer_like_llama_cpp(pre: str, fixtures_dir: Path, tmp_path: Path) -> None:
    """Each of llama.cpp's pre-tokenizer lists (one name per list) on the GPT-2 vocabulary: our ids equal those of
    llama.cpp's own llama-tokenize on 150 random texts, and on text with invalid UTF-8."""
    import dataclasses
    import os
    import subprocess
    exe = _llama_tokenize(fixtures_dir)
    with open_model(fixtures_dir / "vocab" / "ggml-vocab-gpt-2.gguf", vocab_only=True) as mf:
        vocab = dataclasses.replace(mf.vocab, pre=pre)
    hp = HParams(n_vocab=len(vocab), n_embd=64, n_head=1, n_head_kv=1, n_layer=1, n_ff=64, n_rot=64, bos_id=50256,
                 eos_id=50256, add_bos=False, add_space_prefix=False)
    path = tmp_path / f"vocab-{pre}.gguf"
    write_gguf(path, hparams=hp, vocab=vocab, tensors=[], data=None)
    tok = Tokenizer.from_file(str(path))
    rng = random.Random(pre)
    texts = [_random_text(rng).encode("utf-8", "surrogatepass") for _ in range(150)]
    texts += [b"abc\xe2\x96 x\xc3", b"\xff\x80'S 12", b"\xed\xa0\x80\xc0\xaf\xf0\x9f\x98"]
    data = b"<|endoftext|>".join(texts)          # a control token between the texts keeps them apart
    (tmp_path / "in.txt").write_bytes(data)
    r = subprocess.run([str(exe), "-m", str(path), "-f", str(tmp_path / "in.txt"), "--ids", "--log-disable",
                        "--no-bos", "--no-escape"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, LD_LIBRARY_PATH=str(exe.parent)))
    if r.returncode != 0:
        pytest.skip(f"llama-tokenize does not run here (exit {r.returncode}): {r.stderr.strip()[-200:]}")
    expected = json.loads(r.stdout.strip().splitlines()[-1])
    ours = tok.encode(data, add_bos=False, special=True)
    if ours != expected:                          # name the first text that differs
        at = next(i for i, (a, b) in enumerate(zip(ours, expected)) if a != b) if ours[:len(expected)] != expected \
            else len(expected)
        text = texts[ours[:at].count(50256)]
        assert ours == expected, f"first difference in {text!r}"
