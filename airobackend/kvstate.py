"""KV state files: one conversation's KV cache on disk (or in a bytes object), and the folder that keeps them.

A state file holds the tokens of a conversation and the K/V rows of its first n positions, and names the model they
belong to. It is what `--prompt-cache-dir` keeps across restarts and model switches, what llama.cpp server's
`POST /slots/{id}?action=save|restore` writes and reads, and what llama-cpp-python's `Llama.save_state()` returns.

Layout (little-endian):

    b"AIROKVST"  uint32 version (1)  uint32 header_len  header (UTF-8 JSON)
    K rows [n_layer, n_head_kv, n, row_k]  V rows [n_layer, n_head_kv, n, row_v]   (the cache type's raw rows)
    uint32 crc32 of the header and both payloads   b"AIROKEND"

The header carries the model fingerprint (sha256 of the structural hyper-parameters, the tensor table - names, types,
shapes, offsets - and the file size: cheap to compute, and two different files never share it), the settings that
change what a key is (RoPE base and scale, RMSNorm epsilon), the cache types and shapes, and the tokens. A state is
refused with a clear error when any of them differs from the model that reads it; a truncated file by its size, a
corrupt one by its checksum - and in both cases before anything is copied into the live cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Sequence

import numpy as np

from airobackend.errors import RequestError
from airobackend.kvcache import KVSnapshot

MAGIC, END = b"AIROKVST", b"AIROKEND"
VERSION = 1
SUFFIX = ".kvstate"
MAX_HEADER = 64 << 20             # a header with 16M tokens is still smaller; anything larger is not ours
_CHUNK = 64 << 20
# Client file names: a plain name, as llama.cpp's fs_validate_filename allows (common/common.cpp): no separators,
# no leading dot, printable, not too long.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
STRUCTURAL = ("n_vocab", "n_embd", "n_head", "n_head_kv", "n_layer", "n_ff", "n_rot")


class StateFileError(RequestError):
    """A state file that cannot be used here: another model, other settings, truncated, corrupt, a bad name."""


def model_fingerprint(mf: Any) -> str:
    """sha256 (hex) of the model file's structural hyper-parameters, tensor table and size."""
    hp = mf.hparams
    table = [(t.name, int(t.type), list(t.ne), int(t.offset), int(t.nbytes)) for t in mf.tensors.values()]
    blob = json.dumps({"hparams": {k: int(getattr(hp, k)) for k in STRUCTURAL}, "tensors": table,
                       "file_size": int(mf.file_size)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StateHeader:
    model: str                     # fingerprint
    model_name: str
    runtime: dict                  # rope_freq_base, rope_freq_scale, rms_norm_eps
    type_k: str
    type_v: str
    k_shape: list
    v_shape: list
    k_dtype: str
    v_dtype: str
    tokens: list
    created: float = 0.0
    version: int = VERSION

    @property
    def n(self) -> int:
        return len(self.tokens)

    def payload_bytes(self) -> int:
        return (int(np.prod(self.k_shape)) * np.dtype(self.k_dtype).itemsize
                + int(np.prod(self.v_shape)) * np.dtype(self.v_dtype).itemsize)


def write_state(f: IO[bytes], *, fingerprint: str, model_name: str, runtime: dict, tokens: Sequence[int],
                snapshot: KVSnapshot) -> int:
    """Write one state to the binary file `f`; returns the bytes written."""
    if snapshot.n != len(tokens):
        raise ValueError(f"{len(tokens)} tokens for a snapshot of {snapshot.n} positions")
    header = StateHeader(model=fingerprint, model_name=model_name, runtime=dict(runtime), type_k=snapshot.type_k,
                         type_v=snapshot.type_v, k_shape=list(snapshot.k.shape), v_shape=list(snapshot.v.shape),
                         k_dtype=snapshot.k.dtype.str, v_dtype=snapshot.v.dtype.str,
                         tokens=[int(t) for t in tokens], created=time.time())
    text = json.dumps(dataclasses.asdict(header), separators=(",", ":")).encode()
    crc = zlib.crc32(text)
    f.write(MAGIC + struct.pack("<II", VERSION, len(text)) + text)
    n = len(MAGIC) + 8 + len(text)
    for arr in (snapshot.k, snapshot.v):
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        for i in range(0, flat.size, _CHUNK):
            piece = flat[i:i + _CHUNK]
            crc = zlib.crc32(piece, crc)
            f.write(piece.data)
        n += flat.size
    f.write(struct.pack("<I", crc) + END)
    return n + 4 + len(END)


def read_header(f: IO[bytes], size: int, where: str = "state") -> tuple[StateHeader, int]:
    """The header of the state in `f` (of `size` bytes) and the offset of its payload; StateFileError if the file
    is not a state file or is shorter than its header says."""
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
        raise StateFileError(f"{where} is not a KV state file")
    version, hlen = struct.unpack("<II", head[len(MAGIC):])
    if version != VERSION:
        raise StateFileError(f"{where} has state file version {version}; this server reads version {VERSION}")
    if hlen > MAX_HEADER or len(MAGIC) + 8 + hlen > size:
        raise StateFileError(f"{where} is truncated or corrupt (header of {hlen} bytes in a {size}-byte file)")
    text = f.read(hlen)
    try:
        raw = json.loads(text.decode("utf-8"))
        header = StateHeader(**raw)
        header.payload_bytes()
    except (ValueError, TypeError) as e:
        raise StateFileError(f"{where} has a corrupt header ({type(e).__name__})") from None
    offset = len(MAGIC) + 8 + hlen
    if size != offset + header.payload_bytes() + 4 + len(END):
        raise StateFileError(f"{where} is truncated or corrupt: {size} bytes, the header promises "
                             f"{offset + header.payload_bytes() + 4 + len(END)}")
    return header, offset


def check_header(header: StateHeader, *, fingerprint: str, model_name: str, runtime: dict,
                 where: str = "state") -> None:
    """StateFileError unless the state was made by this model with these settings."""
    if header.model != fingerprint:
        raise StateFileError(f"{where} belongs to another model ({header.model_name}, fingerprint "
                             f"{header.model[:12]}); the loaded model is {model_name} ({fingerprint[:12]})")
    for key, value in runtime.items():
        saved = header.runtime.get(key)
        if saved is None or not np.isclose(float(saved), float(value), rtol=1e-6, atol=0.0):
            raise StateFileError(f"{where} was computed with {key} = {saved}; the model now runs with {value} "
                                 f"(keys depend on it)")


def read_state(f: IO[bytes], size: int, *, fingerprint: str, model_name: str, runtime: dict,
               where: str = "state") -> tuple[list[int], KVSnapshot]:
    """The tokens and snapshot of the state in `f`, checked against this model (check_header), its size and its
    checksum; StateFileError for anything wrong. Nothing outside the returned objects is touched."""
    header, _ = read_header(f, size, where)
    check_header(header, fingerprint=fingerprint, model_name=model_name, runtime=runtime, where=where)
    crc = zlib.crc32(json.dumps(dataclasses.asdict(header), separators=(",", ":")).encode())
    arrays = []
    for shape, dtype in ((header.k_shape, header.k_dtype), (header.v_shape, header.v_dtype)):
        arr = np.empty(tuple(int(x) for x in shape), np.dtype(dtype))
        flat = arr.reshape(-1).view(np.uint8)
        for i in range(0, flat.size, _CHUNK):
            piece = flat[i:i + _CHUNK]
            if f.readinto(memoryview(piece)) != piece.size:
                raise StateFileError(f"{where} is truncated")
            crc = zlib.crc32(piece, crc)
        arrays.append(arr)
    tail = f.read(4 + len(END))
    if len(tail) != 4 + len(END) or tail[4:] != END or struct.unpack("<I", tail[:4])[0] != crc:
        raise StateFileError(f"{where} is corrupt (checksum mismatch)")
    k, v = arrays
    if not (k.ndim == v.ndim == 4 and k.shape[2] == v.shape[2] == header.n):
        raise StateFileError(f"{where} is corrupt (its arrays do not hold {header.n} positions)")
    return [int(t) for t in header.tokens], KVSnapshot(header.type_k, header.type_v, header.n, k, v)


def state_bytes(**kw: Any) -> bytes:
    """write_state into a bytes object (llama-cpp-python's LlamaState.llama_state)."""
    buf = io.BytesIO()
    write_state(buf, **kw)
    return buf.getvalue()


def state_from_bytes(data: bytes, **kw: Any) -> tuple[list[int], KVSnapshot]:
    return read_state(io.BytesIO(data), len(data), **kw)


def safe_path(directory: str | os.PathLike, filename: Any) -> Path:
    """DIR/filename for a client-given name, which must be a plain file name (no separators, no '..', no leading
    dot); StateFileError otherwise. The result is checked to lie inside DIR."""
    if not isinstance(filename, str) or not _NAME.match(filename) or ".." in filename:
        raise StateFileError(f"invalid file name {str(filename)[:80]!r}: use letters, digits, '_', '-' and '.', "
                             f"no folders")
    root = Path(directory).resolve()
    path = (root / filename).resolve()
    if path.parent != root:
        raise StateFileError(f"invalid file name {filename!r}")
    return path


def save_file(path: Path, **kw: Any) -> int:
    """write_state to `path` atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            n = write_state(f, **kw)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return n


def load_file(path: Path, **kw: Any) -> tuple[list[int], KVSnapshot]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return read_state(f, size, where=f"state file {path.name!r}", **kw)
    except FileNotFoundError:
        raise StateFileError(f"no state file named {path.name!r}") from None
    except OSError as e:
        raise StateFileError(f"cannot read state file {path.name!r}: {e.strerror}") from None


class StateDir:
    """The states a server keeps in `--prompt-cache-dir`: client-named files (slot save/restore) at the top, and the
    automatic ones of each model under `auto/`, the newest `max_auto` per model kept."""

    def __init__(self, directory: str | os.PathLike, *, fingerprint: str, model_name: str, runtime: dict,
                 max_auto: int) -> None:
        self.root = Path(directory).expanduser()
        self.auto = self.root / "auto"
        self.auto.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.model_name, self.runtime = fingerprint, model_name, dict(runtime)
        self.max_auto = max(1, int(max_auto))
        self._headers: dict[Path, tuple[float, Optional[StateHeader]]] = {}

    def _kw(self) -> dict:
        return dict(fingerprint=self.fingerprint, model_name=self.model_name, runtime=self.runtime)

    def path(self, filename: Any) -> Path:
        return safe_path(self.root, filename)

    def save(self, filename: Any, tokens: Sequence[int], snapshot: KVSnapshot) -> int:
        return save_file(self.path(filename), tokens=tokens, snapshot=snapshot, **self._kw())

    def load(self, filename: Any) -> tuple[list[int], KVSnapshot]:
        return load_file(self.path(filename), **self._kw())

    def erase(self, filename: Any) -> bool:
        try:
            self.path(filename).unlink()
            return True
        except FileNotFoundError:
            return False

    # -- automatic states of this model

    def auto_states(self) -> list[tuple[Path, StateHeader]]:
        """This model's automatic states (headers read once per file version), newest first."""
        out = []
        for p in sorted(self.auto.glob(f"{self.fingerprint[:16]}-*{SUFFIX}")):
            try:
                st = p.stat()
            except OSError:
                continue
            known = self._headers.get(p)
            if known is None or known[0] != st.st_mtime:
                header = None
                try:
                    with open(p, "rb") as f:
                        header, _ = read_header(f, st.st_size, p.name)
                    check_header(header, **self._kw(), where=p.name)
                except (StateFileError, OSError):
                    header = None              # another model's settings, or a broken file: not a candidate
                known = self._headers[p] = (st.st_mtime, header)
            if known[1] is not None:
                out.append((p, known[1]))
        return sorted(out, key=lambda ph: -ph[1].created)

    def save_auto(self, tokens: Sequence[int], snapshot: KVSnapshot) -> Path:
        """Keep a state of this model; older ones beyond max_auto are deleted, as are states this one supersedes
        (earlier turns of the same conversation)."""
        tokens = [int(t) for t in tokens]
        digest = hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16]
        path = self.auto / f"{self.fingerprint[:16]}-{digest}{SUFFIX}"
        save_file(path, tokens=tokens, snapshot=snapshot, **self._kw())
        kept = 0
        for p, h in self.auto_states():
            superseded = p != path and len(h.tokens) <= len(tokens) and tokens[:len(h.tokens)] == h.tokens
            kept += not superseded
            if superseded or kept > self.max_auto:
                try:
                    p.unlink()
                except OSError:
                    pass
                self._headers.pop(p, None)
        return path

    def load_auto(self, path: Path) -> tuple[list[int], KVSnapshot]:
        return load_file(path, **self._kw())
