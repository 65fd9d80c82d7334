"""Speculative decoding speed: decode tok/s with and without drafting, on one model, in the same run.

    .venv/bin/python bench/speculative.py --model FILE [--draft-model SMALL.gguf] [--lookup-ngram 3] [--draft 8]

Three prompts, each generated greedily with the same engine, drafting off and on in turn (A B A B ..., `--rounds`
pairs), so both see the same machine load:

* `rewrite`: the answer copies the input (a passage to repeat with small changes): what prompt lookup is for;
* `chat`: a free question, where drafts are mostly wrong: speculation should cost (almost) nothing here;
* `self`: the model as its own draft model (every drafted token accepted, but the drafting costs as much as the
  decoding it saves);
* `oracle`: drafts that are the plain output itself, free of cost, for every token (the governor that pauses
  drafting while it loses is off here): the machinery's upper bound, i.e. what one verifying pass of k+1 tokens
  costs against k+1 one-token passes.

Printed per prompt and drafter: plain and speculative decode tok/s (the engine's eval time: prompt processing is
not included), their ratio, and drafted / accepted tokens. The output must be identical (greedy): it is checked.
Nothing is downloaded: the model is a file you give (the project's tests fetch SmolLM2-135M-Instruct Q4_1 into
<cache root>/test-models, ~/.cache/airobackend or $AIRO_CACHE_DIR, which is the default when present).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

def _default_model() -> Path:
    from airobackend.paths import cache_root            # where the tests put the real model
    return cache_root() / "test-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

PASSAGE = ("The lighthouse keeper climbed the narrow stairs every evening at six. He trimmed the wick, polished the "
           "great lens, and wrote the weather in a small leather book: wind from the west, sea calm, two ships "
           "passing to the north. In forty years he had missed only one evening, the night his daughter was born.")

PROMPTS = {
    "rewrite": ("<|im_start|>user\nRepeat this text word for word, changing nothing:\n\n" + PASSAGE +
                "<|im_end|>\n<|im_start|>assistant\n" + PASSAGE[:60]),
    "chat": "<|im_start|>user\nWhat should I pack for a week of hiking in the mountains?<|im_end|>\n"
            "<|im_start|>assistant\n",
}


def _decode(engine, tokens, n):
    from airobackend.types import GenerationRequest, SamplingParams
    req = GenerationRequest(tokens=tokens, max_tokens=n, sampling=SamplingParams(temperature=0.0,
                                                                                 repetition_penalty=1.0))
    ids = []
    for ev in engine.generate(req):
        ids.extend(ev.token_ids)
    perf = engine.perf()
    return ids, perf["last_eval"]


def measure(engine, drafter, tokens, n, rounds):
    """(plain tok/s, speculative tok/s, drafted, accepted, same output) with the drafter off and on in turn."""
    t_plain, t_spec, n_plain, n_spec = 0.0, 0.0, 0, 0
    before = dict(engine.spec_stats)
    same = True
    for _ in range(rounds):
        engine.drafter = None
        a, ta = _decode(engine, tokens, n)
        engine.drafter = drafter
        b, tb = _decode(engine, tokens, n)
        same &= a == b
        t_plain, t_spec, n_plain, n_spec = t_plain + ta, t_spec + tb, n_plain + len(a), n_spec + len(b)
    engine.drafter = None
    drafted = engine.spec_stats["drafted"] - before["drafted"]
    accepted = engine.spec_stats["accepted"] - before["accepted"]
    return n_plain / t_plain, n_spec / t_spec, drafted, accepted, same


class Oracle:
    """Drafts the plain greedy output (known from a plain run) at no cost: every draft is accepted."""

    def __init__(self, prompt: list, output: list, n: int) -> None:
        self.prompt, self.output, self.n = len(prompt), output, n

    def __call__(self, input_ids, **kwargs):
        i = len(input_ids) - self.prompt
        return self.output[i:i + self.n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(_default_model()), help="the model file (default: %(default)s)")
    ap.add_argument("--draft-model", help="a smaller model of the same vocabulary to draft with (else only lookup)")
    ap.add_argument("--lookup-ngram", type=int, default=3, help="prompt lookup n-gram length (default 3)")
    ap.add_argument("--draft", type=int, default=8, help="the most tokens drafted at a time (default 8)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="plain/speculative pairs per case (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not Path(args.model).is_file():
        ap.error(f"--model: no file {args.model} (give a GGUF/GGML model; nothing is downloaded)")
    if args.draft < 1 or args.tokens < 1 or args.rounds < 1:
        ap.error("--draft, --tokens and --rounds must be at least 1")

    from airobackend.llama import Llama
    from airobackend.speculative import DraftModel, PromptLookup

    llm = Llama(args.model, n_ctx=1024, n_threads=args.threads, verbose=False)
    engine = llm.engine
    tok = llm.tokenizer
    drafters = {f"lookup {args.lookup_ngram}": PromptLookup(args.lookup_ngram, args.draft)}
    if args.draft_model:
        d = DraftModel(args.draft_model, num_pred_tokens=args.draft, n_ctx=1024, n_threads=args.threads)
        d.check_vocab(tok)
        drafters[f"draft {Path(args.draft_model).name}"] = d
    own = DraftModel(args.model, num_pred_tokens=args.draft, p_min=0.0, n_ctx=1024, n_threads=args.threads)

    print(f"# {platform.processor() or platform.machine()} {_cpu_model()}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} at start; {Path(args.model).name}, greedy, {args.tokens} tokens, "
          f"{args.rounds} A/B pairs, draft <= {args.draft}")
    print(f"{'prompt':8} {'drafter':28} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} {'drafted':>8} "
          f"{'accepted':>8} same")
    _decode(engine, tok.encode(PROMPTS["chat"], add_bos=False), 4)             # compile / warm
    rewrite = tok.encode(PROMPTS["rewrite"], add_bos=False, special=True)
    oracle = Oracle(rewrite, _decode(engine, rewrite, args.tokens)[0], args.draft)
    cases = [(p, name, d) for p in PROMPTS for name, d in drafters.items()]
    cases += [("self", "itself", own), ("oracle", "plain output (upper bound)", oracle)]
    from airobackend.speculative import Governor
    for prompt, name, drafter in cases:
        tokens = tok.encode(PROMPTS[prompt], add_bos=False, special=True) if prompt in PROMPTS else rewrite
        # the bound drafts for every token; the other cases run as served (drafting paused while it loses)
        engine.governor = Governor.always() if drafter is oracle else Governor()
        plain, spec, drafted, accepted, same = measure(engine, drafter, tokens, args.tokens, args.rounds)
        print(f"{prompt:8} {name:28} {plain:11.1f} {spec:10.1f} {spec / plain:6.2f} {drafted:8d} {accepted:8d} "
              f"{'yes' if same else 'NO'}")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
