"""Continuous batching: aggregate decode tokens/s of 1, 2, 4, ... concurrent streams, as ratios against 1 stream.

    python bench/batching.py [--model FILE] [--streams 1,2,4] [--tokens 16] [--rounds 5] [--threads 2] [--engine]

Model level (always): N sequences, each in its own KV cache after its own prompt; one step = one forward pass
(LlamaModel.eval_batch) with the next token of every sequence, so the weights stream once for N tokens. Also the
single-sequence path the engine takes with --parallel 1 (LlamaModel.eval of one token: the mat-vec kernels), as the
baseline the 1-stream batched rate is compared with. The stream counts take turns step by step (eval, 1, 2, 4, eval,
1, 2, 4, ...) so that machine load and memory speed, which move within seconds on a VM, affect them alike; figures
are medians over all steps of all rounds. The CPU-time columns divide the process's
CPU time by the thread count instead of wall time: the fairer figure on a machine that other work shares.

Engine level (--engine): N concurrent requests through Engine with Settings(parallel=N) (greedy, EOS banned, the
same token count each), their consumers in N threads; aggregate tokens/s = all tokens / wall time from the start to
the last event (prompts included); and the time to first token of a request that arrives while N-1 others decode.

Default model: a 7B-wide slice (n_embd 4096, n_ff 11008, 32 heads, 2 layers, n_vocab 32000) in q4_0, written once
under ~/.cache/airobackend/bench (or $AIRO_BENCH_DIR) by airobackend.formats.writer; `--shape 65b --layers 1` a
65B-wide one (n_embd 8192, n_ff 22016). Per-token cost is then a fraction of the whole model's plus the output matrix:
the ratios are what matters, not the absolute tokens/s. Timings need a quiet machine: every figure is a ratio within
one run, but a run on a loaded machine says little.

llama.cpp on the same file (--llama BIN, its `llama-batched-bench`; bench/README.md says how it is built): the same
stream counts, prompt length, steps and threads, after the model-level rounds; its S_TG column (aggregate generated
tokens/s over the decode steps of B parallel sequences) as ratios against its own 1-sequence row. That puts the
ratio a reader compares ours with in the same run: how much a decode step gains from more sequences depends on how
far this CPU's decode is from its arithmetic limit, which is the machine's, not the engine's.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def bench_dir() -> Path:
    return Path(os.environ.get("AIRO_BENCH_DIR", Path.home() / ".cache" / "airobackend" / "bench"))


SHAPES = {"7b": (4096, 11008, 32), "65b": (8192, 22016, 64)}     # n_embd, n_ff, n_head


def default_model(mix: str, n_layer: int, shape: str = "7b") -> Path:
    from airobackend.formats.writer import write_synthetic_model
    n_embd, n_ff, n_head = SHAPES[shape]
    path = bench_dir() / f"batching-{n_embd}-{n_ff}-{n_layer}-32000-{mix}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) ...", flush=True)
        tmp = path.with_suffix(".tmp")
        write_synthetic_model(tmp, format="gguf", mix=mix, n_vocab=32000, n_embd=n_embd, n_head=n_head,
                              n_layer=n_layer, n_ff=n_ff, tile_rows=64)
        os.replace(tmp, path)
    return path


def model_level(llm, streams: list[int], n_tok: int, rounds: int, n_prompt: int) -> dict:
    """Seconds per step (median) for each stream count, and for the one-sequence eval path ('eval')."""
    m = llm.model
    rng = np.random.default_rng(0)
    caches = [m.new_cache(n_ctx=n_prompt + n_tok * rounds + 8) for _ in range(max(streams))]
    for c in caches:
        m.eval(rng.integers(3, m.n_vocab, n_prompt), 0, cache=c)
    times: dict = {n: [] for n in ["eval"] + streams}
    cpu: dict = {n: [] for n in ["eval"] + streams}
    for _ in range(rounds):
        for c in caches:
            c.truncate(n_prompt)            # every round decodes the same positions
        toks = rng.integers(3, m.n_vocab, (n_tok, max(streams)))
        for t in range(n_tok):
            # The stream counts take turns step by step: the memory's speed on a VM moves by a third within a
            # minute, and a step of each count in turn meets the same speed. Each writes position n_prompt + t of
            # the caches it uses (the later ones overwrite it: the cost is the same).
            for n in ["eval"] + streams:
                t0, c0 = time.perf_counter(), time.process_time()
                if n == "eval":
                    m.eval([int(toks[t, 0])], n_prompt + t, cache=caches[0])
                else:
                    m.eval_batch([(caches[i], n_prompt + t, [int(toks[t, i])]) for i in range(n)])
                times[n].append(time.perf_counter() - t0)
                cpu[n].append((time.process_time() - c0) / m.n_threads)
    return ({n: statistics.median(v) for n, v in times.items()}, {n: statistics.median(v) for n, v in cpu.items()})


def engine_level(llm, streams: list[int], n_tok: int, rounds: int) -> dict:
    """Per stream count n: (aggregate tokens/s of n requests started together, seconds to the first token of a
    request that arrives while n-1 others decode)."""
    from airobackend.engine import Engine
    from airobackend.settings import Settings
    from airobackend.types import GenerationRequest, SamplingParams

    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.0, top_k=0, top_p=1.0, min_p=0.0,
                            logit_bias={llm.tokenizer.eos_id: float("-inf")})

    def request(i: int, n: int, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(prompt=f"Stream {i} of {n}: once upon a time, in a land far away, there lived",
                                 max_tokens=max_tokens, sampling=greedy)

    out: dict = {n: ([], []) for n in streams}
    engines = {n: Engine(llm, Settings(parallel=n, multiuser=n, prompt_cache_mb=0)) for n in streams}
    for _ in range(rounds):
        for n in streams:
            eng = engines[n]
            # aggregate: n requests at once
            gens = [eng.generate(request(i, n, n_tok)) for i in range(n)]
            t0 = time.perf_counter()
            threads = [threading.Thread(target=lambda g: list(g), args=(g,)) for g in gens]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[n][0].append(n * n_tok / (time.perf_counter() - t0))
            # time to first token of a request arriving while n-1 others decode
            busy = [eng.generate(request(100 + i, n, 4 * n_tok)) for i in range(n - 1)]
            decoding = [threading.Event() for _ in busy]

            def drain(g, ev):
                for e in g:
                    if e.text:
                        ev.set()
            threads = [threading.Thread(target=drain, args=(g, ev)) for g, ev in zip(busy, decoding)]
            for t in threads:
                t.start()
            for ev in decoding:
                ev.wait()
            t0 = time.perf_counter()
            late = eng.generate(request(999, n, 2))
            next(e for e in late if e.text)
            out[n][1].append(time.perf_counter() - t0)
            late.close()
            eng.abort()                  # the busy ones, running in their slots
            for t in threads:
                t.join()
    for eng in engines.values():
        eng.close()
    return {n: (statistics.median(a), statistics.median(b)) for n, (a, b) in out.items()}


def llama_cpp_level(binary: str, path: Path, streams: list[int], n_prompt: int, n_tok: int, threads: int) -> dict:
    """llama.cpp's llama-batched-bench on the same file: {B: aggregate decode tokens/s (its S_TG)}."""
    cmd = [binary, "-m", str(path), "-c", str(max(streams) * (n_prompt + n_tok) + 64), "-b", "512", "-ub", "512",
           "-npp", str(n_prompt), "-ntg", str(n_tok), "-npl", ",".join(map(str, streams)), "-t", str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"llama-batched-bench exited with {run.returncode}:\n{run.stderr[-2000:]}")
    out = run.stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[2]):
            rows[int(cells[2])] = float(cells[7])          # PP, TG, B, N_KV, T_PP, S_PP, T_TG, S_TG, T, S
    if set(rows) != set(streams):
        raise SystemExit(f"llama-batched-bench gave rows for {sorted(rows)}, not {streams}:\n{out}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a GGUF/GGML file (default: a 7B-wide slice written once)")
    ap.add_argument("--mix", default="q4_0", help="mix of the default slice")
    ap.add_argument("--layers", type=int, default=2, help="layers of the default slice")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="width of the default slice")
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=32, help="tokens cached per sequence before decoding")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", action="store_true", help="also through Engine(parallel=N) with N threads")
    ap.add_argument("--llama", metavar="BIN", help="llama.cpp's llama-batched-bench: the same file, same run")
    args = ap.parse_args(argv)
    if args.llama and not (os.path.isfile(args.llama) and os.access(args.llama, os.X_OK)):
        ap.error(f"--llama {args.llama}: not an executable file (llama.cpp's llama-batched-bench)")

    import numba
    from airobackend.llama import Llama
    from airobackend.kernels import fast

    streams = sorted({int(s) for s in args.streams.split(",")})
    if streams[0] != 1:
        streams = [1] + streams
    path = Path(args.model) if args.model else default_model(args.mix, args.layers, args.shape)
    n_ctx = max(512, args.prompt + args.tokens * args.rounds + 64)
    llm = Llama(str(path), n_ctx=n_ctx, n_threads=args.threads, verbose=False)
    print(f"model {path.name}, {args.threads} threads (of {numba.config.NUMBA_NUM_THREADS}), ISA {fast.ISA}, "
          f"{args.tokens} steps x {args.rounds} rounds, medians")
    llm.model.warmup()
    for n in streams:          # compile the batch shapes outside the timed rounds
        caches = [llm.model.new_cache(n_ctx=8) for _ in range(n)]
        llm.model.eval_batch([(c, 0, [1]) for c in caches])

    t, c = model_level(llm, streams, args.tokens, args.rounds, args.prompt)
    print("\nmodel level (eval_batch)     ms/step  agg tok/s  per-stream tok/s  vs 1 stream  | CPU-time: ms/step"
          "  vs 1 stream")
    for n in ["eval"] + streams:
        k = 1 if n == "eval" else n
        label = "eval, 1 sequence (mat-vec)" if n == "eval" else f"{n} stream{'s' if n > 1 else ''}"
        agg = k / t[n]
        print(f"  {label:26s} {t[n] * 1e3:8.1f} {agg:10.2f} {agg / k:17.2f} {agg * t[1]:11.2f}x  | "
              f"{c[n] * 1e3:16.1f} {k * c[1] / c[n]:11.2f}x")

    if args.llama:
        ll = llama_cpp_level(args.llama, path, streams, args.prompt, args.tokens, args.threads)
        print("\nllama.cpp (llama-batched-bench, S_TG)  agg tok/s  vs 1 stream  | ours / llama.cpp")
        for n in streams:
            print(f"  {n} stream{'s' if n > 1 else ' '}                          {ll[n]:9.2f}  {ll[n] / ll[1]:10.2f}x"
                  f"  | {n / t[n] / ll[n]:16.2f}")

    if args.engine:
        e = engine_level(llm, streams, args.tokens, args.rounds)
        b = e[1][0]
        print(f"\nengine (--parallel N, N clients)  agg tok/s  vs 1 stream  first token while N-1 decode (s)")
        for n in streams:
            print(f"  {n} stream{'s' if n > 1 else ' '}                      {e[n][0]:9.2f}  {e[n][0] / b:10.2f}x"
                  f"  {e[n][1]:8.3f}")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
