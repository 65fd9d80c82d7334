"""One cache root: the generated kernel sources and Numba's compiled-function cache go under AIRO_CACHE_DIR
(default ~/.cache/airobackend), never into the checkout or site-packages, also when a host program imported Numba
before airobackend. Each case runs in a fresh interpreter, since Numba reads its cache folder once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e       # each test runs a fresh Python interpreter

REPO = Path(__file__).resolve().parent.parent

# Compiles one small kernel (written to Numba's cache) and generates one fast-kernel source.
SCRIPT = """
import sys
if sys.argv[1] == "numba-first":
    import numba                          # a host program that uses Numba itself
import numpy as np
import airobackend
from airobackend.kernels import fast, ops
from airobackend.quant import GGMLType
x = np.ones((1, 64), np.float32)
ops.rmsnorm(x, np.ones(64, np.float32), 1e-5, np.empty_like(x))
if fast.ISA != "none":
    fast.kernel_module(fast.SPECS[int(GGMLType.Q8_0)])
print(fast.ISA)
"""


def _numba_files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.suffix in (".nbi", ".nbc")}


def _run(tmp_path: Path, mode: str, **env_extra: str) -> tuple[str, Path]:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "AIRO_CACHE_DIR", "AIRO_NUMBA_CACHE")}
    env.update(HOME=str(home), **env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), home


@pytest.mark.parametrize("mode", ["airobackend-first", "numba-first"])
def test_kernels_and_numba_cache_go_under_airo_cache_dir(tmp_path, mode):
    root = tmp_path / "root"
    before = _numba_files(REPO)
    isa, home = _run(tmp_path, mode, AIRO_CACHE_DIR=str(root))
    assert list((root / "numba").rglob("*.nbi")) and list((root / "numba").rglob("*.nbc")), \
        "Numba's cache is not under AIRO_CACHE_DIR/numba"
    if isa != "none":
        assert list((root / "kernels").rglob("fast_q8_0.py")), "the generated kernel source is not under it"
    assert _numba_files(REPO) == before, "Numba wrote its cache into the checkout"
    assert not home.exists() or not any(home.rglob("*")), "something was written to the home folder"
    assert {p.name for p in root.iterdir()} <= {"numba", "kernels"}


def test_the_default_root_is_the_user_cache(tmp_path):
    isa, home = _run(tmp_path, "airobackend-first")
    root = home / ".cache" / "airobackend"
    assert list((root / "numba").rglob("*.nbi"))
    if isa != "none":
        assert list((root / "kernels").rglob("fast_q8_0.py"))


def test_a_numba_cache_dir_the_user_set_is_kept(tmp_path):
    own = tmp_path / "own-numba"
    _run(tmp_path, "airobackend-first", AIRO_CACHE_DIR=str(tmp_path / "root"), NUMBA_CACHE_DIR=str(own))
    assert list(own.rglob("*.nbi")) and not (tmp_path / "root" / "numba").exists()
