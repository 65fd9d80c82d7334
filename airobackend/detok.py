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
the incomplete tail until the character is complete (engine.md section 5.3). Bytes that can never become valid UTF-8
are replaced by U+FFFD rather than held forever.
"""
from __future__ import annotations

import codecs
from typing import Iterable, Optional, Sequence


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
    text-generation-webui) or just after it when not (KoboldCpp's default: the stop string stays in the output);
    text after the stop string is dropped and later feeds return ("", matched). The earliest match in the text wins;
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
            return (buf[:best_pos] if self.trim else buf[:best_pos + len(best)]), best
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
