"""The model library: every model file in a folder, described from its header alone.

A folder of Airoboros files holds GGML (any generation), GGUF and split `.zip` + `.z01` archives. `ModelLibrary`
finds them, and for each reports what `airobackend inspect` knows: the mix name, the parameter class (7B/13B/33B/
65B/70B, from the tensor shapes), the size on disk, the RAM needed for a context and the prompt template it will use.
Listing only parses headers (the tensor table is offsets and shapes), so it stays fast on a folder of 40 GB files;
results are cached per file by size and modification time.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from airobackend.errors import AiroError, RequestError
from airobackend.formats import HParams, estimate_ram, is_model_file, open_model

# A split archive is NAME.z01, NAME.z02, ... then NAME.zip (the last part, holding the central directory).
_SPLIT_PART = re.compile(r"\.z\d\d$", re.IGNORECASE)

# (n_layer, n_embd, n_head_kv or None for "= n_head") -> parameter class, the published LLaMA shapes.
_CLASSES: dict[tuple[int, int, Optional[int]], str] = {
    (26, 3200, None): "3B",       # OpenLLaMA 3B
    (32, 4096, None): "7B",
    (32, 4096, 8): "7B",          # Mistral 7B (GQA 4)
    (40, 5120, None): "13B",
    (60, 6656, None): "33B",      # LLaMA-1 "30B", called 33B on the model cards (Airoboros 33B)
    (48, 8192, 8): "34B",         # Code Llama 34B (GQA 8)
    (80, 8192, None): "65B",
    (80, 8192, 8): "70B",         # LLaMA-2 70B (GQA 8)
}

GB = 1e9


@dataclass(frozen=True)
class ModelEntry:
    """One model of the library. `name` is what clients send to load it; `path` is never shown to clients."""

    name: str                       # path relative to the library folder, '/'-separated
    path: str                       # absolute path of the file (of the .zip for a split archive)
    format: str = ""                # 'ggml' | 'ggmf' | 'ggjt' | 'gguf'
    version: int = 0
    mix: str = ""                   # 'q4_K_M'
    size_class: str = ""            # '65B'
    n_params: int = 0
    file_size: int = 0              # bytes on disk, all parts of a split archive together
    weights_bytes: int = 0          # bytes of the model itself (the member inside an archive)
    parts: tuple[str, ...] = ()     # file names of every part (one for a plain file)
    n_ctx: int = 0                  # the context `ram_bytes` is for
    n_ctx_train: int = 0
    ram_bytes: int = 0              # RAM needed to run it with an `n_ctx` context
    template: str = ""              # prompt template name the engine will use
    hparams: dict = field(default_factory=dict, compare=False)
    error: Optional[str] = None     # why the file cannot be loaded (then only name/path/file_size are set)

    @property
    def loadable(self) -> bool:
        return self.error is None

    def ram_for(self, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
        """RAM needed with a context of `n_ctx` tokens and a KV cache of these types."""
        return estimate_ram_bytes(self.weights_bytes, self.hparams, n_ctx, type_k, type_v)

    def to_dict(self, *, with_path: bool = False) -> dict:
        """JSON-ready description; the file system path only when asked (never for unauthenticated clients)."""
        d = asdict(self)
        d["parts"] = list(self.parts)
        d["ram_gb"] = round(self.ram_bytes / GB, 2)
        d["file_size_gb"] = round(self.file_size / GB, 2)
        if not with_path:
            del d["path"]
        return d


def estimate_ram_bytes(weights_bytes: int, hparams: dict, n_ctx: int, type_k: str = "f16",
                       type_v: str = "f16") -> int:
    """RAM to run a model with `n_ctx` tokens of context: `airobackend.formats.estimate_ram` (what `inspect` prints)."""
    return estimate_ram(HParams(**hparams), n_ctx, weights_bytes=weights_bytes, type_k=type_k, type_v=type_v)


def size_class(n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_params: int) -> str:
    """'65B' for the published LLaMA shapes, else the parameter count rounded ('1.2M', '0.5B')."""
    known = _CLASSES.get((n_layer, n_embd, None if n_head_kv == n_head else n_head_kv))
    if known is not None:
        return known
    if n_params >= 1e9:
        return f"{n_params / 1e9:.1f}B"
    if n_params >= 1e6:
        return f"{n_params / 1e6:.1f}M"
    return f"{n_params / 1e3:.0f}K"


def split_parts(zip_path: Path) -> list[Path]:
    """The parts of a split archive in order (NAME.z01, NAME.z02, ..., NAME.zip); just [NAME.zip] if not split."""
    parts = []
    for i in range(1, 100):
        p = zip_path.with_suffix(f".z{i:02d}")
        if not p.exists():
            upper = zip_path.with_suffix(f".Z{i:02d}")
            if not upper.exists():
                break
            p = upper
        parts.append(p)
    return parts + [zip_path]


def guess_template(name: str, metadata: Optional[dict] = None, override: Optional[str] = None) -> str:
    """Name of the prompt template the engine will use for this file (`airobackend.chat.choose_template`)."""
    from airobackend.chat import choose_template     # start-up: the CLI imports this module (through the manager)
    return choose_template(override, name, metadata or {}).name


def describe_file(path: str | os.PathLike, *, name: Optional[str] = None, n_ctx: int = 2048,
                  template: Optional[str] = None, opener: Optional[Callable] = None,
                  cache_types: tuple[str, str] = ("f16", "f16")) -> ModelEntry:
    """A `ModelEntry` for one file, from its header only (`ram_bytes` for n_ctx and a KV cache of `cache_types`).
    A file that cannot be read gets `error` set."""
    path = Path(path).resolve()
    name = name or path.name
    parts = split_parts(path) if path.suffix.lower() == ".zip" else [path]
    try:
        file_size = sum(p.stat().st_size for p in parts)
    except OSError as e:
        return ModelEntry(name=name, path=str(path), error=f"cannot read {path.name}: {e.strerror}")
    try:
        with (opener or open_model)(str(path)) as mf:
            return _entry_from(mf, name, path, parts, file_size, n_ctx, template, cache_types)
    except AiroError as e:
        return ModelEntry(name=name, path=str(path), file_size=file_size, parts=tuple(p.name for p in parts),
                          error=str(e))
    except (OSError, ValueError) as e:   # a reader that lets an OS or parse error through: still listed, not fatal
        return ModelEntry(name=name, path=str(path), file_size=file_size, parts=tuple(p.name for p in parts),
                          error=f"cannot read {path.name}: {e}")


def _entry_from(mf, name: str, path: Path, parts: list[Path], file_size: int, n_ctx: int,
                template: Optional[str], cache_types: tuple[str, str]) -> ModelEntry:
    hp = mf.hparams
    n_params = sum(t.n_elements for t in mf.tensors.values())
    hparams = dataclasses.asdict(hp)
    return ModelEntry(
        name=name, path=str(path), format=mf.format, version=int(mf.version), mix=mf.mix_name,
        size_class=size_class(hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, n_params),
        n_params=n_params, file_size=file_size, weights_bytes=int(mf.file_size), parts=tuple(p.name for p in parts),
        n_ctx=n_ctx, n_ctx_train=int(hp.n_ctx_train),
        ram_bytes=estimate_ram_bytes(mf.file_size, hparams, n_ctx, *cache_types),
        template=guess_template(name, getattr(mf, "metadata", None), template), hparams=hparams)


class ModelLibrary:
    """The model files under one folder (`--model-dir`), plus single files registered from elsewhere (`--model`)."""

    def __init__(self, folder: str | os.PathLike, *, n_ctx: int = 2048, template: Optional[str] = None,
                 opener: Optional[Callable] = None, cache_types: tuple[str, str] = ("f16", "f16")) -> None:
        self.folder = Path(folder).expanduser()
        self.cache_types = tuple(cache_types)       # the KV cache types `ram_bytes` counts
        self.n_ctx = n_ctx
        self.template = template
        self._opener = opener
        self._cache: dict[tuple, ModelEntry] = {}
        self._extra: dict[str, Path] = {}
        self._lock = threading.Lock()

    def register(self, path: str | os.PathLike, name: Optional[str] = None) -> str:
        """Add a file that lives outside the folder (the `--model` file, the demo model); returns its name."""
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise RequestError(f"model file not found: {path}")
        try:
            return self._name_in_folder(p)
        except ValueError:
            pass
        name = name or p.name
        with self._lock:
            self._extra[name] = p
        return name

    def scan(self) -> list[ModelEntry]:
        """Every model file in the folder (and registered ones), sorted by name. Only headers are read."""
        found: dict[str, Path] = {}
        if self.folder.is_dir():
            for p in self._walk(self.folder):
                found[self._name_in_folder(p)] = p
        with self._lock:
            for name, p in self._extra.items():
                found.setdefault(name, p)
        return [self._describe(name, p) for name, p in sorted(found.items(), key=lambda kv: kv[0].lower())]

    def find(self, name: str) -> ModelEntry:
        """The entry called `name` (its library name, or its file name when that is unique); RequestError if none.

        Only names from the listing resolve: a client cannot make the server open an arbitrary path.
        """
        entries = self.scan()
        for e in entries:
            if e.name == name:
                return e
        by_file = [e for e in entries if Path(e.name).name == name or Path(e.name).stem == name]
        if len(by_file) == 1:
            return by_file[0]
        known = ", ".join(e.name for e in entries if e.loadable) or "none"
        if by_file:
            raise RequestError(f"model name {name!r} is ambiguous; use one of: "
                               f"{', '.join(e.name for e in by_file)}")
        raise RequestError(f"no model named {name!r} in the model library; available: {known}")

    def redact(self, text: str) -> str:
        """`text` with every file system path of the library replaced by the model's name (error messages reach
        clients; paths must not)."""
        with self._lock:
            pairs = [(str(p), name) for name, p in self._extra.items()]
            pairs += [(e.path, e.name) for e in self._cache.values()]
        for path, name in sorted(pairs, key=lambda pn: -len(pn[0])):
            text = text.replace(path, name)
        folder = str(self.folder.resolve())
        return text.replace(folder + os.sep, "").replace(folder, "<model-dir>")

    # -- internals --

    def _name_in_folder(self, p: Path) -> str:
        """`p`'s path under the folder. A file found in the folder is named by where it was found: a model kept
        elsewhere and linked in (as people do with large files, and in hosts' model folders) has the link's name,
        not a path outside the folder. Other paths count as in the folder only when they resolve into it."""
        try:
            return p.relative_to(self.folder).as_posix()
        except ValueError:
            return p.resolve().relative_to(self.folder.resolve()).as_posix()

    def _walk(self, folder: Path) -> Iterable[Path]:
        """Model files under `folder` (two levels deep, like text-generation-webui's models/ with subfolders)."""
        stack = [(folder, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                children = sorted(d.iterdir())
            except OSError:
                continue
            for c in children:
                if c.name.startswith("."):
                    continue
                if c.is_dir():
                    if depth < 1:
                        stack.append((c, depth + 1))
                elif c.is_file() and not _SPLIT_PART.search(c.name) and is_model_file(c):
                    yield c

    def _describe(self, name: str, p: Path) -> ModelEntry:
        try:
            st = p.stat()
            key = (name, str(p), st.st_size, st.st_mtime_ns, self.n_ctx, self.template, self.cache_types)
        except OSError:
            key = None
        if key is not None and p.suffix.lower() == ".zip":
            key += tuple(q.stat().st_size for q in split_parts(p)[:-1])
        with self._lock:
            hit = self._cache.get(key) if key is not None else None
        if hit is not None:
            return hit
        entry = describe_file(p, name=name, n_ctx=self.n_ctx, template=self.template, opener=self._opener,
                              cache_types=self.cache_types)
        if entry.error is not None:     # the reader's message names the file by its path: clients see it
            entry = dataclasses.replace(entry, error=self.redact(entry.error.replace(entry.path, name)))
        if key is not None:
            with self._lock:
                self._cache[key] = entry
        return entry
