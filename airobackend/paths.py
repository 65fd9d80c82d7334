"""The one cache root: everything airobackend writes for itself lives under it.

    <root>/airobackend-demo-*.gguf   the demo model (airobackend.demo)
    <root>/kernels/<isa>-<hash>/     the generated fast-kernel sources (airobackend.kernels.fast; AIRO_KERNEL_SOURCE_DIR)
    <root>/numba/                    Numba's compiled-function cache (NUMBA_CACHE_DIR) for every kernel

The root is `AIRO_CACHE_DIR` (Settings.cache_dir, `run --cache-dir`), else `$XDG_CACHE_HOME/airobackend`, else
`~/.cache/airobackend`. A NUMBA_CACHE_DIR the user set is left as it is. The kernels know nothing of the application:
they read both folders from the environment (NUMBA_CACHE_DIR, AIRO_KERNEL_SOURCE_DIR), which `use_cache_root` sets.

Numba reads NUMBA_CACHE_DIR when it is imported and fixes each jitted function's cache folder when the function is
defined, that is when a kernel module is imported. So `use_cache_root()` runs on `import airobackend` (before any
kernel module can load) and again where a command line names another root, before the model loads; a host program
that imported Numba first gets Numba's config updated as well.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

_chosen: Optional[Path] = None        # the root a command line named (else the environment decides)
_env_set: dict[str, str] = {}         # the environment values this module set (another value is the user's)


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "airobackend"


def cache_root() -> Path:
    if _chosen is not None:
        return _chosen
    env = os.environ.get("AIRO_CACHE_DIR")
    return Path(env).expanduser() if env else default_root()


def kernel_source_dir() -> Path:
    return cache_root() / "kernels"


def use_cache_root(root: Optional[str | os.PathLike] = None) -> Path:
    """Make `root` (default: from the environment) the cache root and point Numba's cache and the kernel sources into
    it."""
    global _chosen
    if root:
        _chosen = Path(root).expanduser()
    if _set_env("NUMBA_CACHE_DIR", str(cache_root() / "numba")):
        config = sys.modules.get("numba.core.config")
        if config is not None:              # imported before us: its CACHE_DIR was read already
            config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
    os.environ["AIRO_KERNEL_SOURCE_DIR"] = str(kernel_source_dir())    # how the kernels learn it (always ours)
    return cache_root()


def _set_env(name: str, value: str) -> bool:
    """Set an environment variable unless the user set it; True when it now holds `value`."""
    current = os.environ.get(name)
    if current is not None and current != _env_set.get(name):
        return False
    os.environ[name] = _env_set[name] = value
    return True
