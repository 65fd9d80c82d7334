"""bench/side_by_side.py: usage errors before anything runs; with llama.cpp's binaries present, one brief round on a
fixture file prints a table row of ratios for each engine."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO

pytestmark = pytest.mark.e2e       # bench/side_by_side.py as a subprocess

SCRIPT = REPO / "bench" / "side_by_side.py"
LLAMA_BENCH = REPO.parent / "shared" / "tools" / "llama.cpp-c392e50" / "avx512" / "llama-bench"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=dict(os.environ))


@pytest.mark.parametrize("args, says", [
    (["--llama", "x=/nonexistent/llama-bench", "--models", "a.gguf"], "give NAME=PATH of an existing llama-bench"),
    (["--llama", f"x={sys.executable}"], "give either --models or --slices"),
    (["--llama", f"x={sys.executable}", "--slices", "q4_0"], "--slices needs --quantize"),
    (["--llama", f"x={sys.executable}", "--models", "/nonexistent.gguf"], "--models: no file"),
])
def test_usage_errors(args, says):
    r = _run(*args)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not LLAMA_BENCH.is_file() or shutil.which("gcc") is None,
                    reason=f"needs llama.cpp's llama-bench at {LLAMA_BENCH} and gcc")
@pytest.mark.skipif(not (FIXTURES / "models").is_dir(), reason=f"llama.cpp fixtures not found at {FIXTURES}")
def test_one_round_on_a_fixture_prints_ratios(tmp_path):
    r = _run("--llama", f"avx512={LLAMA_BENCH}", "--models", str(FIXTURES / "models" / "fx-q4_0.gguf"),
             "--rounds", "1", "--prompt", "16", "--gen", "4", "--read-mib", "64", "--work", str(tmp_path))
    if r.returncode != 0 and "cannot run" in r.stderr:
        pytest.skip("the llama-bench binary does not run on this CPU")
    assert r.returncode == 0, r.stderr[-2000:]
    head = next(line for line in r.stdout.splitlines() if line.startswith("| file"))
    row = next(line for line in r.stdout.splitlines() if line.startswith("| fx-q4_0.gguf"))
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    for key in ("prompt ours", "prompt avx512", "prompt ours/avx512", "decode ours", "decode avx512",
                "decode ours/avx512", "read GB/s", "ours/read", "avx512/read"):
        assert float(cells[key]) > 0, (key, row)
    for what in ("prompt", "decode"):
        ours, theirs = float(cells[f"{what} ours"]), float(cells[f"{what} avx512"])
        ratio = ours / theirs
        # the tok/s cells are printed to 0.1: a slow engine's (llama-bench on a loaded machine decodes ~2 tok/s)
        # rounding moves the ratio by more than 1 %
        rounding = ratio * (0.05 / ours + 0.05 / theirs)
        assert abs(ratio - float(cells[f"{what} ours/avx512"])) <= 0.01 * ratio + 0.01 + rounding, (what, row)
