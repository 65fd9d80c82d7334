"""The generation engine: one model, one generation at a time, a queue in front, a prompt cache behind.

`Engine.generate(req)` validates the request, takes a place in the queue (or raises `EngineBusy`) and returns a
blocking iterator of `GenerationEvent`s: text deltas made of whole UTF-8 characters, then one last event with the
finish reason and the token counts. Servers run that iterator in a worker thread; `abort`, `partial_text` and `perf`
may be called from any other thread at any time.

What happens per request (engine.md sections 5.3, 6; protocols.md sections 2.3-2.5):
  * prompt cache: the tokens whose keys/values are in the model's KV cache are remembered; a new prompt that starts
    with the same tokens (chat frontends resend the whole history every turn) only evaluates the new tail;
  * context shift: when the context is full, BOS and the request's memory part are kept, the oldest half of the rest
    is dropped with `model.cache.remove` (llama.cpp main's n_keep / n_discard rule) and generation goes on;
  * stop strings: text that could be the start of a stop string is held back until it is decided, then trimmed or
    kept per request;
  * abort: a flag checked before every sampled token and every prompt batch, so a generation ends within one token.
"""
from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from airobackend.detok import IncrementalDecoder, StopStringMatcher
from airobackend.errors import ContextOverflowError, EngineBusy, RequestError
from airobackend.sampling import Sampler, validate_sampling
from airobackend.settings import Settings
from airobackend.types import FinishReason, GenerationEvent, GenerationRequest, SamplingParams

# A request asking for more than this many new tokens is a client bug, not a wish (even with context shift).
MAX_TOKENS_LIMIT = 1 << 20

# KoboldCpp's stop_reason codes for /api/extra/perf (expose.h): INVALID -1, OUT_OF_TOKENS 0, EOS_TOKEN_HIT 1,
# CUSTOM_STOPPER 2. An abort is reported as a custom stop, as KoboldCpp does.
STOP_REASON_CODES = {FinishReason.LENGTH: 0, FinishReason.EOS: 1, FinishReason.STOP: 2, FinishReason.ABORTED: 2}


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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Generation on one model: request queue, one generation slot, prompt cache, context shift, abort, counters."""

    def __init__(self, llama: Any, settings: Optional[Settings] = None) -> None:
        self.llama = llama
        self.settings = settings or Settings()
        self.model, self.tokenizer = llama.model, llama.tokenizer
        self.n_ctx = int(self.model.n_ctx)
        self.n_vocab = int(self.model.n_vocab)
        self.n_batch = max(1, int(getattr(self.model, "n_batch", 0) or self.settings.n_batch or 512))
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()   # admitted, not yet running, in order
        self._running: Optional[_Job] = None
        self._last: Optional[_Job] = None
        self._cache: list[int] = []     # tokens whose K/V sit in the model's cache at positions 0..len-1
        self._last_logits: Optional[np.ndarray] = None
        self._template = None
        now = time.monotonic()
        self._t_start = now
        self._t_idle_since = now
        self._perf: dict[str, Any] = dict(last_process=0.0, last_eval=0.0, last_token_count=0, last_seed=-1,
                                          total_gens=0, stop_reason=-1, last_input_count=0, last_process_count=0)

    # ---------------------------------------------------------------------------------------------- requests
    def generate(self, req: GenerationRequest) -> Generation:
        """Validate `req`, queue it and return the iterator of its events.

        Raises RequestError / ContextOverflowError for a bad request and EngineBusy when the queue is full, both
        before any event. The iterator blocks while earlier requests run.
        """
        job = self._prepare(req)
        with self._cond:
            in_line = len(self._queue) + (1 if self._running is not None else 0)
            if in_line > max(0, int(self.settings.multiuser)):
                raise EngineBusy("Server is busy; please try again later.")
            self._queue.append(job)
        return Generation(self, job)

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
            n_keep = _common_prefix(memory, tokens)
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
    def _run(self, job: _Job) -> Iterator[GenerationEvent]:
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
                aborted = True
            else:
                self._running = job
                job.started = True
                aborted = False
        if aborted:
            yield GenerationEvent(finish_reason=FinishReason.ABORTED, prompt_tokens=len(job.tokens))
            return
        try:
            self._sync_in()
            for event in self._generate(job):
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
            self._sync_out()
            job.finished = True
            if self._running is job:
                self._running = None
            self._last = job
            self._t_idle_since = time.monotonic()
            self._cond.notify_all()

    def _first_waiting(self) -> Optional[_Job]:
        return next((j for j in self._queue if j.waiting), None)

    def _forget(self, job: _Job) -> None:
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._cond.notify_all()

    # ---------------------------------------------------------------------------------------------- the loop
    def _sync_in(self) -> None:
        """Take the cache contents from the Llama facade (its low-level `eval` may have changed them)."""
        n, ids = getattr(self.llama, "n_tokens", None), getattr(self.llama, "input_ids", None)
        if isinstance(n, (int, np.integer)) and ids is not None:
            self._cache = [int(t) for t in ids[:n]]
        self._last_logits = None

    def _sync_out(self) -> None:
        """Tell the facade what is in the cache now (llama-cpp-python's input_ids / n_tokens / scores)."""
        n, ids = getattr(self.llama, "n_tokens", None), getattr(self.llama, "input_ids", None)
        if isinstance(n, (int, np.integer)) and ids is not None:
            k = len(self._cache)
            ids[:k] = self._cache
            self.llama.n_tokens = k
            scores = getattr(self.llama, "scores", None)
            if self._last_logits is not None and k and scores is not None:
                scores[k - 1] = self._last_logits

    def _eval(self, tokens: list[int], job: _Job) -> Optional[np.ndarray]:
        """Evaluate `tokens` after the cached ones, in n_batch chunks; the last row of logits, or None if aborted."""
        logits = None
        for start in range(0, len(tokens), self.n_batch):
            if job.abort.is_set():
                return None
            chunk = tokens[start:start + self.n_batch]
            out = self.model.eval(np.asarray(chunk, dtype=np.int32), len(self._cache))
            self._cache.extend(chunk)
            logits = self._last_logits = np.asarray(out)[-1]
        return logits

    def _shift(self, n_keep: int) -> bool:
        """Make room for one more token: drop the oldest half after the kept part. False if nothing can go."""
        n_past = len(self._cache)
        n_discard = (n_past - n_keep) // 2
        if n_discard < 1:
            return False
        self.model.cache.remove(n_keep, n_keep + n_discard, n_past)
        del self._cache[n_keep:n_keep + n_discard]
        return True

    def _resolve_seed(self, params: SamplingParams) -> int:
        seed = params.seed
        if seed is None or seed < 0:
            seed = self.settings.seed if self.settings.seed is not None and self.settings.seed >= 0 else -1
        if seed < 0:
            seed = random.SystemRandom().randrange(1 << 31)
        return int(seed)

    def _generate(self, job: _Job) -> Iterator[GenerationEvent]:
        req, tok = job.req, self.tokenizer
        eog = getattr(tok, "eog_ids", None) or {tok.eos_id}
        seed = self._resolve_seed(req.sampling)
        sampler = Sampler(req.sampling.replace(seed=seed), tokenizer=tok, n_vocab=self.n_vocab, n_ctx=self.n_ctx)
        decoder = IncrementalDecoder(tok)
        stops = StopStringMatcher(job.stop, trim=req.trim_stop)
        tokens = job.tokens
        if req.echo and job.prompt_text:
            job.text.append(job.prompt_text)
            yield GenerationEvent(text=job.prompt_text)
        t0 = time.perf_counter()

        # Prompt cache: keep the common prefix, evaluate the tail (at least the last token, for its logits).
        n_reuse = min(_common_prefix(self._cache, tokens), len(tokens) - 1)
        del self._cache[n_reuse:]
        logits = self._eval(tokens[n_reuse:], job)
        t1 = time.perf_counter()

        history = list(tokens)
        n_gen = 0
        pending_ids: list[int] = []
        logprobs: Optional[list[dict[str, Any]]] = [] if req.n_probs > 0 else None
        finish: FinishReason
        if logits is None:
            finish = FinishReason.ABORTED
        else:
            while True:
                if job.max_tokens >= 0 and n_gen >= job.max_tokens:
                    finish = FinishReason.LENGTH
                    break
                if job.abort.is_set():
                    finish = FinishReason.ABORTED
                    break
                lp = self._log_softmax(logits) if logprobs is not None else None   # before the sampler sees it
                tid = int(sampler.sample(logits, history))
                if logprobs is not None:
                    logprobs.append(self._logprob_entry(lp, tid, req.n_probs))
                if tid in eog:                     # EOS, or an end-of-turn token such as <|im_end|> / <|eot_id|>
                    finish = FinishReason.EOS
                    break
                n_gen += 1
                history.append(tid)
                pending_ids.append(tid)
                out, matched = stops.feed(decoder.feed(tid))
                if out:
                    job.text.append(out)
                    yield GenerationEvent(text=out, token_ids=tuple(pending_ids), logprobs=logprobs)
                    pending_ids = []
                    logprobs = [] if logprobs is not None else None
                if matched is not None:
                    finish = FinishReason.STOP
                    break
                if job.max_tokens >= 0 and n_gen >= job.max_tokens:
                    finish = FinishReason.LENGTH
                    break
                if len(self._cache) >= self.n_ctx:
                    # -1 means "until the context is full"; otherwise shift if the request allows it.
                    if job.max_tokens < 0 or not req.allow_context_shift or not self._shift(job.n_keep):
                        finish = FinishReason.LENGTH
                        break
                logits = self._eval([tid], job)
                if logits is None:
                    finish = FinishReason.ABORTED
                    break
        t2 = time.perf_counter()

        tail = ""
        if finish is not FinishReason.STOP:
            tail, matched = stops.feed(decoder.flush())
            if matched is not None:
                finish = FinishReason.STOP
            else:
                tail += stops.flush()
        if tail:
            job.text.append(tail)
        with self._cond:
            self._perf.update(last_process=t1 - t0, last_eval=t2 - t1, last_token_count=n_gen, last_seed=seed,
                              total_gens=self._perf["total_gens"] + 1, stop_reason=STOP_REASON_CODES[finish],
                              last_input_count=len(tokens), last_process_count=len(tokens) - n_reuse)
        yield GenerationEvent(text=tail, token_ids=tuple(pending_ids), finish_reason=finish,
                              prompt_tokens=len(tokens), completion_tokens=n_gen, logprobs=logprobs or None)

    @staticmethod
    def _log_softmax(logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float64)
        m = x.max()
        return x - (m + np.log(np.exp(x - m).sum()))

    def _logprob_entry(self, lp: np.ndarray, tid: int, n: int) -> dict[str, Any]:
        """Log-probabilities of the raw model distribution: the chosen token and the top `n`."""
        top = np.argpartition(-lp, n - 1)[:n] if n < lp.size else np.arange(lp.size)
        top = top[np.argsort(-lp[top], kind="stable")]
        piece = self.tokenizer.piece_text
        return {"id": tid, "token": piece(tid), "logprob": float(lp[tid]),
                "top_logprobs": [{"id": int(i), "token": piece(int(i)), "logprob": float(lp[i])} for i in top]}

    # ---------------------------------------------------------------------------------------------- other threads
    def abort(self, genkey: Optional[str] = None) -> bool:
        """Stop the running generation (or, given a key, the queued or running one whose genkey or request_id it is).

        The generation ends within one token with finish reason 'aborted'. A queued job that is aborted ends as soon
        as its turn comes, without running (KoboldCpp's deferred abort). Returns True if something was aborted.
        """
        with self._cond:
            if genkey:
                targets = [j for j in ([self._running] if self._running else []) + list(self._queue)
                           if genkey in (j.genkey, j.req.request_id)]
            else:
                targets = [self._running] if self._running else []
            for j in targets:
                j.abort.set()
            self._cond.notify_all()
            return bool(targets)

    def is_running(self, genkey: Optional[str] = None) -> bool:
        """Whether a generation (with that genkey, if given) is running now."""
        with self._cond:
            return self._running is not None and (not genkey or self._running.genkey == genkey)

    def partial_text(self, genkey: Optional[str] = None) -> str:
        """Text generated so far by the running (else the last) generation, for /api/extra/generate/check.

        With a genkey, only the job with that key is shown; without one, only a job that had no key, and only while
        nobody is waiting, so one user's text is never shown to another (KoboldCpp's rule).
        """
        with self._cond:
            job = self._running or self._last
            if job is None:
                return ""
            if genkey:
                ok = job.genkey == genkey
            else:
                ok = not job.genkey and not self._queue
            return "".join(job.text) if ok else ""

    def perf(self) -> dict[str, Any]:
        """Counters behind KoboldCpp's /api/extra/perf (times in seconds)."""
        with self._cond:
            now = time.monotonic()
            idle = self._running is None
            out = dict(self._perf)
            out.update(queue=len(self._queue), idle=1 if idle else 0, total_img_gens=0, hordeexitcounter=0,
                       uptime=now - self._t_start, idletime=(now - self._t_idle_since) if idle else 0.0,
                       quiet=bool(self.settings.quiet))
            return out

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
            from airobackend.chat import choose_template
            self._template = choose_template(self.settings.template, self.model_path, self._metadata())
        return self._template

    def format_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """Render chat messages with the model's template, ending with the open assistant turn."""
        return self.template.format(messages)

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
        """name, mix, n_ctx, n_vocab, template, path: what adapters show about the loaded model."""
        path = self.model_path
        mf = self._model_file()
        return {
            "name": Path(path).name if path else "model",   # the file name, as the model library lists it
            "path": path,
            "mix": getattr(mf, "mix_name", None),
            "format": getattr(mf, "format", None),
            "n_ctx": self.n_ctx,
            "n_vocab": self.n_vocab,
            "template": self.template.name,
        }
