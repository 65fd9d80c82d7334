"""Which cached tokens a new prompt can keep, and the saved KV states of other conversations.

Chat frontends resend the whole conversation every turn, and once it outgrows the context they cut it: SillyTavern
keeps the system prompt / character card at the top and drops the oldest whole messages after it; KoboldAI Lite
keeps its memory at the top and moves the author's note. The new prompt is then the cached tokens with pieces taken
out, a few tokens changed at each cut (the text is tokenized again), pieces put in, and the new message at the end.

`plan_reuse(cached, prompt, min_chunk)` finds what survives: the common prefix stays where it is; after it, every run
of at least `min_chunk` tokens that the cache holds and the prompt has again (in the same order) is moved to its
place in the prompt, its keys re-rotated by the distance (KVCache.move); what is left is evaluated. This is llama.cpp
server's `--cache-reuse N` (examples/server/server.cpp at c392e5094, "reuse chunks from the cached prompt by
shifting their KV cache", PR #9866) and KoboldCpp's ContextShift (gpttype_adapter.cpp `PurgeMissingTokens`, v1.76,
2da346a5), generalised: llama.cpp scans forward greedily and so cannot step over text the prompt *inserts* (Lite's
moved author's note), KoboldCpp removes one gap only; here the runs are chosen to keep the most tokens, with gaps
and insertions anywhere. Reused runs were computed with the dropped text in view; that approximation is what both
projects accept (bench/shift_fidelity.py measures it).

`PromptCache` keeps whole KV states of other conversations in RAM (LRU, at most `max_entries`, never more than
`budget_bytes` of snapshots), and `StateStore` puts a folder of state files (airobackend.kvstate) behind it, so that
a chat that comes back after another one - or after a restart - reuses its own cache, matched by the same rule.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from airobackend.kvstate import StateFileError

log = logging.getLogger("airobackend.promptcache")

MAX_CANDIDATES = 64         # cache positions looked at per n-gram (bounds the work on very repetitive text)
MAX_RUNS = 256              # matching runs considered by the chain search


@dataclass(frozen=True)
class Chunk:
    """Cached positions src .. src+n-1 go to prompt positions dst .. dst+n-1."""

    src: int
    dst: int
    n: int


@dataclass
class ReusePlan:
    """What of the cache a prompt keeps: `prefix` positions in place, then `chunks` moved (in prompt order)."""

    prompt_len: int
    prefix: int
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def n_reused(self) -> int:
        return self.prefix + sum(c.n for c in self.chunks)

    @property
    def n_evaluate(self) -> int:
        return self.prompt_len - self.n_reused

    def spans(self) -> list[tuple[int, int]]:
        """The prompt ranges [start, end) to evaluate, in order (the gaps around the reused runs)."""
        out, at = [], self.prefix
        for c in self.chunks:
            if c.dst > at:
                out.append((at, c.dst))
            at = c.dst + c.n
        if at < self.prompt_len:
            out.append((at, self.prompt_len))
        return out

    def moves(self) -> list[Chunk]:
        """The chunks in an order that never overwrites a source before it is read: those moving left in
        ascending order, then those moving right in descending order (sources and destinations both increase)."""
        left = [c for c in self.chunks if c.dst < c.src]
        right = [c for c in self.chunks if c.dst > c.src]
        return left + right[::-1]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_reuse(cached: Sequence[int], prompt: Sequence[int], min_chunk: int) -> ReusePlan:
    """The reuse plan that keeps the most cached tokens (see the module docstring).

    min_chunk <= 0: only the common prefix (llama.cpp's `--cache-reuse 0`, KoboldCpp's `--noshift`). The last prompt
    token is always left to evaluate, since its logits are needed.
    """
    cached, prompt = list(cached), list(prompt)
    p = min(common_prefix(cached, prompt), max(0, len(prompt) - 1))
    plan = ReusePlan(len(prompt), p)
    if min_chunk <= 0 or len(prompt) - p < min_chunk + 1 or len(cached) - p < min_chunk:
        return plan
    runs = _matching_runs(cached, prompt, p, min_chunk)
    plan.chunks = _best_chain(runs, p, min_chunk)
    if plan.chunks:          # the last token must be evaluated for its logits
        last = plan.chunks[-1]
        if last.dst + last.n == len(prompt):
            plan.chunks[-1] = Chunk(last.src, last.dst, last.n - 1)
            if plan.chunks[-1].n == 0:
                plan.chunks.pop()
    return plan


def _matching_runs(cached: list[int], prompt: list[int], p: int, n: int) -> list[tuple[int, int, int]]:
    """Maximal runs (prompt start, cache start, length >= n) where prompt and cache agree, both after p."""
    index: dict[tuple, list[int]] = {}
    for j in range(p, len(cached) - n + 1):
        bucket = index.setdefault(tuple(cached[j:j + n]), [])
        if len(bucket) < MAX_CANDIDATES:
            bucket.append(j)
    runs = []
    for i in range(p, len(prompt) - n + 1):
        for j in index.get(tuple(prompt[i:i + n]), ()):
            if i > p and j > p and prompt[i - 1] == cached[j - 1]:
                continue                  # inside a run found from its start
            k = n
            while i + k < len(prompt) and j + k < len(cached) and prompt[i + k] == cached[j + k]:
                k += 1
            runs.append((i, j, k))
    if len(runs) > MAX_RUNS:
        runs = sorted(runs, key=lambda r: -r[2])[:MAX_RUNS]
    return runs


def _best_chain(runs: list[tuple[int, int, int]], p: int, n: int) -> list[Chunk]:
    """The set of runs, in increasing order in both sequences, that keeps the most tokens. A run may lose its head
    where it overlaps the run before it (its end stays), as long as at least n tokens remain."""
    runs = sorted(runs, key=lambda r: (r[0] + r[2], r[1] + r[2]))      # by end in the prompt
    best: list[int] = []                                                 # tokens kept by the best chain ending here
    prev: list[int] = []
    for k, (i, j, length) in enumerate(runs):
        cut = max(0, p - i, p - j)
        value, back = (length - cut, -1) if length - cut >= n else (-1, -1)
        for m in range(k):
            if best[m] < 0:
                continue
            im, jm, lm = runs[m]
            cut = max(0, im + lm - i, jm + lm - j)
            if length - cut >= n and best[m] + length - cut > value:
                value, back = best[m] + length - cut, m
        best.append(value)
        prev.append(back)
    if not best or max(best) <= 0:
        return []
    k = max(range(len(best)), key=lambda x: best[x])
    chain = []
    while k >= 0:
        chain.append(k)
        k = prev[k]
    chunks, end_p, end_c = [], p, p
    for k in reversed(chain):
        i, j, length = runs[k]
        cut = max(0, end_p - i, end_c - j)
        chunks.append(Chunk(j + cut, i + cut, length - cut))
        end_p, end_c = i + length, j + length
    return chunks


@dataclass
class Entry:
    tokens: list[int]
    snapshot: object          # a kvcache.KVSnapshot (or what the owner stores)
    nbytes: int
    used: float = field(default_factory=time.monotonic)


class PromptCache:
    """Saved KV states of other conversations, in RAM: at most `max_entries`, their snapshots together never more
    than `budget_bytes`; the least recently used goes first. Thread-safe."""

    def __init__(self, budget_bytes: int, max_entries: int) -> None:
        self.budget_bytes, self.max_entries = max(0, int(budget_bytes)), max(0, int(max_entries))
        self._entries: list[Entry] = []
        self._lock = threading.Lock()
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0 and self.max_entries > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries)

    def fits(self, nbytes: int) -> bool:
        return self.enabled and nbytes <= self.budget_bytes

    def make_room(self, nbytes: int) -> list[Entry]:
        """Evict least recently used entries until one of `nbytes` fits; returns them (the owner may write them
        elsewhere). Call before taking the snapshot, so the budget holds even while it is being copied."""
        out = []
        with self._lock:
            self._entries.sort(key=lambda e: e.used)
            while self._entries and (len(self._entries) >= self.max_entries or
                                     sum(e.nbytes for e in self._entries) + nbytes > self.budget_bytes):
                out.append(self._entries.pop(0))
        return out

    def put(self, tokens: Sequence[int], snapshot: object, nbytes: int) -> list[Entry]:
        """Keep a state; entries whose tokens are a prefix of `tokens` (older turns of the same chat) are dropped.
        Returns the entries evicted to make room. A state larger than the whole budget is not kept."""
        tokens = list(tokens)
        if not self.fits(nbytes):
            return []
        with self._lock:
            self._entries = [e for e in self._entries
                             if not (len(e.tokens) <= len(tokens) and tokens[:len(e.tokens)] == e.tokens)]
        evicted = self.make_room(nbytes)
        with self._lock:
            self._entries.append(Entry(tokens, snapshot, int(nbytes)))
        return evicted

    def take(self, entry: Entry) -> bool:
        """Remove `entry` (it is being restored into the live cache); False if it was evicted meanwhile."""
        with self._lock:
            for k, e in enumerate(self._entries):
                if e is entry:
                    del self._entries[k]
                    self.hits += 1
                    return True
        return False

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass
class Candidate:
    """A saved state that could serve a prompt: its plan, and how to get its tokens and snapshot."""

    plan: ReusePlan
    tokens: list[int]
    source: str                       # 'ram' | 'disk'
    _load: Callable[[], Optional[tuple[list[int], Any]]]

    def load(self) -> Optional[tuple[list[int], Any]]:
        """(tokens, snapshot), or None if it is gone or unreadable now."""
        return self._load()


class StateStore:
    """Saved KV states of other conversations: RAM first (`PromptCache`), a `kvstate.StateDir` behind it when a
    prompt-cache folder is set. A state that does not fit in RAM, or is evicted from it, goes to disk; at close the
    states in RAM go there too, so they survive a restart or a model switch."""

    def __init__(self, ram: PromptCache, disk: Any = None) -> None:
        self.ram, self.disk = ram, disk

    @property
    def enabled(self) -> bool:
        return self.ram.enabled or self.disk is not None

    def best(self, prompt: Sequence[int], min_chunk: int) -> Optional[Candidate]:
        best: Optional[Candidate] = None
        for e in self.ram.entries():
            plan = plan_reuse(e.tokens, prompt, min_chunk)
            if best is None or plan.n_reused > best.plan.n_reused:
                best = Candidate(plan, e.tokens, "ram", lambda e=e: (e.tokens, e.snapshot) if self.ram.take(e)
                                 else None)
        if self.disk is not None:
            for path, header in self.disk.auto_states():
                plan = plan_reuse(header.tokens, prompt, min_chunk)
                if best is None or plan.n_reused > best.plan.n_reused:
                    best = Candidate(plan, list(header.tokens), "disk", lambda p=path: self._read(p))
        return best

    def _read(self, path: Any) -> Optional[tuple[list[int], Any]]:
        try:
            return self.disk.load_auto(path)
        except StateFileError as e:
            log.warning("saved state %s not used: %s", getattr(path, "name", path), e)
            return None

    def save(self, tokens: Sequence[int], nbytes: int, snapshot: Callable[[], Any]) -> None:
        """Keep a state: in RAM if it fits the budget (evicted ones go to disk), else on disk."""
        if self.ram.fits(nbytes):
            for old in self.ram.make_room(nbytes):        # before the copy: the budget holds throughout
                self.to_disk(old.tokens, old.snapshot)
            self.ram.put(tokens, snapshot(), nbytes)
        elif self.disk is not None:
            self.to_disk(tokens, snapshot())

    def to_disk(self, tokens: Sequence[int], snap: Any) -> None:
        if self.disk is None:
            return
        try:
            self.disk.save_auto(tokens, snap)
        except OSError as e:
            log.warning("could not write a saved state to %s: %s", self.disk.root, e)

    def flush(self) -> None:
        """Write the states held in RAM to disk (if there is a disk) and forget them."""
        for e in self.ram.entries():
            self.to_disk(e.tokens, e.snapshot)
        self.ram.clear()
