"""LlamaModel: the LLaMA forward pass over a model file's weights, with a KV cache sized by the context.

Reads like the architecture (gpt-fast style); every loop over weights or activations is a kernel in
airobackend.kernels. Shapes in comments: n = tokens in this batch, d = n_embd, hd = head_dim, g = n_embd_gqa.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numba
import numpy as np
from numba.core import event as numba_event

from airobackend.errors import ContextOverflowError, ModelFileError, RequestError, UnsupportedTensorType
from airobackend.kernels import dequant, ops
from airobackend.kernels.ggml_types import UnsupportedType
from airobackend.kernels.matmul import Weight, prepare, project
from airobackend.kernels.simd import ISA
from airobackend.kvcache import KVCache, check_types
from airobackend.quant import GGMLType

log = logging.getLogger("airobackend.model")

Report = Callable[[str, bool], None]      # (line, done): see LlamaModel.warmup

ISA_NAMES = {"avx512vnni": "AVX-512 VNNI", "avx2": "AVX2"}


def type_name(t: int) -> str:
    """llama.cpp's spelling of a tensor type: q4_K, q8_0, f16."""
    return GGMLType(t).name.lower().replace("_k", "_K")


def isa_name() -> str:
    return ISA_NAMES.get(ISA, ISA)


class _Compiles(numba_event.Listener):
    """Counts Numba compilations while installed (loads from the on-disk cache are not compilations) and calls
    `first()` when the first one starts."""

    def __init__(self, first: Callable[[], None]) -> None:
        self.count, self.first = 0, first

    def on_start(self, event: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.first()

    def on_end(self, event: Any) -> None:
        pass


def warm_groups(groups: Sequence[tuple[str, Callable[[], Any]]], report: Optional[Report] = None) -> None:
    """Run each (label, fn) group, telling `report` when a group starts compiling and when it is ready."""
    say = report or (lambda line, done: None)
    for label, fn in groups:
        watch = _Compiles(lambda label=label: say(f"compiling {label} - first start only", False))
        t0 = time.perf_counter()
        with numba_event.install_listener("numba:compile", watch):
            fn()
        dt = time.perf_counter() - t0
        say(f"{label}: compiled in {dt:.1f} s (kept in the cache for later starts)" if watch.count
            else f"{label}: loaded from the cache in {dt:.1f} s", True)


@dataclass
class Layer:
    attention_norm: np.ndarray      # f32 [d]
    wq: Weight                      # [n_head * hd, d]
    wk: Weight                      # [n_head_kv * hd, d]
    wv: Weight                      # [n_head_kv * hd, d]
    wo: Weight                      # [d, n_head * hd]
    ffn_norm: np.ndarray            # f32 [d]
    w1: Weight                      # ffn_gate [n_ff, d]
    w2: Weight                      # ffn_down [d, n_ff]
    w3: Weight                      # ffn_up   [n_ff, d]


class Buffers:
    """Activations of a batch of up to `cap` tokens, allocated once and reused by every layer and every step;
    `rows(n)` views the first n rows (a step of several sequences changes n from one step to the next)."""

    def __init__(self, m: "LlamaModel", cap: int) -> None:
        def f32(width: int) -> np.ndarray:
            return np.empty((cap, width), np.float32)
        n_q, n_ff = m.n_head * m.head_dim, (m.layers[0].w1.n_rows if m.layers else 0)
        self.cap = self.n = cap
        self.h, self.attn, self.o = f32(m.n_embd), f32(n_q), f32(m.n_embd)
        self.qkv = [f32(n_q), f32(m.n_embd_gqa), f32(m.n_embd_gqa)]
        self.ffn = [f32(n_ff), f32(n_ff)]

    def rows(self, n: int) -> "Buffers":
        if n == self.n:
            return self
        view = object.__new__(Buffers)
        view.cap, view.n = self.cap, n
        view.h, view.attn, view.o = self.h[:n], self.attn[:n], self.o[:n]
        view.qkv, view.ffn = [a[:n] for a in self.qkv], [a[:n] for a in self.ffn]
        return view


class LlamaModel:
    """Evaluate tokens with a LLaMA model file (GGUF or GGML v1-v3, any weight types).

    Args:
        mf: an open model file (airobackend.formats.open_model) with .hparams and .tensors.
        n_ctx: context length; the KV cache (`self.cache`, airobackend.kvcache: with f16, 2 * n_layer * n_ctx *
            n_embd_gqa * 2 bytes; q8_0 34/64 of that, q4_0 18/64) is allocated for it.
        n_threads: Numba threads for every kernel; 0 = all Numba threads.
        n_batch: tokens per forward pass inside `eval` (longer inputs are split).
        kernels: 'auto', 'generic' or 'fast' (see kernels.matmul.prepare); None reads AIRO_KERNELS.
        progress: called with the fraction of layers prepared (0..1) while loading.
        type_k, type_v: KV cache types, 'f16' (default), 'q8_0' or 'q4_0' (llama.cpp's --cache-type-k/-v).
        layers: (lo, hi) to hold only layers lo..hi-1 and their KV cache (a pipeline stage, airobackend.pipeline);
            None = all. Only those layers' tensors are mapped.
        head: hold the token embeddings, final norm and output matrix (False for a pipeline stage).
    """

    def __init__(self, mf: Any, n_ctx: int = 2048, n_threads: int = 0, n_batch: int = 512,
                 kernels: Optional[str] = None, progress: Optional[Callable[[float], None]] = None,
                 type_k: str = "f16", type_v: str = "f16", layers: Optional[tuple[int, int]] = None,
                 head: bool = True) -> None:
        hp = mf.hparams
        self.mf, self.hparams = mf, hp
        self.n_ctx, self.n_vocab, self.n_batch = int(n_ctx), int(hp.n_vocab), max(1, int(n_batch))
        if self.n_ctx < 1:
            raise RequestError(f"n_ctx must be positive, got {n_ctx}")
        self.n_threads = int(n_threads) or numba.config.NUMBA_NUM_THREADS
        self.n_threads = min(self.n_threads, numba.config.NUMBA_NUM_THREADS)
        self.n_embd, self.n_head, self.n_layer = int(hp.n_embd), int(hp.n_head), int(hp.n_layer)
        self.head_dim = self.n_embd // self.n_head
        try:                                    # a bad cache type fails before the weights are prepared
            self.type_k, self.type_v = check_types(type_k, type_v, self.head_dim)
        except ValueError as e:
            raise RequestError(str(e)) from None
        self.n_rot = int(getattr(hp, "n_rot", 0) or self.head_dim)
        self.eps = float(hp.rms_norm_eps)
        self.freq_base, self.freq_scale = float(hp.rope_freq_base), float(hp.rope_freq_scale or 1.0)

        t = mf.tensors

        def weight(name: str) -> Weight:
            if name not in t:
                raise ModelFileError(f"tensor {name} is missing", path=getattr(mf, "path", None), tensor=name)
            try:
                return prepare(t[name], self.n_threads, kernels)
            except UnsupportedType as e:       # the kernels know no files: name this one
                raise UnsupportedTensorType(e.reason, path=getattr(mf, "path", None), tensor=name) from e

        def vector(name: str) -> np.ndarray:
            if name not in t:
                raise ModelFileError(f"tensor {name} is missing", path=getattr(mf, "path", None), tensor=name)
            info = t[name]
            n = int(np.prod([int(v) for v in info.ne]))
            return dequant.dequantize(info.data, int(info.type), 1, n)[0]

        # LLaMA-3.1-style rope scaling: the converter stores per-pair frequency divisors (rope_freqs, n_rot/2 floats)
        self.freq_factors: Optional[np.ndarray] = None
        if "rope_freqs.weight" in t:
            self.freq_factors = np.ascontiguousarray(vector("rope_freqs.weight"), dtype=np.float32)
            if self.freq_factors.size != self.n_rot // 2:
                raise ModelFileError(f"rope_freqs has {self.freq_factors.size} values, not n_rot/2 = {self.n_rot // 2}",
                                     path=getattr(mf, "path", None), tensor="rope_freqs.weight")
        lo, hi = layers if layers is not None else (0, self.n_layer)
        if not 0 <= lo <= hi <= self.n_layer:
            raise RequestError(f"layers {lo}..{hi} outside the model's 0..{self.n_layer}")
        self.first_layer = int(lo)
        if head:
            self.tok_embeddings = weight("token_embd.weight")
            self.norm = vector("output_norm.weight")
            # Files with tied embeddings have no output matrix; the embedding matrix plays both roles.
            self.output = weight("output.weight" if "output.weight" in t else "token_embd.weight")
        self.layers = []
        for i in range(lo, hi):
            self.layers.append(Layer(
                attention_norm=vector(f"blk.{i}.attn_norm.weight"),
                wq=weight(f"blk.{i}.attn_q.weight"), wk=weight(f"blk.{i}.attn_k.weight"),
                wv=weight(f"blk.{i}.attn_v.weight"), wo=weight(f"blk.{i}.attn_output.weight"),
                ffn_norm=vector(f"blk.{i}.ffn_norm.weight"),
                w1=weight(f"blk.{i}.ffn_gate.weight"), w2=weight(f"blk.{i}.ffn_down.weight"),
                w3=weight(f"blk.{i}.ffn_up.weight"),
            ))
            if progress is not None:
                progress((i + 1 - lo) / max(1, hi - lo))

        # K/V width from the tensors themselves: a GGML v3 file cannot say n_gqa, the wk shape always does.
        wk = t.get("blk.0.attn_k.weight")
        n_embd_gqa = int(np.prod([int(v) for v in wk.ne[1:]])) if wk is not None else self.n_embd
        if n_embd_gqa < self.head_dim or n_embd_gqa % self.head_dim or self.n_head % (n_embd_gqa // self.head_dim):
            raise ModelFileError(f"attn_k has {n_embd_gqa} rows, not a whole number of kv heads of {self.head_dim}",
                                 path=getattr(mf, "path", None), tensor="blk.0.attn_k.weight")
        self.n_head_kv = n_embd_gqa // self.head_dim
        if int(getattr(hp, "n_head_kv", self.n_head_kv) or self.n_head_kv) != self.n_head_kv:
            log.warning("n_head_kv %s in the header disagrees with attn_k's shape; using %d (n_gqa %d)",
                        hp.n_head_kv, self.n_head_kv, self.n_head // self.n_head_kv)
        self.n_embd_gqa = n_embd_gqa
        self.cache = self.new_cache()
        self._buffers: Optional[Buffers] = None

    batched_sequences = True    # eval_batch: several sequences' caches in one pass (--parallel slots)

    def new_cache(self, n_ctx: Optional[int] = None, type_k: Optional[str] = None,
                  type_v: Optional[str] = None) -> KVCache:
        """A KV cache of this model's geometry and RoPE (n_ctx positions, default the model's; types default to the
        model's `type_k` / `type_v`). `self.cache` is the one `eval` uses unless given another (one per sequence when
        several are served)."""
        return KVCache(len(self.layers), self.n_head_kv, int(n_ctx or self.n_ctx), self.head_dim, n_rot=self.n_rot,
                       freq_base=self.freq_base, freq_scale=self.freq_scale, freq_factors=self.freq_factors,
                       type_k=type_k or self.type_k, type_v=type_v or self.type_v)

    # ---- public API ----

    def eval(self, tokens: Any, n_past: int, logits_all: bool = False, cache: Optional[KVCache] = None) -> np.ndarray:
        """Run `tokens` at positions n_past, n_past+1, ...; returns float32 logits [n, n_vocab] (logits_all) or
        [1, n_vocab] (last token). Cache entries at positions >= n_past are overwritten; `cache` defaults to
        self.cache."""
        tokens = self._check_tokens(tokens)
        n = tokens.shape[0]
        if n_past < 0 or n_past + n > self.n_ctx:
            raise ContextOverflowError(f"{n_past} cached + {n} new tokens do not fit in n_ctx = {self.n_ctx}")
        return self._run([(int(n_past), tokens)], cache, all_rows=logits_all)

    def eval_spans(self, spans: Sequence[tuple[int, Any]], cache: Optional[KVCache] = None) -> np.ndarray:
        """Evaluate several runs of tokens at their own positions as if in one batch: spans = [(start, tokens), ...]
        in increasing, non-overlapping position order. Positions between the spans must already hold entries (a
        reuse plan moved them there); each token attends to every position before it. Returns the logits of the
        last token of the last span, [1, n_vocab]. The spans share each weight pass, so filling three gaps costs
        what one batch of their total length costs."""
        checked, end = [], 0
        for start, toks in spans:
            toks = self._check_tokens(toks)
            if start < end or start + toks.shape[0] > self.n_ctx:
                raise ContextOverflowError(f"span at {start} of {toks.shape[0]} tokens overlaps the previous one or "
                                           f"does not fit in n_ctx = {self.n_ctx}")
            checked.append((int(start), toks))
            end = start + toks.shape[0]
        if not checked:
            raise RequestError("eval_spans() needs at least one span")
        return self._run(checked, cache)

    def _check_tokens(self, tokens: Any) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.shape[0] == 0:
            raise RequestError("eval() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise RequestError(f"token id out of range 0..{self.n_vocab - 1}")
        return tokens

    def _run(self, spans: list[tuple[int, np.ndarray]], cache: Optional[KVCache], all_rows: bool = False) -> np.ndarray:
        """The spans in forward passes of at most n_batch tokens (a pass may hold pieces of several spans)."""
        cache = self.cache if cache is None else cache
        numba.set_num_threads(self.n_threads)       # thread-local in Numba: set on the calling thread
        outs, pieces, room = [], [], self.n_batch
        for k, (start, toks) in enumerate(spans):
            while toks.shape[0]:
                take = min(room, toks.shape[0])
                pieces.append((start, toks[:take]))
                start, toks, room = start + take, toks[take:], room - take
                last = k == len(spans) - 1 and toks.shape[0] == 0
                if room == 0 or last:
                    logits = self.forward(pieces, cache, all_rows or last, all_rows)
                    if logits is not None:
                        outs.append(logits)
                    pieces, room = [], self.n_batch
        cache.n_past = spans[-1][0] + spans[-1][1].shape[0]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def eval_batch(self, seqs: Sequence[tuple[KVCache, int, Any]],
                   want: Optional[Sequence[bool]] = None) -> list[Optional[np.ndarray]]:
        """One forward pass for several sequences, each in its own cache: seqs = [(cache, n_past, tokens), ...], such
        as the next token of each decoding sequence and a chunk of another one's prompt. The weights stream once for
        the whole batch (the mat-mat kernels take every row in one pass); each sequence's keys and values go to its
        own cache at its own positions, and it attends over that cache only (entries with the same cache are spans
        of one sequence, in position order). Returns, per entry, the logits of its last token (float32 [n_vocab]),
        or None where `want[i]` is false (a prompt chunk that is not the last one).

        A sequence's rows are computed as they would be alone: activations are quantized per row and every other
        operation is per row or per sequence, so only the kernels' summation order can separate the results from a
        one-sequence pass (tests/test_batch.py measures it). Each cache's n_past becomes the end of what was written
        to it. The batch is one pass whatever its size: the caller keeps it within n_batch."""
        if not seqs:
            raise RequestError("eval_batch() needs at least one sequence")
        want = [True] * len(seqs) if want is None else [bool(w) for w in want]
        if len(want) != len(seqs):
            raise RequestError("eval_batch(): one `want` flag per sequence")
        parts, ends, n = [], [], 0
        for cache, n_past, toks in seqs:
            toks = self._check_tokens(toks)
            if n_past < 0 or n_past + toks.shape[0] > cache.n_ctx:
                raise ContextOverflowError(f"{n_past} cached + {toks.shape[0]} new tokens do not fit in the "
                                           f"sequence's context of {cache.n_ctx}")
            parts.append((cache, int(n_past), toks))
            n += toks.shape[0]
            ends.append(n - 1)
        numba.set_num_threads(self.n_threads)
        tokens = np.concatenate([t for _, _, t in parts])
        x = self.run_layers(self.tok_embeddings.rows(tokens), [(p, t.shape[0]) for _, p, t in parts],
                            [c for c, _, _ in parts])
        for cache, n_past, toks in parts:
            cache.n_past = n_past + toks.shape[0]
        rows = [e for e, w in zip(ends, want) if w]
        out: list[Optional[np.ndarray]] = [None] * len(seqs)
        if rows:
            h = self.buffers(len(rows)).h
            ops.rmsnorm(np.ascontiguousarray(x[rows]), self.norm, self.eps, h)
            logits = self.output(np.ascontiguousarray(h))                       # [len(rows), n_vocab]
            it = iter(logits)
            for i, w in enumerate(want):
                if w:
                    out[i] = next(it)
        return out

    def warmup(self, report: Optional[Report] = None, extra: Sequence[tuple[str, Callable[[], Any]]] = ()) -> float:
        """Compile (or load from Numba's on-disk cache) every kernel this model uses, so that the first request runs
        as fast as the next: the matrix kernels of each weight type (mat-vec and mat-mat), then one-token and
        two-token forward passes at position 0 (attention, norms, RoPE and the rest), then the `extra` groups.
        `report(line, done)` gets, per group, a line when it starts compiling (done=False; a group found in the
        cache compiles nothing and gets none) and one when it is ready, with the time (done=True). Returns the
        seconds it took; the KV cache is left empty (its positions were overwritten)."""
        t0 = time.perf_counter()
        weights: dict[tuple[int, str], Weight] = {}     # one weight per (type, kernel)
        for layer in self.layers:
            for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3):
                weights.setdefault((w.ggml_type, w.kernel_name), w)
        weights.setdefault((self.output.ggml_type, self.output.kernel_name), self.output)

        def matrices() -> None:
            for w in weights.values():
                x = np.ones((9, w.n_cols), np.float32)
                w(x[:1])                                # one token: the mat-vec kernel
                w(x[:2])                                # batches: quantize the rows; 1-2 tokens, up to 8 (several
                w(x[:3])                                # sequences' next tokens, short prompts), more: the
                w(x)                                    # few-token and the mat-mat kernels

        def forward() -> None:
            bos = int(getattr(self.hparams, "bos_id", 1))
            bos = bos if 0 <= bos < self.n_vocab else 0
            self.eval([bos], 0)
            if self.n_ctx >= 2:
                self.eval([bos, bos], 0)

        types = ", ".join(sorted({type_name(t) for t, _ in weights}, key=lambda n: (n[0], len(n), n)))
        generic = all(k == "generic" for _, k in weights)
        matrix_label = f"{types} float32 kernels" if generic else f"{types} kernels for {isa_name()}"
        warm_groups([(matrix_label, matrices), ("attention, norm and RoPE kernels", forward), *extra], report)
        self.cache.truncate(0)
        return time.perf_counter() - t0

    # ---- the forward pass

    def buffers(self, n: int) -> Buffers:
        """Scratch activations for an n-token batch: views into buffers kept for the largest batch so far."""
        if self._buffers is None or self._buffers.cap < n:
            self._buffers = Buffers(self, n)
        return self._buffers.rows(n)

    def forward(self, pieces: list[tuple[int, np.ndarray]], cache: KVCache, want_logits: bool,
                all_rows: bool) -> Optional[np.ndarray]:
        """One pass over a batch made of `pieces` [(start position, tokens), ...]: each piece's keys and values go
        to its positions, then each piece attends over the cache up to its own positions (so a later piece sees the
        earlier ones, and the entries already cached between them)."""
        x = self.blocks(pieces, cache, -1 if all_rows else int(want_logits))
        if not want_logits:
            return None
        if not all_rows:
            x = x[-1:]
        h = self.buffers(sum(t.shape[0] for _, t in pieces)).h
        ops.rmsnorm(x, self.norm, self.eps, h[:x.shape[0]])
        return self.output(np.ascontiguousarray(h[:x.shape[0]]))               # [n or 1, n_vocab]

    def hidden_states(self, tokens: Any) -> np.ndarray:
        """The hidden states after the final norm, float32 [n, n_embd], of `tokens` as one sequence from position 0:
        llama.cpp's "result_norm", the tensor its embedding mode pools. One batch, whose keys and values go to a
        one-layer scratch cache that every layer reuses (a layer's attention needs only its own), so this costs
        n * n_head_kv * head_dim * 4 bytes and the model's caches and what they hold are not touched."""
        tokens = self._check_tokens(tokens)
        numba.set_num_threads(self.n_threads)
        x = self.blocks([(0, tokens)], self.scratch_cache(tokens.shape[0]))
        out = np.empty_like(x)
        ops.rmsnorm(x, self.norm, self.eps, out)
        return out

    def scratch_cache(self, n: int) -> "_EveryLayerIn":
        """A one-layer cache of n positions standing in for every layer: what `hidden_states` evaluates with."""
        return _EveryLayerIn(KVCache(1, self.n_head_kv, n, self.head_dim, n_rot=self.n_rot, freq_base=self.freq_base,
                                     freq_scale=self.freq_scale, freq_factors=self.freq_factors))

    def blocks(self, pieces: list[tuple[int, np.ndarray]], cache: Any, keep: int = -1) -> np.ndarray:
        """The residual stream [n, d] after every layer, for `pieces` as `forward` takes them (at least the last
        `keep` rows of it: all of them when keep < 0)."""
        tokens = pieces[0][1] if len(pieces) == 1 else np.concatenate([t for _, t in pieces])
        x = self.tok_embeddings.rows(tokens)                                    # [n, d]
        return self.run_layers(x, [(int(start), toks.shape[0]) for start, toks in pieces], cache, keep)

    def run_layers(self, x: np.ndarray, spans: Sequence[tuple[int, int]], cache: Any, keep: int = -1) -> np.ndarray:
        """x [n, d] (updated in place) after this model's layers; `spans` [(start position, rows), ...] in row order
        say where each run of rows sits in the sequence. A pipeline stage runs this on its own layers, with its
        own cache (`keep` matters only to a model whose layers are elsewhere: airobackend.pipeline). `cache` may
        also be a list, one cache per span: the spans are then several sequences' (eval_batch)."""
        n, hd = x.shape[0], self.head_dim
        caches = cache if isinstance(cache, list) else [cache] * len(spans)
        rows, r = [], 0                                                 # (row0, row1, start, cache) per span
        for (start, m), c in zip(spans, caches):
            rows.append((r, r + m, start, c))
            r += m
        pos = np.concatenate([np.arange(p, p + r1 - r0, dtype=np.int64) for r0, r1, p, _ in rows])
        b = self.buffers(n)
        h = b.h
        for il, layer in enumerate(self.layers):
            ops.rmsnorm(x, layer.attention_norm, self.eps, h)
            q, k, v = project(h, layer.wq, layer.wk, layer.wv, outs=b.qkv)      # a batch's h quantized once
            q, k, v = q.reshape(n, self.n_head, hd), k.reshape(n, self.n_head_kv, hd), v.reshape(n, self.n_head_kv, hd)
            for r0, r1, p, c in rows:   # RoPE on q, k; k, v into the cache (keys after RoPE, as llama.cpp)
                c.rope_store(il, q[r0:r1], k[r0:r1], v[r0:r1], pos[r0:r1], p)
            for r0, r1, p, c in rows:
                c.attend(il, q[r0:r1], p, b.attn[r0:r1])
            ops.add_rmsnorm(x, layer.wo(b.attn, b.o), layer.ffn_norm, self.eps, h)   # x += attention out; h = norm(x)
            gate, up = project(h, layer.w1, layer.w3, outs=b.ffn)              # [n, n_ff] each
            ops.silu_mul(gate, up)
            ops.add(x, layer.w2(gate, b.o))
        return x


class _EveryLayerIn:
    """A one-layer KVCache standing in for every layer (what `hidden_states` evaluates with)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def rope_store(self, il: int, *args: Any) -> None:
        self.cache.rope_store(0, *args)

    def attend(self, il: int, *args: Any) -> None:
        self.cache.attend(0, *args)
