"""bench/run.py's command line: nonsense is a usage error naming the valid choices, before any measuring starts.
These start the script as a subprocess (e2e)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
RUN = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def _bench(*args: str, timeout: int = 120, env_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"AIRO_BENCH_DIR": str(env_dir)} if env_dir else {}))
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, names", [
    (["--mixes", "q9_X"], ["--mixes: unknown q9_X", "q4_K_M", "'none'"]),
    (["--mixes", "none", "--types", "q7_K"], ["--types: no fast kernel for q7_K", "'all' or 'none'"]),
    (["--mixes", "none", "--rounds", "0"], ["--rounds and --tokens must be at least 1"]),
])
def test_unknown_choices_are_usage_errors(args, names):
    r = _bench(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for n in names:
        assert n in r.stderr, r.stderr
    assert "read bandwidth" not in r.stdout        # refused before measuring anything


NO_FAST_KERNELS = pytest.mark.skipif(__import__("airobackend.kernels.fast", fromlist=["ISA"]).ISA == "none",
                                     reason="no fast kernels on this CPU: --types has nothing to match")


@NO_FAST_KERNELS
def test_type_names_are_accepted_in_any_case():
    # the --types check passes ('q4_k', 'Q6_k' name Q4_K, Q6_K); the next check, of --rounds, then refuses
    r = _bench("--mixes", "none", "--types", "q4_k,Q6_k", "--rounds", "0")
    assert r.returncode == 2 and "--rounds and --tokens must be at least 1" in r.stderr, r.stderr
    assert "error: --types" not in r.stderr


@pytest.mark.slow       # writes and reads a 455 MB weight file
@NO_FAST_KERNELS
def test_type_names_match_case_insensitively(tmp_path):
    # 'q4_k' names Q4_K: one 65B layer in q4_K (its random weights in an unlinked file under AIRO_BENCH_DIR)
    r = _bench("--mixes", "none", "--no-65b", "--no-attention", "--types", "q4_k", "--threads", "1", "--tokens", "1",
               "--rounds", "2", env_dir=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("65B layer, all Q4_K"))
    ratio, spread = row.split()[8:10]           # median ratio, then its p25-p75 over the 2 rounds
    lo, hi = map(float, spread.split("-"))
    assert 0 < lo <= float(ratio) <= hi
    assert list(tmp_path.iterdir()) == []           # the weight file was unlinked


@pytest.mark.parametrize("args, names", [
    (["--protocols", "kobold,grpc"], ["--protocols from kobold,openai,ws", "['grpc']"]),
    (["--tokens", "1"], ["--tokens >= 2"]),
])
def test_http_batching_bench_refuses_nonsense_before_starting_servers(args, names):
    r = subprocess.run([sys.executable, str(RUN.parent / "batching_http.py"), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "model " not in r.stdout       # nothing written, nothing started
    for n in names:
        assert n in r.stderr, r.stderr


def test_batching_bench_refuses_a_llama_binary_that_is_not_one_before_loading(tmp_path):
    r = subprocess.run([sys.executable, str(RUN.parent / "batching.py"), "--llama", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "model " not in r.stdout       # no model written or loaded
    assert "--llama" in r.stderr and "not an executable file" in r.stderr, r.stderr


@pytest.mark.parametrize("args, names", [
    (["--types", "q4_0,q9_X"], ["--types: unknown q9_x"]),
    (["--shapes", "4096"], ["--shapes of the form ROWSxCOLS"]),
    (["--tokens", "four"], ["--tokens: numbers"]),
])
def test_few_tokens_bench_refuses_nonsense_before_measuring(args, names):
    r = subprocess.run([sys.executable, str(RUN.parent / "few_tokens.py"), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "read (" not in r.stdout
    for n in names:
        assert n in r.stderr, r.stderr
