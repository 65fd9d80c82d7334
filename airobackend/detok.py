"""Streaming detokenization: whole UTF-8 characters only, and stop strings held back until decided.

The engine runs every sampled token through both, in this order::

    dec = IncrementalDecoder(tok)               # per generation
    stop = StopStringMatcher(req.stop, trim=req.trim_stop)
    for each sampled token id:
        text, matched = stop.feed(dec.feed(tid))
        emit(text)                              # safe to show: complete characters, not part of a possible stop
        if matched is not None: finish(STOP)    # nothing after the stop string is ever emitted
    at EOS / length / abort: emit(stop.feed(dec.flush())[0] + stop.flush())

Byte-fallback tokens split multi-byte characters (🦙 is the four tokens <0xF0> <0x9F> <0xA6> <0x99>); the decoder keeps
the incomplete tail until the character is complete (llama.cpp's `decode_utf8`, `llama.cpp` at dadbed9). Bytes that can
never become valid UTF-8 are replaced by U+FFFD rather than held forever.
"""
from __future__ import annotations

import bisect
import codecs
from typing import Any, Iterable, Optional, Sequence


class IncrementalDecoder:
    """Token ids in, complete UTF-8 text out.

    `feed(token_id) -> str` returns the text that became complete with this token (possibly ""), `flush() -> str`
    returns what is left at the end (an incomplete trailing sequence becomes U+FFFD). Pieces are printed verbatim
    (`Tokenizer.token_bytes`), so a generated word keeps its leading space; pass `strip_leading_space=True` to drop the
    one space the tokenizer prefixed when decoding a prompt from its first token (llama-cpp-python's rule).
    """

    def __init__(self, tokenizer, *, special: bool = False, strip_leading_space: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._strip = strip_leading_space
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.n_bytes = 0                       # bytes fed so far (all tokens)

    def feed(self, token_id: int) -> str:
        b = self._tok.token_bytes(token_id, special=self._special)
        if self._strip and b:
            self._strip = False
            if b[:1] == b" ":
                b = b[1:]
        self.n_bytes += len(b)
        return self._dec.decode(b)

    def feed_many(self, ids: Iterable[int]) -> str:
        return "".join(self.feed(t) for t in ids)

    def flush(self) -> str:
        """The held-back tail at the end of generation (invalid/incomplete bytes as U+FFFD); resets the decoder."""
        return self._dec.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """True while an incomplete UTF-8 sequence is held back."""
        return bool(self._dec.getstate()[0])


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back anything that may still become one.

    `feed(text) -> (emit, matched)`: `emit` is the text that is now safe to show; `matched` is the stop string found
    (None while none is). On a match, `emit` ends just before the stop string when `trim` (KoboldCpp trim_stop=true,
    text-generation-webui); when not (KoboldCpp's default) it is everything fed so far, the rest of the token that
    completed the stop string included, as KoboldCpp 1.76 returns its whole output then (koboldcpp.py `generate`
    trims only with trim_stop). Later feeds return ("", matched). The earliest match in the text wins;
    among stop strings starting at the same place, the longest. `flush()` returns the held-back text when generation
    ends without a match. Empty stop strings are ignored.
    """

    def __init__(self, stops: Sequence[str] = (), trim: bool = True) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.trim = trim
        self.matched: Optional[str] = None
        self._held = ""
        # every proper prefix of a stop string: the tails we must hold back
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, Optional[str]]:
        if self.matched is not None:
            return "", self.matched
        if not self.stops:
            return text, None
        buf = self._held + text
        best_pos, best = -1, None
        for s in self.stops:
            pos = buf.find(s)
            if pos >= 0 and (best is None or pos < best_pos or (pos == best_pos and len(s) > len(best))):
                best_pos, best = pos, s
        if best is not None:
            self.matched = best
            self._held = ""
            return (buf[:best_pos] if self.trim else buf), best
        # hold back the longest tail that is a proper prefix of some stop string
        hold = 0
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-k:] in self._prefixes:
                hold = k
                break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], None

    def flush(self) -> str:
        """Text still held back (a partial stop string) at the end of generation."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    @property
    def held(self) -> str:
        return self._held


class PhraseBanBuffer:
    """Generated tokens held back while they may still be part of a banned phrase (KoboldCpp 1.76's "anti-slop").

    The engine pushes each sampled token with a state of its own (what it needs to rewind to just before that
    token). `push` answers None, or, when the text now contains a banned phrase, the index of the held token in
    which the phrase's (last) occurrence begins: the engine then calls `take_back(j)`, rewinds to the state it gets
    back and bans that token at that place. `release()` returns the tokens that can no longer be part of a phrase,
    `flush()` all of them at the end. Matching is on the printed bytes, lowercased by ASCII rules as KoboldCpp's
    `toLowerCase` does (phrases must come lowercased), over the held tokens and the end of the released text: a
    phrase that would begin in text already shown (possible after a rewind changed what follows it) is stopped at
    the first held token instead. Only generated tokens take part, so a phrase is never matched into the prompt.
    """

    def __init__(self, tokenizer, phrases: Sequence[bytes]) -> None:
        self._tok = tokenizer
        self.phrases = tuple(p for p in phrases if p)
        self._longest = max((len(p) for p in self.phrases), default=0)
        self._prefixes = {p[:i] for p in self.phrases for i in range(1, len(p))}
        self.held: list[tuple[int, Any]] = []        # (token id, caller's state)
        self._text = b""                              # lowercased bytes of the held tokens
        self._ends: list[int] = []                    # end offset of each held token in _text
        self._shown = b""                             # the last len(longest) - 1 bytes released

    def push(self, tid: int, state: Any) -> Optional[int]:
        self.held.append((tid, state))
        self._text += self._tok.token_bytes(tid).lower()
        self._ends.append(len(self._text))
        full = self._shown + self._text
        for p in self.phrases:                        # KoboldCpp: the first banned phrase found, in the list's order
            at = full.rfind(p)
            if at >= 0:
                at -= len(self._shown)
                return bisect.bisect_right(self._ends, at) if at >= 0 else 0
        return None

    def take_back(self, j: int) -> list[tuple[int, Any]]:
        """Drop held tokens j.. and return them (the first one's state is what to rewind to)."""
        gone = self.held[j:]
        del self.held[j:]
        del self._ends[j:]
        self._text = self._text[:self._ends[-1]] if self._ends else b""
        return gone

    def release(self) -> list[tuple[int, Any]]:
        full = self._shown + self._text
        start = max(0, len(full) - self._longest + 1)
        cut = next((c for c in range(start, len(full)) if full[c:] in self._prefixes), len(full))
        # tokens ending at or before the cut are decided
        return self._drop_front(bisect.bisect_right(self._ends, max(0, cut - len(self._shown))))

    def flush(self) -> list[tuple[int, Any]]:
        return self._drop_front(len(self.held))

    def _drop_front(self, k: int) -> list[tuple[int, Any]]:
        if k == 0:
            return []
        out = self.held[:k]
        cut = self._ends[k - 1]
        keep = self._longest - 1
        self._shown = (self._shown + self._text[:cut])[-keep:] if keep > 0 else b""
        del self.held[:k]
        self._ends = [e - cut for e in self._ends[k:]]
        self._text = self._text[cut:]
        return out

    def forget_text(self) -> None:
        """Stop matching over the held tokens: the next `release` lets all of them go."""
        self._text = self._shown = b""
        self._ends = [0] * len(self.held)

    def shift(self, fn) -> None:
        """Apply `fn` to every held state (the engine renumbers positions after a context shift)."""
        self.held = [(t, fn(st)) for t, st in self.held]
