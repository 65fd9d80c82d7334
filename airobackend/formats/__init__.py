"""Model file readers and writers: GGML (ggml/ggmf/ggjt v1-v3), GGUF, split .zip/.z01 archives.

`open_model(path)` is the one entry point. It parses headers only (tensor data stays in the page cache, mapped,
until a kernel touches it) and returns a `ModelFile` whose tensors are keyed by GGUF names whatever the container.
Every problem with a file raises `ModelFileError` naming the file, the byte offset and the tensor.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import ModelFileError
from ..quant import BLOCK, GGMLType, ftype_name
from ._source import Source

__all__ = [
    "open_model", "ModelFile", "HParams", "Vocab", "TensorInfo", "ModelFileError",
    "estimate_ram", "gguf_tensor_name", "legacy_tensor_name", "is_model_file",
]


# --------------------------------------------------------------------------------------------------------------------
# Data model

@dataclass
class HParams:
    """LLaMA hyper-parameters, from the file plus load-time overrides for what GGML files cannot store."""
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_layer: int
    n_ff: int
    n_rot: int
    n_ctx_train: int = 2048
    rms_norm_eps: float = 5e-6
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    pad_id: int = -1                 # -1: none
    add_bos: bool = True
    add_space_prefix: bool = True
    n_mult: Optional[int] = None     # GGML files only

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head (8 for LLaMA-2 70B)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 1

    @property
    def n_embd_head(self) -> int:
        return self.n_embd // self.n_head if self.n_head else 0

    @property
    def n_embd_gqa(self) -> int:
        """Width of the K and V projections (n_embd / n_gqa)."""
        return self.n_embd_head * self.n_head_kv


@dataclass
class Vocab:
    """The vocabulary exactly as stored.

    spelling 'gguf': SentencePiece pieces with '\\u2581' for spaces, byte tokens as '<0xXX>', token types present.
    spelling 'ggml': mid-2023 convert.py text: plain spaces, byte tokens as the raw byte, control tokens as b'',
    no token types (types is None).
    model: GGUF tokenizer.ggml.model, 'llama' (SentencePiece, every GGML file) or 'gpt2' (byte-level BPE, with its
    `merges` and its pre-tokenizer name `pre`, tokenizer.ggml.pre).
    """
    pieces: list
    scores: np.ndarray
    types: Optional[np.ndarray]
    spelling: str
    model: str = "llama"
    pre: Optional[str] = None
    merges: Optional[list] = None

    def __len__(self) -> int:
        return len(self.pieces)


class TensorInfo:
    """One tensor: where its raw blocks are and how to read them.

    name: GGUF name ('blk.0.attn_q.weight'); legacy_name: GGML name ('layers.0.attention.wq.weight').
    ne: ggml order (ne[0] = row length); shape: numpy order ((n_rows, row_len) for 2-D).
    data: read-only uint8 1-D array of the raw blocks in the GGML v3 / GGUF layout of `type`: a zero-copy view of
    the mapped file, except for tensors converted from a pre-v3 layout and tensors straddling a zip part boundary,
    which are copied once on first access. offset: absolute offset of the data in the (logical) file.
    """

    __slots__ = ("name", "legacy_name", "type", "ne", "shape", "offset", "nbytes", "converted_from",
                 "_loader", "_data")

    def __init__(self, name: str, legacy_name: str, type: GGMLType, ne: tuple, offset: int, nbytes: int,
                 loader: Callable[[], np.ndarray], converted_from: Optional[str] = None) -> None:
        self.name, self.legacy_name, self.type = name, legacy_name, GGMLType(type)
        self.ne = tuple(int(x) for x in ne)
        self.shape = tuple(reversed(self.ne))
        self.offset, self.nbytes = int(offset), int(nbytes)
        self.converted_from = converted_from
        self._loader = loader
        self._data: Optional[np.ndarray] = None

    @property
    def n_elements(self) -> int:
        n = 1
        for x in self.ne:
            n *= x
        return n

    @property
    def row_bytes(self) -> int:
        per_block, nb = BLOCK[self.type]
        return self.ne[0] // per_block * nb

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            d = self._loader()
            if d.size != self.nbytes:   # pragma: no cover - a reader bug, not a file problem
                raise ModelFileError(f"internal: got {d.size} bytes, expected {self.nbytes}", tensor=self.name)
            self._data = d
        return self._data

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.type.name}, ne={self.ne}, offset={self.offset}, nbytes={self.nbytes})"


@dataclass
class ModelFile:
    """An opened model file (see docs/architecture.md, 'Model files')."""
    path: str
    format: str                      # 'ggml' | 'ggmf' | 'ggjt' | 'gguf'
    version: int                     # 0 for unversioned 'ggml'
    file_size: int                   # bytes of the model (the member's size inside a zip)
    ftype: Optional[int]
    mix_name: str
    hparams: HParams
    vocab: Vocab
    tensors: dict
    metadata: dict = field(default_factory=dict)
    container: str = "file"          # 'file' | 'zip'
    member: Optional[str] = None     # the file inside the zip
    _source: Any = field(default=None, repr=False)

    @property
    def version_name(self) -> str:
        if self.format == "gguf":
            return f"GGUF v{self.version}"
        if self.format == "ggml":
            return "ggml (unversioned)"
        return f"{self.format} v{self.version}"

    def type_counts(self) -> dict:
        """{'Q4_K': 10, 'F32': 5, ...} over all tensors."""
        out: dict = {}
        for t in self.tensors.values():
            out[t.type.name] = out.get(t.type.name, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def close(self) -> None:
        """Release the mapping (views already handed out keep it alive until they are dropped)."""
        if self._source is not None:
            for t in self.tensors.values():
                t._data = None
            self._source.close()
            self._source = None

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------------
# Tensor names

_LEGACY_LAYER = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "attention_norm": "attn_norm", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up", "ffn_norm": "ffn_norm",
}
_GGUF_LAYER = {v: k for k, v in _LEGACY_LAYER.items()}
_LEGACY_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_GGUF_TOP = {v: k for k, v in _LEGACY_TOP.items()}
_RE_LEGACY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
_RE_GGUF = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_tensor_name(legacy: str) -> str:
    """'layers.3.feed_forward.w1.weight' -> 'blk.3.ffn_gate.weight' (unknown names come back unchanged)."""
    m = _RE_LEGACY.match(legacy)
    if m and m.group(2) in _LEGACY_LAYER:
        return f"blk.{m.group(1)}.{_LEGACY_LAYER[m.group(2)]}.{m.group(3)}"
    base, _, suffix = legacy.rpartition(".")
    if base in _LEGACY_TOP:
        return f"{_LEGACY_TOP[base]}.{suffix}"
    return legacy


def legacy_tensor_name(name: str) -> str:
    """'blk.3.ffn_gate.weight' -> 'layers.3.feed_forward.w1.weight' (unknown names come back unchanged)."""
    m = _RE_GGUF.match(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    base, _, suffix = name.rpartition(".")
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.{suffix}"
    return name


# --------------------------------------------------------------------------------------------------------------------
# Opening

_OVERRIDES = ("n_gqa", "rms_norm_eps", "rope_freq_base", "rope_freq_scale", "n_ctx_train")


def open_model(path: Union[str, os.PathLike], *, n_gqa: Optional[int] = None, rms_norm_eps: Optional[float] = None,
               rope_freq_base: Optional[float] = None, rope_freq_scale: Optional[float] = None,
               n_ctx_train: Optional[int] = None, vocab_only: bool = False) -> ModelFile:
    """Open a GGUF, GGML (ggml/ggmf/ggjt v1-v3) file or a stored .zip (+ .z01 ...) holding one; headers only.

    The keyword overrides replace what the file says (GGML files store none of them; defaults are llama.cpp's:
    n_gqa inferred from the wk shape, eps 5e-6 for ggjt v3 / 1e-6 for older generations, rope base 10000, scale 1,
    n_ctx_train 2048). vocab_only=True reads hparams and vocabulary and skips the tensor table.
    Raises ModelFileError (naming file, offset, tensor) for anything wrong with the file.
    """
    # here: the readers build on this module's HParams, Vocab and ModelFile (a cycle at the top)
    from . import ggml as _ggml, gguf as _gguf, zipparts as _zip

    path = os.fspath(path)
    overrides = dict(n_gqa=n_gqa, rms_norm_eps=rms_norm_eps, rope_freq_base=rope_freq_base,
                     rope_freq_scale=rope_freq_scale, n_ctx_train=n_ctx_train)
    _check_overrides(path, overrides)
    container, member = "file", None
    try:
        if _zip.looks_like_zip(path):
            src, member = _zip.open_zip_member(path)
            container = "zip"
        else:
            src = Source.open_file(path)
    except ModelFileError as e:
        raise _tidy(e) from None
    try:
        magic = src.bytes(0, 4, what="magic") if src.size >= 4 else b""
        if magic == b"GGUF":
            mf = _gguf.read_gguf(src, overrides, vocab_only=vocab_only)
        else:
            mf = _ggml.read_ggml(src, overrides, vocab_only=vocab_only)
        mf.container, mf.member = container, member
        if not vocab_only:
            validate(mf)
        return mf
    except ModelFileError as e:
        src.close()
        raise _tidy(e) from None
    except (ValueError, OverflowError, IndexError, KeyError, UnicodeDecodeError, MemoryError) as e:
        # Defence in depth: a check we missed must still end as a ModelFileError.
        src.close()
        raise ModelFileError(f"malformed model file: {type(e).__name__}: {e}", path=path) from e


def _tidy(e: ModelFileError) -> ModelFileError:
    """Keep messages one readable line: garbage names from a corrupted file are escaped and clipped."""
    msg = str(e)
    if len(msg) > 400 or not msg.isprintable():
        msg = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in msg)
        if len(msg) > 400:
            msg = msg[:200] + " ... " + msg[-180:]
        e.args = (msg,)
    if e.tensor is not None and len(e.tensor) > 64:
        e.tensor = e.tensor[:64] + "..."
    return e


def is_model_file(path: Union[str, os.PathLike]) -> bool:
    """Cheap test by magic (or .zip extension) used by the model library to list folders."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".zip"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"GGUF" or head[::-1] in (b"ggml", b"ggmf", b"ggjt")


def _check_overrides(path: str, o: dict) -> None:
    def bad(msg: str) -> ModelFileError:
        return ModelFileError(f"invalid load-time override: {msg}", path=path)
    if o["n_gqa"] is not None and not (isinstance(o["n_gqa"], int) and 1 <= o["n_gqa"] <= 256):
        raise bad(f"n_gqa={o['n_gqa']!r} (an integer 1..256)")
    if o["rms_norm_eps"] is not None and not (0 < float(o["rms_norm_eps"]) < 1):
        raise bad(f"rms_norm_eps={o['rms_norm_eps']!r}")
    if o["rope_freq_base"] is not None and not (0 < float(o["rope_freq_base"]) < 1e12):
        raise bad(f"rope_freq_base={o['rope_freq_base']!r}")
    if o["rope_freq_scale"] is not None and not (0 < float(o["rope_freq_scale"]) <= 1e3):
        raise bad(f"rope_freq_scale={o['rope_freq_scale']!r}")
    if o["n_ctx_train"] is not None and not (isinstance(o["n_ctx_train"], int) and 1 <= o["n_ctx_train"] <= 1 << 24):
        raise bad(f"n_ctx_train={o['n_ctx_train']!r}")


def apply_overrides(hp: HParams, o: dict) -> None:
    """Apply user overrides (all but n_gqa, which the readers handle because it changes n_head_kv)."""
    for k in ("rms_norm_eps", "rope_freq_base", "rope_freq_scale"):
        if o.get(k) is not None:
            setattr(hp, k, float(o[k]))
    if o.get("n_ctx_train") is not None:
        hp.n_ctx_train = int(o["n_ctx_train"])


# --------------------------------------------------------------------------------------------------------------------
# Validation against the LLaMA architecture

def expected_shapes(hp: HParams) -> dict:
    """GGUF name -> ne (ggml order) for every tensor a LLaMA model has."""
    e, f, v, g = hp.n_embd, hp.n_ff, hp.n_vocab, hp.n_embd_gqa
    out = {"token_embd.weight": (e, v), "output_norm.weight": (e,), "output.weight": (e, v)}
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        out.update({p + "attn_norm.weight": (e,), p + "attn_q.weight": (e, e), p + "attn_k.weight": (e, g),
                    p + "attn_v.weight": (e, g), p + "attn_output.weight": (e, e), p + "ffn_norm.weight": (e,),
                    p + "ffn_gate.weight": (e, f), p + "ffn_down.weight": (f, e), p + "ffn_up.weight": (e, f)})
    return out


def validate(mf: ModelFile) -> None:
    """Check hparams against each other and every tensor's shape against the hparams."""
    hp = mf.hparams

    def bad(msg: str, t: Optional[TensorInfo] = None) -> ModelFileError:
        return ModelFileError(msg, path=mf.path, offset=t.offset if t else None, tensor=t.name if t else None)

    if not (0 < hp.n_embd <= 1 << 17 and 0 < hp.n_head <= 4096 and 0 < hp.n_layer <= 4096
            and 0 < hp.n_vocab <= 1 << 22 and 0 < hp.n_ff <= 1 << 20):
        raise bad(f"implausible hyper-parameters n_vocab={hp.n_vocab} n_embd={hp.n_embd} n_head={hp.n_head} "
                  f"n_layer={hp.n_layer} n_ff={hp.n_ff}")
    if 9 * hp.n_layer + 2 > len(mf.tensors):
        raise bad(f"n_layer={hp.n_layer} needs at least {9 * hp.n_layer + 2} tensors, the file has "
                  f"{len(mf.tensors)}")
    if hp.n_embd % hp.n_head:
        raise bad(f"n_embd={hp.n_embd} is not a multiple of n_head={hp.n_head}")
    if hp.n_head_kv <= 0 or hp.n_head % hp.n_head_kv:
        raise bad(f"n_head={hp.n_head} is not a multiple of n_head_kv={hp.n_head_kv}")
    if hp.n_rot != hp.n_embd_head:
        raise bad(f"n_rot={hp.n_rot} differs from n_embd/n_head={hp.n_embd_head} (partial RoPE is not LLaMA)")
    if len(mf.vocab) != hp.n_vocab:
        raise bad(f"vocabulary has {len(mf.vocab)} entries, hparams say n_vocab={hp.n_vocab}")
    want = expected_shapes(hp)
    for name, ne in want.items():
        t = mf.tensors.get(name)
        if t is None:
            if name == "output.weight":
                continue  # tied embeddings: the model uses token_embd for the output
            raise bad(f"missing tensor {name!r} ({legacy_tensor_name(name)!r} in GGML files)")
        if t.ne != ne:
            raise bad(f"shape {list(t.ne)} disagrees with the hparams, expected {list(ne)} "
                      f"(n_embd={hp.n_embd} n_ff={hp.n_ff} n_vocab={hp.n_vocab} n_gqa={hp.n_gqa})", t)
        if len(ne) == 1 and t.type != GGMLType.F32:
            raise bad(f"norm weight must be F32, found {t.type.name}", t)
    # Extra tensors (e.g. rope_freqs.weight of later GGUFs) are kept; the forward pass ignores what it does not use.


# --------------------------------------------------------------------------------------------------------------------
# RAM estimate ("Max RAM required" of the model cards: file + context)

SCRATCH_OVERHEAD = 256 << 20     # interpreter, numba runtime, tokenizer, buffers independent of the model


# Bytes per 32 cached values of each KV cache type (ggml's block sizes; airobackend.kvcache holds the rows).
KV_BYTES_PER_32 = {"f16": 64, "q8_0": 34, "q4_0": 18}


def kv_cache_bytes(hp: HParams, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """K and V for every layer: n_layer * n_ctx * n_embd/n_gqa values each, at the cache types' bytes per value
    (f16: 2 * n_layer * n_ctx * n_embd/n_gqa * 2 bytes; q8_0 34/64 of that, q4_0 18/64)."""
    per_32 = sum(KV_BYTES_PER_32[str(t).lower()] for t in (type_k, type_v))
    return hp.n_layer * n_ctx * hp.n_embd_gqa * per_32 // 32


def scratch_bytes(hp: HParams, n_ctx: int, n_batch: int = 512) -> int:
    """Float32 activations for one batch: residual/norm/q/k/v/out (6 * n_embd), FFN (2 * n_ff), attention
    scores (n_head * n_ctx) and logits (n_vocab), per batch position, plus a fixed overhead."""
    per_tok = 6 * hp.n_embd + 2 * hp.n_ff + hp.n_head * n_ctx + hp.n_vocab
    return 4 * n_batch * per_tok + SCRATCH_OVERHEAD


def estimate_ram(model: Union[ModelFile, HParams], n_ctx: Optional[int] = None, *,
                 weights_bytes: Optional[int] = None, n_batch: int = 512, type_k: str = "f16",
                 type_v: str = "f16") -> int:
    """Bytes of RAM needed to run `model` with context `n_ctx` (default: its training context):
    weights (the file size; its pages are mapped) + KV cache of the given types + scratch."""
    if isinstance(model, ModelFile):
        hp, weights = model.hparams, model.file_size if weights_bytes is None else weights_bytes
    else:
        hp, weights = model, weights_bytes or 0
    n_ctx = int(n_ctx or hp.n_ctx_train or 2048)
    return int(weights) + kv_cache_bytes(hp, n_ctx, type_k, type_v) + scratch_bytes(hp, n_ctx, min(n_batch, n_ctx))


def mix_name_for(ftype: Optional[int], tensors: dict) -> str:
    """Mix name from ftype, or guessed from the most common 2-D tensor type when ftype is absent."""
    if ftype is not None:
        return ftype_name(ftype)
    counts: dict = {}
    for t in tensors.values():
        if len(t.ne) == 2:
            counts[t.type] = counts.get(t.type, 0) + 1
    if not counts:
        return "unknown"
    top = max(counts, key=lambda k: counts[k])
    return {GGMLType.F32: "f32", GGMLType.F16: "f16"}.get(top, top.name.lower().replace("_k", "_K"))
