"""ModelManager: the object the server is handed. It is an Engine that can change its model at run time.

Every Engine call (generate, abort, tokenize, perf, model_info, ...) goes to the engine of the loaded model, so the
adapters never notice a switch. `load(name)` replaces the model from the library:

1. the new file's header is read and its RAM need compared with the memory available (refused with
   `InsufficientMemory`, naming the mixes that would fit, unless running from disk is allowed);
2. new requests wait (or get `EngineBusy` when the waiting line is full) while requests in flight finish;
3. the new model is built, beside the old one when both fit in RAM, else after the old one is released;
4. the new engine takes over: its template, context size and vocabulary apply to the next request.

A load that fails leaves the previous model serving (rebuilt if it had to be released to make room).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
import math
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from airobackend.errors import (AiroError, EngineBusy, InsufficientMemory, ModelFileError, ModelNotLoaded,
                                RequestError)
from airobackend.library import GB, ModelEntry, ModelLibrary
from airobackend.settings import KV_CACHE_TYPES, Settings
from airobackend.types import FinishReason, GenerationEvent, GenerationRequest

log = logging.getLogger("airobackend.manager")

# Settings a load may override per model (text-generation-webui's `args`, KoboldCpp's config fields).
LOAD_OVERRIDES = ("n_ctx", "n_threads", "n_batch", "n_gqa", "rms_norm_eps", "rope_freq_base", "rope_freq_scale",
                  "template", "seed", "use_mmap", "cache_type_k", "cache_type_v")

_INT_OPTIONS = {"n_ctx": (16, 1 << 24), "n_threads": (0, 4096), "n_batch": (1, 1 << 16), "n_gqa": (1, 256),
                "seed": (-1, 2**63 - 1)}
_FLOAT_OPTIONS = {"rms_norm_eps": (1e-12, 1.0), "rope_freq_base": (1.0, 1e12), "rope_freq_scale": (1e-6, 1e3)}
_BOOL_OPTIONS = ("allow_disk", "abort_running", "use_mmap")

ProgressFn = Callable[[float], None]


def option_number(value: Any, where: str, lo: float, hi: float, integer: bool = False) -> float:
    """A number option (a number, or its text), checked against [lo, hi]; RequestError naming `where`."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"'{where}' must be a number, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{where}' must be a finite number, got {str(value)[:40]!r}")
    if integer and value != int(value):
        raise RequestError(f"'{where}' must be an integer, got {value}")
    if not lo <= value <= hi:
        raise RequestError(f"'{where}' must be between {lo:g} and {hi:g}, got {value}")
    return int(value) if integer else float(value)


def option_flag(value: Any, where: str) -> bool:
    """A true/false option (a bool, 0/1, or their text); RequestError naming `where`."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RequestError(f"'{where}' must be true or false, got {str(value)[:40]!r}")


Spelling = Callable[[Any, str], dict]          # (client's value, where) -> {our option name: value}


def renamed(name: str) -> Spelling:
    """A client's name for one of our options, with the same values."""
    return lambda value, where: {name: value}


def parse_load_options(args: Any, param: str = "args", spellings: Optional[Mapping[str, Spelling]] = None) -> dict:
    """`load()` keyword arguments from a client's options object, validated (RequestError naming the field).

    Takes our names (LOAD_OVERRIDES, allow_disk, abort_running). A protocol's own names for them are its adapter's
    business: `spellings` maps each to a function giving our options for its value (text-generation-webui's load
    `args`, KoboldCpp's config fields), and what it gives is checked as ours are, under the client's name. Options
    without meaning for a CPU engine (gpu layers, loader, wbits, ...) are ignored, as text-generation-webui ignores
    those a loader does not use.
    """
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise RequestError(f"'{param}' must be an object")
    out: dict = {}
    for key, value in args.items():
        if value is None:
            continue
        where = f"{param}.{key}"
        ours = spellings[key](value, where) if spellings and key in spellings else {key: value}
        for name, v in ours.items():
            _load_option(out, name, v, where)
    return out


def _load_option(out: dict, name: str, value: Any, where: str) -> None:
    if name in _INT_OPTIONS:
        out[name] = option_number(value, where, *_INT_OPTIONS[name], integer=True)
    elif name in _FLOAT_OPTIONS:
        out[name] = option_number(value, where, *_FLOAT_OPTIONS[name])
    elif name in _BOOL_OPTIONS:
        out[name] = option_flag(value, where)
    elif name == "template":
        if not isinstance(value, str):
            raise RequestError(f"'{where}' must be a template name")
        if value and value != "None":
            out[name] = value
    elif name in ("cache_type_k", "cache_type_v"):
        out[name] = _cache_type(value, where)


def _cache_type(value: Any, where: str) -> str:
    t = str(value).strip().lower() if isinstance(value, str) else None
    t = "f16" if t == "fp16" else t
    if t not in KV_CACHE_TYPES:
        raise RequestError(f"'{where}' must be one of {', '.join(KV_CACHE_TYPES)}, got {str(value)[:40]!r}")
    return t
EngineFactory = Callable[[ModelEntry, Settings, ProgressFn], tuple[Any, Any]]


def prompt_cache_bytes(settings: Settings) -> int:
    """RAM set aside for saved KV states (--prompt-cache-mb). The default (None) takes only what is free after the
    model is loaded (Engine._prompt_cache_budget), so it never makes a model that fits refuse to load."""
    mb = settings.prompt_cache_mb
    return max(0, int(mb)) << 20 if mb is not None else 0


def slots_bytes(entry: ModelEntry, settings: Settings) -> int:
    """RAM for the KV caches of the slots beyond the first (--parallel N): each holds a context of n_ctx tokens,
    what the estimate adds for n_ctx positions over one."""
    extra = max(1, int(settings.parallel)) - 1
    if not extra:
        return 0
    kv = (settings.cache_type_k, settings.cache_type_v)
    return extra * max(0, entry.ram_for(settings.n_ctx, *kv) - entry.ram_for(1, *kv))


def mem_available() -> int:
    """Bytes of memory available for a new model: MemAvailable of /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62     # unknown: do not refuse


def prefetch(paths: list[Path], progress: ProgressFn, lo: float = 0.0, hi: float = 1.0,
             chunk: int = 16 << 20) -> None:
    """Read the files once so their pages sit in the page cache, reporting progress from `lo` to `hi`.

    The model maps its file; without this the first generation would fault in gigabytes page by page and the
    load would show no progress at all. Reading is what takes the time of a load from disk.
    """
    total = sum(p.stat().st_size for p in paths) or 1
    buf = bytearray(chunk)
    done = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                done += n
                progress(lo + (hi - lo) * done / total)


def speculative_settings(settings: Settings) -> tuple[Optional[str], int]:
    """(draft model, lookup n-gram) to load with. Speculative decoding runs with one slot only: its verifying pass
    keeps every row of logits of one sequence, and the draft model holds one sequence's cache, while with
    --parallel N every step is one pass over all the slots' tokens. With N > 1 the draft model is not loaded (its
    RAM would serve nothing) and the log says so once per load."""
    asked = [flag for flag, on in (("--draftmodel", settings.draft_model), ("--lookup-ngram",
                                                                            (settings.lookup_ngram or 0) > 0)) if on]
    if int(settings.parallel or 1) > 1 and asked:
        log.warning("speculative decoding is off with --parallel %d (%s ignored): the slots share each forward pass "
                    "instead; use --parallel 1 to draft", settings.parallel, " and ".join(asked))
        return None, 0
    return settings.draft_model, int(settings.lookup_ngram or 0)


def build_engine(entry: ModelEntry, settings: Settings, progress: ProgressFn) -> tuple[Any, Any]:
    """The default engine factory: `Llama` over the file, `Engine` over the Llama. Returns (engine, llama).

    When the file fits in the memory available, it is read through first (progress 0..0.8), so the load shows
    progress and the first request runs at memory speed; a model run from disk (`allow_disk`) is not read ahead.
    """
    # Imported here, not at the top: they bring Numba, and the server imports this module (through the adapters)
    # before it has set Numba's cache folder and before the load that needs them.
    from airobackend.engine import Engine
    from airobackend.llama import Llama

    if settings.ray and settings.replicas:
        from airobackend.replicas import start_replicas     # the Ray extra, only with --ray
        return start_replicas(settings, entry.path), None
    if settings.ray:
        pass                # the head maps only the embeddings and the output; the stages read their own layers
    elif entry.weights_bytes <= mem_available():
        folder = Path(entry.path).parent
        prefetch([folder / part for part in entry.parts] or [Path(entry.path)], progress, 0.0, 0.8)
    draft_model, lookup_ngram = speculative_settings(settings)
    kwargs = dict(model_path=entry.path, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
                  n_batch=settings.n_batch, seed=settings.seed, n_gqa=settings.n_gqa,
                  rms_norm_eps=settings.rms_norm_eps, rope_freq_base=settings.rope_freq_base,
                  rope_freq_scale=settings.rope_freq_scale, verbose=False, type_k=settings.cache_type_k,
                  type_v=settings.cache_type_v, draft_model=draft_model, draft_n=settings.draft,
                  draft_p_min=settings.draft_p_min, lookup_ngram=lookup_ngram)
    params = inspect.signature(Llama).parameters
    if "progress_callback" in params:
        kwargs["progress_callback"] = lambda f: progress(0.8 + 0.15 * f)
    if "use_mmap" in params:
        kwargs["use_mmap"] = settings.use_mmap
    if settings.ray:
        kwargs.update(ray=settings.ray, stages=settings.stages, ray_options=dict(
            allow_disk=settings.allow_disk, cpus=settings.ray_cpus, restarts=settings.ray_restarts))
    llama = Llama(**kwargs)
    progress(0.95)
    # Every kernel compiled (or loaded from the cache) now, not during the first request, which would otherwise
    # wait 20-60 s on a first start with nothing said (SillyTavern and text-generation-webui look hung).
    llama.warmup(getattr(progress, "note", None))
    return Engine(llama, settings), llama


class _Held:
    """The event iterator of one generation; gives the manager its slot back when exhausted, closed or dropped."""

    def __init__(self, events: Iterator[GenerationEvent], release: Callable[[], None]) -> None:
        self._events, self._release, self._done = events, release, False
        # Held while a thread reads an event, so that an unload can tell a stream being read (it sees the abort
        # within a token) from one its caller holds but no longer reads (the unload closes it).
        self._reading = threading.RLock()

    def __iter__(self) -> "_Held":
        return self

    def __next__(self) -> GenerationEvent:
        with self._reading:
            try:
                return next(self._events)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        with self._reading:
            if self._done:
                return
            self._done = True
            try:
                close = getattr(self._events, "close", None)
                if close is not None:
                    close()
            finally:
                self._release()

    def close_if_idle(self) -> None:
        """Close the stream unless a thread is reading from it right now."""
        if self._reading.acquire(blocking=False):
            try:
                self.close()
            finally:
                self._reading.release()

    def __del__(self) -> None:
        self.close()


class ModelManager:
    """An Engine whose model can be listed, loaded, unloaded and switched while the server runs.

    `mem_available` and `engine_factory` are injectable for tests; `on_progress(name, fraction)` is called while a
    model loads (the console progress bar); `load_progress` is the same value for the status routes.
    """

    def __init__(self, settings: Settings, *, library: Optional[ModelLibrary] = None,
                 mem_available: Callable[[], int] = mem_available,
                 engine_factory: EngineFactory = build_engine,
                 on_progress: Optional[Callable[[str, float], None]] = None) -> None:
        self.settings = settings
        self.library = library or ModelLibrary(settings.model_dir, n_ctx=settings.n_ctx,
                                                 cache_types=(settings.cache_type_k, settings.cache_type_v),
                                                 template=settings.template)
        self._mem_available = mem_available
        self._factory = engine_factory
        self._on_progress = on_progress
        self._cond = threading.Condition()
        self._engine: Any = None
        self._llama: Any = None
        self._entry: Optional[ModelEntry] = None
        self._settings_used: Optional[Settings] = None
        self._active = 0              # generations holding the current engine
        self._held: "weakref.WeakSet[_Held]" = weakref.WeakSet()   # their streams, closed by an aborting unload
        self._waiting = 0             # generations waiting for a load to finish
        self._waiting_keys: dict[str, bool] = {}   # their genkeys / request ids -> aborted?
        self._loading: Optional[str] = None   # name of the model being loaded
        self._progress = 0.0
        self._startup_name: Optional[str] = None
        self.last_error: Optional[str] = None

    # ------------------------------------------------------------------ management

    @property
    def loaded_name(self) -> Optional[str]:
        """Library name of the model serving now (None when none)."""
        e = self._entry
        return e.name if e is not None and self._engine is not None else None

    @property
    def loading_name(self) -> Optional[str]:
        return self._loading

    @property
    def load_progress(self) -> float:
        """0..1 while a model loads; 1.0 when one is loaded and idle, 0.0 when none."""
        if self._loading is not None:
            return self._progress
        return 1.0 if self._engine is not None else 0.0

    @property
    def loaded_entry(self) -> Optional[ModelEntry]:
        return self._entry if self._engine is not None else None

    def list_models(self, include_unreadable: bool = False) -> list[dict]:
        """The library: one dict per loadable model file (ModelEntry.to_dict, without paths), `loaded` set on the
        one serving. `include_unreadable` adds the files that cannot be loaded, with their `error`."""
        current = self.loaded_name
        out = []
        for e in self.library.scan():
            if e.loadable or include_unreadable:
                d = e.to_dict()
                d["loaded"] = e.name == current
                out.append(d)
        return out

    def register(self, path: str, name: Optional[str] = None) -> str:
        """Make a file outside the library folder loadable by name (the `--model` file, the demo model)."""
        return self.library.register(path, name)

    @property
    def startup_name(self) -> Optional[str]:
        """The first model loaded: the one the server started with (KoboldCpp's 'initial_model')."""
        return self._startup_name

    def check_load(self, name: str, *, allow_disk: Optional[bool] = None, abort_running: bool = False,
                   **overrides: Any) -> tuple[ModelEntry, Settings, int]:
        """Everything `load` checks before it changes anything: the name, the options, the file's header and the
        RAM. Returns (entry, settings for it, bytes of RAM it needs); raises what `load` would raise."""
        with self._public_errors():
            return self._check_load(name, allow_disk=allow_disk, warn=False, **overrides)

    @contextlib.contextmanager
    def _public_errors(self) -> Iterator[None]:
        """Errors of a load reach clients: re-raise them with the library's file system paths replaced by names."""
        try:
            yield
        except AiroError as e:
            text = self.library.redact(str(e))
            if text == str(e):
                raise
            try:
                public = type(e)(text)
            except Exception:   # an error class with another constructor: keep it as it is
                raise e from None
            raise public from e

    def _check_load(self, name: str, *, allow_disk: Optional[bool], warn: bool,
                    **overrides: Any) -> tuple[ModelEntry, Settings, int]:
        unknown = set(overrides) - set(LOAD_OVERRIDES)
        if unknown:
            raise RequestError(f"unknown load option(s) {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(LOAD_OVERRIDES)}")
        entry = self.library.find(name)
        if not entry.loadable:
            raise ModelFileError(f"cannot load {entry.name}: {entry.error}")
        settings = dataclasses.replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})
        if settings.n_ctx <= 0:
            raise RequestError(f"n_ctx must be positive, got {settings.n_ctx}")
        if settings.template:
            from airobackend.chat import get_template    # start-up: the CLI imports this module for its flags
            get_template(settings.template)          # RequestError naming the known templates
        settings = dataclasses.replace(settings, **{f: _cache_type(getattr(settings, f), f)     # also from the
                                                    for f in ("cache_type_k", "cache_type_v")})   # environment
        # On Ray the nodes check their own share before anything is loaded (airobackend.cluster).
        need = 0 if settings.ray else entry.ram_for(settings.n_ctx, settings.cache_type_k, settings.cache_type_v)
        need += prompt_cache_bytes(settings) + (0 if settings.ray else slots_bytes(entry, settings))
        allow = self.settings.allow_disk if allow_disk is None else bool(allow_disk)
        room = self._room()
        if need > room:
            if not allow:
                raise InsufficientMemory(self._refusal(entry, need, room, settings))
            if warn:
                    log.warning("%s needs %.1f GB of RAM but %.1f GB is available: running from disk through mmap, "
                            "generation will be disk-bound (very slow)", entry.name, need / GB, room / GB)
        return entry, settings, need

    def load(self, name: str, *, allow_disk: Optional[bool] = None, abort_running: bool = False,
             **overrides: Any) -> ModelEntry:
        """Load `name` from the library and make it serve; returns its entry.

        Raises RequestError (unknown name or override), ModelFileError (unreadable file; nothing changes),
        InsufficientMemory (does not fit and `allow_disk` is off; nothing changes), EngineBusy (another load
        is running). `abort_running` aborts generations in flight instead of letting them finish.
        """
        job = self._begin_load(name, allow_disk, overrides)
        self._finish_load(*job, abort_running=abort_running)
        return job[0]

    def start_load(self, name: str, *, allow_disk: Optional[bool] = None, abort_running: bool = False,
                   **overrides: Any) -> ModelEntry:
        """`load` in a background thread: everything that refuses a load is raised here, and `loading_name` is
        set before this returns (a client polling right away sees the load); a failure after that is in
        `last_error`. KoboldCpp's reload_config answers this way."""
        job = self._begin_load(name, allow_disk, overrides)

        def work() -> None:
            try:
                self._finish_load(*job, abort_running=abort_running)
            except AiroError as e:      # recorded in last_error for the status routes
                log.error("loading %s failed: %s", job[0].name, e)

        threading.Thread(target=work, name="airo-model-load", daemon=True).start()
        return job[0]

    def _begin_load(self, name: str, allow_disk: Optional[bool],
                    overrides: dict) -> tuple[ModelEntry, Settings, bool]:
        """Checks, then marks the load as under way (new requests wait from now on). (entry, settings, beside_old)"""
        with self._cond:
            if self._loading is not None:
                raise EngineBusy(f"a model is already loading ({self._loading}); try again when it is ready")
            with self._public_errors():
                entry, settings, need = self._check_load(name, allow_disk=allow_disk, warn=True, **overrides)
            beside_old = need <= self._mem_available()
            self._loading, self._progress = entry.name, 0.0
        self._report(0.0)
        return entry, settings, beside_old

    def _finish_load(self, entry: ModelEntry, settings: Settings, beside_old: bool, *, abort_running: bool) -> None:
        try:
            with self._public_errors():
                self._switch(entry, settings, beside_old=beside_old, abort_running=abort_running)
            self.last_error = None
        except BaseException as e:
            self.last_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            with self._cond:
                self._loading = None
                self._cond.notify_all()
        if self._startup_name is None:
            self._startup_name = entry.name
        self._report(1.0, entry.name)

    def unload(self, *, abort_running: bool = False) -> None:
        """Release the model after the generations in flight finish; Engine calls then raise ModelNotLoaded."""
        with self._cond:
            if self._loading is not None:
                raise EngineBusy(f"a model is loading ({self._loading}); unload when it is ready")
            self._loading, self._progress = "", 0.0     # new requests wait, then find no model
        try:
            self._drain(abort_running)
            with self._cond:
                engine, llama = self._engine, self._llama
                self._engine = self._llama = self._entry = self._settings_used = None
            _close(engine, llama)
        finally:
            with self._cond:
                self._loading = None
                self._cond.notify_all()

    def close(self) -> None:
        """At exit: stop what runs and release the model; its engine writes its saved KV states to the
        prompt-cache folder, if one is set."""
        if self._engine is None:
            return
        try:
            self.unload(abort_running=True)
        except EngineBusy:           # a load is under way: nothing of this model's to keep yet
            pass

    # ------------------------------------------------------------------ the Engine interface

    def generate(self, req: GenerationRequest) -> Iterator[GenerationEvent]:
        """Events of one generation on the loaded model. Waits while a model loads (EngineBusy when too many
        wait); raises ModelNotLoaded when none is loaded. The engine's own errors are raised as it raises them."""
        engine = self._acquire(req)
        if engine is None:      # aborted while waiting for a load
            return iter([GenerationEvent(finish_reason=FinishReason.ABORTED)])
        try:
            events = iter(engine.generate(req))
        except BaseException:
            self._release()
            raise
        held = _Held(events, self._release)
        self._held.add(held)
        return held

    def embed(self, inputs: list, normalize: bool = True) -> list:
        """Engine.embed on the loaded model (waits while a model loads; the model cannot be switched under it)."""
        engine = self._acquire(GenerationRequest(tokens=[]))
        if engine is None:
            raise EngineBusy("the embedding request was cancelled while a model loaded")
        try:
            return engine.embed(inputs, normalize=normalize)
        finally:
            self._release()

    def abort(self, genkey: Optional[str] = None) -> bool:
        """Abort the running generation (or the one with this genkey / request id, running, queued or waiting
        for a load)."""
        with self._cond:
            if genkey and genkey in self._waiting_keys:
                self._waiting_keys[genkey] = True
                self._cond.notify_all()
                return True
        engine = self._engine
        return bool(engine.abort(genkey)) if engine is not None else False

    def tokenize(self, text, add_bos: bool = True) -> list[int]:
        return self._current().tokenize(text, add_bos=add_bos)

    def detokenize(self, ids) -> str:
        return self._current().detokenize(ids)

    def partial_text(self, genkey: Optional[str] = None) -> str:
        engine = self._engine
        return engine.partial_text(genkey) if engine is not None else ""

    def last_logprobs(self, genkey: Optional[str] = None) -> Optional[list]:
        engine = self._engine
        return engine.last_logprobs(genkey) if engine is not None else None

    def perf(self) -> dict:
        perf = dict(self._current().perf())
        perf["queue"] = int(perf.get("queue", 0)) + self._waiting
        return perf

    def model_info(self) -> dict:
        """The engine's model_info plus `library_name` (what list_models calls it) and `load_progress`."""
        info = dict(self._current().model_info())
        info["library_name"] = self.loaded_name
        if self.loaded_name:
            info["name"] = self.loaded_name      # one name in every protocol: the one list_models() shows
        info["load_progress"] = self.load_progress
        return info

    def format_chat(self, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        engine = self._current()
        return engine.format_chat(messages, tools=tools) if tools else engine.format_chat(messages)

    def save_slot(self, slot: int, filename: str) -> dict:
        return self._current().save_slot(slot, filename)

    def restore_slot(self, slot: int, filename: str) -> dict:
        return self._current().restore_slot(slot, filename)

    def erase_slot(self, slot: int) -> dict:
        return self._current().erase_slot(slot)

    def slots_info(self) -> list[dict]:
        return self._current().slots_info()

    def metrics(self) -> dict:
        return self._current().metrics()

    def __getattr__(self, name: str) -> Any:
        # Engine methods added after this class was written still reach the loaded engine.
        if name.startswith("_"):
            raise AttributeError(name)
        engine = self.__dict__.get("_engine")
        if engine is None:
            raise ModelNotLoaded("no model is loaded")
        return getattr(engine, name)

    # ------------------------------------------------------------------ internals

    def _current(self) -> Any:
        engine = self._engine
        if engine is None:
            if self._loading:
                raise ModelNotLoaded(f"no model is loaded: {self._loading} is loading "
                                     f"({self._progress:.0%})")
            raise ModelNotLoaded("no model is loaded")
        return engine

    def _queue_limit(self) -> int:
        # The same line length as the Engine's queue (Settings.multiuser: how many may wait; 0 = nobody).
        return max(0, int(self.settings.multiuser))

    def _acquire(self, req: GenerationRequest) -> Any:
        """The engine to run `req` on, counted as in use; None if `req` was aborted while it waited."""
        with self._cond:
            if self._loading is not None:
                if self._waiting >= self._queue_limit():
                    raise EngineBusy(f"Server is busy; a model is loading ({self._loading or 'unloading'})")
                keys = [k for k in (req.genkey, req.request_id) if k]
                self._waiting += 1
                for k in keys:
                    self._waiting_keys[k] = False
                try:
                    while self._loading is not None and not any(self._waiting_keys[k] for k in keys):
                        self._cond.wait()
                    if any(self._waiting_keys[k] for k in keys):
                        return None
                finally:
                    self._waiting -= 1
                    for k in keys:
                        self._waiting_keys.pop(k, None)
            if self._engine is None:
                raise ModelNotLoaded("no model is loaded")
            self._active += 1
            return self._engine

    def _release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _drain(self, abort_running: bool) -> None:
        """Wait until no generation holds the current engine (aborting them first when asked)."""
        with self._cond:
            while self._active:
                if abort_running:
                    if self._engine is not None:
                        self._engine.abort(None)
                    # A stream its caller keeps but stopped reading would hold the engine forever: close it here
                    # (outside the lock: closing releases, which takes it). One being read ends within a token.
                    held = list(self._held)
                    self._cond.release()
                    try:
                        for h in held:
                            h.close_if_idle()
                    finally:
                        self._cond.acquire()
                    if not self._active:
                        break
                self._cond.wait(timeout=0.05 if abort_running else None)

    def _switch(self, entry: ModelEntry, settings: Settings, *, beside_old: bool, abort_running: bool) -> None:
        self._drain(abort_running)
        with self._cond:
            old = (self._engine, self._llama, self._entry, self._settings_used)
        if old[0] is not None and not beside_old:
            with self._cond:
                self._engine = self._llama = self._entry = self._settings_used = None
            _close(old[0], old[1])
        try:
            engine, llama = self._factory(entry, settings, LoadProgress(self))
        except BaseException:
            if old[0] is not None and not beside_old:
                self._restore(old[2], old[3])
            raise
        with self._cond:
            self._engine, self._llama, self._entry, self._settings_used = engine, llama, entry, settings
        if beside_old and old[0] is not None:
            _close(old[0], old[1])
        log.info("model %s loaded (%s, %s, n_ctx %d)", entry.name, entry.mix, entry.size_class, settings.n_ctx)

    def _restore(self, entry: ModelEntry, settings: Settings) -> None:
        """Bring back the model that was released for a load that then failed."""
        try:
            engine, llama = self._factory(entry, settings, lambda f: None)
        except Exception as e:   # nothing more we can do: report both failures through the logs
            log.error("could not restore %s after a failed load: %s", entry.name, e)
            return
        with self._cond:
            self._engine, self._llama, self._entry, self._settings_used = engine, llama, entry, settings

    def _report(self, fraction: float, name: Optional[str] = None) -> None:
        self._progress = max(0.0, min(1.0, float(fraction)))
        if self._on_progress is not None:
            try:
                self._on_progress(name or self._loading or "", self._progress)
            except Exception:   # a broken progress bar must not break a load
                pass

    def _room(self) -> int:
        """Memory a new model may use: what is available now plus what the old model gives back at the switch.

        The old model's mmapped weights are page cache, which MemAvailable already counts as available, so only
        the rest of it (KV cache, buffers) is added back; without mmap all of it is.
        """
        room = self._mem_available()
        old, used = self.loaded_entry, self._settings_used
        if old is not None and used is not None:
            old_ram = (old.ram_for(used.n_ctx, used.cache_type_k, used.cache_type_v) + prompt_cache_bytes(used)
                       + slots_bytes(old, used))
            room += max(0, old_ram - old.weights_bytes if used.use_mmap else old_ram)
        return room

    def _refusal(self, entry: ModelEntry, need: int, avail: int, settings: Settings) -> str:
        n_ctx, types = settings.n_ctx, (settings.cache_type_k, settings.cache_type_v)
        cache = prompt_cache_bytes(settings)
        fits = [e for e in self.library.scan()
                if e.loadable and e.name != entry.name and e.ram_for(n_ctx, *types) + cache <= avail]
        # Same model family (parameter class) first, best quality (largest) first.
        fits.sort(key=lambda e: (e.size_class != entry.size_class, -e.ram_for(n_ctx, *types)))
        msg = (f"{entry.name} ({entry.size_class} {entry.mix}) needs {need / GB:.1f} GB of RAM for a "
               f"{n_ctx}-token context{_kv_note(types)}" + (f" and {cache / GB:.1f} GB of prompt cache "
                                                            f"(--prompt-cache-mb)" if cache else "")
               + f", but only {avail / GB:.1f} GB is available.")
        if fits:
            msg += " Mixes in the library that fit: " + ", ".join(
                f"{e.name} ({e.size_class} {e.mix}, {e.ram_for(n_ctx, *types) / GB:.1f} GB)" for e in fits[:6]) + "."
        else:
            msg += " No model in the library fits."
        if types == ("f16", "f16") and entry.ram_for(n_ctx, "q8_0", "q8_0") <= avail:
            msg += (f" With a q8_0 KV cache (--cache-type-k q8_0 --cache-type-v q8_0, or --quantkv 1) it needs "
                    f"{entry.ram_for(n_ctx, 'q8_0', 'q8_0') / GB:.1f} GB and fits.")
        msg += " To run it anyway from disk through mmap (generation will be disk-bound), allow disk (--allow-disk)."
        return msg


def _kv_note(types: tuple[str, str]) -> str:
    return "" if types == ("f16", "f16") else f" with a {types[0]}/{types[1]} KV cache"


def _close(engine: Any, llama: Any) -> None:
    for obj in (engine, llama):
        close = getattr(obj, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:
                log.warning("closing %s: %s", type(obj).__name__, e)
    gc.collect()


class LoadProgress:
    """What the engine factory gets: called with the fraction of the load done; `note(line, done)` reports the
    kernel warm-up (shown by the progress display when it has a `note` method, else logged)."""

    def __init__(self, manager: "ModelManager") -> None:
        self.manager = manager

    def __call__(self, fraction: float) -> None:
        self.manager._report(fraction)

    def note(self, line: str, done: bool) -> None:
        show = getattr(self.manager._on_progress, "note", None)
        if show is None:
            log.info("%s", line)
            return
        try:
            show(line, done)
        except Exception:   # a broken progress display must not break a load
            pass


class LineProgress:
    """Load progress as a few lines (each quarter of a load) through `write`: for a log or a host program's console,
    where a redrawn bar cannot be shown. Kernel warm-up notes go the same way."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self._shown = -1

    def __call__(self, name: str, fraction: float) -> None:
        quarter = int(fraction * 4)
        if quarter != self._shown:
            self._shown = quarter
            self.write(f"loading {name}: {int(fraction * 100)}%")

    def note(self, line: str, done: bool) -> None:
        self.write(line)


class ConsoleProgress:
    """A one-line progress bar on stderr for model loads: `loading NAME [#####.....] 50%`."""

    def __init__(self, stream=None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._last = -1

    def __call__(self, name: str, fraction: float) -> None:
        pct = int(fraction * 100)
        if pct == self._last:
            return
        self._last = pct
        filled = int(fraction * self.width)
        end = "\n" if pct >= 100 else ""
        self.stream.write(f"\rloading {name} [{'#' * filled}{'.' * (self.width - filled)}] {pct:3d}%{end}")
        self.stream.flush()
        if pct >= 100:
            self._last = -1

    def note(self, line: str, done: bool) -> None:
        """A line in place of the bar: kept when `done`, else replaced by the next line or the bar."""
        self.stream.write("\r\x1b[K" + line + ("\n" if done else ""))
        self.stream.flush()
        self._last = -1             # the bar is drawn again at the next fraction
