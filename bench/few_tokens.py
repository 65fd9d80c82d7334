"""Few-token mat-mat against the mat-vec: what n activation rows (2-8) cost relative to one, on 7B-shaped weights.

    .venv/bin/python bench/few_tokens.py [--types q4_0,q8_0,q4_K,q6_K] [--tokens 2,3,4,6,8] [--threads 2] [--rounds 7]

A decode step of n sequences (continuous batching) or a verifying pass of a draft (speculative decoding) multiplies
each weight by n activation rows. A bandwidth-bound kernel pays one weight stream for all n plus the arithmetic, so
n tokens should cost little more than one mat-vec. For each type and shape (4096 x 4096, 11008 x 4096) this prints:

* `mv ms`: the mat-vec as the model calls it (FastWeight.matvec: activation quantization fused);
* per n: `full` = quantize_input + matmat_q (the model's path), `kern` = matmat_q alone, each as the ratio of its
  time to the mat-vec's in the same round (medians over rounds);
* `GB/s` of weights per mat-vec and per 4-token product, and `read`: the C STREAM-like read (bench/stream_read.c,
  compiled as bench/side_by_side.py does), sampled once per round, same thread count.

Each case is timed as the fastest of `--calls` calls, each on the next of enough copies of the matrix (random
blocks in unlinked files, read through mmaps as a model file is: bench/run.py's random_raw) that together they
exceed the last-level cache, so every call streams its weights from DRAM as in a model. Rounds interleave all cases,
so load moves them alike; the ratios (medians over `--rounds`) are the figures, the milliseconds say how loaded the
machine was. `--shapes 256x4096 --copies 1 --threads 1` keeps the weights in L2: the kernels' arithmetic alone.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import random_raw  # noqa: E402
from side_by_side import build_stream, read_bandwidth  # noqa: E402

from airobackend.kernels import fast  # noqa: E402
from airobackend.quant import GGMLType  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096))
STREAM_MB = 96              # bytes each timing cycles through: three times the 32 MB L3 of the machine measured


class Case:
    """Copies of one type and shape, their activations and outputs."""

    def __init__(self, t: GGMLType, n_rows: int, n_cols: int, toks: list[int], rng, copies: int = 0):
        self.label = f"{t.name} {n_rows}x{n_cols}"
        raw = random_raw(t, n_rows, n_cols, rng)
        n_copies = copies or max(2, -(-STREAM_MB * 2**20 // raw.nbytes))
        self.ws = [fast.prepare_fast(t, raw if i == 0 else random_raw(t, n_rows, n_cols, rng), n_rows, n_cols)
                   for i in range(n_copies)]
        if self.ws[0] is None:
            raise SystemExit(f"no fast kernel for {t.name} on this CPU (ISA {fast.ISA})")
        self.nbytes = raw.nbytes
        self.x = rng.standard_normal(n_cols, dtype=np.float32)
        self.X = {n: rng.standard_normal((n, n_cols), dtype=np.float32) for n in toks}
        self.out = np.empty(n_rows, np.float32)
        self.Out = {n: np.empty((n, n_rows), np.float32) for n in toks}
        self.i = 0

    def next_w(self):
        self.i = (self.i + 1) % len(self.ws)
        return self.ws[self.i]

    def time(self, mode, n: int, calls: int) -> float:
        """Seconds of the fastest of `calls` calls: 'mv', 'full' (quantize + matmat) or 'kern' (matmat on quantized
        rows). The fastest, not the median: on a machine shared with other work most calls lose one of the two
        cores for part of the time, the fastest ones did not."""
        ts = []
        xq = self.ws[0].quantize_input(self.X[n]) if mode == "kern" else None
        for _ in range(calls):
            w = self.next_w()
            t0 = time.perf_counter()
            if mode == "mv":
                w.matvec(self.x, self.out)
            elif mode == "full":
                w.matmat_q(w.quantize_input(self.X[n]), self.Out[n])
            else:
                w.matmat_q(xq, self.Out[n])
            ts.append(time.perf_counter() - t0)
        return min(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="q4_0,q8_0,q4_K,q6_K")
    ap.add_argument("--tokens", default="2,3,4,6,8")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=9, help="calls per case per round (median)")
    ap.add_argument("--copies", type=int, default=0,
                    help="copies of each matrix cycled through (default: enough to exceed the caches; 1 with a small "
                         "--shapes, e.g. 256x4096, and --threads 1 measures the kernels' arithmetic alone)")
    args = ap.parse_args(argv)
    names = {t.name.lower(): t for t in GGMLType}
    try:
        types = [names[s.strip().lower()] for s in args.types.split(",")]
    except KeyError as e:
        ap.error(f"--types: unknown {e.args[0]}")
    try:
        toks = sorted({int(s) for s in args.tokens.split(",")})
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        ap.error("--tokens: numbers (2,3,4); --shapes: ROWSxCOLS,... (4096x4096)")
    if toks[0] < 1 or any(len(s) != 2 or min(s) < 1 for s in shapes) or min(args.rounds, args.calls) < 1:
        ap.error("--tokens, --rounds, --calls must be at least 1 and --shapes of the form ROWSxCOLS")
    numba.set_num_threads(args.threads)
    exe = build_stream(Path(tempfile.gettempdir()))
    rng = np.random.default_rng(0)
    cases = [Case(t, r, c, toks, rng, args.copies) for t in types for r, c in shapes]
    for cs in cases:        # compile / load every kernel outside the rounds
        cs.time("mv", 1, 1)
        for n in toks:
            cs.time("full", n, 1)
            cs.time("kern", n, 1)
    print(f"ISA {fast.ISA}, {args.threads} threads, {args.rounds} rounds x {args.calls} calls (fastest), medians; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    res: dict = {}
    reads = []
    for _ in range(args.rounds):
        reads.append(read_bandwidth(exe, args.threads, 512))
        for cs in cases:
            mv = cs.time("mv", 1, args.calls)
            res.setdefault((cs.label, "mv"), []).append(mv)
            for n in toks:
                for mode in ("full", "kern"):
                    res.setdefault((cs.label, mode, n), []).append(cs.time(mode, n, args.calls) / mv)
    read = statistics.median(reads)
    print(f"read (bench/stream_read.c, {args.threads} threads): {read:.1f} GB/s (median of {len(reads)}: "
          f"{min(reads):.1f}-{max(reads):.1f}); load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    head = "".join(f" {n:>2}:full  kern" for n in toks)
    print(f"\n{'weight':22s} {'mv ms':>6s}{head}   mv GB/s  /read  4-tok GB/s  /read")
    for cs in cases:
        mv = statistics.median(res[(cs.label, "mv")])
        line = f"{cs.label:22s} {mv * 1e3:6.3f}"
        for n in toks:
            line += f" {statistics.median(res[(cs.label, 'full', n)]):7.2f} {statistics.median(res[(cs.label, 'kern', n)]):5.2f}"
        gb = cs.nbytes / mv / 1e9
        line += f"   {gb:7.1f} {gb / read:6.2f}"
        if 4 in toks:
            g4 = gb / statistics.median(res[(cs.label, "full", 4)])
            line += f"  {g4:10.1f} {g4 / read:6.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
