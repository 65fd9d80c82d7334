"""airobackend next to llama.cpp on the same GGUF files, threads and machine, in one run, as ratios.

    .venv/bin/python bench/side_by_side.py --llama NAME=PATH/llama-bench [--llama NAME=PATH ...] \\
        (--models FILE.gguf ... | --slices q4_0,q4_K_M,q5_K_M,q6_K,q8_0,f16 --quantize PATH/llama-quantize)

For each file, rounds of A B A B: llama.cpp's `llama-bench` (each binary given, run from its own folder's libraries)
and this engine (the same file through `Llama`, in this process) measure prompt processing (`--prompt` tokens as one
batch from position 0) and decode (`--gen` tokens one at a time from position 0, as llama-bench's tg test), each
round in turn, so both see the same machine load. Between rounds a STREAM-like read (bench/stream_read.c, compiled
here with the system C compiler, same thread count) samples the memory read bandwidth; a decode token reads every
weight matrix once (token_embd excepted: one row of it), so weight bytes x tok/s over that bandwidth is how close
decode runs to the machine's limit.

Printed: the CPU model and its SIMD flags, then per file and type the tok/s of each engine, ours / theirs, and the
decode-to-bandwidth ratio of each. `--slices` writes 7B-shaped 4-layer slices (n_embd 4096, n_ff 11008, 32000
vocabulary, random weights, the project's writer) as f16 GGUF once, under --work (default ~/.cache/airobackend/
side_by_side), and makes each mix from it with the llama-quantize given, as llama.cpp users make theirs. Nothing is
downloaded. On fixture-sized files (bench briefly) the weights sit in the caches: the bandwidth ratio is not meaningful
there, the tok/s ratios mostly measure per-call overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
SLICE = dict(n_vocab=32000, n_embd=4096, n_head=32, n_layer=4, n_ff=11008)


def cpu_info() -> tuple[str, list[str]]:
    model, flags = "unknown CPU", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return model, flags


def build_stream(work: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("side_by_side: a C compiler (gcc/cc) is needed for the STREAM-like read baseline")
    exe = work / "stream_read"
    src = HERE / "stream_read.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run([cc, "-O3", "-march=native", "-ffast-math", "-fopenmp", str(src), "-o", str(exe)], check=True)
    return exe


def read_bandwidth(exe: Path, threads: int, mib: int) -> float:
    out = subprocess.run([str(exe), str(threads), str(mib), "3"], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def llama_bench(binary: Path, model: Path, threads: int, n_prompt: int, n_gen: int, extra: list[str]) -> float:
    """tok/s of one llama-bench test (prompt when n_gen == 0, else decode), one repetition after its warm-up."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1",
           "-o", "json", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return float(json.loads(r.stdout)[0]["avg_ts"])


class Ours:
    """This engine on one file: prompt and decode timed as llama-bench times them (logits of the last token)."""

    def __init__(self, path: Path, threads: int, n_prompt: int, n_gen: int) -> None:
        from airobackend.llama import Llama
        self.llm = Llama(str(path), n_ctx=max(n_prompt, n_gen) + 8, n_threads=threads, n_batch=max(n_prompt, 1),
                         verbose=False)
        self.model = self.llm.model
        rng = np.random.default_rng(0)
        self.prompt = rng.integers(3, self.model.n_vocab, n_prompt)
        self.gen = rng.integers(3, self.model.n_vocab, n_gen)
        self.weight_bytes = sum(int(t.data.nbytes) for name, t in self.llm.model_file.tensors.items()
                                if len(t.ne) > 1 and name != "token_embd.weight")
        if "output.weight" not in self.llm.model_file.tensors:        # tied: the embedding matrix is the output
            self.weight_bytes += int(self.llm.model_file.tensors["token_embd.weight"].data.nbytes)
        self.model.warmup()
        self.prompt_ts()
        self.decode_ts()

    def prompt_ts(self) -> float:
        t = time.perf_counter()
        self.model.eval(self.prompt, 0)
        return len(self.prompt) / (time.perf_counter() - t)

    def decode_ts(self) -> float:
        t = time.perf_counter()
        for i, tok in enumerate(self.gen):
            self.model.eval([int(tok)], i)
        return len(self.gen) / (time.perf_counter() - t)

    def close(self) -> None:
        self.llm.close()


def make_slices(mixes: list[str], quantize: Path, work: Path) -> list[Path]:
    from airobackend.formats.writer import write_synthetic_model
    f16 = work / "slice-7b-x4-f16.gguf"
    if not f16.exists():
        print(f"# writing {f16} (once; random weights) ...", flush=True)
        tmp = f16.with_suffix(".tmp")
        write_synthetic_model(tmp, format="gguf", mix="f16", tile_rows=64, **SLICE)
        os.replace(tmp, f16)
    out = []
    for mix in mixes:
        if mix == "f16":
            out.append(f16)
            continue
        path = work / f"slice-7b-x4-{mix}.gguf"
        if not path.exists():
            env = dict(os.environ, LD_LIBRARY_PATH=str(quantize.parent))
            r = subprocess.run([str(quantize), str(f16), str(path), mix.upper()], capture_output=True, text=True,
                               env=env)
            if r.returncode != 0:
                raise SystemExit(f"side_by_side: llama-quantize {mix} failed: {r.stderr.strip()[-400:]}")
        out.append(path)
    return out


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"        # small ones keep two significant digits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama", action="append", required=True, metavar="NAME=PATH",
                    help="a llama.cpp llama-bench binary, named for the table (repeatable)")
    ap.add_argument("--models", nargs="+", type=Path, help="GGUF files to run both engines on")
    ap.add_argument("--slices", help="comma-separated mixes of 7B-shaped slices to make and run (needs --quantize)")
    ap.add_argument("--quantize", type=Path, help="llama.cpp's llama-quantize, to make the slices' mixes")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "airobackend" / "side_by_side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--gen", type=int, default=32, help="decode tokens (default 32)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds per file (default 2; medians are printed)")
    ap.add_argument("--llama-args", default="", help="more llama-bench arguments, e.g. '--poll 0' (its threads "
                    "spin-wait by default, which a machine busy with other work punishes)")
    ap.add_argument("--read-mib", type=int, default=1024, help="buffer of the bandwidth sample (default 1024 MiB)")
    args = ap.parse_args(argv)

    binaries = {}
    for item in args.llama:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"--llama {item!r}: give NAME=PATH of an existing llama-bench binary")
        binaries[name] = Path(path).resolve()
    if bool(args.models) == bool(args.slices):
        ap.error("give either --models or --slices")
    if args.slices and (args.quantize is None or not args.quantize.is_file()):
        ap.error("--slices needs --quantize PATH of llama.cpp's llama-quantize")
    if min(args.threads, args.prompt, args.gen, args.rounds, args.read_mib) < 1:
        ap.error("--threads, --prompt, --gen, --rounds and --read-mib must be at least 1")
    for m in args.models or ():
        if not m.is_file():
            ap.error(f"--models: no file {m}")

    extra = args.llama_args.split()
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stream = build_stream(Path(tmp))
        files = args.models or make_slices([m.strip() for m in args.slices.split(",") if m.strip()],
                                           args.quantize.resolve(), args.work)
        model, flags = cpu_info()
        print(f"# {model}; {' '.join(flags)}; {args.threads} threads; prompt {args.prompt}, decode {args.gen}; "
              f"{args.rounds} A/B rounds (medians); llama-bench {' '.join(extra) or 'defaults'}; load average {os.getloadavg()[0]:.1f} at start")
        names = list(binaries)
        head = ["file", "prompt ours"] + [f"prompt {n}" for n in names] + [f"prompt ours/{n}" for n in names]
        head += ["decode ours"] + [f"decode {n}" for n in names] + [f"decode ours/{n}" for n in names]
        head += ["read GB/s", "ours/read"] + [f"{n}/read" for n in names]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for path in files:
            ours = Ours(path, args.threads, args.prompt, args.gen)
            pp = {k: [] for k in ["ours"] + names}
            tg = {k: [] for k in ["ours"] + names}
            bw = []
            for _ in range(args.rounds):
                bw.append(read_bandwidth(stream, args.threads, args.read_mib))
                pp["ours"].append(ours.prompt_ts())
                tg["ours"].append(ours.decode_ts())
                for n, b in binaries.items():
                    pp[n].append(llama_bench(b, path, args.threads, args.prompt, 0, extra))
                    tg[n].append(llama_bench(b, path, args.threads, 0, args.gen, extra))
            gb = ours.weight_bytes / 1e9
            ours.close()
            med = {k: statistics.median(v) for k, v in pp.items()}
            mtg = {k: statistics.median(v) for k, v in tg.items()}
            read = statistics.median(bw)
            row = [path.name, f"{med['ours']:.1f}"] + [f"{med[n]:.1f}" for n in names]
            row += [_ratio(med['ours'] / med[n]) for n in names]
            row += [f"{mtg['ours']:.1f}"] + [f"{mtg[n]:.1f}" for n in names]
            row += [_ratio(mtg['ours'] / mtg[n]) for n in names]
            row += [f"{read:.1f}", _ratio(mtg['ours'] * gb / read)] + [_ratio(mtg[n] * gb / read) for n in names]
            print("| " + " | ".join(row) + " |", flush=True)
        print(f"# load average {os.getloadavg()[0]:.1f} at the end; decode reads {'/'.join(n for n in names)} and "
              f"ours: weight bytes per token (token_embd excepted) x tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
