"""Attention time per layer over an f16, q8_0 and q4_0 KV cache, as ratios to f16 measured in the same run
(one command: `python bench/kv_cache.py`).

For LLaMA 7B (32 heads x 128) and 65B (64 heads x 128) shapes, a cache of 2048 positions filled with random keys and
values in each type, it times one layer's attention as the forward pass calls it (KVCache.attend: ops.attention for
f16, kernels/kvquant.py for the quantized types):

* decode: one token at position 2047 (attends over 2048 positions);
* prompt: a 128-token batch at positions 1920..2047.

Each round times every type once, in turn, over `--layers` different layers' caches (a real model reads a different
cache in every layer, so the cache is not left in the CPU's last-level cache by the previous call); the medians over
the rounds are printed, in wall time and in process CPU time per thread (the fairer figure on a machine that other
work shares), with the ratio to f16 of the same column. What a quantized cache should save is read bandwidth: decode
streams every cached byte once per token, q8_0 34/64 and q4_0 18/64 of f16's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numba
import numpy as np

from airobackend.kernels import simd
from airobackend.kvcache import KVCache

TYPES = ("f16", "q8_0", "q4_0")
SHAPES = {"7B": 32, "65B": 64}


def _caches(n_head: int, n_layers: int, rng) -> dict[str, KVCache]:
    """One KVCache per type, n_layers layers of 2048 positions, the same random keys/values stored in each."""
    out = {t: KVCache(n_layers, n_head, 2048, 128, n_rot=128, freq_base=10000.0, type_k=t, type_v=t) for t in TYPES}
    for il in range(n_layers):
        for p0 in range(0, 2048, 256):
            k, v = (rng.standard_normal((2, 256, n_head, 128), dtype=np.float32) * 0.5)
            for c in out.values():
                c.rope_store(il, np.zeros((256, n_head, 128), np.float32), k.copy(), v.copy(),
                             np.arange(p0, p0 + 256, dtype=np.int64), p0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="7B,65B", help="comma list of 7B, 65B")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4, help="layers' caches cycled through per timing")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if any(s not in SHAPES for s in shapes) or args.rounds < 1 or args.layers < 1:
        ap.error(f"--shapes from {', '.join(SHAPES)}; --rounds and --layers at least 1")
    threads = [t for t in (int(x) for x in args.threads.split(",")) if t <= numba.config.NUMBA_NUM_THREADS]
    print(f"KV cache attention | ISA {simd.ISA} | cores {os.cpu_count()} | load avg {os.getloadavg()[0]:.1f} | "
          f"{args.layers} layers cycled, median of {args.rounds} rounds")
    rng = np.random.default_rng(1)
    print(f"{'shape':5s} {'thr':>3s} {'case':14s} " + " ".join(f"{t + ' ms':>9s} {'ratio':>5s}" for t in TYPES)
          + "   (wall | cpu per thread)")
    for shape in shapes:
        n_head = SHAPES[shape]
        caches = _caches(n_head, args.layers, rng)
        mib = {t: c.nbytes / args.layers / 2**20 for t, c in caches.items()}
        print(f"{shape}: one layer's cache at 2048 positions: " + ", ".join(f"{t} {mib[t]:.1f} MiB "
              f"({mib[t] / mib['f16']:.2f})" for t in TYPES))
        for nt in threads:
            numba.set_num_threads(nt)
            for label, n_tok, n_past in (("decode @2047", 1, 2047), ("prompt 128 @1920", 128, 1920)):
                q = rng.standard_normal((n_tok, n_head, 128), dtype=np.float32)
                out = np.empty((n_tok, n_head * 128), np.float32)
                wall = {t: [] for t in TYPES}
                cpu = {t: [] for t in TYPES}
                for t in TYPES:                                      # compile / warm up
                    caches[t].attend(0, q, n_past, out)
                for _ in range(args.rounds):
                    for t in TYPES:
                        w0, c0 = time.perf_counter(), time.process_time()
                        for il in range(args.layers):
                            caches[t].attend(il, q, n_past, out)
                        wall[t].append((time.perf_counter() - w0) / args.layers * 1e3)
                        cpu[t].append((time.process_time() - c0) / args.layers / nt * 1e3)
                for name, res in (("wall", wall), ("cpu", cpu)):
                    base = np.median(res["f16"])
                    cells = " ".join(f"{np.median(res[t]):9.2f} {np.median(res[t]) / base:5.2f}" for t in TYPES)
                    print(f"{shape:5s} {nt:3d} {label:14s} {cells}   {name}", flush=True)
        del caches
    return 0


if __name__ == "__main__":
    sys.exit(main())
