"""More than one machine, on Ray: connecting to a cluster, checking every node before anything is loaded, and
placing pipeline stages (airobackend.pipeline) on the nodes.

Ray is an optional dependency (`pip install 'airobackend[ray]'`); nothing here imports it before it is asked for.

Before a stage is created on a node, a probe task placed on that node (the same placement-group bundle the stage
will get) reports the node's copy of the model file (present? its fingerprint), its airobackend version and code
digest, and the memory it has; the head refuses by name a node whose code or file differs from its own, whose
airobackend cannot run the probe at all (older), or that lacks the RAM its stage needs (unless running from disk is
allowed). A node's copy is at the head's path, or in the folder its environment names (AIRO_RAY_MODEL_DIR,
`node_path`).

Once running, every stage or replica actor is watched (`ActorWatch`): Ray tells the head the moment one dies, busy or
idle, and when it has restarted it, so health reports and routing do not wait for a request to fail.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import airobackend
from airobackend.errors import AiroError, BackendUnavailable, InsufficientMemory, ModelFileError, RequestError
from airobackend.formats import open_model
from airobackend.manager import mem_available

log = logging.getLogger("airobackend.cluster")

GB = 1e9
# Bytes hashed for a file's fingerprint: the start (header, metadata, tensor table) and 16 samples spread over the rest.
_HEAD_BYTES, _SAMPLES, _SAMPLE_BYTES = 4 << 20, 16, 64 << 10


class ClusterError(AiroError):
    """The Ray cluster cannot be used as asked: unreachable, too few nodes, a node that differs from the head."""


def ray_module() -> Any:
    """The `ray` module, or ClusterError saying how to install it."""
    try:
        import ray          # the optional [ray] extra, imported where it is used
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'airobackend[ray]'") from None
    return ray


def fingerprint(path: str) -> str:
    """A digest of a model file that tells two copies apart without reading all of it: its size, its first 4 MiB
    (header, metadata, tensor table) and 16 samples of 64 KiB spread over the rest."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
        for k in range(_SAMPLES):
            f.seek(size * (2 * k + 1) // (2 * _SAMPLES))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def code_digest() -> str:
    """A digest of the airobackend package's Python files: nodes that run different code are told apart even when
    the version number is the same (an editable install at another commit)."""
    root = Path(airobackend.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def resident(model_path: Optional[str] = None) -> dict:
    """This process's resident memory by kind (Linux /proc/self/smaps; zeros elsewhere), in bytes: 'model' (pages
    of the model file's mapping, weights read in place), 'files' (other file mappings: the interpreter, NumPy,
    llvmlite and the other shared libraries, code shared with every process that maps them) and 'anon' (private
    memory: the heap, NumPy arrays, weights copied into the kernels' layout, KV caches, Numba's loaded code)."""
    out = {"model": 0, "files": 0, "anon": 0}
    real = os.path.realpath(model_path) if model_path else None
    kind = "anon"
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 6)
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:       # a mapping's header line
                    name = head[5].strip() if len(head) > 5 else ""
                    kind = "anon" if not name.startswith("/") else ("model" if name == real else "files")
                elif head[0] == "Rss:":
                    out[kind] += int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


NODE_MODEL_DIR = "AIRO_RAY_MODEL_DIR"


def node_path(path: str) -> str:
    """This node's copy of the model file `path`: the file of the same name in the folder AIRO_RAY_MODEL_DIR names,
    where that is set in this node's environment (the environment of its `ray start`), else `path` itself. The
    copies' contents are checked against the head's (fingerprint) before anything is loaded."""
    folder = os.environ.get(NODE_MODEL_DIR)
    return os.path.join(folder, os.path.basename(path)) if folder else path


def ray_node_id() -> Optional[str]:
    """The ID of the Ray node this process runs on (None outside Ray): it tells apart nodes that share a host name
    (several raylets on one machine, containers of one image)."""
    ray = sys.modules.get("ray")            # never imported here: inside Ray it is imported already
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def node_report(path: str, need_bytes: int) -> dict:
    """What a node says about itself before a stage or replica is placed on it (run there by a probe task)."""
    local = node_path(path)
    out = {"host": socket.gethostname(), "node": ray_node_id(), "version": airobackend.__version__,
           "code": code_digest(), "mem_available": mem_available(), "need": int(need_bytes), "file": None,
           "error": None, "path": local}
    try:
        out["file"] = fingerprint(local)
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e.strerror or e}"
    return out


def check_reports(reports: Sequence[dict], head: dict, path: str, allow_disk: bool, what: Sequence[str]) -> None:
    """Refuse, naming the node, when a node's version or code differs from the head's (checked first: what the
    rest of a report means is only known for the head's code), its file differs, or its RAM is short."""
    for r, name in zip(reports, what):
        where = f"{name} on node {r['host']}" + (f" (Ray node {r['node'][:12]})" if r.get("node") else "")
        if (r.get("version"), r.get("code")) != (head["version"], head["code"]):
            raise ClusterError(f"{where} runs airobackend {r.get('version')} (code {r.get('code')}), the head "
                               f"{head['version']} (code {head['code']}): install the same version on every node")
        local = r.get("path", path)
        if r["error"]:
            raise ModelFileError(f"{where} cannot read the model file at {local}: {r['error']}", path=path)
        if r["file"] != head["file"]:
            raise ModelFileError(f"{where} has a different model file at {local} (fingerprint {r['file']}, the "
                                 f"head's {head['file']})", path=path)
        if r["need"] > r["mem_available"] and not allow_disk:
            raise InsufficientMemory(f"{where} needs {r['need'] / GB:.2f} GB of RAM, but only "
                                     f"{r['mem_available'] / GB:.2f} GB is available there (allow disk to run it "
                                     f"from disk anyway)")


def probe_nodes(ray: Any, pg: Any, path: str, needs: Sequence[int], what: Sequence[str]) -> list[dict]:
    """`node_report` run on the node of each bundle of `pg` (the one the stage or replica `what[i]` will get). A node
    whose airobackend cannot run it (a version from before this check, a broken install) is refused by name."""
    probe = ray.remote(num_cpus=0)(node_report)
    refs = [probe.options(**_on_bundle(pg, i)).remote(path, need) for i, need in enumerate(needs)]
    reports = []
    for i, ref in enumerate(refs):
        try:
            reports.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            from ray.util.placement_group import placement_group_table     # the [ray] extra
            node = placement_group_table(pg)["bundles_to_node_id"].get(i) or "?"
            host = next((nd["NodeManagerHostname"] for nd in ray.nodes() if nd["NodeID"] == node), "?")
            why = str(getattr(e, "cause", None) or e).strip().splitlines()[-1]
            raise ClusterError(f"{what[i]} on node {host} (Ray node {node[:12]}) cannot run the head's node check "
                               f"({why}): install the same version on every node") from None
    return reports


def connect(address: str, *, num_cpus: Optional[int] = None, object_store_bytes: Optional[int] = None) -> Any:
    """Connect this process to the Ray cluster at `address` ('host:port' of `ray start --head`, 'auto', or 'local'
    for a cluster of this machine alone). An address that does not answer is refused at once, not retried."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    if address == "local":
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_bytes, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        return ray
    if address != "auto":
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "6379")
        host = host.strip("[]") or "127.0.0.1"
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {e} (start one with `ray start --head`)")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return ray


def _actor_error_types(ray: Any) -> tuple:
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "ActorUnavailableError", "ActorDiedError", "GetTimeoutError",
                                          "ObjectLostError", "OwnerDiedError") if hasattr(ex, n))


class RayStages:
    """The transport of a StagedModel whose stages are Ray actors: a handle is an ObjectRef, passed on as it is, so
    a stage's output travels to the next stage's node without coming back to the head."""

    def __init__(self, actors: list, ranges: Sequence[tuple[int, int]], hosts: Sequence[str], pg: Any = None) -> None:
        self.ray = ray_module()
        self.actors, self.ranges, self.hosts, self.pg = actors, list(ranges), list(hosts), pg
        self._errors = _actor_error_types(self.ray)
        self.watch = ActorWatch(self.ray, actors, self._changed, name="ray-stage-watch")

    def _changed(self, i: int, info: Optional[dict]) -> None:
        if info is None:
            log.error("%s died (%s)", self.name(i),
                      "Ray restarts it" if self.watch.state[i] == "down" else "no restarts left")
        else:
            log.info("%s is back (restarted by Ray, its cache empty)", self.name(i))

    def state(self, i: int) -> str:
        """'up', 'down' (Ray restarting it) or 'dead' (no restarts left), as the watch last saw stage i."""
        return self.watch.state[i]

    def __len__(self) -> int:
        return len(self.actors)

    def name(self, i: int) -> str:
        lo, hi = self.ranges[i]
        return f"stage {i + 1} of {len(self.actors)} (layers {lo}-{hi - 1}, node {self.hosts[i]})"

    def submit(self, i: int, method: str, *args: Any) -> Any:
        return getattr(self.actors[i], method).remote(*args)

    def get(self, handles: Any, timeout: Optional[float] = None) -> Any:
        """ray.get, with a dead, restarting or silent stage reported as BackendUnavailable naming it."""
        try:
            return self.ray.get(handles, timeout=timeout)
        except BackendUnavailable:
            raise
        except self._errors as e:
            raise self._unavailable(e) from None

    def _unavailable(self, e: BaseException) -> BackendUnavailable:
        i = self._which(e)
        what = self.name(i) if i is not None else "a stage"
        how = "does not answer" if isinstance(e, self.ray.exceptions.GetTimeoutError) else "failed"
        return BackendUnavailable(f"{what} {how} ({type(e).__name__}); Ray restarts a failed stage, the next "
                                  f"request evaluates the prompt again")

    def _which(self, e: BaseException) -> Optional[int]:
        ids = [a._actor_id.hex() for a in self.actors]
        got = getattr(e, "actor_id", None)
        if got in ids:
            return ids.index(got)
        text = str(e)
        return next((i for i, a in enumerate(ids) if a in text), None)

    def close(self) -> None:
        self.watch.close()
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:   # already gone
                pass
        release_placement(self.ray, self.pg)


def _placement(ray: Any, n: int, cpus: float, what: str) -> Any:
    """A placement group of n one-stage bundles, each on its own node where there are enough nodes."""
    from ray.util.placement_group import placement_group        # the [ray] extra

    nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
    strategy = "STRICT_SPREAD" if len(nodes) >= n else "SPREAD"
    if strategy != "STRICT_SPREAD":
        log.warning("%d %s on %d node(s): some share a machine", n, what, len(nodes))
    pg = placement_group([{"CPU": cpus}] * n, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=60)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise ClusterError(f"the Ray cluster cannot place {n} {what} of {cpus:g} CPU each ({len(nodes)} node(s) "
                           f"alive, strategy {strategy})")
    return pg


def release_placement(ray: Any, pg: Any) -> None:
    """Give a placement group's CPUs back, without waiting: the call blocks while the cluster is going away (the
    server shutting down), and a job's groups are released when it ends anyway."""
    def remove() -> None:
        try:
            ray.util.remove_placement_group(pg)
        except Exception:   # the cluster is gone already
            pass
    if pg is not None:
        threading.Thread(target=remove, name="release-placement", daemon=True).start()


def _on_bundle(pg: Any, i: int) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy     # the [ray] extra
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}


def watched_actor(ray: Any, cls: type) -> Any:
    """The Ray actor class of `cls` (which has an `info` method) with two more concurrency groups beside its own
    work: `info` answered in 'probe' (health checks do not wait for a running forward pass or generation) and
    `watch`, a call that never returns, in 'watch' (ActorWatch keeps one pending, which Ray fails the moment the
    actor's process dies)."""

    class Watched(cls):     # type: ignore[valid-type,misc]
        @ray.method(concurrency_group="probe")
        def info(self) -> dict:
            return cls.info(self)

        @ray.method(concurrency_group="watch")
        def watch(self) -> None:
            threading.Event().wait()

    Watched.__name__ = Watched.__qualname__ = cls.__name__ + "Actor"
    return ray.remote(concurrency_groups={"probe": 1, "watch": 1})(Watched)


class ActorWatch:
    """Notices, without waiting for a request, that an actor died or that Ray restarted it.

    A `watch` call is kept pending on each live actor: Ray fails it as soon as the actor's process dies. A dead
    actor is then sent an `info` call, which Ray holds until it has restarted the actor (and fails at once when it
    will not: no restarts left). One thread waits on all of these; `on_change(i, info)` runs in it with the
    restarted actor's info, or None when actor i died. `state[i]` is 'up', 'down' (Ray restarting it) or 'dead'."""

    def __init__(self, ray: Any, actors: Sequence[Any], on_change: Any, name: str = "ray-watch") -> None:
        self.ray, self.actors, self.on_change = ray, list(actors), on_change
        self._errors = _actor_error_types(ray)
        self.state = ["up"] * len(self.actors)
        self.deaths = [0] * len(self.actors)            # deaths seen, per actor
        self.infos: list[Optional[dict]] = [None] * len(self.actors)   # what each said when it came back
        self._cond = threading.Condition()
        self._pending: dict[Any, tuple[int, str]] = {}
        self._closed = False
        for i in range(len(self.actors)):
            self._arm(i, "watch")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _arm(self, i: int, kind: str) -> None:
        actor = self.actors[i]
        self._pending[(actor.watch if kind == "watch" else actor.info).remote()] = (i, kind)

    def _run(self) -> None:
        while not self._closed and self._pending:
            try:
                ready, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=None)
            except Exception:       # Ray is shutting down
                return
            for ref in ready:
                i, kind = self._pending.pop(ref)
                if self._closed:
                    return
                try:
                    got = self.ray.get(ref)
                except self._errors as e:
                    if kind == "watch":                     # it died: its info answers once Ray restarted it
                        self._arm(i, "info")
                        self._set(i, "down", None)
                    elif isinstance(e, getattr(self.ray.exceptions, "ActorUnavailableError", ())):
                        self._arm(i, "info")                # not reachable yet: the call waits for it again
                    else:
                        self._set(i, "dead", None)          # no restarts left (Ray fails calls to it at once)
                    continue
                except Exception:       # Ray is shutting down
                    return
                if kind == "info":
                    self._arm(i, "watch")
                    self._set(i, "up", got)

    def _set(self, i: int, state: str, info: Optional[dict]) -> None:
        with self._cond:
            if state != "up" and self.state[i] == "up":
                self.deaths[i] += 1
            self.state[i] = state
            if info is not None:
                self.infos[i] = info
            self._cond.notify_all()
        try:
            self.on_change(i, info)
        except Exception:       # a broken callback must not stop the watch
            log.exception("actor watch callback failed")

    def wait(self, predicate: Any, timeout: Optional[float] = None) -> bool:
        """Wait until predicate(self) holds (checked at each change the watch sees); False after `timeout` s."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def close(self) -> None:
        """Stop watching (the actors are killed after this: their pending calls fail and end the thread)."""
        self._closed = True


def start_stages(address: str, path: str, n_stages: int, *, n_ctx: int, n_threads: int = 0, n_batch: int = 512,
                 type_k: str = "f16", type_v: str = "f16", file_options: Optional[dict] = None,
                 allow_disk: bool = False, cpus: float = 1.0, restarts: int = 3, kernels: Optional[str] = None) -> Any:
    """A StagedModel over `path` with `n_stages` stages placed on the Ray cluster at `address` (see `connect`):
    every node checked (file, code, RAM) before anything is loaded; a stage that dies is restarted by Ray up to
    `restarts` times. The head (this process) maps only the embeddings, final norm and output matrix."""
    from airobackend.pipeline import StagedModel, split_layers, stage_ram      # (a cycle at the top)

    options = dict(file_options or {})
    mf = open_model(path, **options)
    transport = None
    try:
        ranges = split_layers(mf.hparams.n_layer, n_stages)
        ray = connect(address)
        kw = dict(n_ctx=n_ctx, n_batch=n_batch, type_k=type_k, type_v=type_v, kernels=kernels)
        needs = [stage_ram(mf, lo, hi, n_ctx=n_ctx, n_batch=n_batch, type_k=type_k, type_v=type_v)
                 for lo, hi in ranges]
        head = node_report(path, 0)
        pg = _placement(ray, n_stages, cpus, "stages")
        try:
            names = [f"stage {i + 1} (layers {lo}-{hi - 1})" for i, (lo, hi) in enumerate(ranges)]
            reports = probe_nodes(ray, pg, path, needs, names)
            check_reports(reports, head, path, allow_disk, names)
        except BaseException:
            ray.util.remove_placement_group(pg)
            raise
        from airobackend.pipeline import Stage     # here: pipeline imports this module (a cycle at the top)
        cls = watched_actor(ray, Stage)
        actors = [cls.options(num_cpus=cpus, max_restarts=restarts, max_task_retries=0, **_on_bundle(pg, i))
                  .remote(path, lo, hi, n_threads=n_threads, file_options=options, **kw)
                  for i, (lo, hi) in enumerate(ranges)]
        transport = RayStages(actors, ranges, [r["host"] for r in reports], pg)
        transport.get([a.warmup.remote() for a in actors])
        model = StagedModel(mf, transport, ranges, n_threads=n_threads, **kw)
    except BaseException:
        if transport is not None:
            transport.close()
        mf.close()
        raise
    for i, (r, need) in enumerate(zip(reports, needs)):
        log.info("%s: %.2f GB of RAM needed, %.2f GB available", transport.name(i), need / GB,
                 r["mem_available"] / GB)
    return model
