"""Pipeline stages: a model's layers split into contiguous ranges, each range held and evaluated by a `Stage`.

A stage maps only its own layers' tensors from the model file and keeps the KV cache of those layers. `StagedModel` is
the LlamaModel the engine sees: it keeps the token embeddings, the final norm and the output matrix (the head), and
sends the residual stream [n, n_embd] through the stages in order, so the generation loop, the prompt cache and the
context shift work unchanged. Its `cache` is a `StagedCache`, which does each KV cache operation (move, remove,
snapshot, restore, ...) on every stage for the stage's layers.

How calls reach the stages is a *transport*: `LocalStages` calls Stage objects in this process (what the tests
compare against), airobackend.cluster's `RayStages` calls Ray actors on other machines. A transport has
`submit(i, method, *args)` (returns a handle; a handle may be passed as an argument of a later submit, so one
stage's output goes to the next without coming back to the head) and `get(handle or list)`.

A batch is sent in micro-chunks of rows: stage 1 works on chunk 2 while stage 2 works on chunk 1. Each chunk's rows
attend to the earlier chunks' entries, which the stage has stored before (a stage runs its calls in order).
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Any, Optional, Sequence

import numpy as np

from airobackend.cluster import node_path, resident, rss_bytes
from airobackend.errors import BackendUnavailable, RequestError
from airobackend.formats import SCRATCH_OVERHEAD, open_model
from airobackend.kvcache import KVCache, KVSnapshot, snapshot_mismatch
from airobackend.model import LlamaModel, _EveryLayerIn

SCRATCH = -1        # cache id of the one-layer scratch cache hidden_states() uses
RESTART_WAIT = 120.0    # seconds a request waits for a stage that Ray is restarting (it reloads its layers)


def split_layers(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """`n_stages` contiguous layer ranges [lo, hi) covering 0..n_layer, sizes differing by at most one (the later
    stages get the extra layers: the first stage often shares its machine with the head's embeddings and output)."""
    n_layer, n_stages = int(n_layer), int(n_stages)
    if n_stages < 1:
        raise RequestError(f"the stage count must be at least 1, not {n_stages}")
    if n_stages > n_layer:
        raise RequestError(f"{n_stages} stages for a model of {n_layer} layers: a stage needs at least one layer")
    base, extra = divmod(n_layer, n_stages)
    out, lo = [], 0
    for i in range(n_stages):
        hi = lo + base + (1 if i >= n_stages - extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class Stage:
    """Layers [lo, hi) of a model file and their KV caches (one per cache id; id 0 is the engine's).

    Args:
        path: the model file (this machine's copy: airobackend.cluster.node_path).
        lo, hi: the layer range.
        n_ctx, n_threads, n_batch, kernels, type_k, type_v: as LlamaModel.
        file_options: open_model's overrides (n_gqa, rms_norm_eps, rope_freq_base, rope_freq_scale).
    """

    def __init__(self, path: str, lo: int, hi: int, *, n_ctx: int, n_threads: int = 0, n_batch: int = 512,
                 kernels: Optional[str] = None, type_k: str = "f16", type_v: str = "f16",
                 file_options: Optional[dict] = None) -> None:
        self.rss_start = rss_bytes()            # the process before the layers: what the layers add is told apart
        self.path, self.lo, self.hi = node_path(str(path)), int(lo), int(hi)
        self.resident_start = self.resident()
        self.mf = open_model(self.path, **(file_options or {}))
        try:
            self.model = LlamaModel(self.mf, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, kernels=kernels,
                                    layers=(self.lo, self.hi), head=False, type_k=type_k, type_v=type_v)
        except BaseException:
            self.mf.close()
            raise
        self.caches: dict[int, KVCache] = {0: self.model.cache}
        self.instance = uuid.uuid4().hex      # changes when the stage is rebuilt (its caches are then empty)
        self.busy_s = 0.0                     # seconds spent in forward passes (what the transport is told from)

    def info(self) -> dict:
        """What the head checks and shows: this stage's instance, layers, pid and resident memory."""
        return {"instance": self.instance, "layers": (self.lo, self.hi), "pid": os.getpid(), "path": self.path,
                "rss": rss_bytes(),
                "rss_start": self.rss_start, "busy_s": self.busy_s,
                "cache_bytes": sum(c.nbytes for c in self.caches.values())}

    def resident(self) -> dict:
        """This process's resident memory by kind (airobackend.cluster.resident) and its KV caches' bytes."""
        out = resident(self.path)
        out["kv"] = sum(c.nbytes for c in getattr(self, "caches", {}).values())
        return out

    def resident_at_start(self) -> dict:
        """resident() as it was before this stage loaded anything (the process of a stage holding no layers)."""
        return self.resident_start

    def warmup(self) -> None:
        """Compile (or load from the on-disk cache) the kernels this stage uses; its caches are left empty."""
        d = self.model.n_embd
        for n in (1, 2):
            self.forward(self.instance, np.zeros((n, d), np.float32), [(0, n)], 0, 0)
        self.caches[0].truncate(0)

    def forward(self, instance: str, x: np.ndarray, spans: Sequence[tuple[int, int]], cache_id: int,
                keep: int) -> np.ndarray:
        """The residual stream x [n, d] after this stage's layers, for `spans` [(start position, rows), ...] in row
        order, with keys and values into cache `cache_id` (SCRATCH: a one-layer scratch cache, as hidden_states).
        Returns all rows (keep < 0) or the last `keep` rows. `instance` is the one the caller loaded: a stage that
        was rebuilt since refuses, as its caches no longer hold what the caller thinks."""
        self._check(instance)
        t0 = time.perf_counter()
        x = np.array(x, dtype=np.float32, order="C")          # received arrays are read-only
        cache: Any = self.model.scratch_cache(x.shape[0]) if cache_id == SCRATCH else self._cache(cache_id)
        x = self.model.run_layers(x, [(int(s), int(n)) for s, n in spans], cache)
        self.busy_s += time.perf_counter() - t0
        return x if keep < 0 else x[x.shape[0] - keep:].copy()

    def cache_call(self, instance: str, cache_id: int, op: str, *args: Any) -> Any:
        """A KVCache operation on this stage's layers: move, remove, truncate, snapshot, restore."""
        self._check(instance)
        if op not in ("move", "remove", "truncate", "snapshot", "restore"):
            raise RequestError(f"unknown cache operation {op!r}")
        return getattr(self._cache(cache_id), op)(*args)

    def new_cache(self, instance: str, cache_id: int, n_ctx: int, type_k: str, type_v: str) -> None:
        self._check(instance)
        self.caches[int(cache_id)] = self.model.new_cache(n_ctx, type_k=type_k, type_v=type_v)

    def drop_cache(self, instance: str, cache_id: int) -> None:
        if instance == self.instance and cache_id:
            self.caches.pop(int(cache_id), None)

    def _cache(self, cache_id: int) -> KVCache:
        try:
            return self.caches[int(cache_id)]
        except KeyError:
            raise BackendUnavailable(f"stage {self.lo}-{self.hi - 1} has no cache {cache_id}") from None

    def _check(self, instance: str) -> None:
        if instance != self.instance:
            raise BackendUnavailable(f"the stage holding layers {self.lo}-{self.hi - 1} was restarted: its KV cache "
                                     f"is empty")

    def close(self) -> None:
        self.mf.close()


class LocalStages:
    """The transport for Stage objects in this process: a call runs at once and its handle is its result."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    def __len__(self) -> int:
        return len(self.stages)

    def submit(self, i: int, method: str, *args: Any) -> Any:
        return getattr(self.stages[i], method)(*args)

    def get(self, handles: Any, timeout: Optional[float] = None) -> Any:
        return handles

    def close(self) -> None:
        for s in self.stages:
            s.close()


def _chunks(spans: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Rows of `spans` [(start, n), ...] cut into chunks of at most `size` rows: [(row0, row1, spans of the chunk)]."""
    out: list[tuple[int, int, list[tuple[int, int]]]] = []
    row, cur, room, r0 = 0, [], size, 0
    for start, n in spans:
        while n:
            take = min(room, n)
            cur.append((start, take))
            start, n, room, row = start + take, n - take, room - take, row + take
            if room == 0:
                out.append((r0, row, cur))
                cur, room, r0 = [], size, row
    if cur:
        out.append((r0, row, cur))
    return out


class StagedCache:
    """The KV cache of one sequence whose layers live on the stages: every operation runs on each stage for its
    layers (airobackend.kvcache.KVCache's interface, as the engine uses it)."""

    def __init__(self, model: "StagedModel", cache_id: int, n_ctx: int, type_k: str, type_v: str) -> None:
        self.model, self.cache_id = model, int(cache_id)
        self.n_layer, self.n_head_kv, self.head_dim = model.n_layer, model.n_head_kv, model.head_dim
        self.n_ctx, self.type_k, self.type_v = int(n_ctx), type_k, type_v
        self.n_past = 0

    @property
    def bytes_per_position(self) -> int:
        return KVCache.size_bytes(self.n_layer, self.n_head_kv, 1, self.head_dim, self.type_k, self.type_v)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_position * self.n_ctx

    def _all(self, op: str, *args: Any) -> list:
        return self.model.on_stages("cache_call", self.cache_id, op, *args)

    def move(self, src_start: int, src_end: int, dst_start: int) -> None:
        self._all("move", int(src_start), int(src_end), int(dst_start))

    def remove(self, start: int, end: int, n_past: Optional[int] = None) -> int:
        n_past = self.n_past if n_past is None else int(n_past)
        self._all("remove", int(start), int(end), n_past)
        self.n_past = n_past - (int(end) - int(start))
        return self.n_past

    def truncate(self, n: int) -> None:
        self._all("truncate", int(n))
        self.n_past = max(0, min(self.n_past, int(n)))

    def snapshot(self, n: Optional[int] = None) -> KVSnapshot:
        n = self.n_past if n is None else int(n)
        parts = self._all("snapshot", n)
        return KVSnapshot(self.type_k, self.type_v, n, np.concatenate([p.k for p in parts]),
                          np.concatenate([p.v for p in parts]))

    def compatible(self, snap: KVSnapshot) -> Optional[str]:
        return snapshot_mismatch(snap, self.type_k, self.type_v, self.n_layer, self.n_head_kv, self.head_dim,
                                 self.n_ctx)

    def restore(self, snap: KVSnapshot) -> None:
        why = self.compatible(snap)
        if why is not None:
            raise ValueError(why)
        m = self.model
        handles = [m.submit(i, "cache_call", self.cache_id, "restore",
                            KVSnapshot(snap.type_k, snap.type_v, snap.n, snap.k[lo:hi], snap.v[lo:hi]))
                   for i, (lo, hi) in enumerate(m.ranges)]
        m.fetch(handles)
        self.n_past = snap.n


class StagedModel(LlamaModel):
    """A LlamaModel whose layers are evaluated by pipeline stages (see the module docstring).

    Args:
        mf: the model file on the head (only the embeddings, final norm and output are mapped from it).
        transport: LocalStages or airobackend.cluster.RayStages, one stage per layer range, loaded.
        ranges: the layer range of each stage, in order.
        micro_batch: rows per chunk when a batch is sent through the stages (0: a batch split in 2 x stages chunks,
            at least 16 rows each).
        Other arguments as LlamaModel (n_ctx, n_threads, n_batch, kernels, type_k, type_v).
    """

    batched_sequences = False   # a stage's pass runs into one cache: eval_batch (--parallel slots) needs local layers

    def __init__(self, mf: Any, transport: Any, ranges: Sequence[tuple[int, int]], *, n_ctx: int = 2048,
                 n_threads: int = 0, n_batch: int = 512, kernels: Optional[str] = None, type_k: str = "f16",
                 type_v: str = "f16", micro_batch: int = 0) -> None:
        super().__init__(mf, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, kernels=kernels, layers=(0, 0),
                         head=True, type_k=type_k, type_v=type_v)
        self.transport, self.ranges = transport, [tuple(r) for r in ranges]
        if len(self.ranges) != len(transport) or self.ranges[0][0] != 0 or self.ranges[-1][1] != self.n_layer \
                or any(a[1] != b[0] for a, b in zip(self.ranges, self.ranges[1:])):
            raise RequestError(f"stage ranges {self.ranges} do not cover the {self.n_layer} layers in order")
        self.micro_batch = int(micro_batch)
        self._types = (self.type_k, self.type_v)
        self._next_id = 1
        self._extra: dict[int, tuple[int, str, str]] = {}          # other caches: id -> (n_ctx, type_k, type_v)
        self.instances = [info["instance"] for info in self.fetch([self.submit(i, "info") for i in range(len(self))])]
        self.cache = StagedCache(self, 0, self.n_ctx, *self._types)

    def __len__(self) -> int:
        return len(self.ranges)

    # ---- calls to the stages

    def submit(self, i: int, method: str, *args: Any) -> Any:
        if method in ("info",):
            return self.transport.submit(i, method)
        return self.transport.submit(i, method, self.instances[i], *args)

    def fetch(self, handles: Any) -> Any:
        return self.transport.get(handles)

    def on_stages(self, method: str, *args: Any) -> list:
        """`method(*args)` on every stage at once; their results in stage order."""
        return self.fetch([self.submit(i, method, *args) for i in range(len(self))])

    def stage_info(self, wait: float = 0.0) -> list[dict]:
        """Every stage's info(); a stage that Ray is restarting is waited for up to `wait` seconds (the transport
        says when it is back), then BackendUnavailable."""
        watch = getattr(self.transport, "watch", None)
        deadline = time.monotonic() + wait
        while True:
            deaths = list(watch.deaths) if watch is not None else None
            if watch is not None and wait:
                watch.wait(lambda w: "down" not in w.state, max(0.0, deadline - time.monotonic()))
            try:
                return self.transport.get([self.submit(i, "info") for i in range(len(self))],
                                          timeout=max(1.0, deadline - time.monotonic()))
            except BackendUnavailable:
                # A call that failed before the watch saw the death: wait for the watch to see it, then ask again.
                if watch is None or "dead" in watch.state or time.monotonic() >= deadline or not watch.wait(
                        lambda w: w.deaths != deaths, max(0.0, deadline - time.monotonic())):
                    raise

    def health(self) -> dict:
        """Each stage's state ('up', or 'down' with why); status 'error' when any is down, as no request can be
        served then. A stage that died is known at once (the transport watches them), not at the next request; a
        stage answers beside a running forward pass, so a busy stage reads as up."""
        states = []
        state = getattr(self.transport, "state", lambda i: "up")
        for i, (lo, hi) in enumerate(self.ranges):
            entry = {"stage": i + 1, "layers": [lo, hi - 1]}
            seen = state(i)
            if seen != "up":
                entry.update(state="down", error="restarting" if seen == "down" else "dead (no restarts left)")
                states.append(entry)
                continue
            try:
                info = self.transport.get(self.submit(i, "info"), timeout=5)
                entry.update(state="up" if info["instance"] == self.instances[i] else "restarted (cache lost)",
                             rss=info["rss"])
            except BackendUnavailable as e:
                entry.update(state="down", error=str(e))
            states.append(entry)
        bad = any(s["state"] == "down" for s in states)
        return {"status": "error" if bad else "ok", "stages": states}

    def cache_lost(self) -> bool:
        """True if a stage was rebuilt (restarted) since the last call, so every cache's contents are gone; the
        stages are then in step again (all caches empty, the other caches made again on the rebuilt stage)."""
        infos = self.stage_info(wait=RESTART_WAIT)
        now = [info["instance"] for info in infos]
        if now == self.instances:
            return False
        changed = [i for i, (a, b) in enumerate(zip(now, self.instances)) if a != b]
        self.instances = now
        for i in changed:
            self.fetch([self.submit(i, "new_cache", cid, *spec) for cid, spec in self._extra.items()])
        for cid in [0, *self._extra]:
            self.on_stages("cache_call", cid, "truncate", 0)
        self.cache.n_past = 0
        return True

    # ---- LlamaModel's interface

    def new_cache(self, n_ctx: Optional[int] = None, type_k: Optional[str] = None,
                  type_v: Optional[str] = None) -> Any:
        if not hasattr(self, "transport"):          # LlamaModel.__init__ asks for one before the stages are known
            return None
        spec = (int(n_ctx or self.n_ctx), type_k or self._types[0], type_v or self._types[1])
        cid, self._next_id = self._next_id, self._next_id + 1
        self.on_stages("new_cache", cid, *spec)
        self._extra[cid] = spec
        return StagedCache(self, cid, *spec)

    def run_layers(self, x: np.ndarray, spans: Sequence[tuple[int, int]], cache: Any, keep: int = -1) -> np.ndarray:
        """x through every stage; the last `keep` rows of the result (all if keep < 0)."""
        if isinstance(cache, StagedCache):
            cid = cache.cache_id
            size = self.micro_batch or max(16, -(-x.shape[0] // (2 * len(self))))
            chunks = _chunks(spans, size)
        elif isinstance(cache, _EveryLayerIn):
            cid, chunks = SCRATCH, [(0, x.shape[0], list(spans))]      # the scratch cache holds one batch
        else:
            raise RequestError("a staged model evaluates into its own caches")
        last = len(self) - 1
        outs = []
        for k, (r0, r1, sub) in enumerate(chunks):
            h: Any = x[r0:r1]
            # Rows the head needs back: all of every chunk, or the last `keep` rows of the batch.
            want = -1 if keep < 0 else max(0, keep - (x.shape[0] - r1))
            want = min(want, r1 - r0) if want >= 0 else -1
            for i in range(len(self)):
                h = self.submit(i, "forward", h, sub, cid, want if i == last else -1)
            outs.append(h)
        got = self.fetch(outs)
        return np.concatenate(got) if len(got) > 1 else np.asarray(got[0])

    def close(self) -> None:
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()


def stage_ram(mf: Any, lo: int, hi: int, *, n_ctx: int, n_batch: int = 512, type_k: str = "f16",
              type_v: str = "f16") -> int:
    """Bytes of RAM a stage of layers [lo, hi) needs: its layers' tensors, their KV cache for n_ctx positions, one
    batch of activations (no logits: the head computes those) and the process's own (interpreter, Numba runtime)."""
    hp = mf.hparams
    weights = sum(int(t.nbytes) for name, t in mf.tensors.items()
                  if name.startswith("blk.") and lo <= int(name.split(".")[1]) < hi)
    head_dim = int(hp.n_embd) // int(hp.n_head)
    kv = KVCache.size_bytes(hi - lo, int(hp.n_embd_gqa) // head_dim, n_ctx, head_dim, type_k, type_v)
    per_row = 6 * int(hp.n_embd) + 2 * int(hp.n_ff) + int(hp.n_head) * n_ctx
    return weights + kv + 4 * min(n_batch, n_ctx) * per_row + SCRATCH_OVERHEAD


def head_ram(mf: Any, *, n_ctx: int, n_batch: int = 512) -> int:
    """Bytes of RAM the head of a staged model needs: embeddings, final norm, output matrix, logits and the process's
    own (the server, tokenizer, Numba runtime)."""
    hp = mf.hparams
    weights = sum(int(t.nbytes) for name, t in mf.tensors.items() if not name.startswith("blk."))
    return weights + 4 * min(n_batch, n_ctx) * (2 * int(hp.n_embd) + int(hp.n_vocab)) + SCRATCH_OVERHEAD
