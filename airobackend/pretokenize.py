"""Pre-tokenization for byte-level BPE vocabularies, as llama.cpp c392e50 does it (src/unicode.cpp
`unicode_regex_split`, the regex lists per `tokenizer.ggml.pre` in src/llama-vocab.cpp).

The text is cut into words by a list of regular expressions applied one after the other, each to every piece the
previous ones left: a match becomes a piece, and so does each stretch of text between two matches. The expressions use
Unicode categories (\\p{L}, \\p{N}, \\p{P}, \\p{M}, \\p{S}), which llama.cpp evaluates with its own category table
(``data/unicode_flags.txt``, the ranges of its src/unicode-data.cpp) through a "collapsed" copy of the text: every
code point above U+007F becomes one stand-in character for its category (0xD1 number, 0xD2 letter, 0xD3 punctuation,
0xD4 mark, 0xD5 symbol, 0x0B whitespace, 0xD0 anything else), and ``\\p{L}`` becomes ``[\\xD2A-Za-z]``. We do the
same with Python's `re` (ASCII ``\\s``, as C++'s std::regex in the "C" locale), so the categories are llama.cpp's and
not those of the running Python's Unicode version. Expressions without categories run on the code points with
non-ASCII whitespace replaced by 0x0B, as llama.cpp runs them through std::wregex.

For the GPT-2 and LLaMA-3 expressions llama.cpp uses hand-written splitters instead of std::regex. Running those
expressions as regexes over the collapsed text gives the same pieces (every code point has a category in the table,
so the splitters' "no match" branch is never taken, and a stretch between two matches is always a single whitespace
character that the splitters emit alone too); the tokenizer tests check it on llama.cpp's own test vectors.
"""
from __future__ import annotations

import bisect
import re
from functools import lru_cache
from importlib import resources
from itertools import accumulate
from typing import Optional

NUMBER, LETTER, SEPARATOR, MARK, PUNCTUATION, SYMBOL, CONTROL, UNDEFINED = 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x01
# unicode_set_whitespace of llama.cpp (the White_Space property)
WHITESPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                        0x205F, 0x3000])

_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_LLAMA3 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
           "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
          "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# The regex lists of llm_tokenizer_bpe, by llama.cpp's pre-tokenizer type.
EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "default": ("[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2, "\\p{N}+", "[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "deepseek-llm": (
        "[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
        "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
        "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
        "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
        "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
        "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
        "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
        "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
        "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
        "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "\\p{N}+",
    ),
    "deepseek-v3": (
        "\\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ),
    "deepseek-coder": ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", "\\p{N}"),
    "falcon": ("[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "starcoder": ("\\p{N}", _GPT2),
    "gpt2": (_GPT2,),
    "qwen2": (_QWEN2,),
    "poro": (_PORO,),
    "viking": (_PORO, "\\p{N}"),
    "tekken": ("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?"
               "((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+"
               "|\\s+(?!\\S)|\\s+",),
    "chameleon": ("<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\\t\\n]|    |  )", "\\p{N}",
                  "[\\p{P}!-/:-@\\[-`{-~]", _GPT2),
}


class PreType:
    """What a `tokenizer.ggml.pre` name means: its expressions and the tokenizer flags llama.cpp sets with it."""

    def __init__(self, expressions: str, *, ignore_merges: bool = False, add_bos: Optional[bool] = None) -> None:
        self.expressions = expressions          # key of EXPRESSIONS
        self.ignore_merges = ignore_merges      # a word that is a whole token is not merged (LLaMA-3, Tekken)
        self.add_bos = add_bos                  # default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3_TYPE = PreType("llama3", ignore_merges=True, add_bos=True)
# llama_vocab::impl::load: GGUF `tokenizer.ggml.pre` -> pre-tokenizer type ("" is llama.cpp's 'default' with a warning)
PRE_TYPES: dict[str, PreType] = {
    "": PreType("default"), "default": PreType("default"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), _LLAMA3_TYPE),
    "dbrx": PreType("llama3"), "smaug-bpe": PreType("llama3"), "chatglm-bpe": PreType("llama3"),
    "deepseek-llm": PreType("deepseek-llm"), "deepseek-coder": PreType("deepseek-coder"),
    "deepseek-v3": PreType("deepseek-v3"), "falcon": PreType("falcon"),
    **{k: PreType("starcoder") for k in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                                         "minerva-7b")},
    **{k: PreType("gpt2") for k in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es",
                                    "jina-v2-de", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais")},
    **{k: PreType("qwen2") for k in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2")},
    **{k: PreType("poro") for k in ("poro-chat", "bloom", "gpt3-finnish")},
    "viking": PreType("viking"), "tekken": PreType("tekken", ignore_merges=True, add_bos=True),
    "chameleon": PreType("chameleon", add_bos=True),
}


# ---------------------------------------------------------------------------------------------- category table
@lru_cache(maxsize=1)
def _ranges() -> tuple[list[int], list[int]]:
    starts, flags = [], []
    text = resources.files("airobackend").joinpath("data/unicode_flags.txt").read_text(encoding="ascii")
    for line in text.splitlines():
        if line and not line.startswith("#"):
            s, f = line.split()
            starts.append(int(s, 16))
            flags.append(int(f, 16))
    return starts, flags


def flags(cp: int) -> int:
    """llama.cpp's category flags of code point `cp` (UNDEFINED beyond the table)."""
    starts, fl = _ranges()
    if cp >= starts[-1]:
        return UNDEFINED
    return fl[bisect.bisect_right(starts, cp) - 1]


_STAND_IN = {NUMBER: "\xd1", LETTER: "\xd2", PUNCTUATION: "\xd3", MARK: "\xd4", SYMBOL: "\xd5"}


class _Collapse(dict):
    """str.translate table: code points above U+007F -> their category's stand-in (filled as they are met)."""

    def __missing__(self, cp: int) -> str:
        if cp < 0x80:
            raise KeyError(cp)                  # never asked: ASCII is entered up front
        c = "\x0b" if cp in WHITESPACE else _STAND_IN.get(flags(cp) & 0xFF, "\xd0")
        self[cp] = c
        return c


class _Wide(dict):
    """str.translate table: non-ASCII whitespace -> 0x0B, everything else unchanged."""

    def __missing__(self, cp: int) -> str:
        c = "\x0b" if cp in WHITESPACE else chr(cp)
        self[cp] = c
        return c


_COLLAPSE = _Collapse({i: chr(i) for i in range(0x80)})
_WIDE = _Wide({i: chr(i) for i in range(0x80)})

# unicode_regex_split: category -> (stand-in, its ASCII members as a class body)
_CATEGORIES = {"\\p{N}": NUMBER, "\\p{L}": LETTER, "\\p{P}": PUNCTUATION, "\\p{M}": MARK, "\\p{S}": SYMBOL}
_CLASS_BODY = {
    NUMBER: "\xd1\x30-\x39",
    LETTER: "\xd2\x41-\x5A\x61-\x7A",
    PUNCTUATION: "\xd3\x21-\x23\x25-\x2A\x2C-\x2F\x3A-\x3B\x3F-\x40\\\x5B-\\\x5D\x5F\\\x7B\\\x7D",
    MARK: "\xd4",
    SYMBOL: "\xd5\\\x24\\\x2B\x3C-\x3E\x5E\x60\\\x7C",
}


def collapse_expression(expr: str) -> str:
    """The expression for the collapsed text: each \\p{X} becomes its stand-in plus its ASCII members
    (llama.cpp's loop in unicode_regex_split, including how it tracks being inside [...])."""
    out: list[str] = []
    inside = False
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c == "[" and (i == 0 or expr[i - 1] != "\\"):
            out.append(c)
            inside = True
        elif inside and c == "]" and expr[i - 1] != "\\":
            out.append(c)
            inside = False
        elif c == "\\" and i + 4 < n and expr[i + 1] == "p" and expr[i + 2] == "{" and expr[i + 4] == "}" \
                and expr[i:i + 5] in _CATEGORIES:
            body = _CLASS_BODY[_CATEGORIES[expr[i:i + 5]]]
            out.append(body if inside else "[" + body + "]")
            i += 5
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _python_expression(expr: str) -> str:
    """`expr` for Python's re.split: its groups made non-capturing and the whole wrapped in one group (so split
    returns the stretches between matches and the matches, in order), and ECMAScript's '$' (no multiline: the end of
    the input; Python's also matches before a final newline) spelled \\Z."""
    out: list[str] = []
    inside, i, n = False, 0, len(expr)
    while i < n:
        c = expr[i]
        if c == "\\":
            out.append(expr[i:i + 2])
            i += 2
            continue
        if inside:
            inside = c != "]"
        elif c == "[":
            inside = True
        elif c == "(" and expr[i + 1:i + 2] != "?":
            c = "(?:"
        elif c == "$" and i == n - 1:
            c = "\\Z"
        out.append(c)
        i += 1
    return "(" + "".join(out) + ")"


class PreTokenizer:
    """Split text into the words BPE merges, for one pre-tokenizer type (a key of EXPRESSIONS)."""

    def __init__(self, expressions: str) -> None:
        self.name = expressions
        self._steps: list[tuple[re.Pattern, bool]] = []
        for expr in EXPRESSIONS[expressions]:
            collapsed = any(cat in expr for cat in _CATEGORIES)
            if collapsed and not expr.isascii():
                raise ValueError(f"expression mixes Unicode categories and non-ASCII characters: {expr!r}")
            source = collapse_expression(expr) if collapsed else expr
            self._steps.append((re.compile(_python_expression(source), re.ASCII), collapsed))

    def split(self, text: str) -> list[str]:
        """The words of `text` (a str of code points), in order; together they are exactly `text`."""
        if not text:
            return []
        ascii_text = text.isascii()
        if ascii_text and len(self._steps) == 1:
            return [w for w in self._steps[0][0].split(text) if w]
        views: dict[bool, str] = {}
        ends = [len(text)]                 # piece i is text[ends[i - 1]:ends[i]] (ends[-1] = 0)
        for pattern, collapsed in self._steps:
            work = views.get(collapsed)
            if work is None:
                work = views[collapsed] = text if ascii_text else text.translate(_COLLAPSE if collapsed else _WIDE)
            # Words repeat: each distinct piece is split once per step, later ones reuse its cut points (an
            # expression sees only the piece, so equal pieces split alike).
            split = pattern.split
            cuts_of: dict[str, tuple[int, ...]] = {}
            new: list[int] = []
            append = new.append
            s = 0
            for e in ends:
                if e - s > 1:                  # a piece of one character stays one piece
                    piece = work[s:e]
                    cuts = cuts_of.get(piece)
                    if cuts is None:
                        lengths = [len(w) for w in split(piece) if w]
                        cuts = cuts_of[piece] = tuple(accumulate(lengths[:-1]))
                    for c in cuts:
                        append(s + c)
                append(e)
                s = e
            ends = new
        return [text[a:b] for a, b in zip([0, *ends], ends)]


@lru_cache(maxsize=None)
def pre_tokenizer(expressions: str) -> PreTokenizer:
    return PreTokenizer(expressions)


# ---------------------------------------------------------------------------------------------- byte <-> unicode
def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode (llama.cpp unicode_byte_to_utf8_map): printable Latin-1 bytes stand for themselves,
    the other 68 bytes for U+0100.. in byte order."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


BYTE_CHARS: tuple[str, ...] = tuple(_byte_chars())
BYTE_ENCODE = {b: c for b, c in enumerate(BYTE_CHARS)}          # for str.translate over latin-1 decoded bytes
CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}


def decode_utf8(data: bytes) -> str:
    """Code points of `data` as llama.cpp's unicode_cpts_from_utf8 reads them: each byte that does not start a
    complete sequence becomes U+FFFD on its own (Python's decoder would merge some of them), and surrogates are kept."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            out.append(chr(b))
            i += 1
            continue
        # lead byte: 10xxxxxx and 11111xxx start nothing; else 1, 2 or 3 continuation bytes must follow
        need = 0 if not b & 0x40 else 1 if not b & 0x20 else 2 if not b & 0x10 else 3 if not b & 0x08 else 0
        if need and i + need < n and all((data[i + k] & 0xC0) == 0x80 for k in range(1, need + 1)):
            if need == 1:
                cp = ((b & 0x1F) << 6) | (data[i + 1] & 0x3F)
            elif need == 2:
                cp = ((b & 0x0F) << 12) | ((data[i + 1] & 0x3F) << 6) | (data[i + 2] & 0x3F)
            else:
                cp = ((b & 0x07) << 18) | ((data[i + 1] & 0x3F) << 12) | ((data[i + 2] & 0x3F) << 6) \
                    | (data[i + 3] & 0x3F)
            out.append(chr(cp) if cp <= 0x10FFFF else "\ufffd")
            i += need + 1
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)
