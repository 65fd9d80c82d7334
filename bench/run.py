"""Speed benchmark of the fast quantized kernels on LLaMA-shaped weights (one command: `python bench/run.py`).

For each mix (q4_0, q4_K_M, q8_0, f16) it builds a 7B-shaped slice -- n_embd 4096, n_ff 11008, 4 layers plus the
32000-row output matrix, per-tensor types as llama-quantize assigns them (airobackend.formats.writer.tensor_type_for)
-- and a 65B-shaped layer (n_embd 8192, n_ff 22016) in q4_K_M, then prints for 1 and 2 threads:

* decode tok/s: one token = a mat-vec through every weight matrix of the slice (activation quantization and Python
  call overhead included; norms/attention, a few % at short context, are not);
* prompt tok/s: a 128-token batch through every layer matrix (mat-mat) and the output matrix for the last token
  (as llama.cpp does without logits_all);
* GB/s of weights streamed per decode token, the machine's read bandwidth measured in the same run (a Numba prange sum
  over 256 MB with the same thread count, sampled between the timed tokens; numpy's single-threaded sum is printed
  once at the start), and the ratio;
* for 65B: the projected decode tok/s of the full model from the per-layer time (80 layers, half of them with Q6_K
  attn_v/ffn_down as q4_K_M has it, plus the output matrix);
* per weight type (`--types`, default all eleven with a fast kernel): decode through a 65B layer whose seven matrices
  all have that type, GB/s and the ratio to the bandwidth sampled beside it;
* attention (`--no-attention` skips it): ms per layer over a 2048-position fp16 KV cache at 7B and 65B head counts,
  decode and a 128-token prompt batch early and late in the context.

On a machine shared with other work, wall-clock numbers drop with the load; the `cpu-GB/s` and `cpu-tok/s` columns
divide by the process CPU time per thread instead (what the kernels do while they hold the cores; the bandwidth they
compete for is still shared), which is the fairer figure there; `cpu-BW` is the bandwidth sample normalized the same
way and the second `ratio` compares the two. Each decode token is interleaved with a bandwidth
sample, so `ratio` compares numbers taken at the same moments.

By default the weights are random blocks of the right types and sizes (speed does not depend on the values) built in
seconds, written to unlinked files under ~/.cache/airobackend/bench (or $AIRO_BENCH_DIR) and read through mmaps of
them, as the engine reads a model file (the legacy types are repacked from there into the kernel layout).
`--small-pages` puts them in anonymous 4 KB-page mmaps instead: a page cache filled by small writes (a fresh
download) maps with 4 KB pages, one re-read from disk with large folios (2 MB mappings on Linux 6.18/ext4 here).
`--files` writes real models with the project's writer into ~/.cache/airobackend/bench (or $AIRO_BENCH_DIR; reused
on the next run) and benchmarks their mmapped tensors.
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from airobackend.formats.writer import tensor_type_for
from airobackend.kernels import fast
from airobackend.quant import BLOCK, GGMLType

MIXES = ("q4_0", "q4_K_M", "q8_0", "f16")
HALF_FIELDS = {GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
               GGMLType.Q8_0: [0], GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.Q4_K: [0, 2],
               GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208]}
LLAMA_CPP_2T = {"q4_0": (48.7, 166), "q4_K_M": (37.0, 97), "q8_0": (27.4, 121), "f16": (17.8, 114)}


def layer_shapes(layer: int, n_embd: int, n_ff: int) -> list[tuple[str, tuple[int, int]]]:
    """(name, (rows, cols)) of one layer's matrices as the model multiplies them: ffn_gate/ffn_up map n_embd -> n_ff
    (n_ff rows of n_embd), ffn_down n_ff -> n_embd (n_embd rows of n_ff: the long rows). GGUF lists shapes the other
    way round (ne = [cols, rows])."""
    p = f"blk.{layer}."
    return [(p + "attn_q.weight", (n_embd, n_embd)), (p + "attn_k.weight", (n_embd, n_embd)),
            (p + "attn_v.weight", (n_embd, n_embd)), (p + "attn_output.weight", (n_embd, n_embd)),
            (p + "ffn_gate.weight", (n_ff, n_embd)), (p + "ffn_down.weight", (n_embd, n_ff)),
            (p + "ffn_up.weight", (n_ff, n_embd))]


SMALL_PAGES = False     # --small-pages: random weights in anonymous 4 KB-page mmaps instead of a file mapping


def bench_dir() -> Path:
    return Path(os.environ.get("AIRO_BENCH_DIR", Path.home() / ".cache" / "airobackend" / "bench"))


def random_raw(t: GGMLType, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of type t, written to an (unlinked) file under bench_dir() and read back through a read-only
    mmap of it: the memory the engine reads k-quant and F16 weights from is a model file's page cache, whose page
    size depends on the kernel and file system (4 KB pages on older kernels; on Linux 6.18/ext4 here, large folios
    mapped as 2 MB pages, unless the file came into the cache through small writes, e.g. a fresh download), and it
    streams differently from numpy's own (huge-page) or anonymous 4 KB memory. `--small-pages` (SMALL_PAGES) puts
    them in anonymous 4 KB-page mmaps instead, which stream like a small-folio page cache."""
    per, nb = BLOCK[t]
    if t == GGMLType.F16:
        src = (rng.standard_normal((n_rows, n_cols), dtype=np.float32) * 0.02).astype(np.float16).view(np.uint8)
    else:
        n_blk = n_cols // per
        src = np.frombuffer(rng.bytes(n_rows * n_blk * nb), np.uint8).reshape(n_rows, n_blk, nb).copy()
        for off in HALF_FIELDS[t]:
            src[:, :, off:off + 2] = np.array([0.001], np.float16).view(np.uint8)
        src = src.reshape(n_rows, n_blk * nb)
    if SMALL_PAGES:
        raw = np.frombuffer(mmap.mmap(-1, src.nbytes), np.uint8).reshape(src.shape)
        raw[...] = src
        return raw
    d = bench_dir()
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=d) as f:
        f.write(memoryview(np.ascontiguousarray(src)).cast("B"))
        f.flush()
        os.fsync(f.fileno())        # write back now, not as background I/O in the middle of the timed tokens
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)     # the mapping keeps the unlinked file alive
    return np.frombuffer(mm, np.uint8).reshape(src.shape)


class Slice:
    """The prepared weight matrices of one benchmark slice."""

    def __init__(self, label: str, tensors: list[tuple[str, GGMLType, np.ndarray, int, int]]):
        self.label = label
        self.weights = []
        self.nbytes = 0
        t0 = time.perf_counter()
        for name, t, raw, n_rows, n_cols in tensors:
            w = fast.prepare_fast(t, raw, n_rows, n_cols)
            if w is None:
                raise SystemExit(f"no fast kernel for {t.name} on this CPU (ISA {fast.ISA})")
            self.weights.append((name, w))
            self.nbytes += raw.nbytes
        self.prepare_s = time.perf_counter() - t0
        self.types = sorted({w.spec.name for _, w in self.weights})

    def decode_once(self, xs) -> None:
        for _, w in self.weights:
            w.matvec(xs[w.n_cols], self._out[w.n_rows])

    def warm(self, n_prompt: int) -> float:
        """Compile (or load from cache) every kernel used; returns seconds."""
        rng = np.random.default_rng(0)
        cols = {w.n_cols for _, w in self.weights}
        rows = {w.n_rows for _, w in self.weights}
        self._xs = {c: rng.standard_normal(c, dtype=np.float32) for c in cols}
        self._Xs = {c: rng.standard_normal((n_prompt, c), dtype=np.float32) for c in cols}
        self._out = {r: np.empty(r, np.float32) for r in rows}
        self._Out = {r: np.empty((n_prompt, r), np.float32) for r in rows}
        t0 = time.perf_counter()
        seen = set()
        for _, w in self.weights:
            if w.spec.name not in seen:
                seen.add(w.spec.name)
                w.matvec(self._xs[w.n_cols], self._out[w.n_rows])
                w.matmat(self._Xs[w.n_cols][:4], self._Out[w.n_rows][:4])
        return time.perf_counter() - t0

    def token(self, bw_buf: np.ndarray | None = None) -> tuple[float, float, float, float]:
        """One decode token after one bandwidth sample: (seconds, read GB/s, CPU seconds, CPU-time GB/s)."""
        bw = cbw = float("nan")
        if bw_buf is not None:
            t0 = time.perf_counter()
            c0 = time.process_time()
            _prange_sum(bw_buf, 256)
            bw = bw_buf.nbytes / (time.perf_counter() - t0) / 1e9
            cbw = bw_buf.nbytes / ((time.process_time() - c0) / numba.get_num_threads()) / 1e9
        t0 = time.perf_counter()
        c0 = time.process_time()
        self.decode_once(self._xs)
        return time.perf_counter() - t0, bw, time.process_time() - c0, cbw

    def decode_time(self, n_tok: int, bw_buf: np.ndarray | None = None) -> tuple[float, float]:
        """(median seconds per decode token, median read GB/s sampled between the tokens). Sampling the bandwidth
        interleaved with the tokens keeps the ratio meaningful on a machine shared with other work."""
        times, bws, cpus, cbws = zip(*(self.token(bw_buf) for _ in range(n_tok)))
        self.last_cpu = float(np.median(cpus))
        self.last_cpu_bw = float(np.median(cbws))
        return float(np.median(times)), float(np.median(bws))

    def prompt_time(self, reps: int = 1) -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            c0 = time.process_time()
            for name, w in self.weights:
                if name == "output.weight":     # llama.cpp computes logits for the batch's last token only
                    w.matvec(self._Xs[w.n_cols][-1], self._out[w.n_rows])
                else:
                    w.matmat(self._Xs[w.n_cols], self._Out[w.n_rows])
            if time.perf_counter() - t0 < best:
                best = time.perf_counter() - t0
                self.last_cpu = time.process_time() - c0
        return best


# ----------------------------------------------------------------------------------------------- bandwidth
@numba.njit(parallel=True, cache=True, fastmath=True)
def _prange_sum(a, n_chunks):
    per = a.shape[0] // n_chunks
    s = np.zeros(n_chunks, np.float32)
    for c in numba.prange(n_chunks):
        b = a[c * per:(c + 1) * per]
        acc = np.float32(0.0)
        for i in range(b.shape[0]):
            acc += b[i]
        s[c] = acc
    return s.sum()


def read_bandwidth(buf: np.ndarray, reps: int = 5) -> tuple[float, float]:
    """(numpy sum GB/s [single-threaded], Numba prange sum GB/s [current thread count]); best of `reps`."""
    _prange_sum(buf[:1 << 20], 64)
    best_np = best_nb = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best_np = max(best_np, buf.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        _prange_sum(buf, 256)
        best_nb = max(best_nb, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best_np, best_nb


# ----------------------------------------------------------------------------------------------- slices
def slice_7b(mix: str, rng, n_layer=4, n_embd=4096, n_ff=11008, n_vocab=32000, files=False):
    if files:
        return slice_from_file(mix, n_layer, n_embd, n_ff, n_vocab)
    tensors = []
    for i in range(n_layer):
        for name, (rows, cols) in layer_shapes(i, n_embd, n_ff):
            t = tensor_type_for(mix, name, (cols, rows), n_layer)
            tensors.append((name, t, random_raw(t, rows, cols, rng), rows, cols))
    t = tensor_type_for(mix, "output.weight", (n_embd, n_vocab), n_layer)
    tensors.append(("output.weight", t, random_raw(t, n_vocab, n_embd, rng), n_vocab, n_embd))
    return Slice(f"7B x{n_layer} {mix}", tensors)


def slice_from_file(mix, n_layer, n_embd, n_ff, n_vocab):
    from airobackend.formats import open_model
    from airobackend.formats.writer import write_synthetic_model
    root = bench_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"slice-{n_embd}-{n_ff}-{n_layer}-{n_vocab}-{mix}.gguf"
    if not path.exists():
        print(f"writing {path} (once) ...", flush=True)
        tmp = path.with_suffix(".tmp")
        write_synthetic_model(tmp, format="gguf", mix=mix, n_vocab=n_vocab, n_embd=n_embd, n_head=n_embd // 128,
                              n_layer=n_layer, n_ff=n_ff)
        os.replace(tmp, path)
    mf = open_model(str(path))
    tensors = []
    for name, ti in mf.tensors.items():
        if len(ti.shape) != 2 or name == "token_embd.weight":
            continue
        n_rows, n_cols = ti.shape
        tensors.append((name, ti.type, ti.data.reshape(n_rows, -1), n_rows, n_cols))
    s = Slice(f"7B x{n_layer} {mix} (file)", tensors)
    s._mf = mf
    return s


def slice_65b_type(rng, t: GGMLType):
    """One 65B layer with every matrix in type t (the per-type decode table)."""
    tensors = [(name, t, random_raw(t, rows, cols, rng), rows, cols)
               for name, (rows, cols) in layer_shapes(0, 8192, 22016)]
    return Slice(f"65B layer, all {t.name}", tensors)


def attention_table(threads: list[int], rng) -> None:
    """ms per layer of causal attention over the fp16 KV cache (ops.attention, as the forward pass calls it)."""
    from airobackend.kernels import ops
    print("\nattention per layer (fp16 KV cache, n_ctx 2048): decode = 1 token, prompt = a 128-token batch")
    print(f"{'shape':24s} {'thr':>3s} {'decode @511':>12s} {'decode @2047':>13s} {'prompt @0':>10s} {'prompt @1920':>13s}")
    for label, n_head in (("7B (32 heads x 128)", 32), ("65B (64 heads x 128)", 64)):
        kc = (rng.standard_normal((n_head, 2048, 128), dtype=np.float32) * 0.5).astype(np.float16).view(np.uint16)
        vc = (rng.standard_normal((n_head, 2048, 128), dtype=np.float32) * 0.5).astype(np.float16).view(np.uint16)
        for nt in threads:
            numba.set_num_threads(nt)
            cells = []
            for n_tok, n_past in ((1, 511), (1, 2047), (128, 0), (128, 1920)):
                q = rng.standard_normal((n_tok, n_head, 128), dtype=np.float32)
                out = np.empty((n_tok, n_head * 128), np.float32)
                ops.attention(q, kc, vc, n_past, out)
                cells.append(min(_timeit(lambda: ops.attention(q, kc, vc, n_past, out)) for _ in range(3)) * 1e3)
            print(f"{label:24s} {nt:3d} {cells[0]:9.2f} ms {cells[1]:10.2f} ms {cells[2]:7.1f} ms {cells[3]:10.1f} ms",
                  flush=True)


def slice_65b_layer(rng, use_q6k: bool):
    n_embd, n_ff = 8192, 22016
    tensors = []
    for name, (rows, cols) in layer_shapes(0, n_embd, n_ff):
        t = GGMLType.Q4_K
        if use_q6k and name.split(".")[-2] in ("attn_v", "ffn_down"):
            t = GGMLType.Q6_K
        tensors.append((name, t, random_raw(t, rows, cols, rng), rows, cols))
    return Slice(f"65B layer q4_K_M ({'Q6_K' if use_q6k else 'Q4_K'} attn_v/ffn_down)", tensors)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mixes", default=",".join(MIXES), help="7B-slice quantization mixes (comma list or 'none')")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=12, help="decode tokens timed (median)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt batch size")
    ap.add_argument("--no-65b", action="store_true")
    ap.add_argument("--types", default="all",
                    help="weight types for the per-type 65B-layer decode table (comma list, 'all' or 'none')")
    ap.add_argument("--rounds", type=int, default=15, help="rounds over the types in the per-type table")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--files", action="store_true", help="benchmark real files written by the project's writer")
    ap.add_argument("--small-pages", action="store_true",
                    help="random weights in anonymous 4 KB-page memory (like a freshly downloaded file's page cache) "
                         "instead of a file mapping")
    args = ap.parse_args(argv)
    global SMALL_PAGES
    SMALL_PAGES = args.small_pages
    fast_names = [GGMLType(t).name for t in fast.supported_types()]
    by_lower = {n.lower(): n for n in fast_names}
    type_names = []
    if args.types not in ("all", "none"):
        asked = [n.strip() for n in args.types.split(",") if n.strip()]
        unknown = [n for n in asked if n.lower() not in by_lower]
        if unknown:
            ap.error(f"--types: no fast kernel for {', '.join(unknown)} on this CPU; "
                     f"choose from {', '.join(fast_names) or '(none: no AVX2)'}, 'all' or 'none'")
        type_names = [by_lower[n.lower()] for n in asked]
    elif args.types == "all":
        type_names = fast_names
    from airobackend.formats.writer import MIX_BASE
    mixes = [] if args.mixes == "none" else [m.strip() for m in args.mixes.split(",") if m.strip()]
    bad = [m for m in mixes if m not in MIX_BASE]
    if bad:
        ap.error(f"--mixes: unknown {', '.join(bad)}; choose from {', '.join(MIX_BASE)} or 'none'")
    if args.rounds < 1 or args.tokens < 1:
        ap.error("--rounds and --tokens must be at least 1")
    threads = [int(t) for t in args.threads.split(",")]
    threads = [t for t in threads if t <= numba.config.NUMBA_NUM_THREADS]
    print(f"airobackend kernel benchmark | ISA {fast.ISA} | numba {numba.__version__} threading layer "
          f"{numba.config.THREADING_LAYER} | cores {os.cpu_count()} | load avg {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(1)
    buf = np.ones(1 << 28, np.float32)           # 1 GiB
    bw = {}
    for nt in threads:
        numba.set_num_threads(nt)
        bw[nt] = read_bandwidth(buf)
        print(f"read bandwidth, {nt} thread(s): numpy sum {bw[nt][0]:.1f} GB/s (single-threaded), "
              f"numba prange sum {bw[nt][1]:.1f} GB/s")
    del buf
    bw_buf = np.ones(1 << 26, np.float32)        # 256 MB, sampled between decode tokens

    rows = []
    hdr = (f"{'slice':44s} {'thr':>3s} {'decode tok/s':>12s} {'GB/s':>6s} {'BW GB/s':>7s} {'ratio':>6s} "
           f"{'cpu-GB/s':>8s} {'cpu-BW':>6s} {'ratio':>5s} {'prompt tok/s':>12s} {'cpu-tok/s':>9s} {'llama.cpp 2t dec/prompt':>24s}")
    for mix in mixes:
        s = slice_7b(mix, rng, files=args.files)
        warm = s.warm(args.prompt)
        print(f"\n{s.label}: {s.nbytes / 1e6:.0f} MB of weights ({', '.join(s.types)}), prepare {s.prepare_s:.1f} s, "
              f"first calls (compile or cache load) {warm:.1f} s")
        print(hdr)
        for nt in threads:
            numba.set_num_threads(nt)
            s.decode_once(s._xs)
            td, bwi = s.decode_time(args.tokens, bw_buf)
            cpu_d = s.last_cpu / nt
            tp = s.prompt_time()
            cpu_p = s.last_cpu / nt
            gbs = s.nbytes / td / 1e9
            ref = LLAMA_CPP_2T.get(mix, ("", ""))
            line = (f"{s.label:44s} {nt:3d} {1 / td:12.1f} {gbs:6.1f} {bwi:7.1f} {gbs / bwi:6.2f} "
                    f"{s.nbytes / cpu_d / 1e9:8.1f} {s.last_cpu_bw:6.1f} {s.nbytes / cpu_d / 1e9 / s.last_cpu_bw:5.2f} "
                    f"{args.prompt / tp:12.1f} {args.prompt / cpu_p:9.1f} "
                    f"{ref[0]:>12} / {ref[1]:<10}")
            print(line, flush=True)
            rows.append(line)
        del s

    if not args.no_65b:
        print("\n65B-shaped layer (n_embd 8192, n_ff 22016), q4_K_M; projection for 80 layers + output (Q6_K):")
        out_raw = random_raw(GGMLType.Q6_K, 32000, 8192, rng)
        out_w = fast.prepare_fast(GGMLType.Q6_K, out_raw, 32000, 8192)
        layers = [slice_65b_layer(rng, False), slice_65b_layer(rng, True)]
        for s in layers:
            s.warm(args.prompt)
        print(hdr)
        for nt in threads:
            numba.set_num_threads(nt)
            x = rng.standard_normal(8192, dtype=np.float32)
            o = np.empty(32000, np.float32)
            out_w.matvec(x, o)
            t_out = min(_timeit(lambda: out_w.matvec(x, o)) for _ in range(3))
            tl = []
            for s in layers:
                s.decode_once(s._xs)
                td, bwi = s.decode_time(max(3, args.tokens // 2), bw_buf)
                cpu_d = s.last_cpu / nt
                cbw = s.last_cpu_bw
                tp = s.prompt_time()
                cpu_p = s.last_cpu / nt
                tl.append(td)
                gbs = s.nbytes / td / 1e9
                print(f"{s.label:44s} {nt:3d} {1 / td:12.2f} {gbs:6.1f} {bwi:7.1f} {gbs / bwi:6.2f} "
                      f"{s.nbytes / cpu_d / 1e9:8.1f} {cbw:6.1f} {s.nbytes / cpu_d / 1e9 / cbw:5.2f} "
                      f"{args.prompt / tp:12.1f} {args.prompt / cpu_p:9.1f}", flush=True)
            t_tok = 40 * tl[0] + 40 * tl[1] + t_out
            full_bytes = 40 * (layers[0].nbytes + layers[1].nbytes) + out_raw.nbytes
            print(f"  -> full 65B q4_K_M, {nt} thread(s): {t_tok * 1e3:.0f} ms/token = {1 / t_tok:.2f} tok/s projected "
                  f"({full_bytes / 1e9:.1f} GB of matmul weights per token, {full_bytes / t_tok / 1e9:.1f} GB/s)")
        del layers, out_w, out_raw

    if type_names:
        # All types are built first and timed round-robin, one token each per round: the VM's slow phases (seconds
        # long: a lower bandwidth level, or two vCPUs that deliver one core) then fall on every type alike instead of
        # on whichever type happened to be timed in them.
        slices = []
        for name in type_names:
            slices.append(slice_65b_type(rng, GGMLType[name]))
            slices[-1].warm(4)
        print(f"\nper weight type: decode through one 65B layer (n_embd 8192, n_ff 22016) with every matrix in that "
              f"type; {args.rounds} rounds over the types, one token each (ratio: median of the per-token ratios)")
        print(f"{'slice':44s} {'thr':>3s} {'decode ms':>9s} {'GB/s':>6s} {'BW GB/s':>7s} {'ratio':>6s} "
              f"{'p25-p75':>9s} {'cpu-GB/s':>8s} {'cpu-BW':>6s} {'ratio':>5s}")
        for nt in threads:
            numba.set_num_threads(nt)
            rec = [[] for _ in slices]
            for s in slices:
                s.decode_once(s._xs)
            for _ in range(args.rounds):
                for s, r in zip(slices, rec):
                    r.append(s.token(bw_buf))
            for s, tokens in zip(slices, rec):
                t, bw, cpu, cbw = (np.array(v) for v in zip(*tokens))
                r = s.nbytes / t / 1e9 / bw
                rc = s.nbytes / (cpu / nt) / 1e9 / cbw
                p25, p75 = np.percentile(r, [25, 75])
                print(f"{s.label:44s} {nt:3d} {np.median(t) * 1e3:9.1f} {s.nbytes / np.median(t) / 1e9:6.1f} "
                      f"{np.median(bw):7.1f} {np.median(r):6.2f} {p25:4.2f}-{p75:4.2f} "
                      f"{s.nbytes / (np.median(cpu) / nt) / 1e9:8.1f} {np.median(cbw):6.1f} {np.median(rc):5.2f}",
                      flush=True)
        del slices

    if not args.no_attention:
        attention_table(threads, rng)
    return 0


def _timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
