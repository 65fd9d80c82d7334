"""The generation engine: one model, one generation at a time, a queue in front, a prompt cache behind.

`Engine.generate(req)` validates the request, takes a place in the queue (or raises `EngineBusy`) and returns a
blocking iterator of `GenerationEvent`s: text deltas made of whole UTF-8 characters, then one last event with the
finish reason and the token counts. Servers run that iterator in a worker thread; `abort`, `partial_text` and `perf`
may be called from any other thread at any time.

What happens per request (llama.cpp `examples/main/main.cpp` at dadbed9; KoboldCpp 1.76 `koboldcpp.py` for the queue):
  * prompt cache: the tokens whose keys/values are in the model's KV cache are remembered; a new prompt keeps what it
    shares with them (chat frontends resend the whole history every turn, trimmed at the top once it is long): the
    common prefix, and runs the cache holds at other positions, moved into place (airobackend.promptcache); only the
    rest is evaluated. States of other conversations wait in RAM (`PromptCache`) until their chat comes back;
  * context shift: when the context is full, BOS and the request's memory part are kept, the oldest half of the rest
    is dropped with `model.cache.remove` (llama.cpp main's n_keep / n_discard rule) and generation goes on;
  * stop strings: text that could be the start of a stop string is held back until it is decided, then trimmed or
    kept per request;
  * phrase bans (KoboldCpp 1.76 anti-slop): tokens that could begin a banned phrase are held back too; when the
    output contains one, generation rewinds to the token where it begins (the cache is cut back there, the logits it
    was drawn from are kept), bans that token at that place and samples again;
  * abort: a flag checked before every sampled token and every prompt batch, so a generation ends within one token;
  * speculative decoding (airobackend.speculative), when the Llama has a drafter: the sampled token and the drafted
    ones are evaluated in one batched pass, the next tokens are drawn from those logits as usual, and the cache is cut
    back at the first drafted token that was not drawn.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from airobackend.chat import choose_template
from airobackend.detok import IncrementalDecoder, PhraseBanBuffer, StopStringMatcher
from airobackend.embeddings import mean_pool, normalize as l2_normalize
from airobackend.errors import ContextOverflowError, EngineBusy, RequestError
from airobackend.kvstate import StateDir, StateFileError
from airobackend.manager import mem_available
from airobackend.promptcache import PromptCache, ReusePlan, StateStore, common_prefix, plan_reuse
from airobackend.sampling import Sampler, validate_sampling
from airobackend.settings import Settings
from airobackend.speculative import Governor
from airobackend.slots import Need, Scheduler, Slot, drive, next_event
from airobackend.types import FinishReason, GenerationEvent, GenerationRequest, SamplingParams

log = logging.getLogger("airobackend.engine")

# A request asking for more than this many new tokens is a client bug, not a wish (even with context shift).
MAX_TOKENS_LIMIT = 1 << 20

# A token the sampler left out has probability 0; JSON has no -inf, so its logprob is reported as OpenAI reports a
# token outside the top 20.
LOGPROB_FLOOR = -9999.0

# A slot whose cache serves at least this fraction of a new prompt is its conversation (llama.cpp server's
# --slot-prompt-similarity default, 0.5).
SLOT_SIMILARITY = 0.5


@dataclass
class _Job:
    req: GenerationRequest
    tokens: list[int]                 # prompt tokens after memory was prepended and any up-front truncation
    n_keep: int                       # tokens never dropped by a context shift (BOS + memory)
    prompt_text: str                  # for echo
    max_tokens: int                   # -1 = until EOS or context full
    genkey: str
    stop: tuple[str, ...]
    abort: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    waiting: bool = False             # its consumer is blocked in next(), waiting for the slot
    finished: bool = False
    text: list[str] = field(default_factory=list)    # emitted deltas, for partial_text
    logprobs: list[dict[str, Any]] = field(default_factory=list)   # emitted logprob entries, for last_logprobs
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)  # parallel slots: the scheduler's events
    slot: int = -1                    # the slot it runs in


class _Output:
    """Released tokens on their way out: through the UTF-8 decoder and the stop strings into events."""

    def __init__(self, job: _Job, decoder: IncrementalDecoder, stops: StopStringMatcher) -> None:
        self.job, self.decoder, self.stops = job, decoder, stops
        self.ids: list[int] = []                      # released since the last event
        self.entries: list[dict[str, Any]] = []       # their logprob entries

    def take(self, ready: list[tuple[int, Any]]) -> tuple[str, Optional[str]]:
        """Feed (token, logprob entry) pairs through: (text now safe to show, the stop string matched or None)."""
        text = ""
        for t, e in ready:
            self.ids.append(t)
            if e is not None:
                self.entries.append(e)
            piece, hit = self.stops.feed(self.decoder.feed(t))
            text += piece
            if hit is not None:
                return text, hit
        return text, None

    def event(self, text: str, **kw: Any) -> GenerationEvent:
        ev = GenerationEvent(text=text, token_ids=tuple(self.ids), logprobs=list(self.entries) or None, **kw)
        if text:
            self.job.text.append(text)
        self.job.logprobs.extend(self.entries)
        self.ids, self.entries = [], []
        return ev


class Generation:
    """The iterator `Engine.generate` returns. Closing it (or dropping it) gives its queue place back."""

    def __init__(self, engine: "Engine", job: _Job) -> None:
        self._engine = engine
        self._job = job
        self._gen = engine._run(job)

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> GenerationEvent:
        return next(self._gen)

    @property
    def genkey(self) -> str:
        return self._job.genkey

    def close(self) -> None:
        """Stop the generation (if running) and release its slot or its place in the queue."""
        self._gen.close()
        self._engine._forget(self._job)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Engine:
    """Generation on one model: request queue, generation slots (one by default; Settings.parallel runs several
    through shared forward passes, airobackend.slots), prompt cache, context shift, abort, counters."""

    def __init__(self, llama: Any, settings: Optional[Settings] = None) -> None:
        self.llama = llama
        self.settings = settings or Settings()
        self.model, self.tokenizer = llama.model, llama.tokenizer
        self.n_ctx = int(self.model.n_ctx)
        self.n_vocab = int(self.model.n_vocab)
        self.n_batch = max(1, int(getattr(self.model, "n_batch", 0) or self.settings.n_batch or 512))
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()   # admitted, not yet running, in order
        self._running: Optional[_Job] = None          # the job in the slot (one slot)
        self._last: Optional[_Job] = None
        self._recent: collections.OrderedDict[str, _Job] = collections.OrderedDict()   # finished, by genkey
        s = self.settings
        self.parallel = max(1, int(getattr(s, "parallel", 1) or 1))
        if self.parallel > 1 and not getattr(self.model, "batched_sequences", True):
            log.warning("--parallel %d is not available with layers on other machines: one slot", self.parallel)
            self.parallel = 1
        # Slot 0 serves with the model's own cache (what the Llama facade sees); more slots get caches of their own.
        self.slots = [Slot(0, self.model.cache)] + [Slot(i, self.model.new_cache()) for i in range(1, self.parallel)]
        self.prefill_chunk = max(1, min(int(getattr(s, "prefill_chunk", 0) or self.n_batch), self.n_batch))
        self._scheduler: Optional[Scheduler] = None
        self.min_chunk = int(s.cache_reuse) if s.context_shift else 0
        self.prompt_cache = PromptCache(self._prompt_cache_budget(), int(s.cache_slots))
        self.states = StateStore(self.prompt_cache, self._state_dir())
        if self.prompt_cache.enabled or self.states.disk is not None:
            log.info("prompt cache: up to %d saved states in %d MiB of RAM%s", self.prompt_cache.max_entries,
                     self.prompt_cache.budget_bytes >> 20,
                     f", on disk in {self.states.disk.root}" if self.states.disk is not None else "")
        self._grammar_kept: Optional[tuple[str, Any]] = None   # the last generation's grammar and its final state
        # Speculative decoding (airobackend.speculative): the drafter; drafted tokens already evaluated sit in
        # Slot.ahead. Drafting keeps every row of a pass's logits, so it runs with one slot only.
        self.drafter = getattr(llama, "draft_model", None)
        self.governor = Governor()                  # drafts only while verifying passes pay (measured)
        self._pass: Optional[list] = None           # the unsettled verifying pass: [seconds, tokens yielded, drafted]
        if self.drafter is not None and self.parallel > 1:
            log.warning("speculative decoding is off with --parallel %d: the slots' steps are batched instead",
                        self.parallel)
            self.drafter = None
        self.spec_stats = dict(drafted=0, accepted=0, passes=0)     # since load: drafted / accepted tokens, passes
        self._template = None
        now = time.monotonic()
        self._t_start = now
        self._t_idle_since = now
        self._perf: dict[str, Any] = dict(last_process=0.0, last_eval=0.0, last_token_count=0, last_seed=-1,
                                          total_gens=0, stop_reason=None, last_input_count=0, last_process_count=0,
                                          last_cached_count=0)
        self.counters: dict[str, float] = dict(prompt_tokens=0, prompt_seconds=0.0, tokens_predicted=0,
                                               predicted_seconds=0.0, requests=0, steps=0, cache_hits=0)

    # The served sequence of the first slot, under the names the single-slot engine has always had.
    @property
    def cache(self) -> Any:
        return self.slots[0].cache

    @property
    def _cache(self) -> list[int]:
        return self.slots[0].tokens

    @_cache.setter
    def _cache(self, tokens: list[int]) -> None:
        self.slots[0].tokens = tokens

    @property
    def _last_logits(self) -> Optional[np.ndarray]:
        return self.slots[0].last_logits

    def _state_dir(self) -> Any:
        """The prompt-cache folder for this model (airobackend.kvstate.StateDir), if one is set and the model can
        name itself (a Llama facade's state_identity)."""
        ident = getattr(self.llama, "state_identity", None)
        if not self.settings.prompt_cache_dir or not isinstance(ident, dict):
            return None
        return StateDir(self.settings.prompt_cache_dir, max_auto=max(1, int(self.settings.cache_slots)), **ident)

    def _prompt_cache_budget(self) -> int:
        """Bytes of RAM for saved KV states: --prompt-cache-mb, or by default what is free now less a margin, up to
        cache_slots full contexts (so a default never makes a model that fits refuse to load)."""
        s = self.settings
        if s.prompt_cache_mb is not None:
            return max(0, int(s.prompt_cache_mb)) << 20
        full = int(getattr(self.cache, "bytes_per_position", 0)) * self.n_ctx
        if full <= 0 or s.cache_slots <= 0:
            return 0
        free = mem_available()
        return max(0, min(int(s.cache_slots) * full, free - max(1 << 30, free // 4)))

    # ---------------------------------------------------------------------------------------------- requests
    def generate(self, req: GenerationRequest) -> Generation:
        """Validate `req`, queue it and return the iterator of its events.

        Raises RequestError / ContextOverflowError for a bad request and EngineBusy when the queue is full, both
        before any event. The iterator blocks while earlier requests run.
        """
        job = self._prepare(req)
        self._admit(job)
        return Generation(self, job)

    def _admit(self, job: _Job) -> None:
        """Put `job` in the queue, or raise EngineBusy when every slot is taken and the line is full."""
        with self._cond:
            in_line = len(self._queue) + len(self._running_jobs())
            if in_line >= max(0, int(self.settings.multiuser)) + self.parallel:
                raise EngineBusy("Server is busy; please try again later.")
            self._queue.append(job)

    def _running_jobs(self) -> list[_Job]:
        """The jobs generating now (call with the condition held)."""
        if self.parallel == 1:
            return [self._running] if self._running is not None else []
        return [s.job for s in self.slots if s.job is not None]

    def embed(self, inputs: Sequence[Sequence[int]], normalize: bool = True) -> list[np.ndarray]:
        """One embedding per token sequence: the final hidden states averaged over its tokens, divided by their
        Euclidean norm when `normalize` (llama.cpp's embedding mode with --pooling mean; airobackend.embeddings).

        Runs in the generation slot, in turn with generations (EngineBusy when the line is full). Each sequence is
        one batch (at most n_batch tokens) evaluated on scratch keys and values, so the KV cache is untouched: the
        prompt cache of the conversation in progress stays valid and its next turn reuses it as before."""
        seqs = [[int(t) for t in seq] for seq in inputs]
        for i, seq in enumerate(seqs):
            if not seq or len(seq) > self.n_batch or not all(0 <= t < self.n_vocab for t in seq):
                raise RequestError(f"input {i} must have 1..{self.n_batch} token ids in 0..{self.n_vocab - 1}")
        if self.parallel > 1:
            # Between two steps of the generations (the forward pass's scratch buffers are the model's).
            sched = self._ensure_scheduler()
            with sched.lock:
                vectors = [mean_pool(self.model.hidden_states(np.asarray(seq, dtype=np.int64))) for seq in seqs]
            return [l2_normalize(v) for v in vectors] if normalize else vectors
        job = _Job(req=GenerationRequest(tokens=[]), tokens=[], n_keep=0, prompt_text="", max_tokens=0, genkey="",
                   stop=())
        self._admit(job)
        try:
            if not self._take_turn(job):
                raise RequestError("embedding request aborted before it started")
            vectors = [mean_pool(self.model.hidden_states(np.asarray(seq, dtype=np.int64))) for seq in seqs]
        finally:
            self._forget(job)
            with self._cond:
                job.finished = True
                if self._running is job:
                    self._running = None
                    self._t_idle_since = time.monotonic()
                self._cond.notify_all()
        return [l2_normalize(v) for v in vectors] if normalize else vectors

    def _prepare(self, req: GenerationRequest) -> _Job:
        if not isinstance(req, GenerationRequest):
            raise RequestError("generate() takes a GenerationRequest")
        if (req.prompt is None) == (req.tokens is None):
            raise RequestError("exactly one of prompt / tokens must be given")
        mt = req.max_tokens
        if isinstance(mt, bool) or not isinstance(mt, (int, np.integer)):
            raise RequestError(f"max_tokens must be an integer, not {mt!r}")
        mt = int(mt)
        if mt < -1:
            raise RequestError(f"max_tokens must be >= 0 (or -1 = until EOS / context full), not {mt}")
        if mt > MAX_TOKENS_LIMIT:
            raise RequestError(f"max_tokens {mt} is absurd (limit {MAX_TOKENS_LIMIT})")
        stop = req.stop if req.stop is not None else ()
        if isinstance(stop, str) or not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a list of strings")
        if isinstance(req.n_probs, bool) or not isinstance(req.n_probs, (int, np.integer)) \
                or not 0 <= req.n_probs <= self.n_vocab:
            raise RequestError(f"n_probs must be an integer in 0..{self.n_vocab}, not {req.n_probs!r}")
        if req.genkey is not None and not isinstance(req.genkey, str):
            raise RequestError("genkey must be a string")
        if not isinstance(req.sampling, SamplingParams):
            raise RequestError("sampling must be SamplingParams")
        validate_sampling(req.sampling, n_vocab=self.n_vocab)

        tok = self.tokenizer
        memory: list[int] = []
        if req.memory:
            if not isinstance(req.memory, str):
                raise RequestError("memory must be a string")
            memory = list(tok.encode(req.memory, add_bos=req.add_bos, special=True))
        if req.tokens is not None:
            try:
                body = [int(t) for t in req.tokens]
            except (TypeError, ValueError):
                raise RequestError("tokens must be a list of integer token ids") from None
            bad = [t for t in body if not 0 <= t < self.n_vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} out of range 0..{self.n_vocab - 1}")
            prompt_text = self.detokenize(body)
        else:
            if not isinstance(req.prompt, str):
                raise RequestError("prompt must be a string")
            prompt_text = req.prompt
            body = []
        if memory and req.tokens is None:
            # Memory and prompt are one text (no second space prefix at the seam); the kept part is the memory's
            # tokens as far as the joint tokenization shares them.
            tokens = list(tok.encode(req.memory + req.prompt, add_bos=req.add_bos, special=True))
            n_keep = common_prefix(memory, tokens)
        elif memory:
            tokens, n_keep = memory + body, len(memory)
        else:
            # special tokens written in the prompt (<|im_start|>, </s>) are those tokens, as llama.cpp's server and
            # llama-cpp-python read prompts; a chat template's output depends on it
            tokens = body if req.tokens is not None else list(tok.encode(req.prompt, add_bos=req.add_bos,
                                                                          special=True))
            n_keep = 1 if tokens and tokens[0] == tok.bos_id else 0
        if not tokens:
            raise RequestError("empty prompt: give some text, or leave add_bos on")

        n_ctx, p = self.n_ctx, len(tokens)
        if not req.allow_context_shift:
            if p >= n_ctx:
                raise ContextOverflowError(
                    f"prompt of {p} tokens does not fit in the context of {n_ctx} tokens (context shift is off)")
            if mt > 0 and p + mt > n_ctx:
                raise ContextOverflowError(
                    f"Requested tokens ({p + mt}) exceed context window of {n_ctx} (prompt {p} + max_tokens {mt})")
        else:
            # Leave room to generate: all of max_tokens up to half the context (the rest comes from shifting).
            reserve = max(1, min(mt if mt >= 0 else n_ctx // 4, n_ctx // 2))
            if p + reserve > n_ctx:
                room = n_ctx - reserve - n_keep
                if room < 1:
                    raise ContextOverflowError(
                        f"the memory part ({n_keep} tokens) leaves no room in the context of {n_ctx} tokens")
                tokens = tokens[:n_keep] + tokens[p - room:]
        return _Job(req=req, tokens=tokens, n_keep=n_keep, prompt_text=prompt_text, max_tokens=mt,
                    genkey=req.genkey or "", stop=tuple(stop))

    # ---------------------------------------------------------------------------------------------- queue
    def _take_turn(self, job: _Job) -> bool:
        """Wait for `job`'s turn in the slot and make it the running job; False if it was aborted first."""
        with self._cond:
            # Turns go in arrival order among the jobs whose consumers are waiting: a generation object that was
            # created but is not being iterated (yet) must not block the others (one thread may hold two streams).
            job.waiting = True
            self._cond.notify_all()
            while not job.abort.is_set() and not (self._running is None and self._first_waiting() is job):
                self._cond.wait()
            job.waiting = False
            if job in self._queue:
                self._queue.remove(job)
            if job.abort.is_set():      # deferred abort (KoboldCpp): ends before it starts
                job.finished = True
                self._cond.notify_all()
                return False
            self._running = job
            job.started = True
            return True

    def _run(self, job: _Job) -> Iterator[GenerationEvent]:
        if self.parallel > 1:
            yield from self._run_in_slots(job)
            return
        if not self._take_turn(job):
            yield GenerationEvent(finish_reason=FinishReason.ABORTED, prompt_tokens=len(job.tokens))
            return
        slot = self.slots[0]
        try:
            self._sync_in(slot)
            job.slot = 0
            for event in drive(self._generate(job, slot), lambda need: self._evaluate(slot, need)):
                if event.finish_reason is not None:
                    # Free the slot before the last event reaches the client, so a /perf or /check it sends on
                    # receiving the answer already sees the engine idle and the next request can start at once.
                    self._release(job)
                yield event
        finally:
            self._release(job)

    def _release(self, job: _Job) -> None:
        """End `job`'s turn (once): hand the cache state to the facade and wake the next request."""
        with self._cond:
            if job.finished:
                return
            self._sync_out(self.slots[0])
            job.finished = True
            if self._running is job:
                self._running = None
            self._remember(job)
            self._t_idle_since = time.monotonic()
            self._cond.notify_all()

    def _remember(self, job: _Job) -> None:
        """The last finished job, and the last few by genkey (/api/extra/generate/check after the end)."""
        self._last = job
        if job.genkey:
            self._recent[job.genkey] = job
            self._recent.move_to_end(job.genkey)
            while len(self._recent) > 64:
                self._recent.popitem(last=False)

    # ---------------------------------------------------------------------------------------------- parallel slots
    def _ensure_scheduler(self) -> Scheduler:
        with self._cond:
            if self._scheduler is None:
                self._scheduler = Scheduler(self, self.prefill_chunk)
            return self._scheduler

    def _run_in_slots(self, job: _Job) -> Iterator[GenerationEvent]:
        """The consumer's side with parallel slots: the scheduler runs the job, its events arrive in a queue."""
        self._ensure_scheduler()
        with self._cond:
            job.waiting = True          # from now on the scheduler may give it a slot
            self._cond.notify_all()
        try:
            while True:
                ev = next_event(job.events)
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if not job.finished:        # the consumer went away: end the job within one step
                job.abort.set()
                with self._cond:
                    if job in self._queue:
                        self._queue.remove(job)
                    self._cond.notify_all()

    def _assign(self) -> bool:
        """Give waiting jobs free slots, in arrival order; each goes to the free slot whose tokens it reuses most, if
        that is at least SLOT_SIMILARITY of its prompt, else to a slot where it throws nothing away, else to the
        slot unused longest (so a new conversation does not evict a returning one for a shared BOS). A job aborted while it waited ends here. Returns whether a slot
        is busy. Called by the scheduler with the condition held."""
        for job in [j for j in self._queue if j.waiting]:
            if job.abort.is_set():      # deferred abort (KoboldCpp): ends before it starts
                self._queue.remove(job)
                job.finished = True
                job.events.put(GenerationEvent(finish_reason=FinishReason.ABORTED, prompt_tokens=len(job.tokens)))
                continue
            free = [s for s in self.slots if not s.busy and not s.reserved]
            if not free:
                break
            reuse = {s.id: plan_reuse(s.tokens, job.tokens, self.min_chunk).n_reused for s in free}
            best = max(free, key=lambda s: (reuse[s.id], -s.used))
            if reuse[best.id] < SLOT_SIMILARITY * len(job.tokens):
                # another conversation: a slot it loses nothing in (empty, or all of it reused), else the slot
                # unused longest
                whole = [s for s in free if reuse[s.id] == len(s.tokens)]
                best = max(whole, key=lambda s: (reuse[s.id], -s.used)) if whole else min(free, key=lambda s: s.used)
            self._queue.remove(job)
            job.waiting, job.started, job.slot = False, True, best.id
            best.job, best.used, best.n_decoded = job, time.monotonic(), 0
            if best.id == 0:
                self._sync_in(best)
        return any(s.busy for s in self.slots)

    def _start(self, slot: Slot) -> Iterator[Any]:
        return self._generate(slot.job, slot)

    def _finish(self, slot: Slot) -> None:
        """The job in `slot` has ended (called with the condition held)."""
        job = slot.job
        slot.job = None
        if slot.id == 0:
            self._sync_out(slot)
        job.finished = True
        self._remember(job)
        if not any(s.busy for s in self.slots):
            self._t_idle_since = time.monotonic()
        self._cond.notify_all()

    def _count_step(self) -> None:
        """One forward pass of the slots (llamacpp:n_decode_total)."""
        with self._cond:
            self.counters["steps"] += 1

    def metrics(self) -> dict[str, float]:
        """Totals and gauges behind llama.cpp server's GET /metrics: prompt tokens evaluated and their seconds,
        tokens generated and their seconds, forward passes, requests processing and deferred, KV cache tokens and
        usage ratio (all slots), prompt-cache hits (requests that reused cached tokens)."""
        with self._cond:
            c = dict(self.counters)
            cached = sum(len(s.tokens) for s in self.slots)
            c.update(requests_processing=len(self._running_jobs()), requests_deferred=len(self._queue),
                     kv_cache_tokens=cached, kv_cache_usage_ratio=cached / (self.n_ctx * len(self.slots)),
                     n_slots=len(self.slots))
            return c

    def slots_info(self) -> list[dict[str, Any]]:
        """Per slot, what llama.cpp server's GET /slots shows: id, n_ctx, is_processing, the tokens cached, and for
        a running job its task, tokens decoded and remaining."""
        with self._cond:
            out = []
            for s in self.slots:
                job = s.job if self.parallel > 1 else self._running
                n_rem = -1 if job is None or job.max_tokens < 0 else max(0, job.max_tokens - s.n_decoded)
                out.append({"id": s.id, "id_task": (job.genkey or job.req.request_id or "") if job else -1,
                            "n_ctx": self.n_ctx, "is_processing": job is not None, "state": 1 if job else 0,
                            "n_past": len(s.tokens), "tokens_cached": len(s.tokens),
                            "next_token": {"has_next_token": job is not None, "n_remain": n_rem,
                                           "n_decoded": s.n_decoded}})
            return out

    def _first_waiting(self) -> Optional[_Job]:
        return next((j for j in self._queue if j.waiting), None)

    def _forget(self, job: _Job) -> None:
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._cond.notify_all()

    # ---------------------------------------------------------------------------------------------- the loop
    def _sync_in(self, slot: Slot) -> None:
        """Take the cache contents from the Llama facade (its low-level `eval` may have changed them): slot 0 only,
        whose cache is the model's."""
        if slot.id != 0:
            return
        n, ids = getattr(self.llama, "n_tokens", None), getattr(self.llama, "input_ids", None)
        if isinstance(n, (int, np.integer)) and ids is not None:
            slot.tokens = [int(t) for t in ids[:n]]
        slot.ahead = []
        slot.last_logits = None

    def _sync_out(self, slot: Slot) -> None:
        """Tell the facade what is in the cache now (llama-cpp-python's input_ids / n_tokens / scores)."""
        n, ids = getattr(self.llama, "n_tokens", None), getattr(self.llama, "input_ids", None)
        if slot.id == 0 and isinstance(n, (int, np.integer)) and ids is not None:
            k = len(slot.tokens)
            ids[:k] = slot.tokens
            self.llama.n_tokens = k
            scores = getattr(self.llama, "scores", None)
            if slot.last_logits is not None and k and scores is not None:
                scores[k - 1] = slot.last_logits

    def _evaluate(self, slot: Slot, need: Need) -> np.ndarray:
        """One Need evaluated alone (one slot): the calls the single-sequence engine has always made."""
        self.counters["steps"] += 1
        if need.at_end:
            (start, chunk), = need.spans
            out = self.model.eval(np.asarray(chunk, dtype=np.int32), start)
        else:
            out = self.model.eval_spans([(st, np.asarray(t, dtype=np.int32)) for st, t in need.spans])
        return np.asarray(out)[-1]

    def _eval(self, slot: Slot, tokens: list[int], job: _Job) -> Iterator[Any]:
        """Evaluate `tokens` after the cached ones, in n_batch chunks (a coroutine: it yields Needs); the last row of
        logits, or None if aborted."""
        logits = None
        for start in range(0, len(tokens), self.n_batch):
            if job.abort.is_set():
                return None
            chunk = tokens[start:start + self.n_batch]
            try:
                logits = yield Need([(len(slot.tokens), chunk)], at_end=True)
            except BaseException:
                slot.tokens.clear()         # a failed evaluation leaves the cache in no known state
                raise
            slot.tokens.extend(chunk)
            slot.last_logits = logits
        return logits

    def _plan(self, slot: Slot, tokens: list[int]) -> ReusePlan:
        """How `tokens` reuses the slot's cache, or a saved state that serves it better (swapped in). The slot's
        state is saved first when the new prompt would throw most of it away (another conversation)."""
        plan = plan_reuse(slot.tokens, tokens, self.min_chunk)
        if not self.states.enabled:
            return plan
        cand = self.states.best(tokens, self.min_chunk)
        better = cand is not None and cand.plan.n_reused > plan.n_reused
        got = cand.load() if better else None          # taken out first: saving the live state may evict it
        if better or plan.n_reused < len(slot.tokens) // 2:
            self._save_live(slot)
        if not better:
            return plan
        why = "it is gone" if got is None else slot.cache.compatible(got[1])
        if why is not None:
            log.warning("prompt cache: a saved state was not used: %s", why)
            slot.tokens = []                 # the live state was saved above; start over
            return plan_reuse(slot.tokens, tokens, self.min_chunk)
        slot.cache.restore(got[1])
        slot.tokens = list(got[0])
        log.info("prompt cache: restored a saved state (%s) of %d tokens, %d reused", cand.source, len(got[0]),
                 cand.plan.n_reused)
        return cand.plan

    def _save_live(self, slot: Slot) -> None:
        """Keep the slot's cache among the saved states (RAM, else disk), if it is worth keeping."""
        n = len(slot.tokens)
        if n < max(16, self.min_chunk):
            return
        tokens, cache = list(slot.tokens), slot.cache
        self.states.save(tokens, n * int(cache.bytes_per_position), lambda: cache.snapshot(n))

    def _fill(self, slot: Slot, plan: ReusePlan, tokens: list[int], job: _Job) -> Iterator[Any]:
        """Carry out `plan`: move the reused runs into place, then evaluate the gaps between them, n_batch tokens
        per weight pass (a pass may fill several gaps; with parallel slots, prefill_chunk tokens per step). A
        coroutine: returns the last token's logits, None if aborted. The bookkeeping (`slot.tokens`) always names
        the valid prefix of the cache, so an abort leaves nothing wrong."""
        del slot.tokens[plan.prefix:]
        for c in plan.moves():
            slot.cache.move(c.src, c.src + c.n, c.dst)
        pending = [(start, tokens[start:end]) for start, end in plan.spans()]
        slot.tokens = tokens[:pending[0][0]]
        logits = None
        while pending:
            if job.abort.is_set():
                return None
            group, room = [], (self.n_batch if self.parallel == 1 else self.prefill_chunk)
            while pending and room:
                start, toks = pending[0]
                group.append((start, toks[:room]))
                room -= len(group[-1][1])
                if len(toks) > len(group[-1][1]):
                    pending[0] = (start + len(group[-1][1]), toks[len(group[-1][1]):])
                else:
                    pending.pop(0)
            try:
                logits = yield Need(group)
            except BaseException:
                slot.tokens = []            # a failed evaluation leaves the cache in no known state
                raise
            slot.tokens = tokens[:pending[0][0]] if pending else list(tokens)
            slot.last_logits = logits
        return logits

    def _next_logits(self, slot: Slot, tid: int, job: _Job, budget: int) -> Iterator[Any]:
        """The logits after `tid`, the token just sampled (None if aborted); a coroutine like `_eval`. `budget`: how
        many more tokens the request may take after it.

        When `tid` is the next drafted token of the last verifying pass, its logits are already there. Otherwise the
        drafted rest is cut from the cache and `tid` is evaluated, together with a new draft when there is a drafter
        (one slot only, so the pass runs here, in the consumer's thread): [tid, d1..dk] in one batched pass whose
        every row of logits is kept for the draws that follow."""
        if slot.ahead and slot.ahead[0][0] == tid:
            row = slot.ahead.pop(0)[1]
            slot.tokens.append(tid)
            self.spec_stats["accepted"] += 1
            self._pass[1] += 1
            if not slot.ahead:
                self._settle()
            slot.last_logits = row
            return row
        self._drop_ahead(slot)
        t0 = time.perf_counter()
        room = min(budget - 1, self.n_ctx - len(slot.tokens) - 1, self.n_batch - 1)
        draft = []
        if self.drafter is not None and room > 0 and self.governor.allow():
            draft = self._draft(slot.tokens + [tid], self.governor.cap(room))
        if not draft:
            logits = yield from self._eval(slot, [tid], job)
            if self.drafter is not None:
                self.governor.plain(time.perf_counter() - t0)
            return logits
        if job.abort.is_set():
            return None
        rows = np.asarray(self.model.eval(np.asarray([tid] + draft, dtype=np.int32), len(slot.tokens),
                                          logits_all=True))
        slot.tokens.append(tid)
        slot.ahead = list(zip(draft, rows[1:]))
        self._pass = [time.perf_counter() - t0, 1, len(draft)]
        self.spec_stats["drafted"] += len(draft)
        self.spec_stats["passes"] += 1
        slot.last_logits = rows[0]
        return rows[0]

    def _settle(self) -> None:
        """The last verifying pass's drafts are all decided: tell the governor what it yielded."""
        if self._pass is not None:
            self.governor.verified(*self._pass)
            self._pass = None

    def _draft(self, context: list[int], n: int) -> list[int]:
        """At most `n` drafted token ids to follow `context` (stopping at the first id outside the vocabulary)."""
        out = []
        # num_pred_tokens: our drafters stop there (a draft model then evaluates no more than that); drafters with
        # llama-cpp-python's interface take **kwargs and may ignore it, hence the slice.
        drafted = self.drafter(np.asarray(context, dtype=np.intc), num_pred_tokens=n)
        for t in np.asarray(drafted).reshape(-1)[:n].tolist():
            if not 0 <= int(t) < self.n_vocab:
                break
            out.append(int(t))
        return out

    def _drop_ahead(self, slot: Slot) -> None:
        """Forget drafted tokens evaluated past the cached ones: their keys and values leave the cache."""
        if slot.ahead:
            slot.ahead = []
            slot.cache.truncate(len(slot.tokens))
        self._settle()

    def _shift(self, slot: Slot, n_keep: int) -> bool:
        """Make room for one more token: drop the oldest half after the kept part. False if nothing can go."""
        self._drop_ahead(slot)
        n_past = len(slot.tokens)
        n_discard = (n_past - n_keep) // 2
        if n_discard < 1:
            return False
        slot.cache.remove(n_keep, n_keep + n_discard, n_past)
        del slot.tokens[n_keep:n_keep + n_discard]
        return True

    def _resolve_seed(self, params: SamplingParams) -> int:
        seed = params.seed
        if seed is None or seed < 0:
            seed = self.settings.seed if self.settings.seed is not None and self.settings.seed >= 0 else -1
        if seed < 0:
            seed = random.SystemRandom().randrange(1 << 31)
        return int(seed)

    def _generate(self, job: _Job, slot: Slot) -> Iterator[Any]:
        """The generation of `job` in `slot`: a coroutine that yields GenerationEvents, and a Need whenever it needs
        the model (the logits are sent back; see airobackend.slots)."""
        req, tok = job.req, self.tokenizer
        eog = getattr(tok, "eog_ids", None) or {tok.eos_id}
        seed = self._resolve_seed(req.sampling)
        sampler = Sampler(req.sampling.replace(seed=seed), tokenizer=tok, n_vocab=self.n_vocab, n_ctx=self.n_ctx)
        kept, self._grammar_kept = self._grammar_kept, None
        if req.grammar_retain_state and kept is not None and kept[0] == req.sampling.grammar:
            sampler.restore((sampler.mu, kept[1]))
        decoder = IncrementalDecoder(tok, special=req.render_special)
        stops = StopStringMatcher(job.stop, trim=req.trim_stop)
        stop_ids = self._stop_tokens(job.stop)
        tokens = job.tokens
        if req.echo and job.prompt_text:
            job.text.append(job.prompt_text)
            yield GenerationEvent(text=job.prompt_text)
        t0 = time.perf_counter()

        # Prompt cache: keep what the cache shares with the prompt, evaluate the rest (at least the last token). A
        # model whose layers live on other machines may have lost its KV cache (a stage restarted): nothing is reused.
        lost = getattr(self.model, "cache_lost", None)
        if lost is not None and lost():
            slot.tokens.clear()
        self._drop_ahead(slot)
        self.governor.restart()
        plan = self._plan(slot, tokens)
        logits = yield from self._fill(slot, plan, tokens, job)
        t1 = time.perf_counter()

        history = list(tokens)
        n_sampled = 0                       # tokens drawn, those a phrase ban took back included (KoboldCpp's budget)
        want_lp = req.n_probs > 0
        out = _Output(job, decoder, stops)
        # Phrase bans (KoboldCpp 1.76 anti-slop): sampled tokens wait in `bans` while they may begin a banned phrase;
        # when the text they make contains one, generation rewinds to the token where it begins, which is then
        # banned at that place. A held token's state is what rewinding to it needs: (output index, cache length,
        # the logits it was drawn from, the sampler's state before it, its logprob entry).
        bans = PhraseBanBuffer(tok, sampler.phrases) if sampler.phrases else None
        banned_at: dict[int, set[int]] = {}
        eos_entry, render_eos = None, None          # render_eos: the end token to print (render_special)

        finish: FinishReason
        if logits is None:
            finish = FinishReason.ABORTED
        else:
            while True:
                if job.max_tokens >= 0 and n_sampled >= job.max_tokens:
                    finish = FinishReason.LENGTH
                    break
                if job.abort.is_set():
                    finish = FinishReason.ABORTED
                    break
                lp = self._log_softmax(logits) if want_lp and not req.post_sampling_probs else None
                n_out = len(history) - len(tokens)
                before = sampler.snapshot() if bans is not None else None
                tid = int(sampler.sample(logits, history, ban=tuple(banned_at.get(n_out, ()))))
                entry = self._logprob_entry(lp, sampler, tid, req.n_probs) if want_lp else None
                if tid in eog and not req.bypass_eos:   # EOS, or an end-of-turn token (<|im_end|>, <|eot_id|>)
                    eos_entry = entry
                    render_eos = tid if req.render_special else None   # KoboldCpp prints it too when asked to
                    finish = FinishReason.EOS
                    break
                n_sampled += 1
                history.append(tid)
                ready = [(tid, entry)]
                if bans is not None:
                    j = bans.push(tid, (n_out, len(slot.tokens), logits.copy(), before, entry))
                    if j is not None:
                        (first, (n_out, pos, logits, state, _)), *_ = bans.take_back(j)
                        banned_at.setdefault(n_out, set()).add(first)
                        del history[len(tokens) + n_out:]
                        self._drop_ahead(slot)
                        del slot.tokens[pos:]          # the model evaluates from `pos` again
                        slot.last_logits = logits
                        sampler.restore(state)
                        continue
                    ready = [(t, st[4]) for t, st in bans.release()]
                text, matched = out.take(ready)
                if text:
                    yield out.event(text)
                if matched is not None:
                    finish = FinishReason.STOP
                    break
                if tid in stop_ids:
                    finish = FinishReason.EOS       # KoboldCpp counts a stop token as an end token
                    break
                if job.max_tokens >= 0 and n_sampled >= job.max_tokens:
                    finish = FinishReason.LENGTH
                    break
                if len(slot.tokens) >= self.n_ctx:
                    # -1 means "until the context is full"; otherwise shift if the request allows it.
                    n_past = len(slot.tokens)
                    if job.max_tokens < 0 or not req.allow_context_shift or not self._shift(slot, job.n_keep):
                        finish = FinishReason.LENGTH
                        break
                    if bans is not None:
                        self._shift_held(bans, n_past - len(slot.tokens), job.n_keep)
                slot.n_decoded = n_sampled
                logits = yield from self._next_logits(slot, tid, job, job.max_tokens - n_sampled
                                                      if job.max_tokens >= 0 else self.n_ctx)
                if logits is None:
                    finish = FinishReason.ABORTED
                    break
        t2 = time.perf_counter()
        self._drop_ahead(slot)

        tail, matched = "", None
        if bans is not None and finish is not FinishReason.STOP:
            tail, matched = out.take([(t, st[4]) for t, st in bans.flush()])   # never a whole phrase: it is shown
        if render_eos is not None and matched is None:
            more, matched = stops.feed(decoder.feed(render_eos))
            tail += more
        if matched is None and finish is not FinishReason.STOP:
            more, matched = stops.feed(decoder.flush())
            tail += more
            if matched is None:
                tail += stops.flush()
        if matched is not None:
            finish = FinishReason.STOP
        if eos_entry is not None and finish is FinishReason.EOS:
            out.entries.append(eos_entry)
        n_gen = len(history) - len(tokens)
        if sampler.grammar is not None:         # for a next request with grammar_retain_state
            self._grammar_kept = (req.sampling.grammar, sampler.snapshot()[1])
        with self._cond:
            self._perf.update(last_process=t1 - t0, last_eval=t2 - t1, last_token_count=n_gen, last_seed=seed,
                              total_gens=self._perf["total_gens"] + 1, stop_reason=finish,
                              last_input_count=len(tokens), last_process_count=plan.n_evaluate,
                              last_cached_count=plan.n_reused)
            c = self.counters       # totals for GET /metrics
            c["requests"] += 1
            c["prompt_tokens"] += plan.n_evaluate
            c["prompt_seconds"] += t1 - t0
            c["tokens_predicted"] += n_gen
            c["predicted_seconds"] += t2 - t1
            c["cache_hits"] += 1 if plan.n_reused else 0
        yield out.event(tail, finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=n_gen,
                        cached_tokens=plan.n_reused, prompt_seconds=t1 - t0, generation_seconds=t2 - t1)

    def _shift_held(self, bans: PhraseBanBuffer, dropped: int, n_keep: int) -> None:
        """After a context shift: held tokens' cache positions move down; if one fell into the dropped part it can
        no longer be rewound to, so phrase matching restarts after the held tokens (they are released as they are,
        by the next release)."""
        bans.shift(lambda st: (st[0], st[1] - dropped) + st[2:])
        if any(st[1] < n_keep for _, st in bans.held):
            bans.forget_text()

    def _stop_tokens(self, stops: Sequence[str]) -> frozenset[int]:
        """Stop strings that are one control token without text (such as "<|im_end|>"): they can never be seen in
        the output, so generation stops on the token itself (KoboldCpp 1.76 gpttype_adapter.cpp special_stop_sequence:
        a stop string that tokenizes to exactly one token whose piece is empty)."""
        out = set()
        for s in stops:
            try:
                ids = self.tokenizer.encode(s, add_bos=False, special=True)
            except TypeError:                       # a tokenizer without special-token parsing
                return frozenset()
            if len(ids) == 1 and not self.tokenizer.token_bytes(ids[0]):
                out.add(int(ids[0]))
        return frozenset(out)

    @staticmethod
    def _log_softmax(logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float64)
        m = x.max()
        return x - (m + np.log(np.exp(x - m).sum()))

    def _logprob_entry(self, lp: Optional[np.ndarray], sampler: Sampler, tid: int, n: int) -> dict[str, Any]:
        """The chosen token and the top `n` with their log-probabilities: of the raw model distribution `lp`, or
        with lp None of the sampler's final candidates (KoboldCpp's logprobs; -inf for a token not among them)."""
        def piece(i: int) -> str:           # token_bytes is all the engine asks of a tokenizer
            return self.tokenizer.token_bytes(i).decode("utf-8", errors="replace")

        if lp is None:
            ids, probs = sampler.last_ids, sampler.last_probs
            with np.errstate(divide="ignore"):
                logs = np.log(probs)
            hit = np.flatnonzero(ids == tid)
            chosen = float(logs[hit[0]]) if hit.size else float("-inf")
            top = [(int(i), float(v)) for i, v in zip(ids[:n], logs[:n])]
        else:
            idx = np.argpartition(-lp, n - 1)[:n] if n < lp.size else np.arange(lp.size)
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            chosen = float(lp[tid])
            top = [(int(i), float(lp[i])) for i in idx]
        return {"id": tid, "token": piece(tid), "logprob": max(chosen, LOGPROB_FLOOR),
                "top_logprobs": [{"id": i, "token": piece(i), "logprob": max(v, LOGPROB_FLOOR)} for i, v in top]}

    # ---------------------------------------------------------------------------------------------- saved states
    @contextlib.contextmanager
    def _turn(self, sid: int) -> Iterator[Slot]:
        """Hold slot `sid` between generations (slot save/restore/erase): waits until it is free, and no job takes
        it while this runs (with one slot the queue waits)."""
        slot = self.slots[sid]
        job = _Job(req=GenerationRequest(prompt=""), tokens=[], n_keep=0, prompt_text="", max_tokens=0, genkey="",
                   stop=())
        with self._cond:
            if self.parallel == 1:
                while self._running is not None:
                    self._cond.wait()
                self._running = job
            else:
                while slot.busy or slot.reserved:
                    self._cond.wait()
            slot.reserved = True
        try:
            self._sync_in(slot)
            yield slot
        finally:
            with self._cond:
                self._sync_out(slot)
                slot.reserved = False
                if self._running is job:
                    self._running = None
                self._cond.notify_all()

    def _slot_id(self, slot: Any) -> int:
        try:
            sid = int(slot)
        except (TypeError, ValueError):
            sid = -1
        if not 0 <= sid < len(self.slots):
            raise RequestError(f"Invalid slot ID {slot}: this server has slots 0.." + str(len(self.slots) - 1)
                               if len(self.slots) > 1 else f"Invalid slot ID {slot}: this server has one slot, 0")
        return sid

    def _slot_dir(self, slot: int) -> Any:
        self._slot_id(slot)
        d = self.states.disk
        if d is None:
            raise NotImplementedError("This server does not support slots action. Start it with "
                                      "`--prompt-cache-dir DIR`")
        return d

    def save_slot(self, slot: int, filename: str) -> dict:
        """llama.cpp server's POST /slots/{id}?action=save: the slot's KV state into DIR/filename."""
        d = self._slot_dir(slot)
        d.path(filename)                                   # a bad name is refused before waiting for the turn
        with self._turn(self._slot_id(slot)) as s:
            t0 = time.perf_counter()
            n = len(s.tokens)
            written = d.save(filename, s.tokens, s.cache.snapshot(n))
            return {"id_slot": int(slot), "filename": filename, "n_saved": n, "n_written": written,
                    "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}

    def restore_slot(self, slot: int, filename: str) -> dict:
        """llama.cpp server's POST /slots/{id}?action=restore: DIR/filename into the slot, after checking that it
        belongs to this model and is whole (StateFileError otherwise; the slot keeps what it had)."""
        d = self._slot_dir(slot)
        path = d.path(filename)
        with self._turn(self._slot_id(slot)) as s:
            t0 = time.perf_counter()
            tokens, snap = d.load(filename)
            why = s.cache.compatible(snap)
            if why is not None:
                raise StateFileError(f"state file {filename!r} cannot be restored here: {why}")
            s.cache.restore(snap)
            s.tokens = list(tokens)
            return {"id_slot": int(slot), "filename": filename, "n_restored": len(tokens),
                    "n_read": path.stat().st_size, "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}

    def erase_slot(self, slot: int) -> dict:
        """llama.cpp server's POST /slots/{id}?action=erase: forget the slot's cache."""
        with self._turn(self._slot_id(slot)) as s:
            n = len(s.tokens)
            s.tokens = []
            s.cache.truncate(0)
            return {"id_slot": int(slot), "n_erased": n}

    def close(self) -> None:
        """Stop the slots' scheduler (after the generations in progress end) and keep what is worth keeping: with a
        prompt-cache folder, the slots' states and the states in RAM are written there (they are found again after
        a restart or a switch back to this model)."""
        sched = self._scheduler
        if sched is not None:
            sched.close()
        if self.states.disk is None:
            return
        with self._cond:
            busy = bool(self._running_jobs())
        if busy:
            return
        for s in self.slots:
            n = len(s.tokens)
            if n >= max(16, self.min_chunk):
                self.states.to_disk(list(s.tokens), s.cache.snapshot(n))
        self.states.flush()

    # ---------------------------------------------------------------------------------------------- other threads
    def abort(self, genkey: Optional[str] = None) -> bool:
        """Stop the running generations (or, given a key, the queued or running one whose genkey or request_id it
        is).

        The generation ends within one token with finish reason 'aborted'. A queued job that is aborted ends as soon
        as its turn comes, without running (KoboldCpp's deferred abort). Returns True if something was aborted.
        """
        with self._cond:
            running = self._running_jobs()
            if genkey:
                targets = [j for j in running + list(self._queue) if genkey in (j.genkey, j.req.request_id)]
            else:
                targets = running
            for j in targets:
                j.abort.set()
            self._cond.notify_all()
            return bool(targets)

    def is_running(self, genkey: Optional[str] = None) -> bool:
        """Whether a generation (with that genkey, if given) is running now."""
        with self._cond:
            return any(not genkey or j.genkey == genkey for j in self._running_jobs())

    def partial_text(self, genkey: Optional[str] = None) -> str:
        """Text generated so far by the running (else the last) generation, for /api/extra/generate/check.

        With a genkey, only the job with that key is shown (running in any slot, or finished lately); without one,
        only the one running job (else the last) if it had no key, and only while nobody is waiting, so one user's
        text is never shown to another (KoboldCpp's rule).
        """
        with self._cond:
            job = self._visible_job(genkey)
            return "".join(job.text) if job is not None else ""

    def last_logprobs(self, genkey: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
        """The logprob entries of the running (else the last) generation, for KoboldCpp's /api/extra/last_logprobs,
        under partial_text's rule; None when there is none to show or it recorded none."""
        with self._cond:
            job = self._visible_job(genkey)
            return list(job.logprobs) if job is not None and job.req.n_probs > 0 else None

    def _visible_job(self, genkey: Optional[str]) -> Optional[_Job]:
        running = self._running_jobs()
        if genkey:
            return next((j for j in running if j.genkey == genkey), None) or self._recent.get(genkey)
        if len(running) > 1:
            return None
        job = running[0] if running else self._last
        return job if job is not None and not job.genkey and not self._queue else None

    def perf(self) -> dict[str, Any]:
        """The last generation's and the queue's facts (types.EngineAPI.perf; times in seconds). A protocol's
        adapter shapes them (KoboldCpp's /api/extra/perf)."""
        with self._cond:
            now = time.monotonic()
            idle = not self._running_jobs()
            out = dict(self._perf)
            out.update(queue=len(self._queue), idle=idle, uptime=now - self._t_start,
                       idletime=(now - self._t_idle_since) if idle else 0.0)
            return out

    def health(self) -> dict:
        """{'status': 'ok' | 'error', ...}: what the model says of the machines it runs on (its pipeline stages);
        a model in this process is always ok."""
        check = getattr(self.model, "health", None)
        return check() if check is not None else {"status": "ok"}

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    # ---------------------------------------------------------------------------------------------- model facts
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` as a prompt is read (special tokens parsed; BOS when asked and the file wants it)."""
        return list(self.tokenizer.encode(text, add_bos=add_bos, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(self.tokenizer.decode(list(ids))).decode("utf-8", errors="replace")

    @property
    def template(self):
        """The prompt template: Settings.template by name, else chosen from the file name / metadata."""
        if self._template is None:
            self._template = choose_template(self.settings.template, self.model_path, self._metadata())
        return self._template

    def format_chat(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[dict]] = None) -> str:
        """Render chat messages (and the OpenAI `tools`, if any) with the model's template, ending with the open
        assistant turn."""
        return self.template.format(messages, tools=tools) if tools else self.template.format(messages)

    @property
    def model_path(self) -> Optional[str]:
        path = getattr(self.llama, "model_path", None)
        return str(path) if path else None

    def _model_file(self) -> Any:
        for owner in (self.llama, self.model):
            for name in ("model_file", "mf", "_mf"):
                mf = getattr(owner, name, None)
                if mf is not None:
                    return mf
        return None

    def _metadata(self) -> Optional[Mapping[str, Any]]:
        mf = self._model_file()
        md = getattr(mf, "metadata", None)
        return md if isinstance(md, Mapping) else None

    def model_info(self) -> dict[str, Any]:
        """name, mix, n_ctx, n_vocab, n_embd, template, path: what adapters show about the loaded model."""
        path = self.model_path
        mf = self._model_file()
        return {
            "name": Path(path).name if path else "model",   # the file name, as the model library lists it
            "path": path,
            "mix": getattr(mf, "mix_name", None),
            "format": getattr(mf, "format", None),
            "n_ctx": self.n_ctx,
            "n_vocab": self.n_vocab,
            "n_embd": getattr(self.model, "n_embd", None),     # the length of an embedding
            "template": self.template.name,
            "kv_cache": f"{getattr(self.model, 'type_k', 'f16')}/{getattr(self.model, 'type_v', 'f16')}",
            **self._rope_info(),
        }

    def _rope_info(self) -> dict:
        """n_ctx_train and the RoPE values the model runs with (airobackend.rope: 'auto' when scaled for a context
        beyond the trained one)."""
        rope = getattr(self.llama, "rope", None)
        if rope is not None:
            return {"n_ctx_train": rope.n_ctx_train, "rope_freq_base": rope.rope_freq_base,
                    "rope_freq_scale": rope.rope_freq_scale, "rope_scaling": rope.source}
        hp = getattr(self.model, "hparams", None)
        if hp is None:
            return {}
        return {"n_ctx_train": int(hp.n_ctx_train), "rope_freq_base": float(hp.rope_freq_base),
                "rope_freq_scale": float(hp.rope_freq_scale), "rope_scaling": "file"}
