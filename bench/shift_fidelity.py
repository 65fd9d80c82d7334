"""How far a context shift moves the logits: reused (moved, re-rotated) KV entries vs evaluating the trimmed prompt.

    python bench/shift_fidelity.py                       # the fixture models (../shared/fixtures), GGUF and GGML v3
    python bench/shift_fidelity.py --model FILE [--model FILE ...]
    python bench/shift_fidelity.py --cache-type q8_0            # with a quantized KV cache (moved keys requantized)

A shift is an approximation: the entries it keeps were computed while the dropped text was still in view, and only
their positions are corrected. For each model and case a "cached" conversation is evaluated, then the case's new
prompt is served the way the engine serves it (airobackend.promptcache.plan_reuse, KVCache.move, then the new tokens
one at a time), and compared with the same prompt evaluated from scratch. Printed per case: tokens reused, max
|logit difference| and RMS difference over the new tokens' logits, and top-1 agreement (how often the most likely
next token is the same). For scale: the RMS of the logits themselves, how far the logits move between the untrimmed
conversation and the trimmed one (both evaluated from scratch: what the cut itself changes, `trim rms`), and for the
fixture models llama.cpp's own noise floor (its quantized-activation logits vs float32 ones, from index.json).
The fixture models have random weights (nearly uniform attention), so the figures show the mechanism and its scale,
not what a trained model's text quality does (for that, --model a trained model, e.g. the SmolLM2 file that
../shared/fixtures/README.md names); the one-layer fx32k model is exact up to fp16 rounding (a layer's
first keys depend only on token and position), which checks the moves themselves.

Cases (token counts for a 512-position context; text from airobackend/data/demo_corpus.txt):
  gap       [BOS memory(24)] [dropped(120)] [kept(300)] -> [BOS memory] [kept] [new(16)]
  two gaps  [BOS memory] [a(100)] [b(100)] [c(100)] [d(100)] -> [BOS memory] [b] [d] [new]
  insertion [BOS memory] [a(200)] [b(200)] -> [BOS memory] [a] [note(20)] [b] [new]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("AIRO_FIXTURES", REPO.parent / "shared" / "fixtures"))
DEFAULT = ["fx-f16", "fx-q4_0", "fx-q8_0", "fx-q4_K_M", "fxgqa-q4_K_M", "fx32k-q4_0"]


def corpus_tokens(llm, n: int) -> list[int]:
    text = (REPO / "airobackend" / "data" / "demo_corpus.txt").read_text()
    ids = llm.tokenize(text.encode(), add_bos=False)
    while len(ids) < n:
        ids = ids + ids
    return ids


def cases(ids: list[int], bos: int) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (cached tokens, new prompt)."""
    mem, rest = ids[:24], ids[24:]

    def part(a: int, b: int) -> list[int]:
        return rest[a:b]
    new = part(900, 916)
    return {
        "gap": ([bos] + mem + part(0, 120) + part(120, 420), [bos] + mem + part(120, 420) + new),
        "two gaps": ([bos] + mem + part(0, 100) + part(100, 200) + part(200, 300) + part(300, 400),
                     [bos] + mem + part(100, 200) + part(300, 400) + new),
        "insertion": ([bos] + mem + part(0, 200) + part(200, 400),
                      [bos] + mem + part(0, 200) + part(600, 620) + part(200, 400) + new),
    }


def measure(llm, cached: list[int], prompt: list[int], n_new: int) -> dict:
    """Logits of the last n_new prompt positions: served by reuse vs from scratch."""
    from airobackend.promptcache import plan_reuse

    model = llm.model
    model.eval(cached, 0)
    plan = plan_reuse(cached, prompt, 16)
    for c in plan.moves():
        model.cache.move(c.src, c.src + c.n, c.dst)
    spans = plan.spans()
    first_new = len(prompt) - n_new
    reused_rows = []
    for start, end in spans:                      # gaps before the new tail in one go, then the tail token by token
        if end <= first_new:
            model.eval_spans([(start, prompt[start:end])])
            continue
        if start < first_new:
            model.eval_spans([(start, prompt[start:first_new])])
            start = first_new
        for i in range(start, end):
            reused_rows.append(model.eval(prompt[i:i + 1], i)[0])
    shifted = np.stack(reused_rows[-n_new:])
    fresh = model.eval(prompt, 0, logits_all=True)[-n_new:]
    untrimmed = model.eval(cached + prompt[first_new:], 0, logits_all=True)[-n_new:]
    d = shifted - fresh
    return {"reused": plan.n_reused, "prompt": len(prompt), "max_abs": float(np.abs(d).max()),
            "rms": float(np.sqrt((d ** 2).mean())), "logit_rms": float(np.sqrt((fresh ** 2).mean())),
            "top1": float((shifted.argmax(1) == fresh.argmax(1)).mean()), "n": n_new,
            "trim_rms": float(np.sqrt(((untrimmed - fresh) ** 2).mean()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="model file(s) instead of the fixture models")
    ap.add_argument("--formats", default="gguf,ggmlv3", help="fixture twins to use")
    ap.add_argument("--cache-type", default="f16", choices=["f16", "q8_0", "q4_0"],
                    help="KV cache type (keys and values), as --cache-type-k/-v")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)

    from airobackend.llama import Llama

    targets: list[tuple[str, str, dict]] = []
    if args.model:
        targets = [(Path(m).name, m, {}) for m in args.model]
    else:
        index = json.loads((FIXTURES / "reference" / "index.json").read_text())
        for m in index["models"]:
            if m["name"] not in DEFAULT:
                continue
            for fmt in args.formats.split(","):
                targets.append((f"{m['name']} ({fmt})", str(FIXTURES / m["files"][fmt]["path"]), m["noise_floor"]))
    out = []
    print(f"{'model':22s} {'case':10s} {'reused':>11s} {'max|dlogit|':>11s} {'rms':>8s} {'top-1':>7s} "
          f"{'logit rms':>9s} {'trim rms':>8s} {'llama.cpp noise':>15s}")
    for name, path, floor in targets:
        llm = Llama(path, n_ctx=512, verbose=False, n_gqa=None, type_k=args.cache_type, type_v=args.cache_type)
        ids = corpus_tokens(llm, 1100)
        for case, (cached, prompt) in cases(ids, llm.token_bos()).items():
            r = measure(llm, cached, prompt, 16)
            r.update(model=name, case=case, cache_type=args.cache_type)
            out.append(r)
            noise = f"{floor['max_abs']:.4f}" if floor else "-"
            print(f"{name:22s} {case:10s} {r['reused']:5d}/{r['prompt']:<5d} {r['max_abs']:11.4f} {r['rms']:8.4f} "
                  f"{r['top1']:7.1%} {r['logit_rms']:9.3f} {r['trim_rms']:8.4f} {noise:>15s}", flush=True)
        llm.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
