"""JSON Schema -> GBNF: a grammar whose every sentence is JSON that validates against the schema.

    grammar = schema_to_grammar({"type": "object", "properties": {...}, "required": [...]})   # SchemaError if not

The semantics are llama.cpp's `json_schema_to_grammar` (common/json-schema-to-grammar.cpp and
examples/json_schema_to_grammar.py at commit c392e509): the same rule names, the same `space` rule between tokens,
properties in schema order with the required ones first and the optional ones as nested optional tails,
`additionalProperties`, `enum`/`const` as literals, `oneOf`/`anyOf`/type lists as alternatives, `allOf` of objects
merged, arrays with `items`/`prefixItems` and `minItems`/`maxItems`, strings with `minLength`/`maxLength`,
`format` date, time, date-time, uuid (and email), `pattern`, integers with `minimum`/`maximum` (exclusive too), local
`$ref`s (`#/$defs/...`, `#/definitions/...`, recursive ones included), and `{}` as "an object" (what the OpenAI
`json_object` response format asks for).

Where llama.cpp's output can fail validation this converter differs, so that the output always validates:

* keywords that constrain a value but cannot be written as a grammar here (`not`, `if`, `uniqueItems`,
  `multipleOf`, bounds on non-integer numbers, `minProperties`, `patternProperties`, `contains`, ...) are refused
  with a SchemaError naming where they are, instead of being ignored; so are remote `$ref`s (nothing is fetched);
* literals (`enum`, `const`, property names) keep their JSON escapes (`\\"`, `\\\\`);
* a `pattern` is translated for the inside of a JSON string: characters JSON must escape are produced escaped,
  `\\d \\w \\s` (and `\\D \\W \\S`) are understood, and a pattern without `^`/`$` matches anywhere in the string
  (JSON Schema's search semantics) instead of being refused;
* a `\\u` escape in a string never names a UTF-16 surrogate (each escape is one whole character, so lengths count
  as JSON Schema counts them);
* a `required` name without a property schema gets the `additionalProperties` schema (any value if absent);
* dates are real dates (no year 0000, no February 30th), and `format: email` is produced as an address.

Keywords that only annotate (`title`, `description`, `default`, `examples`, unknown `format`s, ...) are ignored,
as JSON Schema says they may be.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

from airobackend.errors import RequestError

SPACE_RULE = '| " " | "\\n" [ \\t]{0,20}'      # constrained whitespace keeps the model from running away

# name -> (rule body, rules it uses)
PRIMITIVE_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false") space', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
               ("integral-part", "decimal-part")),
    "integer": ('("-"? integral-part) space', ("integral-part",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
               ("string", "value")),
    "array": ('"[" space ( value ("," space value)* )? "]" space', ("value",)),
    "uuid": ('"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
             '[0-9a-fA-F]{12} "\\"" space', ()),
    # one character of a JSON string; a \u escape names a whole character, never half a surrogate pair
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" ([0-9a-cA-CeEfF] [0-9a-fA-F]{3} | '
             '[dD] [0-7] [0-9a-fA-F]{2}))', ()),
    "string": ('"\\"" char* "\\"" space', ("char",)),
    "null": ('"null" space', ()),
}
STRING_FORMAT_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    # llama.cpp's date rule also allows year 0000 and days such as 02-31, which no validator accepts
    "date": ('date-year "-" date-month-day | date-leap-year "-02-29"',
             ("date-year", "date-month-day", "date-leap-year")),
    "date-year": ('[1-9] [0-9]{3} | "0" ( [1-9] [0-9]{2} | "0" ( [1-9] [0-9] | "0" [1-9] ) )', ()),
    "date-month-day": ('( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] ) | '
                       '( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" ) | '
                       '"02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] )', ()),
    # years divisible by 4 but not by 100, and years divisible by 400
    "date-leap-year": ('[0-9] [0-9] ( [02468] [48] | [13579] [26] | [2468] "0" ) | '
                       '( [02468] [48] | [13579] [26] | [2468] "0" ) "00"', ()),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )', ()),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\"" space', ("date",)),
    "time-string": ('"\\"" time "\\"" space', ("time",)),
    "date-time-string": ('"\\"" date-time "\\"" space', ("date-time",)),
    # not in llama.cpp (a TODO there): validators check this format, so it is produced in a form all accept
    "email-string": ('"\\"" [a-zA-Z0-9._%+-]+ "@" [a-zA-Z0-9-]+ ( "." [a-zA-Z0-9-]+ )+ "\\"" space', ()),
}
RESERVED_NAMES = {"root", "dot", *PRIMITIVE_RULES, *STRING_FORMAT_RULES}
INVALID_RULE_CHARS_RE = re.compile(r"[^a-zA-Z0-9-]+")

# Keywords that constrain a value and that no rule below enforces: refused rather than silently ignored.
UNENFORCED = ("not", "if", "uniqueItems", "multipleOf", "minProperties", "maxProperties", "patternProperties",
              "dependentRequired", "dependentSchemas", "dependencies", "contains", "minContains", "maxContains",
              "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
MAX_REPEAT = 10000          # the grammar parser's limit on {m,n}
MAX_TOTAL_REPEAT = 100000   # all bounded repetitions of one schema together (the grammar parser expands each)
MAX_SCHEMA_RULES = 5000     # a schema that needs more rules than this is a mistake or an attack


class SchemaError(RequestError):
    """A schema that cannot be turned into a grammar; the message says where (a JSON-pointer-like path)."""

    def __init__(self, message: str, where: str = "", param: Optional[str] = None) -> None:
        super().__init__(f"json schema{' at ' + where if where else ''}: {message}")
        self.param = param


# ---------------------------------------------------------------------------------------------- GBNF text helpers

def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal (every character that GBNF treats specially escaped)."""
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _class_char(cp: int) -> str:
    """One code point inside a GBNF character class."""
    c = chr(cp)
    if c in "\\]-^[\"":
        return "\\" + c
    if cp < 0x20 or cp == 0x7F:
        return f"\\x{cp:02X}"
    if 0xD800 <= cp <= 0xDFFF or cp > 0xFFFF:
        return f"\\U{cp:08X}"
    return c


def build_repetition(item: str, lo: int, hi: Optional[int], separator: Optional[str] = None) -> str:
    """`item` repeated lo..hi times (hi None = unbounded), with `separator` between items (llama.cpp's form)."""
    if lo == 0 and hi == 1:
        return f"{item}?"
    if not separator:
        if lo == 1 and hi is None:
            return f"{item}+"
        if lo == 0 and hi is None:
            return f"{item}*"
        return f"{item}{{{lo},{'' if hi is None else hi}}}"
    rest = build_repetition(f"({separator} {item})", max(lo - 1, 0), None if hi is None else hi - 1)
    result = f"{item} {rest}"
    return f"({result})?" if lo == 0 else result


def _min_max_int(lo: Optional[int], hi: Optional[int], out: list[str], decimals_left: int = 16,
                 top_level: bool = True) -> None:
    """Integers in [lo, hi] (either may be None) as GBNF, digit by digit (llama.cpp's _generate_min_max_int)."""

    def digit_range(a: str, b: str) -> None:
        out.append(f"[{a}]" if a == b else f"[{a}-{b}]")

    def more_digits(min_d: int, max_d: Optional[int]) -> None:
        out.append("[0-9]")
        if min_d == max_d == 1:
            return
        out.append(f"{{{min_d}" + ("" if max_d == min_d else "," + ("" if max_d is None else str(max_d))) + "}")

    def uniform_range(a: str, b: str) -> None:
        i = 0
        while i < len(a) and a[i] == b[i]:
            i += 1
        if i > 0:
            out.append(f'"{a[:i]}"')
        if i < len(a):
            if i > 0:
                out.append(" ")
            sub_len = len(a) - i - 1
            if sub_len > 0:
                a_sub, b_sub = a[i + 1:], b[i + 1:]
                zeros, nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if a_sub == zeros:
                    digit_range(a[i], chr(ord(b[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{a[i]}] (")
                    uniform_range(a_sub, nines)
                    out.append(")")
                    if ord(a[i]) < ord(b[i]) - 1:
                        out.append(" | ")
                        if b_sub == nines:
                            digit_range(chr(ord(a[i]) + 1), b[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(a[i]) + 1), chr(ord(b[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(b[i], b[i])
                    out.append(" ")
                    uniform_range(zeros, b_sub)
                out.append(")")
            else:
                out.append(f"[{a[i]}-{b[i]}]")

    if lo is not None and hi is not None:
        if lo < 0 and hi < 0:
            out.append('"-" (')
            _min_max_int(-hi, -lo, out, decimals_left, True)
            out.append(")")
            return
        if lo < 0:
            out.append('"-" (')
            _min_max_int(0, -lo, out, decimals_left, True)
            out.append(") | ")
            lo = 0
        lo_s, hi_s = str(lo), str(hi)
        for digits in range(len(lo_s), len(hi_s)):
            uniform_range(lo_s, "9" * digits)
            lo_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(lo_s, hi_s)
        return
    less = max(decimals_left - 1, 1)
    if lo is not None:
        if lo < 0:
            out.append('"-" (')
            _min_max_int(None, -lo, out, decimals_left, False)
            out.append(") | [0] | [1-9] ")
            more_digits(0, decimals_left - 1)
        elif lo == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less)
            else:
                more_digits(1, decimals_left)
        elif lo <= 9:
            c = str(lo)
            start = "1" if top_level else "0"
            if c > start:
                digit_range(start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less)
        else:
            lo_s = str(lo)
            c = lo_s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(len(lo_s), less)
                out.append(" | ")
            digit_range(c, c)
            out.append(" (")
            _min_max_int(int(lo_s[1:]), None, out, less, False)
            out.append(")")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(len(lo_s) - 1, less)
        return
    if hi is not None:
        if hi >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                more_digits(0, less)
                out.append(" | ")
            _min_max_int(0, hi, out, decimals_left, True)
        else:
            # llama.cpp passes top_level=False here, which lets "-030" through (a leading zero is not JSON)
            out.append('"-" (')
            _min_max_int(-hi, None, out, decimals_left, True)
            out.append(")")
        return
    raise AssertionError("a bound is needed")


# ---------------------------------------------------------------------------------------------- regex -> GBNF

_MAX_CP = 0x10FFFF
_DIGIT = ((0x30, 0x39),)
_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
          (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))
_LINE_END = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))      # what ECMA-262's `.` does not match
_CLASS_ESCAPES = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False), "W": (_WORD, True),
                  "s": (_SPACE, False), "S": (_SPACE, True)}
_CHAR_ESCAPES = {"t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "0": 0}


def _normalise(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, x = [], 0
    for a, b in _normalise(ranges):
        if a > x:
            out.append((x, a - 1))
        x = b + 1
    if x <= _MAX_CP:
        out.append((x, _MAX_CP))
    return out


def _subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """ranges minus cut (both lists of inclusive code point ranges)."""
    keep = _complement(cut)
    out = []
    for a, b in _normalise(ranges):
        for c, d in keep:
            lo, hi = max(a, c), min(b, d)
            if lo <= hi:
                out.append((lo, hi))
    return out


# Characters a JSON string cannot hold as they are: the quote, the backslash, controls; surrogates are no chars.
_JSON_SPECIAL = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0xD800, 0xDFFF)]


def _json_char_set(ranges: list[tuple[int, int]]) -> str:
    """A GBNF expression for one character of `ranges` written inside a JSON string (escaped where JSON must)."""
    plain = _subtract(ranges, _JSON_SPECIAL)
    alts = []
    if plain:
        alts.append("[" + "".join(_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}"
                                  for a, b in plain) + "]")
    for a, b in _normalise(ranges):
        for cp in range(max(a, 0), min(b, 0x5C) + 1):     # the specials are all below 0x5D (surrogates dropped)
            if cp < 0x20 or cp in (0x22, 0x5C):
                alts.append(gbnf_literal(json.dumps(chr(cp))[1:-1]))
    if not alts:
        raise _PatternError("a character class that matches no character")
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


class _PatternError(Exception):
    pass


class _Regex:
    """ECMA-262 regular expression (the JSON Schema dialect) -> GBNF for the inside of a JSON string.

    Supported: literals and escapes, `.`, classes with ranges and negation, `\\d \\w \\s \\D \\W \\S` (the negated
    ones produce ASCII only, where every dialect agrees), groups
    (capturing, `(?:`, named), `|`, the quantifiers `* + ? {m} {m,} {m,n}` (lazy forms too: same language), `^` at
    the start and `$` at the end of a top-level alternative. Refused: lookaround, backreferences, `\\b`, anchors
    elsewhere."""

    def __init__(self, pattern: str, any_char: str, spend: Any = None) -> None:
        self.p = pattern
        self.i = 0
        self.any_char = any_char        # rule name of one JSON string character (for unanchored ends)
        self.spend = spend or (lambda n: None)

    def err(self, msg: str) -> _PatternError:
        return _PatternError(f"{msg} (at offset {self.i} of /{self.p}/)")

    def peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    def translate(self) -> str:
        alts = []
        while True:
            anchored_start = self.peek() == "^"
            if anchored_start:
                self.i += 1
            seq, anchored_end = self.sequence(top=True)
            parts = ([] if anchored_start else [f"{self.any_char}*"]) + ([seq] if seq else []) + \
                ([] if anchored_end else [f"{self.any_char}*"])
            alts.append(" ".join(parts) if parts else '""')
            if self.peek() == "|":
                self.i += 1
                continue
            if self.i < len(self.p):
                raise self.err("unbalanced ')'")
            break
        return alts[0] if len(alts) == 1 else "(" + " | ".join(f"({a})" for a in alts) + ")"

    def alternation(self) -> str:
        alts = [self.sequence(top=False)[0]]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.sequence(top=False)[0])
        return " | ".join(a or '""' for a in alts)

    def sequence(self, top: bool) -> tuple[str, bool]:
        items: list[str] = []
        lit: list[str] = []                  # pending literal characters (raw, not yet JSON-escaped)

        def flush() -> None:
            if lit:
                items.append(gbnf_literal(json.dumps("".join(lit), ensure_ascii=False)[1:-1]))
                lit.clear()

        while self.i < len(self.p):
            c = self.peek()
            if c in "|)":
                break
            if c == "$":
                self.i += 1
                if top and (self.i == len(self.p) or self.peek() == "|"):
                    flush()
                    return " ".join(items), True
                raise self.err("'$' is only supported at the end of the pattern")
            if c == "^":
                raise self.err("'^' is only supported at the start of the pattern")
            atom, literal = self.atom()
            q = self.quantifier()
            if literal is not None and q is None:
                lit.append(literal)
                continue
            flush()
            items.append(atom if q is None else f"({atom}){q}")
        flush()
        return " ".join(items), False

    def quantifier(self) -> Optional[str]:
        c = self.peek()
        q = None
        if c in "*+?":
            self.i += 1
            q = c
        elif c == "{":
            m = re.match(r"\{(\d+)(,(\d*))?\}", self.p[self.i:])
            if m is None:
                return None                  # a '{' that starts no quantifier is a literal (ECMA-262 annex B)
            self.i += m.end()
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if (hi is not None and hi < lo) or lo > MAX_REPEAT or (hi or 0) > MAX_REPEAT:
                raise self.err(f"bad or too large repetition {m.group(0)}")
            self.spend(max(lo, hi or 0))
            q = f"{{{lo},{'' if hi is None else hi}}}" if hi != lo else f"{{{lo}}}"
        if q is not None and self.peek() == "?":
            self.i += 1                      # lazy: the same strings match
        if q is not None and (self.peek() in ("*", "+", "?") or re.match(r"\{\d+(,\d*)?\}", self.p[self.i:])):
            raise self.err("nothing to repeat")
        return q

    def atom(self) -> tuple[str, Optional[str]]:
        """(GBNF expression, the literal character when the atom is one plain character)."""
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?<", self.i) and not self.p.startswith(("?<=", "?<!"), self.i) \
                    or self.p.startswith("?P<", self.i):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise self.err("unterminated group name")
                self.i = end + 1
            elif self.peek() == "?":
                raise self.err("lookaround and inline flags are not supported")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.err("missing ')'")
            self.i += 1
            return f"({inner or chr(34) * 2})", None
        if c == "[":
            return _json_char_set(self.char_class()), None
        if c == ".":
            self.i += 1
            return _json_char_set(_complement(list(_LINE_END))), None
        if c in "*+?":
            raise self.err("nothing to repeat")
        if c == "\\":
            ranges, cp = self.escape(in_class=False)
            if ranges is not None:
                return _json_char_set(ranges), None
            return gbnf_literal(json.dumps(chr(cp), ensure_ascii=False)[1:-1]), chr(cp)
        self.i += 1
        return gbnf_literal(json.dumps(c, ensure_ascii=False)[1:-1]), c

    def escape(self, in_class: bool) -> tuple[Optional[list[tuple[int, int]]], int]:
        """At a backslash: (ranges, 0) for a class escape, (None, code point) for a character escape."""
        self.i += 1
        c = self.peek()
        if not c:
            raise self.err("pattern ends with a backslash")
        self.i += 1
        if c in _CLASS_ESCAPES:
            ranges, negated = _CLASS_ESCAPES[c]
            # Validators disagree on these classes beyond ASCII (ECMA-262's \w is ASCII, Python's is Unicode), so
            # what is produced lies in both: the ASCII complement for \D \W \S.
            return (_subtract([(0, 0x7F)], list(ranges)) if negated else list(ranges)), 0
        if c in _CHAR_ESCAPES and not (c == "0" and self.peek().isdigit()):
            return None, _CHAR_ESCAPES[c]
        if c == "b" and in_class:
            return None, 8
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) == n and all(d in "0123456789abcdefABCDEF" for d in digits):
                self.i += n
                return None, int(digits, 16)
            raise self.err(f"bad \\{c} escape")
        if c.isdigit() or c in "bBkpPc":
            raise self.err(f"\\{c} (backreference, word boundary, property or control escape) is not supported")
        return None, ord(c)

    def char_class(self) -> list[tuple[int, int]]:
        self.i += 1                                      # '['
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.err("unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo_set, lo = self.class_atom()
            if lo_set is None and self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi_set, hi = self.class_atom()
                if hi_set is not None or hi < lo:
                    raise self.err("bad character range")
                ranges.append((lo, hi))
            elif lo_set is not None:
                ranges.extend(lo_set)
            else:
                ranges.append((lo, lo))
        return _complement(ranges) if negated else _normalise(ranges)

    def class_atom(self) -> tuple[Optional[list[tuple[int, int]]], int]:
        if self.peek() == "\\":
            return self.escape(in_class=True)
        c = self.peek()
        self.i += 1
        return None, ord(c)


# ---------------------------------------------------------------------------------------------- the converter

class SchemaConverter:
    """Builds the rules for one schema (llama.cpp's SchemaConverter); `format_grammar()` prints them, sorted."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {"space": SPACE_RULE}
        self.repeats = 0                # the sum of the bounded repetitions so far (MAX_TOTAL_REPEAT)
        self.refs: dict[str, Any] = {}
        self.resolving: set[str] = set()
        self.root_schema: Any = None

    # -- rules
    def add_rule(self, name: str, rule: str) -> str:
        esc = INVALID_RULE_CHARS_RE.sub("-", name)
        key = esc
        if esc in self.rules and self.rules[esc] != rule:
            i = 0
            while f"{esc}{i}" in self.rules and self.rules[f"{esc}{i}"] != rule:
                i += 1
            key = f"{esc}{i}"
        self.rules[key] = rule
        if len(self.rules) > MAX_SCHEMA_RULES:
            raise SchemaError(f"the schema needs more than {MAX_SCHEMA_RULES} grammar rules")
        return key

    def add_primitive(self, name: str, rule: tuple[str, tuple[str, ...]]) -> str:
        key = self.add_rule(name, rule[0])
        for dep in rule[1]:
            if dep not in self.rules:
                self.add_primitive(dep, PRIMITIVE_RULES.get(dep) or STRING_FORMAT_RULES[dep])
        return key

    def format_grammar(self) -> str:
        return "\n".join(f"{name} ::= {rule}" for name, rule in sorted(self.rules.items()))

    # -- references
    def resolve(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str):
            raise SchemaError("$ref must be a string", where)
        if not ref.startswith("#"):
            raise SchemaError(f"only local references ('#/...') are supported, not {ref!r}", where)
        target = self.root_schema
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"cannot resolve $ref {ref!r}", where)
        return target

    def visit_ref(self, ref: str, where: str) -> str:
        ref_name = ref.split("/")[-1] or "ref"
        if ref_name not in self.rules and ref not in self.resolving:
            self.resolving.add(ref)
            ref_name = self.visit(self.resolve(ref, where), ref_name, f"{where}/$ref")
            self.resolving.discard(ref)
        return ref_name

    # -- schemas
    def visit(self, schema: Any, name: str, where: str = "") -> str:
        if schema is True:
            schema = {}
        if schema is False:
            raise SchemaError("the schema `false` matches nothing", where or "/")
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object, not {type(schema).__name__}", where or "/")
        for kw in UNENFORCED:
            if kw in schema:
                raise SchemaError(f"'{kw}' is not supported (the grammar could not enforce it)", where or "/")
        st = schema.get("type")
        fmt = schema.get("format")
        rule_name = name + "-" if name in RESERVED_NAMES else (name or "root")
        at = where or "/"

        if "$ref" in schema:
            return self.add_rule(rule_name, self.visit_ref(schema["$ref"], at))
        if "oneOf" in schema or "anyOf" in schema:
            key = "oneOf" if "oneOf" in schema else "anyOf"
            alts = schema[key]
            if not isinstance(alts, list) or not alts:
                raise SchemaError(f"'{key}' must be a non-empty list", at)
            return self.add_rule(rule_name, " | ".join(
                self.visit(alt, f"{name}{'-' if name else 'alternative-'}{i}", f"{where}/{key}/{i}")
                for i, alt in enumerate(alts)))
        if isinstance(st, list):
            if not st:
                raise SchemaError("'type' must not be an empty list", at)
            return self.add_rule(rule_name, " | ".join(
                self.visit({**schema, "type": t}, f"{name}{'-' if name else 'alternative-'}{i}", f"{where}/type/{i}")
                for i, t in enumerate(st)))
        if st is not None and st not in ("string", "number", "integer", "boolean", "null", "object", "array"):
            raise SchemaError(f"unknown type {st!r}", at)
        if "const" in schema:
            return self.add_rule(rule_name, self.constant(schema["const"]) + " space")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError("'enum' must be a non-empty list", at)
            return self.add_rule(rule_name, "(" + " | ".join(self.constant(v) for v in values) + ") space")
        if st == "number" and any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum",
                                                         "exclusiveMaximum")):
            raise SchemaError("bounds on a non-integer number are not supported (use type integer)", at)
        if st in (None, "object") and ("properties" in schema or schema.get("additionalProperties", True)
                                       is not True or "required" in schema):
            props = schema.get("properties", {})
            if not isinstance(props, dict):
                raise SchemaError("'properties' must be an object", at)
            required = schema.get("required", [])
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise SchemaError("'required' must be a list of strings", at)
            return self.add_rule(rule_name, self.object_rule(list(props.items()), set(required), name,
                                                             schema.get("additionalProperties"), where))
        if st in (None, "object") and "allOf" in schema:
            return self.add_rule(rule_name, self.all_of(schema["allOf"], name, where))
        if st in (None, "array") and ("items" in schema or "prefixItems" in schema):
            return self.add_rule(rule_name, self.array_rule(schema, name, where))
        if st in (None, "array") and ("minItems" in schema or "maxItems" in schema):
            return self.add_rule(rule_name, self.array_rule(dict(schema, items={}), name, where))
        if st in (None, "string") and "pattern" in schema:
            self.no_lengths(schema, "pattern", at)
            return self.pattern_rule(schema["pattern"], rule_name, at)
        if st in (None, "string") and isinstance(fmt, str) and re.fullmatch(r"uuid[1-5]?", fmt):
            self.no_lengths(schema, f"format {fmt!r}", at)
            return self.add_primitive("root" if rule_name == "root" else fmt, PRIMITIVE_RULES["uuid"])
        if st in (None, "string") and isinstance(fmt, str) and f"{fmt}-string" in STRING_FORMAT_RULES:
            self.no_lengths(schema, f"format {fmt!r}", at)
            prim = f"{fmt}-string"
            return self.add_rule(rule_name, self.add_primitive(prim, STRING_FORMAT_RULES[prim]))
        if st == "string" and ("minLength" in schema or "maxLength" in schema):
            lo, hi = self.bounds(schema, "minLength", "maxLength", at)
            char = self.add_primitive("char", PRIMITIVE_RULES["char"])
            return self.add_rule(rule_name, '"\\"" ' + build_repetition(char, lo, hi) + ' "\\"" space')
        if st in (None, "integer") and any(k in schema for k in ("minimum", "exclusiveMinimum", "maximum",
                                                                  "exclusiveMaximum")):
            return self.add_rule(rule_name, self.integer_range(schema, at))
        if st == "object" or not schema or set(schema) <= _ANNOTATIONS:
            return self.add_rule(rule_name, self.add_primitive("object", PRIMITIVE_RULES["object"]))
        if st is None:
            raise SchemaError(f"cannot make a grammar for this schema (keywords: {', '.join(sorted(schema))})", at)
        return self.add_primitive("root" if rule_name == "root" else st, PRIMITIVE_RULES[st])

    @staticmethod
    def constant(value: Any) -> str:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except ValueError:
            raise SchemaError("a constant must be finite JSON") from None
        return gbnf_literal(text)

    @staticmethod
    def no_lengths(schema: dict, what: str, at: str) -> None:
        if "minLength" in schema or "maxLength" in schema:
            raise SchemaError(f"minLength/maxLength together with {what} is not supported", at)

    def spend(self, n: int, at: str = "") -> None:
        self.repeats += n
        if self.repeats > MAX_TOTAL_REPEAT:
            raise SchemaError(f"the length and item bounds add up to more than {MAX_TOTAL_REPEAT} repetitions", at)

    def bounds(self, schema: dict, lo_key: str, hi_key: str, at: str) -> tuple[int, Optional[int]]:
        lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
        for k, v in ((lo_key, lo), (hi_key, hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_REPEAT):
                raise SchemaError(f"'{k}' must be an integer in 0..{MAX_REPEAT}", at)
        if hi is not None and hi < lo:
            raise SchemaError(f"'{hi_key}' is smaller than '{lo_key}'", at)
        self.spend(max(lo, hi or 0), at)
        return lo, hi

    def integer_range(self, schema: dict, at: str) -> str:
        def num(k: str) -> Optional[float]:
            v = schema.get(k)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e15:
                raise SchemaError(f"'{k}' must be a number of at most 15 digits", at)
            return v
        lo = hi = None
        if num("minimum") is not None:
            lo = math.ceil(schema["minimum"])
        if num("exclusiveMinimum") is not None:
            x = schema["exclusiveMinimum"]
            lo = max(lo if lo is not None else -math.inf, math.floor(x) + 1)
        if num("maximum") is not None:
            hi = math.floor(schema["maximum"])
        if num("exclusiveMaximum") is not None:
            x = schema["exclusiveMaximum"]
            hi = min(hi if hi is not None else math.inf, math.ceil(x) - 1)
        if lo is not None and hi is not None and hi < lo:
            raise SchemaError("no integer lies within the bounds", at)
        out = ["("]
        _min_max_int(None if lo is None else int(lo), None if hi is None else int(hi), out)
        out.append(") space")
        return "".join(out)

    def pattern_rule(self, pattern: Any, rule_name: str, at: str) -> str:
        if not isinstance(pattern, str):
            raise SchemaError("'pattern' must be a string", at)
        char = self.add_primitive("char", PRIMITIVE_RULES["char"])
        try:
            body = _Regex(pattern, char, lambda n: self.spend(n, at)).translate()
        except _PatternError as e:
            raise SchemaError(f"pattern: {e}", at) from None
        return self.add_rule(rule_name, f'"\\"" ({body}) "\\"" space')

    def array_rule(self, schema: dict, name: str, where: str) -> str:
        at = where or "/"
        items = schema.get("prefixItems", schema.get("items"))
        if isinstance(items, list) or "prefixItems" in schema:
            if not isinstance(items, list):
                raise SchemaError("'prefixItems' must be a list", at)
            key = "prefixItems" if "prefixItems" in schema else "items"
            parts = [self.visit(item, f"{name}{'-' if name else ''}tuple-{i}", f"{where}/{key}/{i}")
                     for i, item in enumerate(items)]
            return '"[" space ' + ' "," space '.join(parts) + ' "]" space' if parts else '"[" space "]" space'
        lo, hi = self.bounds(schema, "minItems", "maxItems", at)
        if items is False:
            if lo > 0:
                raise SchemaError("'items': false with minItems > 0 matches nothing", at)
            return '"[" space "]" space'
        item = self.visit(items, f"{name}{'-' if name else ''}item", f"{where}/items")
        return '"[" space ' + build_repetition(item, lo, hi, separator='"," space') + ' "]" space'

    def all_of(self, parts: Any, name: str, where: str) -> str:
        at = where or "/"
        if not isinstance(parts, list) or not parts:
            raise SchemaError("'allOf' must be a non-empty list", at)
        props: list[tuple[str, Any]] = []
        required: set[str] = set()

        def add(comp: Any, is_required: bool, w: str) -> None:
            if isinstance(comp, dict) and "$ref" in comp:
                comp = self.resolve(comp["$ref"], w)
            if not isinstance(comp, dict):
                raise SchemaError("allOf parts must be objects", w)
            for kw in UNENFORCED:
                if kw in comp:
                    raise SchemaError(f"'{kw}' is not supported (the grammar could not enforce it)", w)
            for k, v in (comp.get("properties") or {}).items():
                props.append((k, v))
                if is_required and k in (comp.get("required") or list(comp.get("properties") or {})):
                    required.add(k)

        for i, part in enumerate(parts):
            if isinstance(part, dict) and "anyOf" in part:
                for j, alt in enumerate(part["anyOf"]):
                    add(alt, False, f"{where}/allOf/{i}/anyOf/{j}")
            else:
                add(part, True, f"{where}/allOf/{i}")
        return self.object_rule(props, required, name, None, where)

    def not_strings(self, strings: list[str]) -> str:
        """A JSON string that is none of `strings` (llama.cpp's _not_strings, over JSON-escaped texts)."""
        char = self.add_primitive("char", PRIMITIVE_RULES["char"])
        trie: dict = {}
        for s in strings:
            node = trie
            for c in json.dumps(s, ensure_ascii=False)[1:-1]:
                node = node.setdefault(c, {})
            node[""] = {}
        out = ['"\\"" ( ']

        def visit(node: dict) -> None:
            rejects = []
            first = True
            for c in sorted(k for k in node if k):
                child = node[c]
                rejects.append(c)
                if not first:
                    out.append(" | ")
                first = False
                out.append(gbnf_literal(c))
                if any(k for k in child):
                    out.append(" (")
                    visit(child)
                    out.append(")")
                elif "" in child:
                    out.append(f" {char}+")
            if any(k for k in node):
                if not first:
                    out.append(" | ")
                out.append("[^\"\\\\\\x00-\\x1F\\x7F" + "".join(_class_char(ord(c)) for c in rejects) +
                           f"] {char}*")

        visit(trie)
        out.append(f' ){"" if "" in trie else "?"} "\\"" space')
        return "".join(out)

    def object_rule(self, properties: list[tuple[str, Any]], required: set[str], name: str,
                    additional: Any, where: str) -> str:
        at = where or "/"
        names = [k for k, _ in properties]
        missing = [r for r in sorted(required) if r not in names]
        if missing:                                  # required but not described: additionalProperties says what
            if additional is False:
                raise SchemaError(f"required {missing[0]!r} is not allowed by additionalProperties: false", at)
            extra = additional if isinstance(additional, dict) else {}
            properties = properties + [(k, extra) for k in missing]
        kv: dict[str, str] = {}
        seen = set()
        for prop, sub in properties:
            if prop in seen:
                continue
            seen.add(prop)
            prop_rule = self.visit(sub, f"{name}{'-' if name else ''}{prop}", f"{where}/properties/{prop}")
            kv[prop] = self.add_rule(f"{name}{'-' if name else ''}{prop}-kv",
                                     f"{gbnf_literal(json.dumps(prop, ensure_ascii=False))} space \":\" space "
                                     f"{prop_rule}")
        order = list(kv)
        req = [k for k in order if k in required]
        opt = [k for k in order if k not in required]
        if additional is not None and additional is not False:
            sub = f"{name}{'-' if name else ''}additional"
            if isinstance(additional, dict):
                value = self.visit(additional, f"{sub}-value", f"{where}/additionalProperties")
            elif additional is True:
                value = self.add_primitive("value", PRIMITIVE_RULES["value"])
            else:
                raise SchemaError("'additionalProperties' must be a boolean or a schema", at)
            key = (self.add_primitive("string", PRIMITIVE_RULES["string"]) if not order
                   else self.add_rule(f"{sub}-k", self.not_strings(order)))
            kv["*"] = self.add_rule(f"{sub}-kv", f'{key} ":" space {value}')
            opt.append("*")

        rule = '"{" space ' + ' "," space '.join(kv[k] for k in req)
        if opt:
            rule += " ("
            if req:
                rule += ' "," space ( '

            def tail(ks: list[str], first_optional: bool) -> str:
                k, rest = ks[0], ks[1:]
                comma = f'( "," space {kv[k]} )'
                if first_optional:
                    res = comma + ("*" if k == "*" else "?")
                else:
                    res = kv[k] + (" " + comma + "*" if k == "*" else "")
                if rest:
                    res += " " + self.add_rule(f"{name}{'-' if name else ''}{k}-rest", tail(rest, True))
                return res

            rule += " | ".join(tail(opt[i:], False) for i in range(len(opt)))
            if req:
                rule += " )"
            rule += " )?"
        return rule + ' "}" space'


_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs",
                "definitions", "readOnly", "writeOnly", "deprecated", "format", "contentMediaType",
                "contentEncoding", "$anchor", "nullable"}


def schema_to_grammar(schema: Any, param: Optional[str] = None) -> str:
    """The GBNF grammar (root rule `root`) for JSON values that validate against `schema`.

    Raises SchemaError (a RequestError; `param` is put on it, for the OpenAI error's `param`) when the schema is
    malformed or uses something the grammar could not enforce."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SchemaError(f"not valid JSON ({e.msg})", param=param) from None
    conv = SchemaConverter()
    conv.root_schema = schema
    try:
        conv.visit(schema, "")
    except SchemaError as e:
        e.param = param
        raise
    except RecursionError:
        raise SchemaError("the schema nests too deeply", param=param) from None
    return conv.format_grammar()


def response_format_schema(value: Any, param: str = "response_format") -> Optional[Any]:
    """The JSON schema an OpenAI `response_format` asks for: None for absent/"text", `{}` (any object) for
    "json_object" (or its `schema`, as llama.cpp's server accepts), the `json_schema.schema` for "json_schema".
    RequestError naming `param` for anything else."""
    def bad(msg: str) -> RequestError:
        err = RequestError(f"'{param}' {msg}")
        err.param = param                   # type: ignore[attr-defined]
        return err

    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad('must be an object such as {"type": "json_object"}')
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        return {} if schema is None else schema
    if kind == "json_schema":
        spec = value.get("json_schema")
        if spec is not None and not isinstance(spec, dict):
            raise bad("'json_schema' must be an object with a 'schema'")
        schema = (spec or {}).get("schema")
        return {} if schema is None else schema
    raise bad(f'type must be "text", "json_object" or "json_schema", not {str(kind)[:40]!r}')
