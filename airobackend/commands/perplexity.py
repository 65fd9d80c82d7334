"""`airobackend perplexity`: a model's perplexity on a text file, as llama.cpp's `perplexity` tool computes it.

    airobackend perplexity -m FILE -f TEXT [-c 512] [-b N] [--chunks K] [-t N]

prints the running perplexity after each chunk (``[1]11.5474,[2]11.2670,...``) and ends with
``Final estimate: PPL = 8.1770 +/- 0.27187``, the same figures llama.cpp prints for the same file, text and settings
(airobackend.perplexity has the method). Lower is better; compare quantizations of one model on one text.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from airobackend.commands.run import OPTIONS, add_options, build_settings
from airobackend.errors import AiroError
from airobackend.perplexity import chunk_count, perplexity

# The model options of `run` that apply here (the context and batch size are this command's own).
MODEL_OPTIONS = tuple(o for o in OPTIONS if o.group == "model" and o.dest not in ("n_ctx", "n_batch", "template",
                                                                                   "seed", "cache_dir"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, metavar="TEXT",
                        help="the text file to score (UTF-8; other bytes are tokenized as llama.cpp does)")
    parser.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=512, metavar="N",
                        help="tokens per chunk; the second half of each chunk is scored")
    parser.add_argument("-b", "--batch-size", dest="batch", type=int, default=2048, metavar="N",
                        help="tokens per forward pass (as llama.cpp: below n_ctx, or a multiple of it)")
    parser.add_argument("--chunks", type=int, default=-1, metavar="K", help="score at most K chunks (-1 = all)")
    add_options(parser, MODEL_OPTIONS)


def main(args: argparse.Namespace) -> int:
    settings = build_settings(args, options=MODEL_OPTIONS)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")

    def info(msg: str) -> None:
        if not settings.quiet:
            print(msg, file=sys.stderr, flush=True)

    n_ctx, n_batch = args.ctx, args.batch
    if n_ctx <= 0 or n_batch <= 0:
        print("airobackend perplexity: error: --ctx-size and --batch-size must be > 0", file=sys.stderr)
        return 1
    if args.chunks == 0 or args.chunks < -1:
        print(f"airobackend perplexity: error: --chunks {args.chunks}: give -1 (all) or at least 1", file=sys.stderr)
        return 1
    if not (n_batch < n_ctx or n_batch % n_ctx == 0):
        print(f"airobackend perplexity: error: --batch-size {n_batch} must be below --ctx-size {n_ctx} or a "
              f"multiple of it", file=sys.stderr)
        return 1
    if not settings.model:
        print("airobackend perplexity: error: give the model file with -m FILE", file=sys.stderr)
        return 1
    try:
        with open(args.file, "rb") as f:       # bytes, as llama.cpp reads them: invalid UTF-8 is the tokenizer's
            text = f.read()
        from airobackend.llama import Llama     # brings Numba: here, so the CLI's other commands start without it
        llm = Llama(model_path=settings.model, n_ctx=n_ctx, n_threads=settings.n_threads or None,
                    n_batch=min(n_batch, n_ctx), n_gqa=settings.n_gqa, rms_norm_eps=settings.rms_norm_eps,
                    rope_freq_base=settings.rope_freq_base, rope_freq_scale=settings.rope_freq_scale, verbose=False)
        tok = llm.tokenizer
        t0 = time.perf_counter()
        tokens = tok.encode(text, add_bos=True)
        info(f"perplexity: tokenization took {(time.perf_counter() - t0) * 1e3:.1f} ms, {len(tokens)} tokens")
        n_chunk = chunk_count(len(tokens), n_ctx, args.chunks)
        info(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, "
             f"batch_size={min(n_batch, n_ctx)}, {llm.n_threads} threads")
        last = None
        t0 = time.perf_counter()
        for r in perplexity(llm.model, tokens, n_ctx, bos_id=tok.bos_id if tok.add_bos else None,
                            n_chunks=args.chunks):
            if r.chunk == 1:
                per_pass = time.perf_counter() - t0
                info(f"perplexity: {per_pass:.2f} seconds per pass - ETA {per_pass * n_chunk / 60:.2f} minutes")
            sys.stdout.write(f"[{r.chunk}]{r.ppl:.4f},")
            sys.stdout.flush()
            last = r
        sys.stdout.write("\n")
        if last is not None:
            print(f"Final estimate: PPL = {last.ppl:.4f} +/- {last.error:.5f}", flush=True)
        return 0
    except AiroError as e:
        print(f"airobackend perplexity: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"airobackend perplexity: error: {e}", file=sys.stderr)
        return 1
