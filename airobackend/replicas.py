"""Replicas: N whole engines, each a Ray actor on its own node, behind one server (`serve --ray ADDR --replicas N`).

`ReplicaSet` is what the server and the adapters see in place of an Engine (the same methods: generate, abort,
partial_text, perf, tokenize, ...). A request goes to a free replica, preferring the one whose KV cache holds the
longest start of its prompt (a returning conversation: chat frontends resend the whole history, so the replica
that answered the last turn evaluates only the new tail). When every replica is busy, requests wait in one line of
Settings.multiuser places, as KoboldCpp's queue; more are refused busy. A genkey (or request id) stays with the
replica running it, so abort and check reach the right one.

A replica that dies ends its request with BackendUnavailable (the protocols' 503) and is left out of the rotation;
Ray restarts it (bounded by Settings.ray_restarts) and it is taken back once it answers. The others keep serving.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence

from airobackend.cluster import (ActorWatch, _actor_error_types, _on_bundle, _placement, check_reports, connect,
                                 node_path, node_report, probe_nodes, ray_module, release_placement, rss_bytes,
                                 watched_actor)
from airobackend.errors import BackendUnavailable, EngineBusy, RequestError
from airobackend.library import describe_file
from airobackend.manager import build_engine
from airobackend.types import FinishReason, GenerationEvent, GenerationRequest

log = logging.getLogger("airobackend.replicas")


class Replica:
    """One whole engine in a Ray actor (threaded: abort and check run beside a generation)."""

    def __init__(self, settings: Any, path: str) -> None:
        self.path = node_path(path)
        entry = describe_file(self.path, n_ctx=settings.n_ctx)
        self.engine, self.llama = build_engine(entry, settings, lambda f: None)
        self.instance = uuid.uuid4().hex

    def generate(self, req: GenerationRequest) -> Iterator[GenerationEvent]:
        gen = self.engine.generate(req)
        try:
            for ev in gen:
                yield ev
        finally:
            gen.close()

    def call(self, method: str, *args: Any, **kw: Any) -> Any:
        """An Engine method that returns at once (abort, partial_text, perf, tokenize, ...)."""
        if method.startswith("_") or method in ("generate",):
            raise RequestError(f"{method} cannot be called on a replica")
        return getattr(self.engine, method)(*args, **kw)

    def template(self) -> dict:
        """What the adapters read of the chat template (its name and default system prompt)."""
        t = self.engine.template
        return {"name": getattr(t, "name", None), "system": getattr(t, "system", "")}

    def info(self) -> dict:
        return {"instance": self.instance, "host": socket.gethostname(), "pid": os.getpid(), "rss": rss_bytes(),
                "running": self.engine.is_running(), "path": self.path}


def _shared(a: Any, b: Any) -> int:
    """Length of the common start of two prompts (strings or token lists)."""
    if a is None or b is None or type(a) is not type(b):
        return 0
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ReplicaSet:
    """Engines on Ray actors behind one interface (see the module docstring)."""

    def __init__(self, actors: Sequence[Any], hosts: Sequence[str], settings: Any, pg: Any = None) -> None:
        self.ray = ray_module()
        self._errors = _actor_error_types(self.ray)
        self.actors, self.hosts, self.settings, self.pg = list(actors), list(hosts), settings, pg
        n = len(self.actors)
        self._cond = threading.Condition()
        self._busy = [0] * n
        self._holds: list[Any] = [None] * n           # prompt + output of each replica's last generation
        self._used = [0.0] * n                         # when each was last chosen (least recently used first)
        self._down: dict[int, Any] = {}                 # replica -> pending ping (None: none sent yet)
        self._keys: dict[str, int] = {}                 # genkey / request id -> replica running it
        self._aborted: set[str] = set()                 # keys aborted while waiting for a replica
        self._waiting = 0
        self._last: Optional[int] = None
        self.n_batch = int(settings.n_batch)
        self._template: Any = None
        self.watch = ActorWatch(self.ray, self.actors, self._changed, name="ray-replica-watch")

    def _changed(self, i: int, info: Optional[dict]) -> None:
        """The watch saw replica i die (info None: out of rotation at once, not at its next request) or come back."""
        with self._cond:
            if info is None:
                self._down.setdefault(i, None)
                log.error("replica %d on %s died (%s)", i + 1, self.hosts[i],
                          "Ray restarts it" if self.watch.state[i] == "down" else "no restarts left")
            elif self._down.pop(i, False) is not False:
                log.info("replica %d on %s is back", i + 1, self.hosts[i])
            self._holds[i] = None                   # its cache is gone either way
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self.actors)

    # ---------------------------------------------------------------------------------------------- routing
    def _up(self) -> list[int]:
        """Replicas in rotation; a down one is taken back once its ping (sent now if none is pending) answers."""
        for i, ping in list(self._down.items()):
            if ping is None:
                self._down[i] = ping = self.actors[i].info.remote()
            ready, _ = self.ray.wait([ping], timeout=0)
            if ready:
                try:
                    self.ray.get(ping)
                    del self._down[i]
                    self._holds[i] = None           # a restarted replica's cache is empty
                    log.info("replica %d on %s is back", i + 1, self.hosts[i])
                except self._errors:
                    self._down[i] = None
        return [i for i in range(len(self)) if i not in self._down]

    def _choose(self, prompt: Any) -> Optional[int]:
        free = [i for i in self._up() if not self._busy[i]]
        if not free:
            return None
        return max(free, key=lambda i: (_shared(prompt, self._holds[i]), -self._used[i]))

    def _acquire(self, req: GenerationRequest) -> Optional[int]:
        prompt = req.prompt if req.prompt is not None else tuple(req.tokens or ())
        keys = [k for k in (req.genkey, req.request_id) if k]
        with self._cond:
            if not self._up():
                raise BackendUnavailable(f"all {len(self)} replicas are down (Ray is restarting them)")
            i = self._choose(prompt)
            if i is None:
                if self._waiting >= max(0, int(self.settings.multiuser)):
                    raise EngineBusy("Server is busy; please try again later.")
                self._waiting += 1
                try:
                    while i is None and not any(k in self._aborted for k in keys):
                        self._cond.wait(timeout=1.0)       # also wakes to take back a restarted replica
                        i = self._choose(prompt)
                finally:
                    self._waiting -= 1
                    for k in keys:
                        self._aborted.discard(k)
                if i is None:
                    return None
            self._busy[i] += 1
            self._used[i] = time.monotonic()
            self._last = i
            for k in keys:
                self._keys[k] = i
            return i

    def _release(self, i: int, req: GenerationRequest, held: Any) -> None:
        with self._cond:
            self._busy[i] -= 1
            self._holds[i] = held
            for k in (req.genkey, req.request_id):
                if k and self._keys.get(k) == i:
                    del self._keys[k]
            self._cond.notify_all()

    def _failed(self, i: int, e: BaseException) -> BackendUnavailable:
        with self._cond:
            self._down.setdefault(i, None)
            self._holds[i] = None
            self._cond.notify_all()
        why = f"replica {i + 1} of {len(self)} (node {self.hosts[i]}) failed: {type(e).__name__}"
        log.error("%s", why)
        return BackendUnavailable(why)

    # ------------------------------------------------------------------------------------------ the Engine interface
    def generate(self, req: GenerationRequest) -> Iterator[GenerationEvent]:
        if not isinstance(req, GenerationRequest):
            raise RequestError("generate() takes a GenerationRequest")
        if not req.request_id:          # a key to stop it on its replica by, should the reader go away
            req = dataclasses.replace(req, request_id="airo-" + uuid.uuid4().hex[:16])
        i = self._acquire(req)
        if i is None:
            return iter([GenerationEvent(finish_reason=FinishReason.ABORTED)])
        try:
            refs = self.actors[i].generate.options(num_returns="streaming").remote(req)
            # The first event carries the engine's own refusals (bad request, context overflow) before any output.
            first = self._next(i, refs)
        except BaseException:
            self._release(i, req, None)
            raise
        return self._events(i, req, refs, first)

    def _next(self, i: int, refs: Any) -> Optional[GenerationEvent]:
        try:
            return self.ray.get(next(refs))
        except StopIteration:
            return None
        except self._errors as e:
            raise self._failed(i, e) from None

    def _events(self, i: int, req: GenerationRequest, refs: Any, ev: Optional[GenerationEvent]) \
            -> Iterator[GenerationEvent]:
        text: list = []
        ok = False
        try:
            while ev is not None:
                text.extend(ev.token_ids if req.prompt is None else [ev.text])
                yield ev
                if ev.finish_reason is not None:
                    ok = True
                    break
                ev = self._next(i, refs)
        finally:
            if not ok and i not in self._down:       # the reader went away: stop the generation on its replica
                self.actors[i].call.remote("abort", req.request_id)
            held = (req.prompt + "".join(text)) if req.prompt is not None else tuple(req.tokens or ()) + tuple(text)
            self._release(i, req, held if ok else None)

    def embed(self, inputs: list, normalize: bool = True) -> list:
        return self._any("embed", inputs, normalize=normalize)

    def abort(self, genkey: Optional[str] = None) -> bool:
        with self._cond:
            if genkey and genkey not in self._keys:
                if self._waiting:
                    self._aborted.add(genkey)
                    self._cond.notify_all()
                    return True
                return False
            targets = [self._keys[genkey]] if genkey else [i for i in self._up() if self._busy[i]]
        return any(self._call(i, "abort", genkey) for i in targets)

    def partial_text(self, genkey: Optional[str] = None) -> str:
        with self._cond:
            i = self._keys.get(genkey, self._last) if genkey else self._last
        return self._call(i, "partial_text", genkey) if i is not None and i not in self._down else ""

    def is_running(self, genkey: Optional[str] = None) -> bool:
        with self._cond:
            return (genkey in self._keys) if genkey else any(self._busy)

    def last_logprobs(self, genkey: Optional[str] = None) -> Any:
        with self._cond:
            i = self._keys.get(genkey, self._last) if genkey else self._last
        return self._call(i if i is not None else self._up()[0], "last_logprobs", genkey)

    def perf(self) -> dict:
        """The counters of the replica that ran the last generation (KoboldCpp's /perf reports the last one), with
        the set's own queue and idle state."""
        with self._cond:
            i = self._last if self._last is not None and self._last not in self._down else None
        out = dict(self._call(i, "perf") if i is not None else self._any("perf"))
        with self._cond:
            out.update(queue=self._waiting, idle=not any(self._busy))
        return out

    @property
    def queue_length(self) -> int:
        return self._waiting

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._any("tokenize", text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._any("detokenize", list(ids))

    def format_chat(self, messages: Sequence[Any], tools: Any = None) -> str:
        return self._any("format_chat", list(messages), tools=tools) if tools else self._any("format_chat",
                                                                                               list(messages))

    def model_info(self) -> dict:
        info = dict(self._any("model_info"))
        info["replicas"] = len(self)
        return info

    @property
    def template(self) -> Any:
        """The replicas' chat template as the adapters read it (name, system)."""
        if self._template is None:
            with self._cond:
                up = self._up()
            if not up:
                raise BackendUnavailable(f"all {len(self)} replicas are down (Ray is restarting them)")
            self._template = SimpleNamespace(**self.ray.get(self.actors[up[0]].template.remote()))
        return self._template

    def save_slot(self, slot: int, filename: str) -> dict:
        raise RequestError("slot save/restore is not served with replicas: each replica holds its own cache")

    def restore_slot(self, slot: int, filename: str) -> dict:
        return self.save_slot(slot, filename)

    def erase_slot(self, slot: int) -> dict:
        return self.save_slot(slot, "")

    def slots_info(self) -> list[dict]:
        raise RequestError("GET /slots is not served with replicas: each replica has its own slots")

    def metrics(self) -> dict:
        raise RequestError("GET /metrics is not served with replicas: each replica keeps its own counters")

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every replica to be in rotation (a restarted one answering again)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._up()) < len(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)           # the watch tells when a replica is back
            return True

    def health(self) -> dict:
        """Each replica's state: up (answering), down (Ray restarting it or gone)."""
        with self._cond:
            up = self._up()
        pings = {i: self.actors[i].info.remote() for i in up}
        ready, _ = self.ray.wait(list(pings.values()), num_returns=len(pings), timeout=5)
        states = []
        for i in range(len(self)):
            ok = i in pings and pings[i] in ready
            if ok:
                try:
                    self.ray.get(pings[i])
                except self._errors as e:
                    self._failed(i, e)
                    ok = False
            states.append({"replica": i + 1, "node": self.hosts[i], "state": "up" if ok else "down"})
        n_up = sum(s["state"] == "up" for s in states)
        return {"status": "ok" if n_up == len(self) else ("degraded" if n_up else "error"), "replicas": states}

    def _call(self, i: int, method: str, *args: Any, **kw: Any) -> Any:
        try:
            return self.ray.get(self.actors[i].call.remote(method, *args, **kw))
        except self._errors as e:
            raise self._failed(i, e) from None

    def _any(self, method: str, *args: Any, **kw: Any) -> Any:
        with self._cond:
            up = self._up()
        if not up:
            raise BackendUnavailable(f"all {len(self)} replicas are down (Ray is restarting them)")
        return self._call(up[0], method, *args, **kw)

    def close(self) -> None:
        self.watch.close()
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        release_placement(self.ray, self.pg)


def start_replicas(settings: Any, path: str) -> ReplicaSet:
    """`settings.replicas` whole engines over `path` on the Ray cluster `settings.ray`, one per node where there are
    enough nodes: every node checked (file, code, RAM) before anything is loaded."""
    n = int(settings.replicas)
    if n < 1:
        raise RequestError(f"the replica count must be at least 1, not {n}")
    entry = describe_file(path, n_ctx=settings.n_ctx)
    ray = connect(settings.ray)
    head = node_report(path, 0)
    pg = _placement(ray, n, settings.ray_cpus, "replicas")
    actors: list = []
    try:
        names = [f"replica {i + 1}" for i in range(n)]
        reports = probe_nodes(ray, pg, path, [entry.ram_for(settings.n_ctx)] * n, names)
        check_reports(reports, head, path, settings.allow_disk, names)
        local = dataclasses.replace(settings, ray=None, replicas=0, stages=1)
        cls = watched_actor(ray, Replica)
        actors = [cls.options(num_cpus=settings.ray_cpus, max_restarts=settings.ray_restarts, max_task_retries=0,
                              max_concurrency=max(4, int(settings.multiuser) + 4), **_on_bundle(pg, i))
                  .remote(local, path) for i in range(n)]
        ray.get([a.info.remote() for a in actors])            # every engine loaded
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(pg)
        raise
    return ReplicaSet(actors, [r["host"] for r in reports], settings, pg)
