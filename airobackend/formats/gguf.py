"""GGUF v2/v3 reader (llama architecture).

We parse the header ourselves rather than with gguf-py's GGUFReader: GGUFReader builds several numpy objects per
vocabulary string and took 1.8 s to open a 32000-token file on the project machine (this parser: ~0.05 s), which
matters when the model library lists folders of files; it also walks counts taken from the file without bounding
them first. The tests check this parser against GGUFReader field by field on every fixture.
Tensor data are zero-copy views of the mapped file.
"""
from __future__ import annotations

import struct
from typing import Any, Optional

import numpy as np

from ..errors import ModelFileError, UnsupportedTensorType
from ..pretokenize import PRE_TYPES
from ..quant import BLOCK, WEIGHT_TYPES, GGMLType
from . import HParams, ModelFile, TensorInfo, Vocab, apply_overrides, legacy_tensor_name, mix_name_for
from ._source import Cursor, Source

MAX_NAME = 256           # llama.cpp's GGML_MAX_NAME is 64; anything beyond this is garbage
MAX_KEY = 256
MAX_DIMS = 4
MAX_DIM = 1 << 40

# value type -> (struct, size) for scalars
_SCALARS = {0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"), 3: struct.Struct("<h"),
            4: struct.Struct("<I"), 5: struct.Struct("<i"), 6: struct.Struct("<f"), 7: struct.Struct("<?"),
            10: struct.Struct("<Q"), 11: struct.Struct("<q"), 12: struct.Struct("<d")}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
       12: "<f8"}
STRING, ARRAY = 8, 9


def _type_name(t: int) -> str:
    try:
        import gguf     # the gguf package (and its YAML) only to name a type id this reader does not know
        return gguf.GGMLQuantizationType(t).name
    except Exception:
        return f"unknown type id {t}"


class _Parser:
    def __init__(self, src: Source) -> None:
        self.src = src
        self.cur = Cursor(src)

    def string(self, what: str, limit: int) -> bytes:
        c = self.cur
        n = c.u64(f"{what} length")
        if n > limit or n > c.remaining:
            raise c.fail(f"absurd {what} length {n}", offset=c.pos - 8)
        return bytes(c.take(n, what))

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        c = self.cur
        st = _SCALARS.get(vtype)
        if st is not None:
            return c.unpack(st, f"value of {key}")[0]
        if vtype == STRING:
            return self.string(f"string value of {key}", c.remaining)
        if vtype == ARRAY:
            if depth > 1:
                raise c.fail(f"arrays nested too deep in {key}")
            etype = c.u32(f"array type of {key}")
            n = c.u64(f"array length of {key}")
            if etype in _NP:
                size = n * np.dtype(_NP[etype]).itemsize
                if size > c.remaining:
                    raise c.fail(f"array {key} of {n} elements runs past the end of the file", offset=c.pos - 12)
                arr = np.frombuffer(bytes(c.take(size, f"array {key}")), dtype=_NP[etype])
                return arr.astype(bool) if etype == 7 else arr
            if etype == STRING:
                if n * 8 > c.remaining:
                    raise c.fail(f"array {key} of {n} strings runs past the end of the file", offset=c.pos - 12)
                out = []
                u64, take = c.u64, c.take
                for _ in range(n):
                    k = u64(key)
                    if k > c.remaining:
                        raise c.fail(f"absurd string length {k} in array {key}", offset=c.pos - 8)
                    out.append(bytes(take(k, key)))
                return out
            if etype == ARRAY:
                if n * 12 > c.remaining:
                    raise c.fail(f"array {key} of {n} arrays runs past the end of the file", offset=c.pos - 12)
                return [self.value(ARRAY, key, depth + 1) for _ in range(n)]
            raise c.fail(f"unknown array element type {etype} in {key}", offset=c.pos - 12)
        raise c.fail(f"unknown value type {vtype} for key {key!r}", offset=c.pos - 4)


def read_gguf(src: Source, overrides: dict, *, vocab_only: bool = False) -> ModelFile:
    p = _Parser(src)
    c = p.cur
    path = src.path
    c.take(4, "magic")
    version = c.u32("version")
    if version not in (2, 3):
        if version == 1:
            raise c.fail("GGUF v1 (August 2023, 32-bit counts) is not supported; re-convert the model with a current "
                         "llama.cpp (convert_hf_to_gguf.py) or use its GGML/GGUF v2+ release", offset=4)
        if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            raise c.fail("big-endian GGUF files are not supported", offset=4)
        raise c.fail(f"unknown GGUF version {version} (supported: 2, 3)", offset=4)
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # Each key/value needs >= 8+1+4+1 bytes, each tensor record >= 8+1+4+8+4+8: bound before looping.
    if n_kv * 14 > c.remaining:
        raise c.fail(f"absurd metadata count {n_kv} for a file of {src.size} bytes", offset=16)
    if n_tensors * 33 > c.remaining:
        raise c.fail(f"absurd tensor count {n_tensors} for a file of {src.size} bytes", offset=8)

    meta: dict = {}
    for _ in range(n_kv):
        kpos = c.pos
        key = p.string("metadata key", MAX_KEY).decode("utf-8", "replace")
        if not key.isprintable():
            raise c.fail(f"garbled metadata key {key[:48]!r}", offset=kpos)
        vtype = c.u32(f"type of {key}")
        if key in meta:
            raise c.fail(f"duplicate metadata key {key!r}", offset=kpos)
        meta[key] = p.value(vtype, key)

    def sval(k: str, default: Optional[str] = None) -> Optional[str]:
        v = meta.get(k)
        return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else default

    arch = sval("general.architecture", "")
    if arch != "llama" and not vocab_only:     # a vocabulary alone may come from any architecture's file
        raise ModelFileError(f"architecture {arch!r} is not supported (only 'llama')", path=path)

    hp, vocab = _hparams_and_vocab(meta, arch, path, overrides, vocab_only)
    tensors: dict = {}
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise ModelFileError(f"bad general.alignment {alignment!r}", path=path)

    if n_tensors > 9 * hp.n_layer + 64 and not vocab_only:
        raise ModelFileError(f"{n_tensors} tensors is far more than a {hp.n_layer}-layer LLaMA has", path=path,
                             offset=8)
    infos = []
    for i in range(n_tensors):
        tpos = c.pos
        name = p.string("tensor name", MAX_NAME).decode("utf-8", "replace")
        if not name.isprintable():
            raise c.fail(f"garbled tensor name {name[:48]!r}", offset=tpos)
        n_dims = c.u32("n_dims", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor has {n_dims} dimensions", offset=c.pos - 4, tensor=name)
        ne = c.unpack(struct.Struct(f"<{n_dims}Q"), "dims", name)
        if any(d < 1 or d > MAX_DIM for d in ne):
            raise c.fail(f"absurd dimensions {list(ne)}", offset=tpos, tensor=name)
        while len(ne) > 1 and ne[-1] == 1:
            ne = ne[:-1]                      # llama.cpp treats trailing 1s as absent
        ttype = c.u32("tensor type", name)
        off = c.u64("tensor offset", name)
        if ttype not in BLOCK.keys() or GGMLType(ttype) not in WEIGHT_TYPES:
            raise UnsupportedTensorType(f"tensor type {_type_name(ttype)} ({ttype}) is not supported",
                                        path=path, offset=tpos, tensor=name)
        infos.append((name, tuple(ne), GGMLType(ttype), off, tpos))
    data_start = -(-c.pos // alignment) * alignment

    if not vocab_only:
        spans = []
        for name, ne, ttype, off, tpos in infos:
            per_block, nb = BLOCK[ttype]
            if ne[0] % per_block:
                raise ModelFileError(f"row length {ne[0]} is not a multiple of the {ttype.name} block ({per_block})",
                                     path=path, offset=tpos, tensor=name)
            n = 1
            for d in ne:
                n *= d
            nbytes = n // per_block * nb
            if off % alignment:
                raise ModelFileError(f"data offset {off} is not aligned to {alignment}", path=path, offset=tpos,
                                     tensor=name)
            start = data_start + off
            if start + nbytes > src.size:
                raise ModelFileError(f"tensor data ({nbytes} bytes at {start}) runs past the end of the file "
                                     f"({src.size} bytes)", path=path, offset=start, tensor=name)
            if name in tensors:
                raise ModelFileError("duplicate tensor name", path=path, offset=tpos, tensor=name)
            tensors[name] = TensorInfo(name, legacy_tensor_name(name), ttype, ne, start, nbytes,
                                       _view_loader(src, start, nbytes, name))
            spans.append((start, start + nbytes, name))
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ModelFileError(f"tensor data overlaps that of {n0!r}", path=path, offset=s1, tensor=n1)

    ftype = meta.get("general.file_type")
    ftype = int(ftype) if isinstance(ftype, (int, np.integer)) else None
    mf = ModelFile(path=path, format="gguf", version=version, file_size=src.size, ftype=ftype,
                   mix_name=mix_name_for(ftype, tensors), hparams=hp, vocab=vocab, tensors=tensors,
                   metadata=meta, _source=src)
    return mf


def _view_loader(src: Source, start: int, nbytes: int, name: str):
    return lambda: src.view(start, nbytes, tensor=name)


def _hparams_and_vocab(meta: dict, arch: str, path: str, o: dict, vocab_only: bool):
    def num(key: str, default=None, kind=int):
        v = meta.get(key, default)
        if v is None:
            if vocab_only:
                return 0
            raise ModelFileError(f"missing metadata key {key!r}", path=path)
        if isinstance(v, np.ndarray) or isinstance(v, (bytes, list)):
            raise ModelFileError(f"metadata key {key!r} has the wrong type", path=path)
        return kind(v)

    a = arch + "."
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, bytes) for t in tokens):
        raise ModelFileError("no vocabulary (tokenizer.ggml.tokens, an array of strings) in this file", path=path)
    n_vocab = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    if scores is None:
        scores = np.zeros(n_vocab, np.float32)
    if not isinstance(scores, np.ndarray) or scores.shape != (n_vocab,):
        raise ModelFileError(f"tokenizer.ggml.scores does not have {n_vocab} entries", path=path)
    if types is not None and (not isinstance(types, np.ndarray) or types.shape != (n_vocab,)):
        raise ModelFileError(f"tokenizer.ggml.token_type does not have {n_vocab} entries", path=path)
    model = meta.get("tokenizer.ggml.model", b"llama")
    model = model.decode("utf-8", "replace") if isinstance(model, bytes) else str(model)
    pre, merges = None, None
    if model == "gpt2":
        pre_raw = meta.get("tokenizer.ggml.pre", b"")
        pre = pre_raw.decode("utf-8", "replace") if isinstance(pre_raw, bytes) else ""
        if pre not in PRE_TYPES:
            raise ModelFileError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
                                 f"{', '.join(sorted(k for k in PRE_TYPES if k))}", path=path)
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, bytes) for m in merges):
            raise ModelFileError("byte-level BPE vocabulary without tokenizer.ggml.merges (an array of strings)",
                                 path=path)
    elif model != "llama":
        kinds = {"bert": "WordPiece", "t5": "Unigram", "rwkv": "RWKV", "no_vocab": "no vocabulary",
                 "none": "no vocabulary"}
        raise ModelFileError(f"tokenizer model {model!r}" + (f" ({kinds[model]})" if model in kinds else "")
                             + " (tokenizer.ggml.model) is not supported; supported: 'llama' (SentencePiece), "
                             "'gpt2' (byte-level BPE)", path=path)
    vocab = Vocab(pieces=tokens, scores=scores.astype(np.float32),
                  types=None if types is None else types.astype(np.int32), spelling="gguf", model=model, pre=pre,
                  merges=merges)

    n_embd = num(a + "embedding_length")
    n_head = num(a + "attention.head_count")
    n_head_kv = num(a + "attention.head_count_kv", n_head)
    if o.get("n_gqa") is not None and n_head:
        n_head_kv = n_head // o["n_gqa"]
    scale = 1.0
    stype = meta.get(a + "rope.scaling.type")
    if isinstance(stype, bytes) and stype not in (b"none", b"linear"):
        raise ModelFileError(f"rope scaling type {stype.decode('utf-8', 'replace')!r} ({a}rope.scaling.type) is not "
                             f"supported (only 'none' and 'linear')", path=path)
    if isinstance(stype, bytes) and stype == b"linear" and meta.get(a + "rope.scaling.factor"):
        scale = 1.0 / float(meta[a + "rope.scaling.factor"])
    elif meta.get(a + "rope.scale_linear"):
        scale = 1.0 / float(meta[a + "rope.scale_linear"])

    def tok_id(key: str, default: int) -> int:
        v = meta.get("tokenizer.ggml." + key)
        return int(v) if isinstance(v, (int, np.integer)) and 0 <= int(v) < max(n_vocab, 1) else default

    bpe = vocab.model == "gpt2"     # llama.cpp's defaults differ for byte-level BPE vocabularies
    if bpe:
        bpe_add_bos = bool(PRE_TYPES[vocab.pre or ""].add_bos)
    hp = HParams(
        n_vocab=n_vocab, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_layer=num(a + "block_count"),
        n_ff=num(a + "feed_forward_length"),
        n_rot=num(a + "rope.dimension_count", n_embd // n_head if n_head else 0),
        n_ctx_train=num(a + "context_length", 2048), rms_norm_eps=num(a + "attention.layer_norm_rms_epsilon",
                                                                       5e-6, float),
        rope_freq_base=num(a + "rope.freq_base", 10000.0, float), rope_freq_scale=scale,
        bos_id=tok_id("bos_token_id", 1), eos_id=tok_id("eos_token_id", 2), unk_id=tok_id("unknown_token_id", 0),
        pad_id=tok_id("padding_token_id", -1),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", bpe_add_bos if bpe else True)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", not bpe)))
    apply_overrides(hp, o)
    return hp, vocab
