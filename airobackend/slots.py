"""Parallel slots: several generations share each forward pass (continuous batching, llama.cpp server's --parallel).

A generation (Engine._generate) is a coroutine: it yields text events, and a `Need` whenever it needs the model (a
prompt chunk or the next token of its sequence); the logits of the Need's last token are sent back. With one slot
the consumer's own thread runs it and evaluates each Need at once, exactly as a plain loop would (Engine._run).
With several, the `Scheduler`'s thread runs every slot's coroutine up to its next Need, puts the events into the
job's queue for its consumer, and evaluates the Needs of all slots in one forward pass (LlamaModel.eval_batch):
every decoding slot's next token plus prompt chunks up to `prefill_chunk` tokens, so the weights stream once for
all of them and a new prompt never holds the others' next tokens back by more than one chunk. Each slot has its own
KV cache and its own record of the tokens in it, so a slot is chosen by the longest reuse of what it holds.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

log = logging.getLogger("airobackend.slots")


@dataclass
class Need:
    """A forward pass a generation waits for: `spans` [(start position, tokens), ...] of its slot's sequence (a
    later span sees the earlier ones and what the cache holds between them); the last token's logits come back.
    `at_end`: one run at the end of the cache (the one-slot loop evaluates it with model.eval, else eval_spans)."""
    spans: list[tuple[int, list[int]]]
    at_end: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for _, t in self.spans)


class Slot:
    """One sequence the engine can serve: its KV cache, the tokens whose keys/values it holds at positions
    0..len-1, and the job running in it (if any)."""

    def __init__(self, sid: int, cache: Any) -> None:
        self.id, self.cache = sid, cache
        self.tokens: list[int] = []
        self.last_logits: Optional[np.ndarray] = None
        self.ahead: list[tuple[int, np.ndarray]] = []    # drafted tokens evaluated past `tokens` (speculative)
        self.job: Any = None
        self.gen: Optional[Iterator] = None         # the job's coroutine (Engine._generate)
        self.need: Optional[Need] = None            # what it waits for
        self.result: Optional[np.ndarray] = None    # the logits to send it on its next turn
        self.reserved = False                       # a slot action (save/restore/erase) holds it
        self.used = 0.0                             # monotonic time it was last given a job
        self.n_decoded = 0                          # tokens its job has generated (GET /slots)

    @property
    def busy(self) -> bool:
        return self.job is not None


def drive(gen: Iterator, evaluate: Callable[[Need], np.ndarray]) -> Iterator[Any]:
    """Run a generation coroutine in the calling thread: Needs are evaluated at once, events are passed on."""
    try:
        x = next(gen)
        while True:
            if isinstance(x, Need):
                try:
                    logits = evaluate(x)
                except BaseException as e:      # the generation sees it where it waits (and forgets its cache)
                    x = gen.throw(e)
                    continue
                x = gen.send(logits)
            else:
                yield x
                x = next(gen)
    except StopIteration:
        return
    finally:
        gen.close()


class Scheduler:
    """The thread that runs the slots of an engine with Settings.parallel > 1 (see the module docstring).

    Engine hooks: `assign()` (under the engine's condition: give waiting jobs to free slots, return whether any slot
    is busy), `start(slot)` (the coroutine of the slot's new job) and `finish(slot)` (free it; under the condition).
    """

    def __init__(self, engine: Any, prefill_chunk: int) -> None:
        self.engine = engine
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.lock = threading.Lock()        # the model's forward pass (its scratch buffers are shared)
        self.closing = False
        self._thread = threading.Thread(target=self._loop, name="airobackend-slots", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self.engine._cond:
            self.closing = True
            self.engine._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ---------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        eng = self.engine
        while True:
            try:
                with eng._cond:
                    while not eng._assign() and not self.closing:
                        eng._cond.wait()
                    if self.closing and not any(s.busy for s in eng.slots):
                        return
                    active = [s for s in eng.slots if s.busy]
                for s in active:
                    if s.need is None:
                        self._advance(s)
                waiting = [s for s in active if s.busy and s.need is not None]
                if waiting:
                    self._step(waiting)
            except Exception:       # a bug here must not leave every client waiting forever: end the jobs
                log.exception("slot scheduler step failed")
                for s in eng.slots:
                    if s.busy:
                        job = s.job
                        self._end(s)
                        job.events.put(RuntimeError("the generation failed; see the server log"))

    def _advance(self, s: Slot) -> None:
        """Run the slot's coroutine up to its next Need (events go to the job's queue), or to its end."""
        job = s.job
        try:
            if s.gen is None:
                s.gen = self.engine._start(s)
                x = next(s.gen)
            else:
                x, s.result = s.gen.send(s.result), None
            while not isinstance(x, Need):
                if x.finish_reason is not None:
                    # Free the slot before the last event reaches the client (see Engine._run).
                    self._end(s)
                    job.events.put(x)
                    return
                job.events.put(x)
                x = next(s.gen)
            s.need = x
        except StopIteration:
            self._end(s)
        except BaseException as e:      # a bad request or a model error: it ends that job, not the server
            log.debug("generation in slot %d failed: %r", s.id, e)
            self._end(s)
            job.events.put(e)

    def _end(self, s: Slot) -> None:
        gen = s.gen
        s.gen, s.need, s.result = None, None, None
        if gen is not None:
            gen.close()
        with self.engine._cond:
            self.engine._finish(s)

    def _step(self, waiting: list[Slot]) -> None:
        """One forward pass: every decoding slot's token, and prompt chunks up to prefill_chunk tokens (the oldest
        job's first; at least one chunk, so a prompt always progresses)."""
        decode = [s for s in waiting if s.need.n_tokens == 1]
        prefill = sorted((s for s in waiting if s.need.n_tokens > 1), key=lambda s: s.used)
        budget = self.prefill_chunk
        chosen = list(decode)
        for s in prefill:
            if s.need.n_tokens <= budget or not chosen:
                chosen.append(s)
                budget -= s.need.n_tokens
        seqs, want = [], []
        for s in chosen:
            for k, (start, toks) in enumerate(s.need.spans):
                seqs.append((s.cache, start, np.asarray(toks, dtype=np.int32)))
                want.append(k == len(s.need.spans) - 1)
        try:
            with self.lock:
                out = self.engine.model.eval_batch(seqs, want)
        except BaseException as e:
            for s in chosen:                # the pass failed for all of them; each job ends with the error
                job = s.job
                try:
                    s.gen.throw(e)          # where it waits: it forgets what its cache held
                except BaseException:
                    pass
                self._end(s)
                job.events.put(e)
            return
        self.engine._count_step()
        outs = [o for o, w in zip(out, want) if w]
        for s, logits in zip(chosen, outs):
            s.need, s.result = None, logits


def next_event(events: "queue.Queue[Any]") -> Any:
    """The next item of a job's event queue; an exception put there is raised in the consumer."""
    x = events.get()
    if isinstance(x, BaseException):
        raise x
    return x
