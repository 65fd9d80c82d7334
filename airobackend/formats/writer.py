"""Writers for GGUF (v3) and GGML v3 ('ggjt' v3) LLaMA files, and seeded synthetic models in any mix.

Writing is streamed: the header is computed from the tensor list, then each tensor's raw blocks are produced (and,
for synthetic models, generated and quantized in row chunks) and written one after the other, so a 65B-shaped slice
never sits in RAM as a whole.

Synthetic weights follow the recipe of the llama.cpp-made test fixtures: tensor k (in the order
token_embd, per layer attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_down ffn_up, then output_norm,
output) is `default_rng([seed, k]).standard_normal((n_rows, row_len), float32)` x 0.02, norms 1 + 0.02 x N(0, 1);
f16 and quantized files start from the values rounded to f16 (llama-quantize ran on the f16 file), so seed 11 and
the fx shapes reproduce the fixtures' tensor payloads byte for byte.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ..quant import BLOCK, FTYPE_NAMES, GGMLType
from . import HParams, Vocab, legacy_tensor_name
from .quantize import quantize

MIX_FTYPE = {v: k for k, v in FTYPE_NAMES.items()}
MIX_BASE = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1,
            "q5_0": GGMLType.Q5_0, "q5_1": GGMLType.Q5_1, "q8_0": GGMLType.Q8_0, "q2_K": GGMLType.Q2_K,
            "q3_K_S": GGMLType.Q3_K, "q3_K_M": GGMLType.Q3_K, "q3_K_L": GGMLType.Q3_K, "q4_K_S": GGMLType.Q4_K,
            "q4_K_M": GGMLType.Q4_K, "q5_K_S": GGMLType.Q5_K, "q5_K_M": GGMLType.Q5_K, "q6_K": GGMLType.Q6_K}
K_MIXES = {m for m, t in MIX_BASE.items() if t >= GGMLType.Q2_K}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: GGUF name, type, ne in ggml order (ne[0] = row length)."""
    name: str
    type: GGMLType
    ne: tuple

    @property
    def nbytes(self) -> int:
        per_block, nb = BLOCK[self.type]
        n = 1
        for d in self.ne:
            n *= d
        return n // per_block * nb


# --------------------------------------------------------------------------------------------------------------------
# llama.cpp's per-tensor type choice for a mix

def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp: give the first and last eighth and every third layer in between more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type_for(mix: str, name: str, ne: Sequence[int], n_layer: int, *, n_gqa: int = 1,
                    rules: str = "2025") -> GGMLType:
    """Type llama-quantize gives tensor `name` (GGUF name) in `mix`.

    rules='2023': mid-2023 llama.cpp (`llama_model_quantize_internal`, `llama.cpp` at dadbed9, the GGML v3 era): k-quant
    mixes put output in Q6_K; wv/w2 get Q4_K (q2_K, q3_K_M), Q5_K (q3_K_L), Q6_K on use_more_bits layers (q4_K_M,
    q5_K_M); wo gets Q4_K (q2_K, q3_K_M) / Q5_K (q3_K_L).
    rules='2025': llama.cpp c392e5094 (the fixtures): output Q6_K for every quantized mix but q8_0, and the
    attn_v / ffn_down / attn_output rules of its `llama_tensor_get_type` (`src/llama-quant.cpp`).
    Norms (1-D) stay F32.
    """
    if mix not in MIX_BASE:
        raise ValueError(f"unknown mix {mix!r} (one of {', '.join(MIX_BASE)})")
    if len(ne) == 1 or not name.endswith("weight"):
        return GGMLType.F32
    base = MIX_BASE[mix]
    if base in (GGMLType.F32, GGMLType.F16):
        return base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    kind = name.split(".")[-2] if layer >= 0 else name.rsplit(".", 1)[0]
    t = base
    if rules == "2023":
        if kind == "output" and mix in K_MIXES:
            t = GGMLType.Q6_K
        elif kind in ("attn_v", "ffn_down"):
            if mix in ("q2_K", "q3_K_M"):
                t = GGMLType.Q4_K
            elif mix == "q3_K_L":
                t = GGMLType.Q5_K
            elif mix in ("q4_K_M", "q5_K_M") and use_more_bits(layer, n_layer):
                t = GGMLType.Q6_K
        elif kind == "attn_output":
            if mix in ("q2_K", "q3_K_M"):
                t = GGMLType.Q4_K
            elif mix == "q3_K_L":
                t = GGMLType.Q5_K
        if t >= GGMLType.Q2_K and ne[0] % 256:
            if kind == "output":
                return GGMLType.F16
            if kind == "token_embd":
                return GGMLType.Q4_0
            raise ValueError(f"{name}: row length {ne[0]} is not a multiple of 256, which {t.name} needs")
        return t
    if rules != "2025":
        raise ValueError(f"rules must be '2023' or '2025', not {rules!r}")
    if kind == "output":
        if ne[0] % 256:
            return GGMLType.Q8_0
        if t != GGMLType.Q8_0:
            t = GGMLType.Q6_K
    elif kind == "attn_v":
        if mix == "q2_K":
            t = GGMLType.Q4_K if n_gqa >= 4 else GGMLType.Q3_K
        elif mix == "q3_K_M":
            t = GGMLType.Q5_K if layer < 2 else GGMLType.Q4_K
        elif mix == "q3_K_L":
            t = GGMLType.Q5_K
        elif mix in ("q4_K_M", "q5_K_M") and use_more_bits(layer, n_layer):
            t = GGMLType.Q6_K
        elif mix == "q4_K_S" and layer < 4:
            t = GGMLType.Q5_K
    elif kind == "ffn_down":
        if mix == "q2_K":
            t = GGMLType.Q3_K
        elif mix == "q3_K_M":
            t = GGMLType.Q5_K if layer < n_layer // 16 else GGMLType.Q4_K
        elif mix == "q3_K_L":
            t = GGMLType.Q5_K
        elif mix in ("q4_K_M", "q5_K_M") and use_more_bits(layer, n_layer):
            t = GGMLType.Q6_K
        elif mix == "q4_K_S" and layer < n_layer // 8:
            t = GGMLType.Q5_K
    elif kind == "attn_output":
        if mix == "q2_K":
            t = GGMLType.Q3_K
        elif mix == "q3_K_M":
            t = GGMLType.Q4_K
        elif mix == "q3_K_L":
            t = GGMLType.Q5_K
    if t >= GGMLType.Q2_K and ne[0] % 256:   # llama.cpp's fallback for rows that are not whole super-blocks
        t = {GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q4_K: GGMLType.Q5_0,
             GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}[t]
    return t


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary spellings

def vocab_to_ggml(v: Vocab) -> list:
    """GGUF pieces -> mid-2023 convert.py text (spaces, raw bytes, empty control tokens, ' \\u2047 ' for unk)."""
    if v.spelling == "ggml":
        return list(v.pieces)
    out = []
    for i, p in enumerate(v.pieces):
        t = int(v.types[i]) if v.types is not None else 1
        if t == 6 and len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            out.append(bytes([int(p[3:5], 16)]))
        elif t == 3:
            out.append(b"")
        elif t == 2:
            out.append(" \u2047 ".encode())
        else:
            out.append(p.replace("\u2581".encode(), b" "))
    return out


def vocab_to_gguf(v: Vocab) -> tuple[list, np.ndarray]:
    """GGML text -> GGUF pieces and token types (what llama.cpp's GGML->GGUF converter does)."""
    if v.spelling == "gguf":
        types = v.types if v.types is not None else np.ones(len(v.pieces), np.int32)
        return list(v.pieces), np.asarray(types, np.int32)
    pieces, types = [], np.ones(len(v.pieces), np.int32)
    special = {0: (b"<unk>", 2), 1: (b"<s>", 3), 2: (b"</s>", 3)}
    for i, p in enumerate(v.pieces):
        if i in special:
            pieces.append(special[i][0])
            types[i] = special[i][1]
        elif 3 <= i < 259 and len(p) == 1:
            pieces.append(b"<0x%02X>" % p[0])
            types[i] = 6
        elif p == b"":
            pieces.append(p)
            types[i] = 3
        else:
            pieces.append(p.replace(b" ", "\u2581".encode()))
    return pieces, types


# --------------------------------------------------------------------------------------------------------------------
# Container writers

DataSource = Callable[[TensorSpec], Iterable[np.ndarray]]   # yields raw uint8 chunks of one tensor, in order


def _write_chunks(f, spec: TensorSpec, chunks: Optional[Iterable[np.ndarray]]) -> None:
    if chunks is None:                # no data: leave a hole (sparse file), for header-only tests of huge shapes
        f.seek(spec.nbytes, os.SEEK_CUR)
        return
    n = 0
    for c in chunks:
        b = np.ascontiguousarray(c, dtype=np.uint8).reshape(-1)
        f.write(memoryview(b))
        n += b.size
    if n != spec.nbytes:
        raise ValueError(f"{spec.name}: data source gave {n} bytes, expected {spec.nbytes}")


def _gguf_str(b: Union[str, bytes]) -> bytes:
    if isinstance(b, str):
        b = b.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_kv(key: str, value) -> bytes:
    k = _gguf_str(key)
    if isinstance(value, bool):
        return k + struct.pack("<IB", 7, value)
    if isinstance(value, int):
        return k + struct.pack("<II", 4, value) if value >= 0 else k + struct.pack("<Ii", 5, value)
    if isinstance(value, float):
        return k + struct.pack("<If", 6, value)
    if isinstance(value, (str, bytes)):
        return k + struct.pack("<I", 8) + _gguf_str(value)
    if isinstance(value, np.ndarray):
        code = {np.dtype("<f4"): 6, np.dtype("<i4"): 5, np.dtype("<u4"): 4}[value.dtype]
        return k + struct.pack("<IIQ", 9, code, value.size) + value.tobytes()
    if isinstance(value, list):   # list of strings
        return k + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_gguf_str(s) for s in value)
    raise TypeError(f"cannot store {type(value)} in GGUF")


def write_gguf(path: Union[str, os.PathLike], *, hparams: HParams, vocab: Vocab, tensors: Sequence[TensorSpec],
               data: Optional[DataSource], ftype: Optional[int] = None, name: str = "airobackend synthetic",
               alignment: int = 32, extra: Optional[dict] = None) -> None:
    """Write a GGUF v3 llama file; `data(spec)` yields the raw blocks of each tensor in order (data=None leaves
    holes: a sparse file with valid headers, for tests of huge shapes)."""
    hp = hparams
    pieces, types = vocab_to_gguf(vocab)
    kv = {"general.architecture": "llama", "general.name": name, "general.alignment": alignment,
          "llama.context_length": hp.n_ctx_train, "llama.embedding_length": hp.n_embd,
          "llama.block_count": hp.n_layer, "llama.feed_forward_length": hp.n_ff,
          "llama.rope.dimension_count": hp.n_rot, "llama.attention.head_count": hp.n_head,
          "llama.attention.head_count_kv": hp.n_head_kv,
          "llama.attention.layer_norm_rms_epsilon": float(hp.rms_norm_eps),
          "llama.rope.freq_base": float(hp.rope_freq_base), "llama.vocab_size": len(pieces),
          "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
          "tokenizer.ggml.scores": np.asarray(vocab.scores, "<f4"), "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.bos_token_id": hp.bos_id, "tokenizer.ggml.eos_token_id": hp.eos_id,
          "tokenizer.ggml.unknown_token_id": hp.unk_id, "tokenizer.ggml.add_bos_token": bool(hp.add_bos),
          "tokenizer.ggml.add_space_prefix": bool(hp.add_space_prefix)}
    if getattr(vocab, "model", "llama") == "gpt2":        # byte-level BPE: its merges and pre-tokenizer
        kv.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": vocab.pre or "",
                   "tokenizer.ggml.merges": list(vocab.merges or [])})
    if hp.rope_freq_scale != 1.0:
        kv["llama.rope.scaling.type"] = "linear"
        kv["llama.rope.scaling.factor"] = 1.0 / hp.rope_freq_scale
    if ftype is not None:
        kv["general.file_type"] = int(ftype)
        kv["general.quantization_version"] = 2
    kv.update(extra or {})
    head = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv))]
    head += [_gguf_kv(k, v) for k, v in kv.items()]
    off = 0
    offsets = []
    for s in tensors:
        offsets.append(off)
        head.append(_gguf_str(s.name) + struct.pack(f"<I{len(s.ne)}QIQ", len(s.ne), *s.ne, int(s.type), off))
        off += -(-s.nbytes // alignment) * alignment
    header = b"".join(head)
    with open(path, "wb") as f:
        f.write(header)
        f.write(b"\0" * (-len(header) % alignment))
        for s in tensors:
            _write_chunks(f, s, data(s) if data is not None else None)
            f.write(b"\0" * (-s.nbytes % alignment))
        f.truncate()


def write_ggml_v3(path: Union[str, os.PathLike], *, hparams: HParams, vocab: Vocab, tensors: Sequence[TensorSpec],
                  data: Optional[DataSource], ftype: int, n_mult: Optional[int] = None) -> None:
    """Write a GGML v3 ('ggjt' v3) file: hparams (no eps/rope/n_gqa: not storable), convert.py-spelled vocabulary,
    tensor records with legacy names and data aligned to 32 bytes."""
    hp = hparams
    if n_mult is None:
        n_mult = hp.n_mult or _find_n_mult(hp.n_embd, hp.n_ff)
    pieces = vocab_to_ggml(vocab)
    with open(path, "wb") as f:
        f.write(struct.pack("<II7I", 0x67676A74, 3, len(pieces), hp.n_embd, n_mult, hp.n_head, hp.n_layer,
                            hp.n_rot, ftype))
        scores = np.asarray(vocab.scores, np.float32)
        f.write(b"".join(struct.pack("<I", len(p)) + p + struct.pack("<f", float(scores[i]))
                         for i, p in enumerate(pieces)))
        for s in tensors:
            name = legacy_tensor_name(s.name).encode()
            rec = struct.pack(f"<3I{len(s.ne)}I", len(s.ne), len(name), int(s.type), *s.ne) + name
            f.write(rec)
            f.write(b"\0" * (-f.tell() % 32))
            _write_chunks(f, s, data(s) if data is not None else None)
        f.truncate()


def _find_n_mult(n_embd: int, n_ff: int) -> int:
    """n_mult reproducing n_ff with llama.cpp's formula: Meta's 256 when it works, else the largest (convert.py)."""
    for n_mult in (256, *range(8192, 0, -1)):
        if ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult == n_ff:
            return n_mult
    raise ValueError(f"no n_mult gives n_ff={n_ff} for n_embd={n_embd}; GGML v3 cannot store this shape")


# --------------------------------------------------------------------------------------------------------------------
# Synthetic models

def synthetic_vocab(n_vocab: int) -> Vocab:
    """A deterministic SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces."""
    if n_vocab < 3:
        raise ValueError("n_vocab must be >= 3")
    pieces = [b"<unk>", b"<s>", b"</s>"]
    types = [2, 3, 3]
    for b in range(min(256, n_vocab - 3)):
        pieces.append(b"<0x%02X>" % b)
        types.append(6)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    i = 0
    while len(pieces) < n_vocab:
        word, k = "", i
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        pieces.append(("\u2581" + word if i % 2 == 0 else word).encode())
        types.append(1)
        i += 1
    scores = -np.arange(n_vocab, dtype=np.float32)
    scores[:259] = 0
    return Vocab(pieces=pieces, scores=scores, types=np.asarray(types, np.int32), spelling="gguf")


def llama_tensor_order(n_layer: int) -> list:
    """GGUF names in the fixtures' generation order (the index k of the seeded recipe)."""
    names = ["token_embd.weight"]
    for i in range(n_layer):
        names += [f"blk.{i}.{k}.weight" for k in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_gate", "ffn_down", "ffn_up")]
    return names + ["output_norm.weight", "output.weight"]


def ggml_tensor_order(n_layer: int) -> list:
    """The order convert.py wrote GGML files in: tok_embeddings, norm, output, then per layer wq wk wv wo
    attention_norm w1 w2 w3 ffn_norm."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(n_layer):
        names += [f"blk.{i}.{k}.weight" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm",
                                                  "ffn_gate", "ffn_down", "ffn_up", "ffn_norm")]
    return names


def synthetic_values(seed: int, k: int, ne: Sequence[int], *, f16: bool, rows_per_chunk: int) -> Iterator[np.ndarray]:
    """The fixture recipe for tensor k, in chunks of rows (the generator's stream does not depend on chunking)."""
    rng = np.random.default_rng([seed, k])
    row = int(ne[0])
    n_rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    for r in range(0, n_rows, rows_per_chunk):
        m = min(rows_per_chunk, n_rows - r)
        v = rng.standard_normal((m, row), dtype=np.float32)
        v = (np.float32(1) + np.float32(0.02) * v) if len(ne) == 1 else v * np.float32(0.02)
        if f16 and len(ne) > 1:      # norms stay F32 with their f32 values
            v = v.astype(np.float16).astype(np.float32)
        yield v


def write_synthetic_model(path: Union[str, os.PathLike], *, format: str = "gguf", mix: str = "q4_0",
                          n_vocab: int = 1024, n_embd: int = 256, n_head: int = 4, n_head_kv: Optional[int] = None,
                          n_layer: int = 2, n_ff: Optional[int] = None, seed: int = 11,
                          vocab: Optional[Vocab] = None, rules: Optional[str] = None, n_ctx_train: int = 2048,
                          rms_norm_eps: float = 5e-6, chunk_bytes: int = 32 << 20, sparse: bool = False,
                          tile_rows: Optional[int] = None) -> dict:
    """Write a seeded random LLaMA model (format 'gguf' or 'ggml' = GGML v3) in `mix` ('f32', 'q4_K_M', ...).

    Per-tensor types follow llama.cpp's rules (`rules` '2025' for GGUF, '2023' for GGML v3 by default; see
    tensor_type_for). Weights follow the fixtures' recipe; with seed 11 and the fx shapes the payloads equal
    llama.cpp's fx-* files. Memory use is bounded by `chunk_bytes` of float32 values per step whatever the shape.
    sparse=True writes only the headers and leaves the tensor data as holes (instant 65B-sized files).
    tile_rows=N (benchmarks): quantize only the first N rows of each matrix and repeat their blocks over the rest,
    so 7B/65B-shaped k-quant slices are written at disk speed (the numpy k-quantizers do ~1 M weights/s); the
    values then follow the recipe only in those rows.
    Returns {gguf name: GGMLType}.
    """
    if format not in ("gguf", "ggml"):
        raise ValueError("format must be 'gguf' or 'ggml'")
    n_head_kv = n_head_kv or n_head
    if n_ff is None:
        n_ff = ((2 * (4 * n_embd) // 3 + 255) // 256) * 256
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")
    rules = rules or ("2025" if format == "gguf" else "2023")
    vocab = vocab or synthetic_vocab(n_vocab)
    if len(vocab) != n_vocab:
        raise ValueError(f"vocab has {len(vocab)} entries, n_vocab={n_vocab}")
    hp = HParams(n_vocab=n_vocab, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_layer=n_layer, n_ff=n_ff,
                 n_rot=n_embd // n_head, n_ctx_train=n_ctx_train, rms_norm_eps=rms_norm_eps)
    n_embd_gqa = n_embd // n_head * n_head_kv
    shapes = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,),
              "output.weight": (n_embd, n_vocab)}
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (n_embd,), p + "attn_q.weight": (n_embd, n_embd),
                       p + "attn_k.weight": (n_embd, n_embd_gqa), p + "attn_v.weight": (n_embd, n_embd_gqa),
                       p + "attn_output.weight": (n_embd, n_embd), p + "ffn_norm.weight": (n_embd,),
                       p + "ffn_gate.weight": (n_embd, n_ff), p + "ffn_down.weight": (n_ff, n_embd),
                       p + "ffn_up.weight": (n_embd, n_ff)})
    k_of = {n: k for k, n in enumerate(llama_tensor_order(n_layer))}
    types = {n: tensor_type_for(mix, n, ne, n_layer, n_gqa=n_head // n_head_kv, rules=rules)
             for n, ne in shapes.items()}
    order = llama_tensor_order(n_layer) if format == "gguf" else ggml_tensor_order(n_layer)
    specs = [TensorSpec(n, types[n], shapes[n]) for n in order]
    from_f16 = mix != "f32"

    def data(spec: TensorSpec) -> Iterator[np.ndarray]:
        per_row = spec.ne[0] * 4
        rows = max(1, chunk_bytes // per_row)
        n_rows = spec.ne[1] if len(spec.ne) > 1 else 1
        if tile_rows and n_rows > tile_rows:
            head = next(synthetic_values(seed, k_of[spec.name], spec.ne, f16=from_f16, rows_per_chunk=tile_rows))
            block = quantize(head, spec.type)
            reps = max(1, rows // tile_rows)
            for r in range(0, n_rows, tile_rows * reps):
                m = min(tile_rows * reps, n_rows - r)
                whole, part = divmod(m, tile_rows)
                out = np.tile(block, whole)
                yield np.concatenate([out, block[:part * (block.size // tile_rows)]]) if part else out
            return
        for v in synthetic_values(seed, k_of[spec.name], spec.ne, f16=from_f16, rows_per_chunk=rows):
            yield quantize(v, spec.type)

    ftype = MIX_FTYPE[mix]
    src = None if sparse else data
    if format == "gguf":
        write_gguf(path, hparams=hp, vocab=vocab, tensors=specs, data=src, ftype=ftype)
    else:
        write_ggml_v3(path, hparams=hp, vocab=vocab, tensors=specs, data=src, ftype=ftype)
    return types


def write_model_like(path: Union[str, os.PathLike], mf, *, format: str,
                     tensor_filter: Optional[Callable[[str], bool]] = None) -> None:
    """Re-write an opened ModelFile (GGML v3 or GGUF) in `format` with payloads copied unchanged."""
    specs = [TensorSpec(t.name, t.type, t.ne) for t in mf.tensors.values()
             if tensor_filter is None or tensor_filter(t.name)]
    order = {n: i for i, n in enumerate((llama_tensor_order if format == "gguf" else ggml_tensor_order)(
        mf.hparams.n_layer))}
    specs.sort(key=lambda s: order.get(s.name, len(order)))      # the order each converter wrote

    def data(spec: TensorSpec):
        yield mf.tensors[spec.name].data

    if format == "gguf":
        write_gguf(path, hparams=mf.hparams, vocab=mf.vocab, tensors=specs, data=data, ftype=mf.ftype)
    else:
        write_ggml_v3(path, hparams=mf.hparams, vocab=mf.vocab, tensors=specs, data=data, ftype=mf.ftype or 0)
