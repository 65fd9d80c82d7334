"""JSON Schema -> GBNF (airobackend.json_schema): every sentence of the grammar is JSON that the `jsonschema` package
validates against the schema, instances that break the schema are outside the grammar, and what the converter
cannot enforce is refused by name. Sentences are drawn by a random walk over the grammar itself (no model)."""
from __future__ import annotations

import datetime
import json
import re

import jsonschema
import numpy as np
import pytest

from airobackend.errors import RequestError
from airobackend.grammar import Grammar
from airobackend.json_schema import SchemaError, schema_to_grammar

# Characters offered where a negated class allows "anything else": structure, escapes, non-ASCII, controls.
POOL = list('abzAZ09 _-.,:;!?/"\\{}[]\t\né€😀') + ["\x01", "\u2028"]
CLOSERS = set('"}]')


def accepts(g: Grammar, text: str) -> bool:
    """Whether `text` is a complete sentence of `g`."""
    stacks = g.initial_stacks
    for c in text:
        stacks = g.accept_char(stacks, ord(c))
        if not stacks:
            return False
    return () in stacks


def random_sentence(g: Grammar, rng: np.random.Generator, soft_len: int = 40, max_len: int = 4000):
    """A random sentence of `g` (biased to close strings and containers once it is long), or None."""
    stacks, out = g.initial_stacks, []
    while len(out) < max_len:
        if () in stacks and rng.random() < (0.2 if len(out) < soft_len else 0.9):
            return "".join(out)
        cands: set[str] = set()
        for st in stacks:
            if not st:
                continue
            neg, ranges, _ = g.chars[st[-1]]
            if neg:
                cands.update(c for c in POOL if g.char_matches(st[-1], ord(c)))
            else:
                for lo, hi in ranges:
                    for cp in {lo, hi, int(rng.integers(lo, hi + 1))}:
                        if not 0xD800 <= cp <= 0xDFFF:
                            cands.add(chr(cp))
        if not cands:
            return "".join(out) if () in stacks else None
        cands_l = sorted(cands)
        w = np.array([(60.0 if c == '"' else 15.0 if c in CLOSERS else 0.2 if c in ",\\" else 1.0)
                      if len(out) > soft_len else 1.0 for c in cands_l])
        c = cands_l[int(rng.choice(len(cands_l), p=w / w.sum()))]
        stacks = g.accept_char(stacks, ord(c))
        out.append(c)
    return None


def _time_ok(v: object) -> bool:
    if not isinstance(v, str):
        return True
    m = re.fullmatch(r"(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", v)
    return bool(m) and int(m.group(1)) < 24 and int(m.group(2)) < 60 and int(m.group(3)) < 60


def _date_time_ok(v: object) -> bool:
    if not isinstance(v, str):
        return True
    date, sep, time = v.partition("T")
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        return False
    return sep == "T" and _time_ok(time)


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("time")(_time_ok)
FORMATS.checks("date-time")(_date_time_ok)


def validator(schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=FORMATS)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "site": {"type": "string", "format": "uri"},            # an annotation: not enforced, not refused
        "tags": {"type": "array", "items": {"enum": ["a", "b\"c", "é"]}, "minItems": 1, "maxItems": 3},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = {
    "json_object": {},
    "person": PERSON,
    "nested_defs": {
        "$defs": {"node": {"type": "object", "required": ["v"], "properties": {
            "v": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 1000},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}}},
        "$ref": "#/$defs/node"},
    "union_and_types": {"type": "object", "properties": {
        "x": {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"const": {"k": [1, "two"]}}]},
        "y": {"type": ["integer", "string"], "maxLength": 3},
        "z": {"oneOf": [{"type": "integer", "minimum": 5}, {"type": "integer", "maximum": -5}]}},
        "required": ["x", "y", "z"]},
    "formats": {"type": "array", "prefixItems": [{"type": "string", "format": "date"},
                                                 {"type": "string", "format": "time"},
                                                 {"type": "string", "format": "date-time"},
                                                 {"type": "string", "format": "uuid"}]},
    "patterns": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3,4}(\.[a-z]+)?$"},
        "quote": {"type": "string", "pattern": r'^say "(hi|bye)"\\\s?$'},
        "free": {"type": "string", "pattern": "[z9][^a-c]"},          # unanchored: anywhere in the string
        "dots": {"type": "string", "pattern": r"^.{2}\W\D$"}},
        "required": ["code", "quote", "free", "dots"], "additionalProperties": False},
    "additional_schema": {"type": "object", "properties": {"id": {"type": "integer"}},
                          "required": ["id", "extra"], "additionalProperties": {"type": "boolean"}},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "null"}}}]},
    "numbers": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
    "neg_range": {"type": "integer", "minimum": -120, "maximum": -7},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sentence_validates(name):
    schema = SCHEMAS[name]
    g = Grammar.parse(schema_to_grammar(schema))
    v = validator(schema)
    rng = np.random.default_rng(sum(map(ord, name)))
    done = 0
    for _ in range(40):
        text = random_sentence(g, rng)
        if text is None:
            continue
        value = json.loads(text)
        errors = [e.message for e in v.iter_errors(value)]
        assert not errors, (text, errors)
        done += 1
    assert done >= 30, f"only {done} of 40 random walks ended"


def test_instances_that_break_the_schema_are_not_in_the_grammar():
    g = Grammar.parse(schema_to_grammar(PERSON))
    good = '{"name": "Ann", "age": 31, "tags": ["b\\"c", "\u00e9"], "born": "2001-02-28"}'
    assert validator(PERSON).is_valid(json.loads(good)) and accepts(g, good)
    for bad in ('{"age": 31}',                                  # required name missing
                '{"name": "Ann", "age": 151}',                  # above maximum
                '{"name": "Ann", "age": -1}',                   # below minimum
                '{"name": "Ann", "age": 3, "x": 1}',            # additionalProperties: false
                '{"name": "Ann", "age": 3, "tags": []}',        # minItems
                '{"name": "Ann", "age": 3, "tags": ["c"]}',     # not in enum
                '{"name": "Ann", "age": 3, "born": "2001-13-01"}',
                '{"name": "Annabelle Lee!", "age": 3}'):        # maxLength 12
        assert not validator(PERSON).is_valid(json.loads(bad)), bad
        assert not accepts(g, bad), bad
    pat = SCHEMAS["patterns"]
    gp = Grammar.parse(schema_to_grammar(pat))
    ok = '{"code": "AB-123.xy", "quote": "say \\"hi\\"\\\\ ", "free": "..9d..", "dots": "\\"a!x"}'
    assert validator(pat).is_valid(json.loads(ok)) and accepts(gp, ok)
    for field, value in (("code", "AB-12"), ("quote", 'say "hi"'), ("free", "9a"), ("dots", "ab!1")):
        bad = json.loads(ok)
        bad[field] = value
        text = json.dumps(bad, ensure_ascii=False)
        assert not validator(pat).is_valid(bad) and not accepts(gp, text), text


def test_json_object_grammar_is_any_object():
    g = Grammar.parse(schema_to_grammar({}))
    assert accepts(g, '{"a": [1, {"b": null}], "c": "x\\u00e9"}')
    assert not accepts(g, "[1]") and not accepts(g, '"text"')
    assert not accepts(g, '{"a": "\\ud800"}')                # half a surrogate pair is no character


@pytest.mark.parametrize("schema, where, words", [
    ({"type": "array", "uniqueItems": True}, "/", "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "/properties/a", "not"),
    ({"type": "number", "minimum": 0.5}, "/", "non-integer number"),
    ({"type": "integer", "multipleOf": 3}, "/", "multipleOf"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "/properties/a",
     "local references"),
    ({"$ref": "#/$defs/missing"}, "/", "cannot resolve"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "/", "lookaround"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "/", "backreference"),
    ({"type": "string", "pattern": "^a$b"}, "/", "'$'"),
    ({"type": "string", "pattern": "^a", "maxLength": 3}, "/", "minLength/maxLength"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "/", "'a'"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "/", "no integer"),
    ({"type": "sting"}, "/", "unknown type"),
    ({"enum": []}, "/", "non-empty"),
    ({"items": {"type": "string"}, "minItems": -1}, "/", "minItems"),
    (False, "/", "matches nothing"),
    ([1, 2], "/", "must be an object"),
])
def test_what_cannot_be_enforced_is_refused_by_name(schema, where, words):
    with pytest.raises(SchemaError) as e:
        schema_to_grammar(schema, param="response_format")
    assert isinstance(e.value, RequestError) and e.value.param == "response_format"
    assert f"at {where}:" in str(e.value) and words in str(e.value)


def test_recursive_and_huge_schemas_end_with_an_error_not_a_crash():
    deep: dict = {"type": "integer"}
    for _ in range(3000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError):
        schema_to_grammar(deep)
    many = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 10000} for i in range(11)}}
    with pytest.raises(SchemaError, match="repetitions"):
        schema_to_grammar(many)                  # each bound is legal, together they would make a huge grammar
    # a self-reference terminates (the rule refers to itself by name)
    g = schema_to_grammar({"$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "$ref": "#/$defs/t"})
    assert accepts(Grammar.parse(g), "[[], [[]]]")


@pytest.mark.parametrize("lo, hi", [(3, 250), (-120, -7), (-10, 10), (7, 7), (0, None), (-3, None), (150, None),
                                    (None, 17), (None, -5), (None, 0), (999, 1001)])
def test_integer_bounds_accept_exactly_the_integers_in_range(lo, hi):
    schema = {"type": "integer", **({"minimum": lo} if lo is not None else {}),
              **({"maximum": hi} if hi is not None else {})}
    g = Grammar.parse(schema_to_grammar(schema))
    for n in range(-1100, 1101):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert accepts(g, str(n)) == inside, n
    for text in ("007", "-05", "00", "+5", "1.0"):            # never a leading zero, a plus sign or a fraction
        assert not accepts(g, text), text
