"""GBNF grammars (llama.cpp `grammars/README.md` syntax) and the stack-based matcher that constrains sampling.

Parsing follows llama.cpp's `llama_grammar_parser`: ``name ::= alternatives`` rules (one per line; newlines are
allowed inside parentheses and after ``|`` / ``::=``), sequences, ``|``, groups, ``*`` ``+`` ``?`` ``{m}`` ``{m,}``
``{m,n}``, string literals with escapes (``\\n \\r \\t \\\\ \\" \\[ \\] \\xHH \\uHHHH \\UHHHHHHHH``), character classes
``[a-z0-9_]`` with ranges and ``^`` negation, ``.`` (any character), ``#`` comments. The start rule is ``root``.
Repetitions are rewritten into helper rules as llama.cpp does; left recursion is refused.

Matching is llama.cpp's `llama_grammar_*` algorithm: the state is a set of stacks of positions in the flattened
rules, each stack's top a character element. A code point advances every stack whose top accepts it. Tokens are
UTF-8 byte strings, possibly ending inside a character: the incomplete tail is carried between tokens and a token is
allowed when every complete character is accepted and the incomplete one can still match. EOS is allowed only when
some stack is empty (the grammar may end there).

    g = Grammar.parse(src)                        # GrammarError (a RequestError) with the position on bad input
    m = GrammarMatcher(g, tokenizer)              # one per generation
    m.allows(tid) -> bool; m.accept(tid); m.can_end; m.mask(ids) -> bool array; m.allowed_ids() -> all allowed ids
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence

import numpy as np

from airobackend.errors import RequestError

END, ALT, RULE_REF, CHAR, CHAR_NOT, CHAR_RNG_UPPER, CHAR_ALT, CHAR_ANY = range(8)
MAX_REPETITION = 10000


class GrammarError(RequestError):
    """A GBNF grammar that cannot be parsed or used; `position` is the character offset in the source."""

    def __init__(self, message: str, src: str = "", position: Optional[int] = None) -> None:
        self.position = position
        if position is not None:
            line = src.count("\n", 0, position) + 1
            col = position - (src.rfind("\n", 0, position) + 1) + 1
            message = f"{message} at line {line}, column {col} (offset {position})"
        super().__init__(f"grammar: {message}")


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-_")


class _Parser:
    def __init__(self, src: str) -> None:
        self.src = src
        self.symbol_ids: dict[str, int] = {}
        self.rules: dict[int, list[tuple[int, int]]] = {}
        self.defined_at: dict[int, int] = {}
        self.first_use: dict[int, int] = {}

    def err(self, msg: str, pos: int) -> GrammarError:
        return GrammarError(msg, self.src, pos)

    def symbol_id(self, name: str, pos: int) -> int:
        if name not in self.symbol_ids:
            self.symbol_ids[name] = len(self.symbol_ids)
            self.first_use[self.symbol_ids[name]] = pos
        return self.symbol_ids[name]

    def generate_symbol_id(self, base: str) -> int:
        sid = len(self.symbol_ids)
        self.symbol_ids[f"{base}_{sid}"] = sid
        return sid

    def ch(self, pos: int) -> str:
        return self.src[pos] if pos < len(self.src) else ""

    def parse_space(self, pos: int, newline_ok: bool) -> int:
        s = self.src
        while pos < len(s):
            c = s[pos]
            if c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            elif c == "#":
                while pos < len(s) and s[pos] not in "\r\n":
                    pos += 1
            else:
                break
        return pos

    def parse_name(self, pos: int) -> int:
        end = pos
        while end < len(self.src) and _is_word_char(self.src[end]):
            end += 1
        if end == pos:
            raise self.err("expecting name", pos)
        return end

    def parse_int(self, pos: int) -> tuple[int, int]:
        end = pos
        while end < len(self.src) and self.src[end].isdigit():
            end += 1
        if end == pos:
            raise self.err("expecting integer", pos)
        return int(self.src[pos:end]), end

    def parse_char(self, pos: int) -> tuple[int, int]:
        s = self.src
        if pos >= len(s):
            raise self.err("unexpected end of input", pos)
        if s[pos] == "\\":
            c = self.ch(pos + 1)
            if c in ("x", "u", "U"):
                n = {"x": 2, "u": 4, "U": 8}[c]
                digits = s[pos + 2:pos + 2 + n]
                if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise self.err(f"expecting {n} hex digits after \\{c}", pos)
                value = int(digits, 16)
                if value > 0x10FFFF:
                    raise self.err("code point out of range", pos)
                return value, pos + 2 + n
            esc = {'"': '"', "[": "[", "]": "]", "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "-": "-",
                   "^": "^", "/": "/", "'": "'"}
            if c in esc:
                return ord(esc[c]), pos + 2
            raise self.err(f"unknown escape \\{c}", pos)
        return ord(s[pos]), pos + 1

    def parse(self) -> None:
        pos = self.parse_space(0, True)
        while pos < len(self.src):
            pos = self.parse_rule(pos)
        if not self.rules:
            raise self.err("empty grammar", 0)
        for name, sid in self.symbol_ids.items():
            if sid not in self.rules:
                raise self.err(f"undefined rule {name!r}", self.first_use.get(sid, 0))
        if "root" not in self.symbol_ids:
            raise GrammarError("no 'root' rule")

    def parse_rule(self, pos: int) -> int:
        name_end = self.parse_name(pos)
        name = self.src[pos:name_end]
        after = self.parse_space(name_end, False)
        if self.src[after:after + 3] != "::=":
            raise self.err("expecting ::=", after)
        rule_id = self.symbol_id(name, pos)
        if rule_id in self.rules:
            raise self.err(f"rule {name!r} defined twice", pos)
        self.defined_at[rule_id] = pos
        p = self.parse_space(after + 3, True)
        p = self.parse_alternates(p, name, rule_id, False)
        c = self.ch(p)
        if c == "\r":
            p += 2 if self.ch(p + 1) == "\n" else 1
        elif c == "\n":
            p += 1
        elif c:
            raise self.err("expecting newline or end", p)
        return self.parse_space(p, True)

    def parse_alternates(self, pos: int, rule_name: str, rule_id: int, nested: bool) -> int:
        rule: list[tuple[int, int]] = []
        pos = self.parse_sequence(pos, rule_name, rule, nested)
        while self.ch(pos) == "|":
            rule.append((ALT, 0))
            pos = self.parse_space(pos + 1, True)
            pos = self.parse_sequence(pos, rule_name, rule, nested)
        rule.append((END, 0))
        self.rules[rule_id] = rule
        return pos

    def parse_sequence(self, pos: int, rule_name: str, out: list[tuple[int, int]], nested: bool) -> int:
        last_sym_start = len(out)
        src = self.src
        while pos < len(src):
            c = src[pos]
            if c == '"':
                start = pos
                pos += 1
                last_sym_start = len(out)
                while self.ch(pos) != '"':
                    if pos >= len(src):
                        raise self.err("unterminated string literal", start)
                    value, pos = self.parse_char(pos)
                    out.append((CHAR, value))
                pos = self.parse_space(pos + 1, nested)
            elif c == "[":
                start = pos
                pos += 1
                last_sym_start = len(out)
                typ = CHAR
                if self.ch(pos) == "^":
                    pos += 1
                    typ = CHAR_NOT
                first = True
                while self.ch(pos) != "]":
                    if pos >= len(src):
                        raise self.err("unexpected end of input in character class", start)
                    value, pos = self.parse_char(pos)
                    out.append((typ if first else CHAR_ALT, value))
                    first = False
                    if self.ch(pos) == "-" and self.ch(pos + 1) not in ("]", ""):
                        upper, pos = self.parse_char(pos + 1)
                        if upper < value:
                            raise self.err("character range out of order", pos)
                        out.append((CHAR_RNG_UPPER, upper))
                if first:
                    raise self.err("empty character class", start)
                pos = self.parse_space(pos + 1, nested)
            elif _is_word_char(c):
                name_end = self.parse_name(pos)
                ref = self.symbol_id(src[pos:name_end], pos)
                last_sym_start = len(out)
                out.append((RULE_REF, ref))
                pos = self.parse_space(name_end, nested)
            elif c == "(":
                start = pos
                pos = self.parse_space(pos + 1, True)
                sub = self.generate_symbol_id(rule_name)
                pos = self.parse_alternates(pos, rule_name, sub, True)
                last_sym_start = len(out)
                out.append((RULE_REF, sub))
                if self.ch(pos) != ")":
                    raise self.err("expecting ')' to close the group", start if pos >= len(src) else pos)
                pos = self.parse_space(pos + 1, nested)
            elif c == ".":
                last_sym_start = len(out)
                out.append((CHAR_ANY, 0))
                pos = self.parse_space(pos + 1, nested)
            elif c in "*+?{":
                if last_sym_start == len(out):
                    raise self.err(f"expecting preceding item to {c}", pos)
                if c == "{":
                    start = pos
                    pos = self.parse_space(pos + 1, nested)
                    lo, pos = self.parse_int(pos)
                    pos = self.parse_space(pos, nested)
                    hi: Optional[int] = lo
                    if self.ch(pos) == ",":
                        pos = self.parse_space(pos + 1, nested)
                        if self.ch(pos).isdigit():
                            hi, pos = self.parse_int(pos)
                            pos = self.parse_space(pos, nested)
                        else:
                            hi = None
                    if self.ch(pos) != "}":
                        raise self.err("expecting '}'", pos)
                    if (hi is not None and hi < lo) or lo > MAX_REPETITION or (hi or 0) > MAX_REPETITION:
                        raise self.err("bad repetition bounds", start)
                    pos = self.parse_space(pos + 1, nested)
                else:
                    lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                    pos = self.parse_space(pos + 1, nested)
                self.handle_repetitions(out, last_sym_start, rule_name, lo, hi)
            else:
                break
        return pos

    def handle_repetitions(self, out: list[tuple[int, int]], start: int, rule_name: str, lo: int,
                           hi: Optional[int]) -> None:
        """llama.cpp's rewrite: S{m,n} --> S S ... (m times) then nested optionals / a recursive tail rule."""
        prev = out[start:]
        del out[start:]
        if lo == 0 and hi == 0:
            return
        for _ in range(lo):
            out.extend(prev)
        last_rec: Optional[int] = None
        n_opt = 1 if hi is None else hi - lo

        def add_rep(n: int, is_inf: bool) -> int:
            nonlocal last_rec
            rec = self.generate_symbol_id(rule_name)
            body = list(prev)
            if is_inf:
                body.append((RULE_REF, rec))          # S* --> rec ::= S rec |
            elif last_rec is not None:
                body.append((RULE_REF, last_rec))     # S{0,n} --> rec ::= S rec_{n-1} |
            self.rules[rec] = body + [(ALT, 0), (END, 0)]
            last_rec = rec
            return rec

        if hi is None:
            out.append((RULE_REF, add_rep(1, True)))
        elif n_opt > 0:
            for i in range(n_opt):
                add_rep(i, False)
            out.append((RULE_REF, last_rec))


class Grammar:
    """A parsed grammar: flattened rule elements, ready for `GrammarMatcher`."""

    def __init__(self, rules: dict[int, list[tuple[int, int]]], root: int, names: dict[int, str]) -> None:
        n_rules = max(rules) + 1
        self.etype: list[int] = []
        self.evalue: list[int] = []
        self.rule_start = [0] * n_rules
        self.rule_alts: list[list[int]] = [[] for _ in range(n_rules)]
        for rid in range(n_rules):
            self.rule_start[rid] = len(self.etype)
            elems = rules[rid]
            self.rule_alts[rid].append(len(self.etype))
            for i, (t, v) in enumerate(elems):
                self.etype.append(t)
                self.evalue.append(v)
                if t == ALT:
                    self.rule_alts[rid].append(len(self.etype))
        self.root = root
        self.names = names
        # every char element: (negated, sorted ranges, position after the element)
        self.chars: dict[int, tuple[bool, tuple[tuple[int, int], ...], int]] = {}
        for p, t in enumerate(self.etype):
            if t in (CHAR, CHAR_NOT, CHAR_ANY):
                ranges = []
                q = p
                if t == CHAR_ANY:
                    ranges.append((0, 0x10FFFF))
                    q += 1
                else:
                    while True:
                        lo = self.evalue[q]
                        hi = lo
                        if self.etype[q + 1] == CHAR_RNG_UPPER:
                            hi = self.evalue[q + 1]
                            q += 1
                        ranges.append((lo, hi))
                        q += 1
                        if self.etype[q] != CHAR_ALT:
                            break
                self.chars[p] = (t == CHAR_NOT, tuple(sorted(ranges)), q)
        self._check_left_recursion(rules)
        self._advance_memo: dict[tuple[int, ...], frozenset] = {}
        self.initial_stacks = self._start_stacks()

    @classmethod
    def parse(cls, src: str) -> "Grammar":
        """Parse GBNF source; raises GrammarError (a RequestError) naming the position of the problem."""
        if not isinstance(src, str):
            raise GrammarError(f"grammar must be a string, not {type(src).__name__}")
        p = _Parser(src)
        p.parse()
        names = {v: k for k, v in p.symbol_ids.items()}
        return cls(p.rules, p.symbol_ids["root"], names)

    @staticmethod
    def cached(src: str) -> "Grammar":
        """`parse` with a small cache: frontends resend the same grammar with every request, and the parsed
        grammar's expansion memo stays warm across them (it is only ever added to, so sharing is safe)."""
        return _parse_cached(src)

    # ------------------------------------------------------------------ analysis
    def _check_left_recursion(self, rules: dict[int, list[tuple[int, int]]]) -> None:
        alts = {rid: [[]] for rid in rules}
        for rid, elems in rules.items():
            for t, v in elems:
                if t == ALT:
                    alts[rid].append([])
                elif t != END:
                    alts[rid][-1].append((t, v))
        nullable = set()
        changed = True
        while changed:
            changed = False
            for rid, rs in alts.items():
                if rid not in nullable and any(all(t == RULE_REF and v in nullable for t, v in a) for a in rs):
                    nullable.add(rid)
                    changed = True
        edges = {rid: set() for rid in rules}
        for rid, rs in alts.items():
            for a in rs:
                for t, v in a:
                    if t != RULE_REF:
                        break
                    edges[rid].add(v)
                    if v not in nullable:
                        break
        state: dict[int, int] = {}

        def visit(r: int) -> None:
            state[r] = 1
            for s in edges[r]:
                if state.get(s) == 1:
                    raise GrammarError(f"left recursion in rule {self.names.get(s, s)!r}")
                if s not in state:
                    visit(s)
            state[r] = 2

        for r in rules:
            if r not in state:
                visit(r)

    def _is_end(self, pos: int) -> bool:
        return self.etype[pos] in (END, ALT)

    def advance(self, stack: tuple[int, ...]) -> frozenset:
        """All stacks reachable from `stack` by expanding rule references until each top is a char element."""
        memo = self._advance_memo.get(stack)
        if memo is not None:
            return memo
        out: set[tuple[int, ...]] = set()
        todo = [stack]
        seen = set()
        while todo:
            st = todo.pop()
            if st in seen:
                continue
            seen.add(st)
            if not st:
                out.add(st)
                continue
            pos = st[-1]
            if self.etype[pos] == RULE_REF:
                rid = self.evalue[pos]
                base = st[:-1]
                if not self._is_end(pos + 1):
                    base = base + (pos + 1,)
                for sub in self.rule_alts[rid]:
                    todo.append(base if self._is_end(sub) else base + (sub,))
            else:
                out.add(st)
        res = frozenset(out)
        if len(self._advance_memo) > 200_000:
            self._advance_memo.clear()
        self._advance_memo[stack] = res
        return res

    def _start_stacks(self) -> frozenset:
        out: set = set()
        for sub in self.rule_alts[self.root]:
            out |= self.advance(() if self._is_end(sub) else (sub,))
        return frozenset(out)

    def char_matches(self, pos: int, c: int) -> bool:
        neg, ranges, _ = self.chars[pos]
        hit = False
        for lo, hi in ranges:
            if lo <= c <= hi:
                hit = True
                break
        return hit != neg

    def partial_may_match(self, pos: int, lo: int, hi: int) -> bool:
        """Could some code point in [lo, hi] (what an incomplete UTF-8 sequence may still become) match?"""
        neg, ranges, _ = self.chars[pos]
        if not neg:
            return any(a <= hi and b >= lo for a, b in ranges)
        x = lo                                    # first point of [lo, hi] not covered by the ranges?
        for a, b in ranges:
            if a <= x <= b:
                x = b + 1
        return x <= hi

    def accept_char(self, stacks: Iterable[tuple[int, ...]], c: int) -> frozenset:
        out: set = set()
        for st in stacks:
            if not st:
                continue
            pos = st[-1]
            if self.char_matches(pos, c):
                nxt = self.chars[pos][2]
                ns = st[:-1] if self._is_end(nxt) else st[:-1] + (nxt,)
                out |= self.advance(ns)
        return frozenset(out)


@functools.lru_cache(maxsize=16)
def _parse_cached(src: str) -> Grammar:
    return Grammar.parse(src)


# ---------------------------------------------------------------------- UTF-8 with a carried partial sequence
def _decode_utf8(data: bytes, value: int, n_remain: int) -> Optional[tuple[list[int], int, int]]:
    """Code points of `data` given a partial sequence (value, n_remain) carried from before; returns
    (code points, value, n_remain) of the new partial tail, or None for invalid UTF-8 (llama.cpp decode_utf8)."""
    cps: list[int] = []
    for b in data:
        if n_remain:
            if b >> 6 != 2:
                return None
            value = (value << 6) | (b & 0x3F)
            n_remain -= 1
            if n_remain == 0:
                cps.append(value)
            continue
        if b < 0x80:
            cps.append(b)
        elif b >> 5 == 6:
            value, n_remain = b & 0x1F, 1
        elif b >> 4 == 14:
            value, n_remain = b & 0x0F, 2
        elif b >> 3 == 30:
            value, n_remain = b & 0x07, 3
        else:
            return None
    return cps, value, n_remain


class GrammarMatcher:
    """Grammar state for one generation over one tokenizer's vocabulary.

    `allows(tid)` says whether token `tid` can come next; `accept(tid)` advances (RequestError if it cannot);
    `can_end` is True when EOS is allowed; `mask(ids)` checks many ids; `allowed_ids()` walks the whole vocabulary
    through a byte trie, pruning every prefix the grammar rejects (used when no cheap candidate is allowed).
    """

    def __init__(self, grammar: Grammar, tokenizer) -> None:
        self.g = grammar
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_id
        self.stacks: frozenset = grammar.initial_stacks
        self.partial = (0, 0)                      # incomplete UTF-8 character carried from the last token
        self._memo: dict[int, bool] = {}

    @property
    def can_end(self) -> bool:
        return self.partial[1] == 0 and () in self.stacks

    @property
    def done(self) -> bool:
        """True when nothing but the end can follow (every stack is empty)."""
        return all(not st for st in self.stacks)

    def _state_after(self, data: bytes) -> Optional[tuple[frozenset, int, int]]:
        dec = _decode_utf8(data, *self.partial)
        if dec is None:
            return None
        cps, value, n_remain = dec
        stacks = self.stacks
        for c in cps:
            stacks = self.g.accept_char(stacks, c)
            if not stacks:
                return None
        if n_remain and not self._partial_ok(stacks, value, n_remain):
            return None
        return stacks, value, n_remain

    def _partial_ok(self, stacks: Iterable[tuple[int, ...]], value: int, n_remain: int) -> bool:
        if n_remain == 1 and value < 2:
            return False                          # a 7-bit character split over 2 bytes (overlong)
        lo = value << (6 * n_remain)
        hi = lo | ((1 << (6 * n_remain)) - 1)
        if lo == 0:                               # the shortest code point this many bytes may encode
            lo = 1 << 11 if n_remain == 2 else 1 << 16
        return any(st and self.g.partial_may_match(st[-1], lo, hi) for st in stacks)

    def allows(self, tid: int) -> bool:
        tid = int(tid)
        r = self._memo.get(tid)
        if r is None:
            if tid == self.eos_id:
                r = self.can_end
            else:
                piece = self.tok.token_bytes(tid)
                # empty pieces and pieces starting with NUL are never grammar text (as in llama.cpp)
                r = bool(piece) and piece[0] != 0 and self._state_after(piece) is not None
            self._memo[tid] = r
        return r

    def mask(self, ids: Sequence[int]) -> np.ndarray:
        return np.fromiter((self.allows(t) for t in ids), dtype=bool, count=len(ids))

    def accept(self, tid: int) -> None:
        tid = int(tid)
        if tid == self.eos_id:
            if not self.can_end:
                raise RequestError("grammar: end of sequence where the grammar cannot end")
            self.stacks = frozenset()
        else:
            st = self._state_after(self.tok.token_bytes(tid))
            if st is None:
                raise RequestError(f"grammar: token {tid} is not allowed here")
            self.stacks, v, n = st
            self.partial = (v, n)
        self._memo = {}

    def allowed_ids(self) -> np.ndarray:
        """Every token id the grammar allows next (ascending)."""
        trie = _token_trie(self.tok)
        out: list[int] = []
        g = self.g
        # depth-first over the trie: node, stacks, partial value, bytes still missing from the current character
        todo = [(trie, self.stacks, self.partial[0], self.partial[1])]
        while todo:
            node, stacks, value, n_remain = todo.pop()
            ids, children = node
            out.extend(ids)
            for b, child in children.items():
                if n_remain:
                    if b >> 6 != 2:
                        continue
                    v, n = (value << 6) | (b & 0x3F), n_remain - 1
                    if n:
                        if self._partial_ok(stacks, v, n):
                            todo.append((child, stacks, v, n))
                        continue
                    cp = v
                elif b < 0x80:
                    cp = b
                else:
                    if b >> 5 == 6:
                        v, n = b & 0x1F, 1
                    elif b >> 4 == 14:
                        v, n = b & 0x0F, 2
                    elif b >> 3 == 30:
                        v, n = b & 0x07, 3
                    else:
                        continue
                    if self._partial_ok(stacks, v, n):
                        todo.append((child, stacks, v, n))
                    continue
                ns = g.accept_char(stacks, cp)
                if ns:
                    todo.append((child, ns, 0, 0))
        if self.can_end:
            out.append(self.eos_id)
        return np.array(sorted(set(out)), dtype=np.int64)


def _token_trie(tok) -> tuple[list[int], dict]:
    """Byte trie of the vocabulary's printed pieces (empty pieces left out), cached on the tokenizer."""
    trie = getattr(tok, "_grammar_trie", None)
    if trie is None:
        trie = ([], {})
        for tid in range(tok.n_vocab):
            piece = tok.token_bytes(tid)
            if not piece or piece[0] == 0 or tid == tok.eos_id:
                continue
            node = trie
            for b in piece:
                node = node[1].setdefault(b, ([], {}))
            node[0].append(tid)
        tok._grammar_trie = trie
    return trie
