"""What pipeline stages on Ray cost: decode time per token, local engine vs 2 (and 3) stages, same model, same run.

    python bench/ray_stages.py [--model FILE] [--tokens 32] [--runs 3] [--threads N] [--stages 2,3]

Needs the [ray] extra. The stages run on a Ray cluster of this machine (ray.cluster_utils.Cluster: one raylet per
stage, on the loopback interface), so what is measured is the transport — Ray calls, object passing, the head's
embeddings and output — not a network: every stage computes its layers with the same kernels the local model uses,
and on one machine only one stage computes at a time during decoding. Runs alternate local / staged so machine load
affects them alike.

Figures:
  ms/token      median time of one decode step (model.eval of one token at the next position), over --tokens steps;
  ratio         staged ms/token / local ms/token (the goal: <= 1.10 for 2 stages on one machine);
  bytes/token   activations sent per decode token: n_embd float32 per hop (head -> stage 1 -> ... -> head);
  bytes/chunk   the same for a prompt chunk of n_batch rows (what a slow link multiplies);
  RSS / share   each stage's resident memory, and what it grew by from before its layers were loaded (the
                process itself, Python, Numba and Ray, is the rest) against its share of the file.
Default model: a 7B-wide slice (n_embd 4096, n_ff 11008, 4 layers, q4_0, 32000 tokens) written to a temporary folder.
Real network latency is not measured here: add the link's round trip per hop, and bytes/token over its bandwidth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")     # 127.0.0.1 stays 127.0.0.1 (no network)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def decode_ms(model, start: int, n: int) -> float:
    """Median ms of n one-token evaluations at positions start, start+1, ..."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        model.eval([10 + i % 50], start + i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model file (default: a 7B-wide 4-layer q4_0 slice, written once)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--n-ctx", type=int, default=256)
    args = ap.parse_args()

    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from airobackend.cluster import start_stages
    from airobackend.formats import open_model
    from airobackend.llama import default_n_threads
    from airobackend.model import LlamaModel

    path = args.model
    if path is None:
        from airobackend.formats.writer import write_synthetic_model
        path = str(Path(tempfile.gettempdir()) / "airobackend-bench-7b-slice-4-q4_0.gguf")
        if not os.path.exists(path):
            write_synthetic_model(path, mix="q4_0", n_vocab=32000, n_embd=4096, n_head=32, n_layer=4, n_ff=11008,
                                  tile_rows=64)
    threads = args.threads or default_n_threads()
    counts = [int(s) for s in args.stages.split(",") if s]
    mf = open_model(path)
    hp = mf.hparams
    prompt = list(range(10, 10 + 32))
    local = LlamaModel(mf, n_ctx=args.n_ctx, n_threads=threads)
    local.eval(prompt, 0)

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, object_store_memory=80 << 20,
                                                                include_dashboard=False))
    for _ in range(max(counts) - 1):
        cluster.add_node(num_cpus=2, object_store_memory=80 << 20)     # room for the 2- and 3-stage sets at once
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    staged = {}
    try:
        for n in counts:
            m = start_stages(cluster.address, path, n, n_ctx=args.n_ctx, n_threads=threads)
            m.eval(prompt, 0)
            staged[n] = m
        results: dict = {"local": []}
        results.update({n: [] for n in counts})
        for _ in range(args.runs):
            results["local"].append(decode_ms(local, len(prompt), args.tokens))
            for n in counts:
                results[n].append(decode_ms(staged[n], len(prompt), args.tokens))
        base = statistics.median(results["local"])
        load = os.getloadavg()
        print(f"model {Path(path).name}: n_embd {hp.n_embd}, {hp.n_layer} layers, {mf.mix_name}; {threads} "
              f"threads per stage; {args.tokens} tokens x {args.runs} runs; load average {load[0]:.1f} "
              f"(machine {'loaded' if load[0] > (os.cpu_count() or 1) * 0.5 else 'quiet'}, {os.cpu_count()} CPUs)")
        print(f"{'':10} {'ms/token':>9} {'ratio':>6} {'bytes/token':>12} {'bytes/chunk':>12}")
        print(f"{'local':10} {base:9.2f} {1.0:6.2f} {0:12d} {0:12d}")
        for n in counts:
            ms = statistics.median(results[n])
            per_hop = 4 * int(hp.n_embd)
            print(f"{str(n) + ' stages':10} {ms:9.2f} {ms / base:6.2f} {per_hop * (n + 1):12d} "
                  f"{per_hop * 512 * n + per_hop:12d}")
        for n in counts:
            for i, info in enumerate(staged[n].stage_info()):
                lo, hi = info["layers"]
                share = sum(t.nbytes for k, t in mf.tensors.items()
                            if k.startswith("blk.") and lo <= int(k.split(".")[1]) < hi)
                grown = info["rss"] - info["rss_start"]
                print(f"{n} stages, stage {i + 1} (layers {lo}-{hi - 1}): RSS {info['rss'] / 2**20:.0f} MiB, of "
                      f"which the layers and their cache {grown / 2**20:.0f} MiB; share of the file "
                      f"{share / 2**20:.0f} MiB, ratio {grown / share:.2f}")
        print("raw ms/token per run:", {str(k): [round(v, 2) for v in vs] for k, vs in results.items()})
    finally:
        for m in staged.values():
            m.close()
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
