"""What pipeline stages on Ray cost: decode time per token, local engine vs 2 (and 3) stages, same model, same run,
and what each stage's resident memory is made of.

    python bench/ray_stages.py [--model FILE] [--tokens 32] [--runs 3] [--threads N] [--stages 2,3]

Needs Ray (the [ray] or [test] extra). The stages run on a Ray cluster of this machine (ray.cluster_utils.Cluster:
one raylet per stage, on the loopback interface), so what is measured is the transport — Ray calls, object passing,
the head's embeddings and output — not a network: every stage computes its layers with the same kernels the local
model uses, and on one machine only one stage computes at a time during decoding. The local model and the staged
sets take turns token by token, so that machine load affects them alike.

Time, per decode token (model.eval of one token at the next position; medians over --tokens steps, then over runs):
  ms/token      the whole step;
  ratio         staged ms/token / local ms/token (the goal: <= 1.10 for 2 stages on one machine);
  best, ratio   the fastest single step of each, and their ratio: on a loaded machine the step least delayed by
                other jobs, closest to what the same step costs on a quiet one;
  layers        the part spent in run_layers: for the local model its layers; for a staged model the stages'
                forward passes and the calls that carry the row to them and back;
  in stages     the stages' own time in their forward passes (summed over stages; each stage counts it);
  transport     layers - in stages: Ray calls, serialization, waiting for a process to be scheduled;
  bytes/token   activations sent per decode token: one row (n_embd float32) to each stage and one back from it.
                Ray passes an object under 100 KiB (max_direct_call_object_size) through its owner, the head: stage
                1's row goes back to the head and on to stage 2, so a token costs one round trip per stage;
  bytes/chunk   the same for a prompt chunk of 512 rows: objects that large go from stage to stage directly (head ->
                stage 1 -> ... -> stage N), and only the rows the head needs come back (1 for a prompt's last chunk).

Memory, per stage process (Linux /proc/self/smaps of that process, after the prompt and the decode runs):
  share         bytes of the file in the stage's layers (its tensors' sizes);
  RSS           the process's resident memory;
  idle worker   the RSS of an idle Ray worker on the same cluster (an actor that imports nothing): the part of a
                stage that is Ray's, not the model's;
  RSS - idle    what the stage costs beyond an idle Ray worker;
  /share        (RSS - idle - KV) / share: the goal is within 10 % (the KV cache is the stage's by design, sized by
                n_ctx, and `inspect --stages` counts it apart);
  weights+data  private memory (anonymous pages and model-file pages) grown since before the layers were loaded,
                less the KV cache: the weights (copied into the kernels' layout, or read in place from the mapping),
                the activation buffers and Numba's loaded machine code; compared with the share (1.00 = no copy
                beyond the one the kernels read);
  KV            the stage's KV caches (n_ctx positions of its layers);
  fixed         RSS - idle - share - KV: the interpreter, NumPy, Numba and llvmlite (shared-library pages, shared
                with every process on the machine that maps them) and the kernels' code: the same for a stage of
                one layer as for one of forty, so small beside a real model's share.
Default model: a 7B-shaped q4_0 file (n_embd 4096, n_ff 11008, 32000 tokens) of `--layers` layers (default 32, a 7B's
depth; 3.7 GB), random weights: bench/batching.py's file, written once under ~/.cache/airobackend/bench. The depth matters for both goals: the transport
per token and a stage's fixed memory (interpreter, NumPy, Numba, llvmlite, activation buffers) do not grow with the
layers, the work and the share do; `--layers 4` shows them against a slice's eighth of a 7B's work.
Real network latency is not measured here: add the link's round trip per hop, and bytes/token over its bandwidth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import default_model  # noqa: E402  (bench/ is not a package)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")     # 127.0.0.1 stays 127.0.0.1 (no network)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
MIB = 2 ** 20


class Timed:
    """Wraps a model's run_layers to add up the time spent in it."""

    def __init__(self, model) -> None:
        self.model, self.inner, self.total = model, model.run_layers, 0.0
        model.run_layers = self

    def __call__(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kw)
        finally:
            self.total += time.perf_counter() - t0


def decode(models: dict, timers: dict, start: int, n: int) -> dict:
    """For each model: (median ms of n one-token evaluations at positions start, start+1, ..., mean ms in
    run_layers, mean ms in the stages' forward passes (0 for a local model)). The models take turns token by
    token, so that the machine's load, which moves from second to second, falls on each alike."""
    busy0 = {k: _busy(m) for k, m in models.items()}
    layers0 = {k: t.total for k, t in timers.items()}
    times: dict = {k: [] for k in models}
    for i in range(n):
        for k, m in models.items():
            t0 = time.perf_counter()
            m.eval([10 + i % 50], start + i)
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(times[k]) * 1e3, (timers[k].total - layers0[k]) / n * 1e3,
                (_busy(m) - busy0[k]) / n * 1e3, min(times[k]) * 1e3) for k, m in models.items()}


def _busy(model) -> float:
    info = getattr(model, "stage_info", None)
    return sum(i["busy_s"] for i in info()) if info is not None else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model file (default: a 7B-shaped q4_0 file of --layers layers, written once)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the default model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--n-ctx", type=int, default=256)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from airobackend.cluster import start_stages
    from airobackend.formats import open_model
    from airobackend.llama import default_n_threads
    from airobackend.model import LlamaModel

    path = args.model or str(default_model("q4_0", args.layers))
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

    @ray.remote(num_cpus=0)
    class Idle:
        """An idle Ray worker: what a stage process is before it imports anything of ours."""
        def rss(self) -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    staged = {}
    try:
        idle_actor = Idle.remote()
        idle = ray.get(idle_actor.rss.remote())
        for n in counts:
            m = start_stages(cluster.address, path, n, n_ctx=args.n_ctx, n_threads=threads)
            m.eval(prompt, 0)
            staged[n] = m
        models = {"local": local, **staged}
        timers = {k: Timed(m) for k, m in models.items()}
        results: dict = {k: [] for k in models}
        for _ in range(args.runs):
            for k, r in decode(models, timers, len(prompt), args.tokens).items():
                results[k].append(r)
        load = os.getloadavg()
        print(f"model {Path(path).name}: n_embd {hp.n_embd}, {hp.n_layer} layers, {mf.mix_name}; {threads} "
              f"threads per stage; {args.tokens} tokens x {args.runs} runs; load average {load[0]:.1f} "
              f"(machine {'loaded' if load[0] > (os.cpu_count() or 1) * 0.5 else 'quiet'}, {os.cpu_count()} CPUs)")
        base = statistics.median(r[0] for r in results["local"])
        best_base = min(r[3] for r in results["local"])
        per_hop = 4 * int(hp.n_embd)
        print(f"{'':10} {'ms/token':>9} {'ratio':>6} {'best':>6} {'ratio':>6} {'layers':>7} {'in stages':>9} "
              f"{'transport':>9} {'bytes/token':>12} {'bytes/chunk':>12}")
        for k, rs in results.items():
            ms, lay, busy = (statistics.median(r[j] for r in rs) for j in range(3))
            best = min(r[3] for r in rs)
            hops = 0 if k == "local" else k + 1
            name = "local" if k == "local" else f"{k} stages"
            transport = f"{lay - busy:9.2f}" if k != "local" else f"{'-':>9}"
            stages_ms = f"{busy:9.2f}" if k != "local" else f"{'-':>9}"
            n_st = hops - 1 if hops else 0
            print(f"{name:10} {ms:9.2f} {ms / base:6.2f} {best:6.2f} {best / best_base:6.2f} {lay:7.2f} {stages_ms} "
                  f"{transport} {per_hop * 2 * n_st:12d} "
                  f"{per_hop * 512 * n_st + per_hop if hops else 0:12d}")
        print("raw ms/token per run:", {str(k): [round(r[0], 2) for r in rs] for k, rs in results.items()})

        print(f"idle Ray worker: RSS {idle / MIB:.0f} MiB")
        print(f"{'set':8} {'stage':>5} {'layers':>7} {'share':>7} {'RSS':>6} {'RSS-idle':>8} {'/share':>6} "
              f"{'weights+data':>12} {'/share':>6} {'KV':>5} {'fixed':>6}   (MiB)")
        rows = []
        for n in counts:
            model = staged[n]
            infos = model.stage_info()
            mems = model.fetch([model.transport.submit(i, "resident") for i in range(len(model))])
            starts = model.fetch([model.transport.submit(i, "resident_at_start") for i in range(len(model))])
            for i, (info, mem, start) in enumerate(zip(infos, mems, starts)):
                lo, hi = info["layers"]
                share = sum(t.nbytes for k, t in mf.tensors.items()
                            if k.startswith("blk.") and lo <= int(k.split(".")[1]) < hi)
                rss = info["rss"]
                data = (mem["anon"] + mem["model"]) - (start["anon"] + start["model"]) - mem["kv"]
                fixed = rss - idle - share - mem["kv"]
                print(f"{n} stages {i + 1:5d} {f'{lo}-{hi - 1}':>7} {share / MIB:7.0f} {rss / MIB:6.0f} "
                      f"{(rss - idle) / MIB:8.0f} {(rss - idle - mem['kv']) / share:6.2f} {data / MIB:12.0f} "
                      f"{data / share:6.2f} {mem['kv'] / MIB:5.1f} {fixed / MIB:6.0f}")
                rows.append((share, rss - mem["kv"], data))
        # Stages of different sizes tell the fixed part from what a layer adds (the slope between the smallest and
        # the largest stage).
        small, large = min(rows), max(rows)
        if large[0] > small[0]:
            d = large[0] - small[0]
            print(f"a stage larger by {d / MIB:.0f} MiB of the file: RSS less KV +{(large[1] - small[1]) / MIB:.0f} MiB "
                  f"({(large[1] - small[1]) / d:.2f} x), weights+data +{(large[2] - small[2]) / MIB:.0f} MiB "
                  f"({(large[2] - small[2]) / d:.2f} x)")
    finally:
        for m in staged.values():
            m.close()
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
