"""First start and warm start of `airobackend run` on the demo model: wall and CPU seconds from start to exit.

    python bench/first_start.py [--runs N]

A first start compiles every kernel the model needs (during the load, before the first token) into an empty cache
root (a fresh AIRO_CACHE_DIR); a warm start loads them from that cache. CPU seconds (user + system of the child)
are what a busy machine changes least; wall seconds are what a user waits.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def timed(env: dict) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "airobackend", "run", "-n", "8", "-p", "Hello", "-s", "1"],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="first/warm pairs, each with its own empty cache root")
    n = ap.parse_args().runs
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    for i in range(n):
        with tempfile.TemporaryDirectory(prefix="airo-first-start-") as root:
            env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
            env["AIRO_CACHE_DIR"] = root
            cold = timed(env)
            warm = timed(env)
        groups = [line for line in cold[2].splitlines() if ": compiled in " in line or ": loaded from" in line]
        print(f"run {i + 1}: first start {cold[0]:.1f} s wall, {cold[1]:.1f} s CPU; "
              f"warm start {warm[0]:.1f} s wall, {warm[1]:.1f} s CPU")
        for line in groups:
            print("   ", line)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
