"""Legacy GGML reader: unversioned 'ggml', 'ggmf' v1, 'ggjt' v1, v2 and v3 (no library exists for these; ours).

GGML v3 tensors are zero-copy views. Pre-v3 quant blocks are converted to the v3 layout on first access of
`TensorInfo.data` (never at open time):
  * Q4_0/Q4_1/Q5_0/Q5_1 of 'ggml'/'ggmf'/'ggjt' v1: nibbles in "pairs" order -> "halves" order (lossless);
  * Q4_0/Q4_1/Q8_0 scales f32 -> fp16 (ggjt v1/v2; rounding the scale to fp16, at most 2^-11 relative, exactly what
    llama.cpp's own v3 format stores);
  * Q4_2 (ggjt v1 only, 16-weight blocks with their own scale) has no v3 equivalent and is refused.
"""
from __future__ import annotations

import struct
from typing import Callable, Optional

import numpy as np

from ..errors import ModelFileError, UnsupportedTensorType
from ..quant import BLOCK, GGMLType
from . import HParams, ModelFile, TensorInfo, Vocab, apply_overrides, gguf_tensor_name, mix_name_for
from ._source import Cursor, Source

MAGICS = {0x67676D6C: "ggml", 0x67676D66: "ggmf", 0x67676A74: "ggjt"}
NOT_MODELS = {0x67676C61: "a LoRA adapter ('ggla'), not a model", 0x6767736E: "a llama.cpp session file ('ggsn')"}
MAX_NAME = 256
_HP = struct.Struct("<7I")
_REC = struct.Struct("<3I")

# Legacy tensor type ids (identical numbers in every generation): 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 4 Q4_2, 5 Q4_3,
# 6 Q5_0, 7 Q5_1, 8 Q8_0, 10..14 K-quants (v3 only).
_OLD_NAMES = {4: "Q4_2", 5: "Q4_3"}


def _legacy_layout(gen: str, version: int, t: int):
    """(v3 type, bytes per 32-block in the file, converter or None, description) for a tensor type in a generation."""
    pairs = gen in ("ggml", "ggmf") or version == 1          # pre-#1405 nibble order
    v3 = gen == "ggjt" and version >= 3
    if t not in BLOCK.keys():
        return None
    if t in (0, 1):
        return GGMLType(t), None, None, None
    if v3:
        return GGMLType(t), None, None, None
    if t == 2:
        return GGMLType.Q4_0, 20, (_q4_0_pairs if pairs else _q4_0_halves_f32), "Q4_0 (f32 scale" + (
            ", pair nibble order)" if pairs else ")")
    if t == 3:
        return GGMLType.Q4_1, 24, (_q4_1_pairs if pairs else _q4_1_halves_f32), "Q4_1 (f32 scales" + (
            ", pair nibble order)" if pairs else ")")
    if t == 6:
        return GGMLType.Q5_0, 22, (_q5_0_pairs if pairs else None), "Q5_0 (pair nibble order)" if pairs else None
    if t == 7:
        return GGMLType.Q5_1, 24, (_q5_1_pairs if pairs else None), "Q5_1 (pair nibble order)" if pairs else None
    if t == 8:
        return GGMLType.Q8_0, 36, _q8_0_f32, "Q8_0 (f32 scale)"
    return None


def read_ggml(src: Source, overrides: dict, *, vocab_only: bool = False) -> ModelFile:
    c = Cursor(src)
    path = src.path
    magic = c.u32("magic")
    if magic in NOT_MODELS:
        raise c.fail(f"this is {NOT_MODELS[magic]}", offset=0)
    if magic not in MAGICS:
        raw = struct.pack("<I", magic)
        raise c.fail(f"not a model file: magic {raw!r} is neither GGUF nor GGML ('ggml', 'ggmf', 'ggjt')", offset=0)
    gen = MAGICS[magic]
    version = 0
    if gen != "ggml":
        version = c.u32("version")
        ok = {"ggmf": (1,), "ggjt": (1, 2, 3)}[gen]
        if version not in ok:
            raise c.fail(f"unknown {gen} version {version} (known: {', '.join(map(str, ok))})", offset=4)
    hpos = c.pos
    n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype = c.unpack(_HP, "hyper-parameters")
    rec = 4 if gen == "ggml" else 8                      # smallest vocabulary record
    if not (1 <= n_vocab <= 1 << 22) or n_vocab * rec > c.remaining:
        raise c.fail(f"absurd n_vocab {n_vocab} for a file of {src.size} bytes", offset=hpos)
    if not (1 <= n_embd <= 1 << 17 and 1 <= n_head <= 4096 and 1 <= n_layer <= 4096 and 1 <= n_mult <= 1 << 20):
        raise c.fail(f"implausible hyper-parameters n_embd={n_embd} n_head={n_head} n_layer={n_layer} "
                     f"n_mult={n_mult}", offset=hpos)

    # Vocabulary
    pieces: list = []
    scores = np.zeros(n_vocab, np.float32)
    take, u32, f32 = c.take, c.u32, c.f32
    for i in range(n_vocab):
        n = u32("vocabulary entry length")
        if n > 1 << 16 or n > c.remaining:
            raise c.fail(f"absurd length {n} of vocabulary entry {i}", offset=c.pos - 4)
        pieces.append(bytes(take(n, f"vocabulary entry {i}")))
        if gen != "ggml":
            scores[i] = f32(f"score of vocabulary entry {i}")
    vocab = Vocab(pieces=pieces, scores=scores, types=None, spelling="ggml")

    # Tensor records until end of file
    tensors: dict = {}
    aligned = gen == "ggjt"
    if not vocab_only:
        while c.pos < src.size:
            rpos = c.pos
            n_dims, name_len, ttype = c.unpack(_REC, "tensor record")
            if not 1 <= n_dims <= 2:
                raise c.fail(f"tensor record with {n_dims} dimensions (only 1-D and 2-D tensors exist in LLaMA files)",
                             offset=rpos)
            if not 1 <= name_len <= MAX_NAME:
                raise c.fail(f"absurd tensor name length {name_len}", offset=rpos + 4)
            ne = c.unpack(struct.Struct(f"<{n_dims}I"), "tensor dimensions")
            raw_name = bytes(c.take(name_len, "tensor name"))
            try:
                legacy = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise c.fail(f"tensor name {raw_name[:48]!r} is not UTF-8", offset=rpos) from None
            if not legacy.isprintable():
                raise c.fail(f"garbled tensor name {legacy[:48]!r}", offset=rpos)
            if any(d < 1 for d in ne):
                raise c.fail(f"zero dimension in {list(ne)}", offset=rpos, tensor=legacy)
            layout = _legacy_layout(gen, version, ttype)
            if layout is None:
                if ttype in _OLD_NAMES:
                    raise UnsupportedTensorType(
                        f"tensor type {_OLD_NAMES[ttype]} ({ttype}) was removed from llama.cpp in April/May 2023 and "
                        f"has no current equivalent; re-quantize the model from its f16 file",
                        path=path, offset=rpos, tensor=legacy)
                if 10 <= ttype <= 14:
                    raise UnsupportedTensorType(
                        f"k-quant tensor in a {gen} v{version} file (k-quants exist only in ggjt v3)",
                        path=path, offset=rpos, tensor=legacy)
                raise UnsupportedTensorType(f"unknown tensor type {ttype}", path=path, offset=rpos, tensor=legacy)
            v3type, old_bytes, conv, desc = layout
            if ttype in (9, 15):
                raise UnsupportedTensorType(f"tensor type {GGMLType(ttype).name} is an activation format, not a weight",
                                            path=path, offset=rpos, tensor=legacy)
            per_block, nb = BLOCK[v3type]
            if ne[0] % per_block:
                raise c.fail(f"row length {ne[0]} is not a multiple of the {v3type.name} block ({per_block})",
                             offset=rpos, tensor=legacy)
            n_el = ne[0] * (ne[1] if n_dims == 2 else 1)
            nbytes = n_el // per_block * nb
            file_bytes = n_el // per_block * (old_bytes or nb)
            if aligned:
                c.seek(c.pos + (-c.pos & 31))
            start = c.pos
            if start + file_bytes > src.size:
                raise c.fail(f"tensor data ({file_bytes} bytes) runs past the end of the file ({src.size} bytes)",
                             offset=start, tensor=legacy)
            name = gguf_tensor_name(legacy)
            if len(tensors) >= 9 * n_layer + 64:
                raise c.fail(f"more tensors than a {n_layer}-layer LLaMA has", offset=rpos, tensor=legacy)
            if name in tensors:
                raise c.fail("duplicate tensor", offset=rpos, tensor=legacy)
            loader = _loader(src, start, file_bytes, legacy, conv)
            tensors[name] = TensorInfo(name, legacy, v3type, tuple(ne), start, nbytes, loader,
                                       converted_from=f"{gen} v{version} {desc}" if conv else None)
            c.seek(start + file_bytes)

    hp = _hparams(path, gen, version, overrides, tensors, n_vocab=n_vocab, n_embd=n_embd, n_mult=n_mult,
                  n_head=n_head, n_layer=n_layer, n_rot=n_rot)
    meta = {"ggml.magic": gen, "ggml.version": version, "ggml.n_mult": n_mult, "ggml.ftype": ftype}
    return ModelFile(path=path, format=gen, version=version, file_size=src.size, ftype=ftype,
                     mix_name=mix_name_for(ftype, tensors), hparams=hp, vocab=vocab, tensors=tensors,
                     metadata=meta, _source=src)


def _hparams(path: str, gen: str, version: int, o: dict, tensors: dict, **h) -> HParams:
    n_embd, n_head, n_mult = h["n_embd"], h["n_head"], h["n_mult"]
    wk = tensors.get("blk.0.attn_k.weight")
    if o.get("n_gqa") is not None:
        n_gqa = o["n_gqa"]
        if n_head % n_gqa:
            raise ModelFileError(f"n_gqa={n_gqa} does not divide n_head={n_head}", path=path)
    elif wk is not None and len(wk.ne) == 2 and wk.ne[1] and n_embd % wk.ne[1] == 0:
        n_gqa = n_embd // wk.ne[1]                 # LLaMA-2 70B files: wk is [n_embd, n_embd/8]
        if n_gqa < 1 or n_head % n_gqa:
            n_gqa = 1
    else:
        n_gqa = 1
    w1 = tensors.get("blk.0.ffn_gate.weight")
    if w1 is not None and len(w1.ne) == 2:
        n_ff = w1.ne[1]                            # robust against odd n_mult values (convert.py's find_n_mult)
    else:
        n_ff_raw = 2 * (4 * n_embd) // 3
        n_ff = (n_ff_raw + n_mult - 1) // n_mult * n_mult
    hp = HParams(n_vocab=h["n_vocab"], n_embd=n_embd, n_head=n_head, n_head_kv=n_head // n_gqa,
                 n_layer=h["n_layer"], n_ff=n_ff, n_rot=h["n_rot"],
                 # not stored: LLaMA-1 files (all Airoboros 65B) were trained at 2048; LLaMA-2 70B, the one
                 # grouped-query LLaMA of the GGML era (80 layers, n_embd 8192, 8 KV heads), at 4096
                 n_ctx_train=4096 if (h["n_layer"], n_embd, n_head // n_gqa) == (80, 8192, 8) else 2048,
                 # ggjt v3 files were run with llama.cpp's late default 5e-6; the earlier trees hard-coded 1e-6
                 rms_norm_eps=5e-6 if (gen == "ggjt" and version >= 3) else 1e-6,
                 rope_freq_base=10000.0, rope_freq_scale=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                 add_bos=True, add_space_prefix=True, n_mult=n_mult)
    apply_overrides(hp, o)
    return hp


def _loader(src: Source, start: int, nbytes: int, name: str, conv: Optional[Callable]):
    if conv is None and start % 32 == 0:
        return lambda: src.view(start, nbytes, tensor=name)
    if conv is None:
        # 'ggml'/'ggmf' data are unaligned; kernels view F16/F32 rows as floats, so hand out an aligned copy
        def aligned() -> np.ndarray:
            out = src.view(start, nbytes, tensor=name).copy()
            out.flags.writeable = False
            return out
        return aligned

    def load() -> np.ndarray:
        out = conv(np.asarray(src.view(start, nbytes, tensor=name)))
        out = np.ascontiguousarray(out).reshape(-1)
        out.flags.writeable = False
        return out
    return load


# ---- pre-v3 block converters: raw bytes of the old layout -> raw bytes of the v3 layout ------------------------

def _f32_to_f16_bytes(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f4").astype("<f2").view(np.uint8).reshape(-1, 2)


def _pairs_to_halves(qs: np.ndarray) -> np.ndarray:
    """qs [nb, 16]: byte j = element 2j (low) | 2j+1 (high) -> byte j = element j (low) | element j+16 (high)."""
    e = np.empty((qs.shape[0], 32), np.uint8)
    e[:, 0::2] = qs & 0x0F
    e[:, 1::2] = qs >> 4
    return e[:, :16] | (e[:, 16:] << 4)


def _q4_0_pairs(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 20)
    return np.concatenate([_f32_to_f16_bytes(b[:, 0:4]), _pairs_to_halves(b[:, 4:20])], axis=1)


def _q4_0_halves_f32(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 20)
    return np.concatenate([_f32_to_f16_bytes(b[:, 0:4]), b[:, 4:20]], axis=1)


def _q4_1_pairs(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 24)
    return np.concatenate([_f32_to_f16_bytes(b[:, 0:4]), _f32_to_f16_bytes(b[:, 4:8]), _pairs_to_halves(b[:, 8:24])],
                          axis=1)


def _q4_1_halves_f32(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 24)
    return np.concatenate([_f32_to_f16_bytes(b[:, 0:4]), _f32_to_f16_bytes(b[:, 4:8]), b[:, 8:24]], axis=1)


def _q5_0_pairs(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 22)     # fp16 d, u32 qh (bit i = 5th bit of element i in both orders), qs
    return np.concatenate([b[:, 0:6], _pairs_to_halves(b[:, 6:22])], axis=1)


def _q5_1_pairs(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 24)
    return np.concatenate([b[:, 0:8], _pairs_to_halves(b[:, 8:24])], axis=1)


def _q8_0_f32(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 36)
    return np.concatenate([_f32_to_f16_bytes(b[:, 0:4]), b[:, 4:36]], axis=1)
