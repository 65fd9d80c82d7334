"""Speed of the tokenizers and the sampler chain (`python bench/tokenizer_sampling.py`).

Prints tokenizer throughput on ~10 MB of ordinary text (this repository's English docs repeated) and on space-less
text (the compiled merge loop) for the real LLaMA SentencePiece vocabulary and, on the same texts in the same run, for llama.cpp's
byte-level BPE test vocabularies (GPT-2: one pre-tokenizer expression; DeepSeek LLM: six), with each BPE time as a
ratio to the SentencePiece one; with the `regex` package installed, also what splitting by the GPT-2 expression with
its own \\p{L}/\\p{N} costs next to ours (llama.cpp's category stand-ins, stdlib re). Then the per-token cost
of the sampler over 32000 logits: default KoboldCpp chain, greedy, mirostat 2, a JSON grammar, and the full chain
(every filter plus DRY over the whole 1-2k-token context with SillyTavern's sequence breakers, XTC, smoothing,
top-nσ). Each sampler line also prints its ratio to a 7B token measured in the
same run: the mat-vecs of one q4_0 7B layer (n_embd 4096, n_ff 11008) timed and counted 32 times, plus the 32000 x
4096 output matrix (bench/run.py's decode token; norms and attention, a few %, left out). `--no-7b` skips it,
`--no-tokenizer` skips the tokenizer lines. Both are also timed in process CPU time (the 7B token's divided by the
thread count, as bench/run.py's cpu-tok/s), the fairer ratio on a machine that other work shares. Needs the fixtures
(../shared/fixtures or $AIRO_FIXTURES).
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numba
import numpy as np

from airobackend.sampling import Sampler
from airobackend.tokenizer import Tokenizer
from airobackend.types import SamplingParams

REPO = Path(__file__).resolve().parent.parent
FIX = Path(os.environ.get("AIRO_FIXTURES", REPO.parent / "shared" / "fixtures"))
JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''


def timed(fn, *a):
    t = time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t


def seven_b_token_seconds(n_tok: int = 9) -> tuple[float, float]:
    """Median wall seconds and CPU seconds per thread of a 7B q4_0 decode token's matrix work: one layer's mat-vecs
    x 32 + the output matrix."""
    sys.path.insert(0, str(REPO / "bench"))
    from run import slice_7b
    sl = slice_7b("q4_0", np.random.default_rng(0), n_layer=1)
    sl.warm(4)
    threads = numba.get_num_threads()
    layer, out, clayer, cout = [], [], [], []
    for _ in range(n_tok):
        t0, c0 = time.perf_counter(), time.process_time()
        for name, w in sl.weights:
            if name != "output.weight":
                w.matvec(sl._xs[w.n_cols], sl._out[w.n_rows])
        t1, c1 = time.perf_counter(), time.process_time()
        for name, w in sl.weights:
            if name == "output.weight":
                w.matvec(sl._xs[w.n_cols], sl._out[w.n_rows])
        layer.append(t1 - t0)
        out.append(time.perf_counter() - t1)
        clayer.append((c1 - c0) / threads)
        cout.append((time.process_time() - c1) / threads)
    return (32 * float(np.median(layer)) + float(np.median(out)),
            32 * float(np.median(clayer)) + float(np.median(cout)))


def encode_speeds(name: str, tok, big: str, spaceless: dict) -> dict:
    """Seconds to encode the docs text (word cache cold, then warm) and the space-less texts."""
    out = {}
    ids, out["docs cold"] = timed(tok.encode, big)
    ids, out["docs warm"] = timed(tok.encode, big)
    print(f"{name}: encode 10 MB of docs text: {out['docs cold']:.2f} s cold, {out['docs warm']:.2f} s warm, "
          f"{len(ids)} tokens, {len(ids) / out['docs warm']:,.0f} tok/s")
    tok.encode("a" * 3000)                                   # compile / load the cached Numba merge loop
    for n, s in spaceless.items():
        key = f"{n // 1_000_000} MB no spaces"
        ids, out[key] = timed(tok.encode, s)
        print(f"{name}: encode {n / 1e6:g} MB without spaces: {out[key]:.2f} s, {len(ids)} tokens")
    return out


def regex_comparison(big: str) -> None:
    """Seconds to split the docs text by the GPT-2 pre-tokenizer expression: ours (stdlib re over llama.cpp's
    category stand-ins) and, if installed, the `regex` package's \\p{L}/\\p{N} (its own Unicode version)."""
    from airobackend.pretokenize import pre_tokenizer
    words, dt = timed(pre_tokenizer("gpt2").split, big)
    line = f"pre-tokenize 10 MB by the GPT-2 expression: ours {dt:.2f} s ({len(words)} words)"
    try:
        import regex
    except ImportError:
        print(line + "; `regex` not installed")
        return
    pat = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    theirs, dt2 = timed(pat.findall, big)
    print(line + f", `regex` {dt2:.2f} s ({len(theirs)} words): ours / regex {dt / dt2:.2f}")


def main() -> int:
    vocab = FIX / "vocab" / "ggml-vocab-llama-spm.gguf"
    if not vocab.exists():
        print(f"fixtures not found at {FIX}", file=sys.stderr)
        return 1
    tok, dt = timed(Tokenizer.from_file, str(vocab))
    print(f"load vocabulary: {dt:.2f} s")
    if "--no-tokenizer" not in sys.argv:
        bench_tokenizer(tok)
    sample_costs(tok)
    return 0


def bench_tokenizer(tok: Tokenizer) -> None:
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").rglob("*.md"))]
    docs = "".join(p.read_text() for p in texts if p.is_file()) or "Hello world. " * 1000
    big = (docs * (10_000_000 // len(docs) + 1))[:10_000_000]
    rng = random.Random(0)
    spaceless = {n: "".join(rng.choice("abcdefghij") for _ in range(n)) for n in (1_000_000, 10_000_000)}
    base = encode_speeds("SentencePiece (llama-spm)", tok, big, spaceless)
    for name in ("gpt-2", "deepseek-llm"):
        bpe, dt = timed(Tokenizer.from_file, str(FIX / "vocab" / f"ggml-vocab-{name}.gguf"))
        print(f"load vocabulary {name}: {dt:.2f} s")
        times = encode_speeds(f"byte-level BPE ({name})", bpe, big, spaceless)
        print("  time / SentencePiece's: " + ", ".join(f"{k} {t / base[k]:.2f}" for k, t in times.items()))
    regex_comparison(big)


def sample_costs(tok: Tokenizer) -> None:
    g = np.random.default_rng(0)
    logits = [g.standard_normal(tok.n_vocab).astype(np.float32) * 3 for _ in range(200)]
    hist = list(g.integers(0, tok.n_vocab, 512)) + list(g.integers(0, tok.n_vocab, 16)) * 32   # a loop for DRY
    configs = {
        "KoboldCpp default chain": SamplingParams(seed=1, repetition_penalty=1.1),
        "greedy": SamplingParams(seed=1, temperature=0.0),
        "all samplers on": SamplingParams(seed=1, top_k=0, top_p=0.9, min_p=0.02, typical_p=0.95, tfs=0.95,
                                          top_a=0.1, repetition_penalty=1.1, frequency_penalty=0.1,
                                          dynatemp_range=0.3),
        "mirostat 2": SamplingParams(seed=1, mirostat=2),
        "JSON grammar, top_k 40": SamplingParams(seed=1, top_k=40, grammar=JSON_GBNF),
        "full chain (+ DRY, XTC, smoothing, top-n sigma)": SamplingParams(
            seed=1, top_k=0, top_p=0.9, min_p=0.02, typical_p=0.95, tfs=0.95, top_a=0.1, repetition_penalty=1.1,
            frequency_penalty=0.1, dynatemp_range=0.3, smoothing_factor=0.3, nsigma=2.0, xtc_probability=0.5,
            xtc_threshold=0.1, dry_multiplier=0.8, dry_penalty_last_n=0,
            dry_sequence_breakers=("\n", ":", "\"", "*")),
    }
    t7b, c7b = seven_b_token_seconds() if "--no-7b" not in sys.argv else (float("nan"), float("nan"))
    if t7b == t7b:
        print(f"7B q4_0 token (matrix work, {numba.get_num_threads()} threads): {t7b * 1e3:.1f} ms "
              f"(CPU time per thread {c7b * 1e3:.1f} ms)")
    for name, p in configs.items():
        s = Sampler(p, tokenizer=tok)
        h = list(hist)
        t, c = time.perf_counter(), time.process_time()
        for lg in logits:
            h.append(s.sample(lg, h))
            if h[-1] == tok.eos_id:                          # a finished grammar: start a new generation
                s = Sampler(p, tokenizer=tok)
        dt = (time.perf_counter() - t) / len(logits)
        dc = (time.process_time() - c) / len(logits)
        print(f"sample ({name}): {dt * 1e3:.2f} ms/token, {dt / t7b:.3f} of a 7B token; "
              f"CPU time {dc * 1e3:.2f} ms, {dc / c7b:.3f} of a 7B token's")


if __name__ == "__main__":
    sys.exit(main())
