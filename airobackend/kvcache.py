"""KVCache: the keys and values of one sequence, for every layer, and what can be done to them.

One KVCache holds positions 0 .. n_ctx-1 of one sequence. The forward pass (airobackend.model) writes a batch's keys
and values into it and attends over it, one layer at a time; the engine rearranges it between requests (context
shift, chunk reuse) and copies it out and in (prompt cache, state files). Everything that depends on how entries are
stored lives here, so that a cache type is one class's business.

Storage, type 'f16' (llama.cpp's default F16 cache): `k` and `v` are uint16 arrays of fp16 bit patterns, head-major
[n_layer, n_head_kv, n_ctx, head_dim], so that attention streams one head's keys and values contiguously. A position's
entry in one layer and head is one *row*; a row of another cache type is that type's blocks for head_dim values
(`row_width`, `dtype`): moves and copies work on rows whatever the type, and only the K re-rotation and attention
need to decode them.

Operations:
  * `rope_store(il, q, k, v, pos, n_past)`: RoPE on q and k at positions `pos`, then k, v into layer il at positions
    n_past .. n_past+n-1 (one fused kernel for f16). Keys are stored after RoPE, as llama.cpp stores them.
  * `attend(il, q, n_past, out)`: causal attention of a batch at positions n_past.. over layer il.
  * `layer(il)`: the (k, v) arrays of one layer, as the attention kernels read them.
  * `move(src_start, src_end, dst_start)`: copy entries to other positions and re-rotate their keys by the position
    difference d = dst_start - src_start (RoPE is a rotation by an angle linear in the position, so R(p + d) =
    R(d) R(p): decode, rotate by d, encode; exact up to the cache type's rounding). Either direction; overlap is fine.
  * `remove(start, end)`: drop positions start..end-1 and move the rest down (llama_kv_cache_seq_rm + seq_add).
  * `truncate(n)`: forget positions >= n.
  * `snapshot(n)` / `restore(snap)`: copy the first n positions out (a `KVSnapshot`: the rows as arrays, which the
    prompt cache keeps in RAM and the state files write to disk) and back in.
  * `nbytes`, `bytes_per_position`, `KVCache.size_bytes(...)`: memory, for the RAM-fit check and the prompt cache.

`n_past` is the number of leading positions that hold entries: the forward pass sets it to the end of what it wrote,
`remove` and `truncate` lower it, `restore` sets it. `move` leaves it alone (a reuse plan moves several chunks and
then evaluates the gaps between them). Which tokens those entries belong to is the engine's bookkeeping, not ours.

A cache type is a constructor parameter (`type_k`, `type_v`): 'f16', 'q8_0' or 'q4_0' (llama.cpp's names; a type is a
`_Codec`, rows <-> float32 values, in CODECS). q8_0 and q4_0 rows are ggml's blocks (airobackend.kernels.kvquant);
moving quantized keys dequantizes, rotates and quantizes them again, as llama.cpp's K shift does.

Several sequences (parallel slots) use several KVCache objects of the same geometry: `LlamaModel.new_cache()` makes
one, and `LlamaModel.eval(..., cache=...)` evaluates into the one given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from airobackend.kernels import dequant, kvquant, ops


class _Codec:
    """How one cache type stores a row of head_dim values."""

    name = ""
    dtype: np.dtype = np.dtype(np.uint16)

    def row_width(self, head_dim: int) -> int:
        """Elements of `dtype` per row of head_dim values."""
        raise NotImplementedError

    def decode(self, rows: np.ndarray, head_dim: int) -> np.ndarray:
        """float32 [..., head_dim] from rows [..., row_width]."""
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> np.ndarray:
        """rows [..., row_width] from float32 x [..., head_dim]."""
        raise NotImplementedError


class _F16(_Codec):
    """fp16 bit patterns, round to nearest even (llama.cpp's F16 cache)."""

    name = "f16"
    dtype = np.dtype(np.uint16)

    def row_width(self, head_dim: int) -> int:
        return head_dim

    def decode(self, rows: np.ndarray, head_dim: int) -> np.ndarray:
        return dequant.f16_table()[rows]

    def encode(self, x: np.ndarray) -> np.ndarray:
        return ops.f32_to_f16_bits(x)


class _Blocks(_Codec):
    """ggml's q8_0 / q4_0 blocks: a row is one head's head_dim values quantized as llama.cpp stores them in its
    cache (kernels/kvquant.py: ggml's bytes per value, the block scales at the row's end)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, name: str) -> None:
        self.name, self.t = name, kvquant.TYPES[name]

    def row_width(self, head_dim: int) -> int:
        return kvquant.row_bytes(self.t, head_dim)

    def decode(self, rows: np.ndarray, head_dim: int) -> np.ndarray:
        flat = np.ascontiguousarray(rows).reshape(-1, rows.shape[-1])
        out = np.empty((flat.shape[0], head_dim), np.float32)
        kvquant.dequantize_rows(flat, self.t, out)
        return out.reshape(*rows.shape[:-1], head_dim)

    def encode(self, x: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        rows = np.empty((flat.shape[0], self.row_width(x.shape[-1])), np.uint8)
        kvquant.quantize_rows(flat, self.t, rows)
        return rows.reshape(*x.shape[:-1], rows.shape[-1])


# llama.cpp's --cache-type-k/-v names. A cache with a quantized K or V attends as llama.cpp's flash attention does
# (kvquant.attention: q converted to K's dot-product type, probabilities and value sums in float32); f16/f16 keeps
# llama.cpp's default path (ops.attention: q and the probabilities rounded to fp16).
CODECS: dict[str, _Codec] = {"f16": _F16(), "q8_0": _Blocks("q8_0"), "q4_0": _Blocks("q4_0")}


def check_type(name: "str | int") -> str:
    """The cache type `name` normalised, or ValueError naming the known ones. Also takes ggml's type numbers, as
    llama-cpp-python's `type_k` / `type_v` (1 = f16, 8 = q8_0, 2 = q4_0), and text-generation-webui's 'fp16'."""
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        name = kvquant.type_name(int(name))
    key = str(name).lower()
    key = "f16" if key == "fp16" else key
    if key not in CODECS:
        raise ValueError(f"unknown KV cache type {name!r}; known: {', '.join(CODECS)}")
    return key


def check_types(type_k: "str | int", type_v: "str | int", head_dim: int) -> tuple[str, str]:
    """(type_k, type_v) normalised, or ValueError: an unknown name, or a quantized type for a head size that is not
    a whole number of blocks."""
    tk, tv = check_type(type_k), check_type(type_v)
    if (tk, tv) != ("f16", "f16") and head_dim % kvquant.QK:
        raise ValueError(f"a {tk}/{tv} KV cache needs a head size that is a multiple of {kvquant.QK}; this model's "
                         f"is {head_dim} (use f16)")
    return tk, tv


@dataclass
class KVSnapshot:
    """The first `n` positions of a KVCache, copied out: rows [n_layer, n_head_kv, n, row_width] for K and V."""

    type_k: str
    type_v: str
    n: int
    k: np.ndarray
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


def snapshot_mismatch(snap: KVSnapshot, type_k: str, type_v: str, n_layer: int, n_head_kv: int, head_dim: int,
                      n_ctx: int) -> Optional[str]:
    """None if `snap` fits a cache of this geometry and these types, else why not (KVCache and a staged cache, whose
    layers live elsewhere, check a state the same way)."""
    if (snap.type_k, snap.type_v) != (type_k, type_v):
        return (f"the state holds a {snap.type_k}/{snap.type_v} KV cache, this model runs a "
                f"{type_k}/{type_v} one")
    for name, arr, t in (("K", snap.k, type_k), ("V", snap.v, type_v)):
        want = (n_layer, n_head_kv, snap.n, CODECS[t].row_width(head_dim))
        if arr.shape != want or arr.dtype != CODECS[t].dtype:
            return f"the state's {name} cache has shape {arr.shape}, this model needs {want}"
    if snap.n > n_ctx:
        return f"the state holds {snap.n} positions, more than the context of {n_ctx}"
    return None


class KVCache:
    """Keys and values of one sequence, every layer, positions 0 .. n_ctx-1 (see the module docstring).

    Args:
        n_layer, n_head_kv, n_ctx, head_dim: geometry.
        n_rot, freq_base, freq_scale, freq_factors: the model's RoPE (freq_factors: a file's rope_freqs, or None),
            used to rotate keys when they move.
        type_k, type_v: cache types ('f16', 'q8_0', 'q4_0').
    """

    def __init__(self, n_layer: int, n_head_kv: int, n_ctx: int, head_dim: int, *, n_rot: int,
                 freq_base: float, freq_scale: float = 1.0, freq_factors: Optional[np.ndarray] = None,
                 type_k: str = "f16", type_v: str = "f16") -> None:
        self.n_layer, self.n_head_kv, self.n_ctx, self.head_dim = int(n_layer), int(n_head_kv), int(n_ctx), int(head_dim)
        self.n_rot, self.freq_base, self.freq_scale = int(n_rot), float(freq_base), float(freq_scale)
        self.freq_factors = freq_factors
        self.type_k, self.type_v = check_types(type_k, type_v, self.head_dim)
        self._ck, self._cv = CODECS[self.type_k], CODECS[self.type_v]
        self._tk, self._tv = kvquant.TYPES[self.type_k], kvquant.TYPES[self.type_v]
        self._flash = (self.type_k, self.type_v) != ("f16", "f16")
        self.k = np.zeros((self.n_layer, self.n_head_kv, self.n_ctx, self._ck.row_width(self.head_dim)), self._ck.dtype)
        self.v = np.zeros((self.n_layer, self.n_head_kv, self.n_ctx, self._cv.row_width(self.head_dim)), self._cv.dtype)
        self.n_past = 0

    # ---- sizes

    @staticmethod
    def size_bytes(n_layer: int, n_head_kv: int, n_ctx: int, head_dim: int, type_k: str = "f16",
                   type_v: str = "f16") -> int:
        """Bytes a cache of this geometry and types holds (without allocating one)."""
        per_row = sum(CODECS[check_type(t)].row_width(head_dim) * CODECS[check_type(t)].dtype.itemsize
                      for t in (type_k, type_v))
        return int(n_layer) * int(n_head_kv) * int(n_ctx) * per_row

    @property
    def bytes_per_position(self) -> int:
        """Bytes of K and V that one position takes over all layers."""
        return self.size_bytes(self.n_layer, self.n_head_kv, 1, self.head_dim, self.type_k, self.type_v)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    # ---- the forward pass

    def layer(self, il: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer il's (k, v) rows, [n_head_kv, n_ctx, row_width] each."""
        return self.k[il], self.v[il]

    def rope_store(self, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, n_past: int) -> None:
        """RoPE on q [n, n_head, hd] and k [n, n_head_kv, hd] (float32, in place) at positions `pos`, then k and v
        into layer il at positions n_past .. n_past+n-1."""
        if self._flash:
            kvquant.rope_store(q, k, v, pos, self.n_rot, self.freq_base, self.freq_scale, self.k[il].view(np.uint8),
                               self.v[il].view(np.uint8), n_past, self._tk, self._tv, self.freq_factors)
        else:
            ops.rope_kv(q, k, v, pos, self.n_rot, self.freq_base, self.freq_scale, self.k[il], self.v[il], n_past,
                        self.freq_factors)

    def attend(self, il: int, q: np.ndarray, n_past: int, out: np.ndarray) -> None:
        """Causal attention of q [n, n_head, hd] (roped) at positions n_past.. over layer il: out [n, n_head * hd]."""
        if self._flash:
            kvquant.attention(q, self.k[il], self.v[il], n_past, out, self._tk, self._tv)
        else:
            ops.attention(q, self.k[il], self.v[il], n_past, out)

    # ---- rearranging

    def _check_range(self, start: int, end: int, what: str) -> None:
        if not 0 <= start <= end <= self.n_ctx:
            raise ValueError(f"{what}: positions {start}..{end} outside 0..{self.n_ctx}")

    def rotate(self, keys: np.ndarray, delta: int) -> None:
        """Rotate float32 keys [m, n_head_kv, hd] (already roped) in place by `delta` positions."""
        if keys.shape[0] and delta:
            ops.rope(keys, np.full(keys.shape[0], delta, np.int64), self.n_rot, self.freq_base, self.freq_scale,
                     self.freq_factors)

    def move(self, src_start: int, src_end: int, dst_start: int) -> None:
        """Copy the entries of positions src_start..src_end-1 to dst_start.. in every layer, keys re-rotated by
        dst_start - src_start. The source positions keep their (stale) contents unless overwritten."""
        self._check_range(src_start, src_end, "move source")
        m, delta = src_end - src_start, dst_start - src_start
        self._check_range(dst_start, dst_start + m, "move destination")
        if m == 0 or delta == 0:
            return
        src, dst = slice(src_start, src_end), slice(dst_start, dst_start + m)
        for il in range(self.n_layer):
            keys = np.ascontiguousarray(self._ck.decode(self.k[il, :, src], self.head_dim).transpose(1, 0, 2))
            self.rotate(keys, delta)                              # [m, n_head_kv, hd]
            self.k[il, :, dst] = self._ck.encode(keys.transpose(1, 0, 2))
            self.v[il, :, dst] = self.v[il, :, src].copy()        # values carry no position

    def remove(self, start: int, end: int, n_past: Optional[int] = None) -> int:
        """Drop positions start..end-1 of the first n_past (default: self.n_past), moving the later ones down;
        returns (and sets) the new n_past."""
        n_past = self.n_past if n_past is None else int(n_past)
        if not 0 <= start <= end <= n_past <= self.n_ctx:
            raise ValueError(f"bad remove({start}, {end}) with {n_past} positions filled")
        self.move(end, n_past, start)
        self.n_past = n_past - (end - start)
        return self.n_past

    def truncate(self, n: int) -> None:
        """Forget positions >= n."""
        self.n_past = max(0, min(self.n_past, int(n)))

    # ---- copies

    def snapshot(self, n: Optional[int] = None) -> KVSnapshot:
        """A copy of positions 0..n-1 (default: n_past)."""
        n = self.n_past if n is None else int(n)
        self._check_range(0, n, "snapshot")
        return KVSnapshot(self.type_k, self.type_v, n, self.k[:, :, :n].copy(), self.v[:, :, :n].copy())

    def compatible(self, snap: KVSnapshot) -> Optional[str]:
        """None if `snap` can be restored here, else why not."""
        return snapshot_mismatch(snap, self.type_k, self.type_v, self.n_layer, self.n_head_kv, self.head_dim,
                                 self.n_ctx)

    def restore(self, snap: KVSnapshot) -> None:
        """Copy `snap` into positions 0..snap.n-1; n_past becomes snap.n. ValueError if it does not fit."""
        why = self.compatible(snap)
        if why is not None:
            raise ValueError(why)
        self.k[:, :, :snap.n] = snap.k
        self.v[:, :, :snap.n] = snap.v
        self.n_past = snap.n
