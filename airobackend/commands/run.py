"""`airobackend run`: generate from a prompt on the console, like llama.cpp's `main`.

    airobackend run -m FILE -p "USER: Write a story about llamas\\nASSISTANT:" -n -1 -c 2048 -t 2 --temp 0.7 \\
        --repeat_penalty 1.1 --color

prints the prompt, then each piece of text as soon as it is generated. `-n -1` generates until EOS or until the
context is full; ^C stops the generation cleanly (a second ^C quits at once). `-i` starts an interactive chat with
the model's prompt template (Airoboros 1.x by default), one user turn per stdin line. Without `-m` the demo model is
used (random weights: it prints nonsense). Escapes such as \\n in -p are processed as llama.cpp does.

Every option is declared once in `OPTIONS`. Options that are Settings fields also read AIRO_<FIELD> from the
environment when not given on the command line.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
import signal
import string
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from airobackend.demo import BANNER, demo_model_path
from airobackend.errors import AiroError
from airobackend.manager import ConsoleProgress
from airobackend.paths import use_cache_root
from airobackend.settings import Settings
from airobackend.types import FinishReason, GenerationRequest, SamplingParams

log = logging.getLogger("airobackend.run")

# llama.cpp main's console colors
COLOR_PROMPT = "\x1b[33m"            # yellow: the prompt
COLOR_USER = "\x1b[1m\x1b[32m"       # bold green: what the user types
COLOR_RESET = "\x1b[0m"


@dataclass(frozen=True)
class Opt:
    """One command-line option. `setting=True`: a Settings field (default and AIRO_<DEST> env from Settings)."""

    flags: tuple[str, ...]
    dest: str
    help: str
    type: Optional[Callable[[str], Any]] = None     # None: a flag (store_true)
    default: Any = None
    setting: bool = False
    group: str = "sampling"
    metavar: Optional[str] = None
    action: Optional[str] = None
    ignored: Optional[str] = None                  # accepted for llama.cpp's command lines, with this reason


GPU = "GPU options, and this engine runs on the CPU"


_D = Settings()
_S = SamplingParams
OPTIONS: tuple[Opt, ...] = (
    # model (Settings fields)
    Opt(("-m", "--model"), "model", "model file, GGUF or GGML v1-v3 (default: the demo model, random weights)", str,
        setting=True, group="model", metavar="FILE"),
    Opt(("-c", "--ctx-size", "--contextsize"), "n_ctx", f"context size in tokens (default {_D.n_ctx})", int,
        setting=True, group="model", metavar="N"),
    Opt(("-t", "--threads"), "n_threads", "CPU threads (default: all this process may use)", int, setting=True,
        group="model", metavar="N"),
    Opt(("-b", "--batch-size"), "n_batch", f"prompt tokens per forward pass (default {_D.n_batch})", int,
        setting=True, group="model", metavar="N"),
    Opt(("-gqa", "--gqa", "--n-gqa"), "n_gqa", "grouped-query factor for GGML v3 files (LLaMA-2 70B: 8)", int,
        setting=True, group="model", metavar="N"),
    Opt(("-eps", "--rms-norm-eps"), "rms_norm_eps", "RMS norm epsilon override (GGML v3 LLaMA-2: 1e-5)", float,
        setting=True, group="model", metavar="EPS"),
    Opt(("--rope-freq-base",), "rope_freq_base", "RoPE frequency base override (default: from the file, else 10000)",
        float, setting=True, group="model", metavar="F"),
    Opt(("--rope-freq-scale",), "rope_freq_scale", "RoPE frequency scale override (linear scaling: 1/factor)",
        float, setting=True, group="model", metavar="F"),
    Opt(("-ctk", "--cache-type-k"), "cache_type_k", "KV cache type for keys: f16, q8_0, q4_0 (default f16)", str,
        setting=True, group="model", metavar="TYPE"),
    Opt(("-ctv", "--cache-type-v"), "cache_type_v", "KV cache type for values: f16, q8_0, q4_0 (default f16)", str,
        setting=True, group="model", metavar="TYPE"),
    Opt(("--template", "--chat-template"), "template",
        "prompt template for -i: airoboros, airoboros-1.2, vicuna, alpaca, chatml, or gguf (the file's own "
        "chat template; default: that, else one chosen by the file name)", str,
        setting=True, group="model", metavar="NAME"),
    Opt(("-s", "--seed"), "seed", "RNG seed, -1 = random (default -1)", int, setting=True, group="model",
        metavar="N"),
    Opt(("--cache-dir",), "cache_dir", "cache root: the demo model, generated kernels and Numba's cache "
        "(default ~/.cache/airobackend)", str,
        setting=True, group="model", metavar="DIR"),
    Opt(("--quiet",), "quiet", "no banner, no timings", setting=True, group="model"),
    # llama.cpp main's flags (mid-2023) without meaning on this CPU engine: accepted, and said to be ignored
    Opt(("-ngl", "--n-gpu-layers", "--gpu-layers"), "n_gpu_layers", "layers to offload to a GPU: ignored", int,
        group="llama.cpp", metavar="N", ignored=GPU),
    Opt(("-mg", "--main-gpu"), "main_gpu", "the GPU for scratch: ignored", int, group="llama.cpp", metavar="I",
        ignored=GPU),
    Opt(("-ts", "--tensor-split"), "tensor_split", "how to split tensors across GPUs: ignored", str,
        group="llama.cpp", metavar="SPLIT", ignored=GPU),
    Opt(("-lv", "--low-vram"), "low_vram", "no VRAM scratch buffer: ignored", group="llama.cpp", ignored=GPU),
    Opt(("-fa", "--flash-attn"), "flash_attn", "flash attention: ignored (attention is always this engine's CPU "
        "kernel)", group="llama.cpp", ignored=GPU),
    Opt(("--mlock",), "mlock", "lock the model in RAM: ignored", group="llama.cpp",
        ignored="not supported (the weights are a file mapping the OS may page out)"),
    Opt(("--no-mmap",), "no_mmap", "do not map the model file: ignored", group="llama.cpp",
        ignored="not supported (the weights are always read through a file mapping)"),
    Opt(("--numa",), "numa", "NUMA optimisations: ignored", group="llama.cpp", ignored="not supported"),
    Opt(("--memory-f32",), "memory_f32", "f32 KV cache: ignored", group="llama.cpp",
        ignored="not supported (the KV cache is never f32)"),
    Opt(("--lora",), "lora", "LoRA adapter: ignored", str, group="llama.cpp", metavar="FNAME",
        ignored="not supported (LoRA adapters; the base model runs)"),
    Opt(("--lora-base",), "lora_base", "base model for --lora: ignored", str, group="llama.cpp", metavar="FNAME",
        ignored="not supported (LoRA adapters; the base model runs)"),
    Opt(("-a", "--alias"), "alias", "model name in server answers: ignored by run", str, group="llama.cpp",
        metavar="ALIAS", ignored="a server option"),
    Opt(("--prompt-cache",), "prompt_cache", "prompt state file: ignored", str, group="llama.cpp",
        metavar="FNAME", ignored="not supported (prompt state files)"),
    Opt(("--prompt-cache-all",), "prompt_cache_all", "save generations in the prompt cache: ignored",
        group="llama.cpp", ignored="not supported (prompt state files)"),
    Opt(("--prompt-cache-ro",), "prompt_cache_ro", "read the prompt cache only: ignored", group="llama.cpp",
        ignored="not supported (prompt state files)"),
    Opt(("--keep",), "keep", "prompt tokens kept when the context is full: ignored", int, group="llama.cpp",
        metavar="N", ignored="not supported (a full context keeps the prompt's start as the engine decides)"),
    Opt(("--cfg-negative-prompt",), "cfg_negative_prompt", "negative prompt for guidance: ignored", str,
        group="llama.cpp", metavar="PROMPT", ignored="not supported (classifier-free guidance)"),
    Opt(("--cfg-scale",), "cfg_scale", "guidance strength: ignored", float, group="llama.cpp", metavar="N",
        ignored="not supported (classifier-free guidance)"),
    Opt(("--no-penalize-nl",), "no_penalize_nl", "do not penalize newlines: ignored", group="llama.cpp",
        ignored="not supported (newlines are penalized like any token)"),
    Opt(("--perplexity",), "perplexity", "compute perplexity: ignored", group="llama.cpp",
        ignored="not a mode of run"),
    Opt(("--perplexity-lines",), "perplexity_lines", "perplexity per line: ignored", group="llama.cpp",
        ignored="not a mode of run"),
    Opt(("--chunks",), "chunks", "perplexity chunks: ignored", int, group="llama.cpp", metavar="N",
        ignored="not a mode of run"),
    Opt(("--embedding",), "embedding", "embedding output: ignored", group="llama.cpp", ignored="not a mode of run"),
    Opt(("--mtest",), "mtest", "memory test: ignored", group="llama.cpp", ignored="not a mode of run"),
    Opt(("--export",), "export", "export the compute graph: ignored", group="llama.cpp",
        ignored="not a mode of run"),
    Opt(("-md", "--model-draft", "--draft-model", "--draftmodel"), "draft_model",
        "speculative decoding with this smaller model of the same vocabulary as the draft", str, setting=True,
        group="model", metavar="FILE"),
    Opt(("--draft", "--draft-max", "--draftamount"), "draft", f"the most tokens drafted at a time (default {_D.draft})",
        int, setting=True, group="model", metavar="N"),
    Opt(("--draft-p-min",), "draft_p_min",
        f"the draft model stops after a token it gives less than this probability (default {_D.draft_p_min})",
        float, setting=True, group="model", metavar="P"),
    Opt(("--lookup-ngram",), "lookup_ngram",
        "speculative decoding without a draft model: copy what followed the last N tokens earlier in the context "
        "(0 = off)", int, setting=True, group="model", metavar="N"),
    # prompt and output
    Opt(("-p", "--prompt"), "prompt", "prompt to start generation with (default: empty)", str, group="prompt",
        metavar="TEXT"),
    Opt(("-f", "--file"), "file", "read the prompt from a file", str, group="prompt", metavar="FILE"),
    Opt(("-n", "--n-predict", "--predict"), "n_predict",
        "tokens to generate, -1 = until EOS or the context is full (default 128)", int, default=128, group="prompt",
        metavar="N"),
    Opt(("-e", "--escape"), "escape", "process escapes (\\n, \\t, \\\", \\xHH, ...) in the prompt (default: on)",
        default=True, group="prompt"),
    Opt(("--no-escape",), "escape", "do not process escapes in the prompt", action="store_false", group="prompt"),
    Opt(("-r", "--reverse-prompt"), "reverse_prompt",
        "stop generating at this text (repeatable); in -i mode, it hands the turn back to you", str,
        action="append", group="prompt", metavar="TEXT"),
    Opt(("-i", "--interactive"), "interactive", "interactive chat using the prompt template (one line per turn)",
        group="prompt"),
    Opt(("-ins", "--instruct"), "instruct", "instruction mode: the same chat, each turn wrapped in the model's "
        "template (its turn markers, and its user marker as the reverse prompt)", group="prompt"),
    Opt(("--interactive-first",), "interactive_first", "interactive, waiting for your input first; -p is then the "
        "conversation's system text", group="prompt"),
    Opt(("--multiline-input",), "multiline_input", "in -i: Return starts a new line; end a turn with '\\' "
        "(without it, a line ending in '\\' continues on the next)", group="prompt"),
    Opt(("--no-history",), "no_history", "in -i: send each turn without the earlier ones", group="prompt"),
    Opt(("--in-prefix",), "in_prefix", "in -i: text put before each of your turns", str, default="",
        group="prompt", metavar="TEXT"),
    Opt(("--in-suffix",), "in_suffix", "in -i: text put after each of your turns", str, default="",
        group="prompt", metavar="TEXT"),
    Opt(("--random-prompt",), "random_prompt", "without -p: start from one of llama.cpp's random prompts",
        group="prompt"),
    Opt(("--verbose-prompt",), "verbose_prompt", "print the prompt's tokens before generating", group="prompt"),
    Opt(("--system",), "system", "system prompt for -i (default: the template's preamble)", str, group="prompt",
        metavar="TEXT"),
    Opt(("--color",), "color", "colorise the prompt and user input", group="prompt"),
    Opt(("--no-display-prompt",), "no_display_prompt", "do not print the prompt before the generated text",
        group="prompt"),
    Opt(("--ignore-eos",), "ignore_eos", "never end at EOS (ban the EOS token)", group="prompt"),
    Opt(("--grammar",), "grammar", "GBNF grammar constraining the output", str, group="prompt", metavar="GBNF"),
    Opt(("--grammar-file",), "grammar_file", "read the GBNF grammar from a file", str, group="prompt",
        metavar="FILE"),
    # sampling: llama.cpp main's names and defaults (mid-2023)
    Opt(("--temp",), "temp", "temperature, <= 0 = greedy (default 0.8)", float, default=0.8, metavar="T"),
    Opt(("--top-k", "--top_k"), "top_k", "top-k, 0 = off (default 40)", int, default=40, metavar="N"),
    Opt(("--top-p", "--top_p"), "top_p", "top-p, 1.0 = off (default 0.95)", float, default=0.95, metavar="P"),
    Opt(("--min-p", "--min_p"), "min_p", "min-p, 0 = off (default 0)", float, default=0.0, metavar="P"),
    Opt(("--typical",), "typical", "locally typical sampling, 1.0 = off (default 1.0)", float, default=1.0,
        metavar="P"),
    Opt(("--tfs",), "tfs", "tail-free sampling z, 1.0 = off (default 1.0)", float, default=1.0, metavar="Z"),
    Opt(("--repeat-penalty", "--repeat_penalty"), "repeat_penalty", "repetition penalty, 1.0 = off (default 1.1)",
        float, default=1.1, metavar="F"),
    Opt(("--repeat-last-n", "--repeat_last_n"), "repeat_last_n",
        "tokens the repetition penalty looks back, -1 = the whole context (default 64)", int, default=64,
        metavar="N"),
    Opt(("--presence-penalty",), "presence_penalty", "presence penalty (default 0)", float, default=0.0,
        metavar="F"),
    Opt(("--frequency-penalty",), "frequency_penalty", "frequency penalty (default 0)", float, default=0.0,
        metavar="F"),
    Opt(("--mirostat",), "mirostat", "mirostat: 0 off, 1 v1, 2 v2 (default 0)", int, default=0, metavar="N"),
    Opt(("--mirostat-lr", "--mirostat-eta"), "mirostat_eta", "mirostat learning rate eta (default 0.1)", float,
        default=0.1, metavar="ETA"),
    Opt(("--mirostat-ent", "--mirostat-tau"), "mirostat_tau", "mirostat target entropy tau (default 5.0)", float,
        default=5.0, metavar="TAU"),
    Opt(("-l", "--logit-bias"), "logit_bias", "TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 2-inf), repeatable",
        str, action="append", metavar="BIAS"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OPTIONS)


def add_options(parser: argparse.ArgumentParser, options: tuple[Opt, ...]) -> None:
    """Declare `options` on `parser`, in argument groups named by Opt.group (other commands reuse run's options)."""
    groups: dict[str, Any] = {}
    for o in options:
        if o.group not in groups:
            groups[o.group] = parser.add_argument_group(o.group)
        kw: dict[str, Any] = {"dest": o.dest, "help": o.help.replace("%", "%%")}   # each help states its default
        if o.setting:
            kw["help"] += f" [env AIRO_{o.dest.upper()}]"
        if o.setting:
            # Absent unless given, so Settings.from_env can fill it from AIRO_<DEST> (and help shows no 'None').
            kw["default"] = argparse.SUPPRESS
        elif o.action != "store_false":
            kw["default"] = o.default
        if o.action:
            kw["action"] = o.action
            if o.type is not None:
                kw["type"] = o.type
        elif o.type is None:
            kw["action"] = "store_true"
        else:
            kw["type"] = o.type
        if o.metavar and kw.get("action") not in ("store_true", "store_false"):
            kw["metavar"] = o.metavar
        groups[o.group].add_argument(*o.flags, **kw)


def build_settings(args: argparse.Namespace, environ: Optional[dict] = None,
                   options: tuple[Opt, ...] = OPTIONS) -> Settings:
    """Settings from AIRO_* environment variables with the command-line values on top."""
    given = {o.dest: getattr(args, o.dest) for o in options if o.setting and hasattr(args, o.dest)}
    return Settings.from_env(environ, **given)


def process_escapes(s: str) -> str:
    """llama.cpp's `process_escapes`: \\n \\r \\t \\' \\" \\\\ \\a \\b \\f \\v \\? and \\xHH; others stay as typed."""
    simple = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f",
              "v": "\v", "?": "?"}
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            n = s[i + 1]
            if n in simple:
                out.append(simple[n])
                i += 2
                continue
            if n == "x" and len(s) >= i + 4 and all(ch in string.hexdigits for ch in s[i + 2:i + 4]):
                out.append(chr(int(s[i + 2:i + 4], 16)))
                i += 4
                continue
        out.append(c)
        i += 1
    return "".join(out)


def parse_logit_bias(items: Optional[list]) -> dict[int, float]:
    """llama.cpp's --logit-bias: TOKEN_ID followed by +BIAS or -BIAS (`15043+1`, `15043-1`, `2-inf`)."""
    out: dict[int, float] = {}
    for item in items or ():
        m = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(inf|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*", item)
        if m is None:
            raise AiroError(f"--logit-bias {item!r}: expected TOKEN_ID+BIAS or TOKEN_ID-BIAS, e.g. 15043+1")
        value = float(m.group(3))
        if m.group(2) == "-":
            value = -value
        elif value == float("inf"):
            raise AiroError(f"--logit-bias {item!r}: a bias may be -inf, not +inf")
        out[int(m.group(1))] = value
    return out


# llama.cpp's gpt_random_prompt choices (examples/common.cpp, mid-2023)
RANDOM_PROMPTS = ("So", "Once upon a time", "When", "The", "After", "If", "import", "He", "She", "They")


def ignored_lines(args: argparse.Namespace) -> list[str]:
    """One line per reason for the llama.cpp flags given that mean nothing here ("-ngl 32, -mg 0: GPU options...")."""
    by_reason: dict[str, list[str]] = {}
    for o in OPTIONS:
        value = getattr(args, o.dest, None)
        if o.ignored and value is not None and value is not False:
            by_reason.setdefault(o.ignored, []).append(o.flags[0] + ("" if value is True else f" {value}"))
    return [f"airobackend: {', '.join(flags)}: {reason}; ignored" for reason, flags in by_reason.items()]


def sampling_from_args(args: argparse.Namespace, settings: Settings) -> SamplingParams:
    grammar = args.grammar
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    return SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, typical_p=args.typical,
        tfs=args.tfs, top_a=0.0, repetition_penalty=args.repeat_penalty,
        repetition_penalty_range=0 if args.repeat_last_n < 0 else args.repeat_last_n,
        repetition_penalty_slope=1.0, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, mirostat=args.mirostat, mirostat_tau=args.mirostat_tau,
        mirostat_eta=args.mirostat_eta, seed=settings.seed if settings.seed >= 0 else None,
        ban_eos=bool(args.ignore_eos), grammar=grammar or None, logit_bias=parse_logit_bias(args.logit_bias))


class _Interrupt:
    """^C during a generation aborts it (the loop ends within one token); a second ^C raises KeyboardInterrupt."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> "_Interrupt":
        self.hit = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:              # not the main thread (embedded use): leave ^C alone
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        self.engine.abort()

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _generate(engine: Any, gen: Any, out: Callable[[str], None]) -> tuple[str, Any]:
    """Print the events of `gen` as they come; ^C aborts the generation."""
    parts: list[str] = []
    last = None
    with _Interrupt(engine):
        for ev in gen:
            if ev.text:
                parts.append(ev.text)
                out(ev.text)
            last = ev
    return "".join(parts), last


def _timings(engine: Any, last: Any) -> str:
    p = engine.perf()
    proc, ev = p["last_process"], p["last_eval"]
    n_proc, n_gen = p["last_process_count"], p["last_token_count"]
    rate = (lambda n, t: f"{n / t:.2f} tok/s" if t > 0 and n else "-")  # noqa: E731
    reason = last.finish_reason.value if last is not None and last.finish_reason else "?"
    line = (f"prompt: {n_proc} tokens in {proc:.2f} s ({rate(n_proc, proc)}), "
            f"generated: {n_gen} tokens in {ev:.2f} s ({rate(n_gen, ev)}), seed {p['last_seed']}, stop: {reason}")
    if getattr(engine, "drafter", None) is not None:      # llama.cpp's speculative example prints the same counts
        st = engine.spec_stats
        line += f"; since load: {st['drafted']} tokens drafted, {st['accepted']} accepted, {st['passes']} verifying passes"
    return line


def _warmup_report() -> Callable[[str, bool], None]:
    """Kernel warm-up lines on stderr; on a terminal the 'compiling ...' line is replaced by its result."""
    if sys.stderr.isatty():
        return ConsoleProgress().note
    return lambda line, done: print(line, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    logging.basicConfig(level=logging.WARNING if settings.quiet else logging.INFO, stream=sys.stderr,
                        format="%(message)s")
    try:
        sys.stdout.reconfigure(errors="replace")          # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        pass

    def info(msg: str) -> None:
        if not settings.quiet:
            print(msg, file=sys.stderr, flush=True)

    for line in ignored_lines(args):
        info(line)
    try:
        prompt = args.prompt if args.prompt is not None else ""
        if args.file:
            with open(args.file, encoding="utf-8") as f:
                prompt = f.read()
        elif args.prompt is None and args.random_prompt:
            prompt = random.Random(None if settings.seed < 0 else settings.seed).choice(RANDOM_PROMPTS)
        if args.escape:
            prompt = process_escapes(prompt)
        sampling = sampling_from_args(args, settings)
        # sampling and chat load here, not at the top: the CLI imports every command module to build its flags
        from airobackend.sampling import validate_sampling
        validate_sampling(sampling)                      # bad values are reported before the model loads
        use_cache_root(settings.cache_dir)              # before anything compiles
        path = settings.model
        if not path:
            path = str(demo_model_path(settings.cache_dir))
            info(f"airobackend: no model given (-m FILE): using the {BANNER}")
        # Llama and Engine bring Numba: imported here, once its cache folder is set (and `--help` stays quick)
        from airobackend.llama import Llama
        t0 = time.perf_counter()
        llm = Llama(model_path=path, n_ctx=settings.n_ctx, n_threads=settings.n_threads or None,
                    n_batch=settings.n_batch, seed=settings.seed, n_gqa=settings.n_gqa,
                    rms_norm_eps=settings.rms_norm_eps, rope_freq_base=settings.rope_freq_base,
                    rope_freq_scale=settings.rope_freq_scale, chat_format=settings.template,
                    type_k=settings.cache_type_k, type_v=settings.cache_type_v, verbose=False,
                    draft_model=settings.draft_model, draft_n=settings.draft, draft_p_min=settings.draft_p_min,
                    lookup_ngram=settings.lookup_ngram)
        loaded = time.perf_counter() - t0
        warm = llm.warmup(None if settings.quiet else _warmup_report())   # kernels compiled now, not mid-reply
        from airobackend.engine import Engine
        engine = Engine(llm, settings)
        info(f"airobackend: {path} loaded in {loaded:.2f} s, kernels ready in {warm:.2f} s: n_ctx {engine.n_ctx}, "
             f"KV cache {llm.model.type_k}/{llm.model.type_v}, {llm.n_threads} threads, template "
             f"{engine.template.name}")
        if args.verbose_prompt and prompt:
            ids = engine.tokenize(prompt)
            info(f"prompt: {prompt!r}\nnumber of tokens in prompt = {len(ids)}")
            for tid in ids:
                info(f"{tid:6d} -> {engine.detokenize([tid])!r}")
        if args.interactive or args.instruct or args.interactive_first:
            return _chat(engine, args, prompt, sampling, info)
        return _one_shot(engine, args, prompt, sampling, info)
    except AiroError as e:
        print(f"airobackend run: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`airobackend run ... | head`): stop quietly, as a Unix filter does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"airobackend run: error: {e}", file=sys.stderr)
        return 1


def _one_shot(engine: Any, args: argparse.Namespace, prompt: str, sampling: SamplingParams,
              info: Callable[[str], None]) -> int:
    req = GenerationRequest(prompt=prompt, max_tokens=args.n_predict, stop=tuple(args.reverse_prompt or ()),
                            trim_stop=False, sampling=sampling, allow_context_shift=True)
    gen = engine.generate(req)          # a bad request raises here, before anything is printed
    if not args.no_display_prompt and prompt:
        _write((COLOR_PROMPT + prompt + COLOR_RESET) if args.color else prompt)
    _, last = _generate(engine, gen, _write)
    if last is not None and last.finish_reason is FinishReason.EOS:
        _write("\n")
        info("[end of text]")
    elif last is not None and last.finish_reason is FinishReason.ABORTED:
        _write("\n")
        info("[interrupted]")
    else:
        _write("\n")
    info(_timings(engine, last))
    return 0


def read_turn(stream: Any, multiline: bool) -> Optional[str]:
    """One user turn, llama.cpp main's way: a line ending in '\\' goes on to the next line, or, with
    --multiline-input, ends the turn (Return then only starts a new line); a line ending in '/' ends it too.
    None at the end of input."""
    lines: list[str] = []
    while True:
        line = stream.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line.endswith("/"):
            lines.append(line[:-1])
            return "\n".join(lines)
        if line.endswith("\\"):
            lines.append(line[:-1])
            if multiline:
                return "\n".join(lines)
            continue
        lines.append(line)
        if not multiline:
            return "\n".join(lines)


def _chat(engine: Any, args: argparse.Namespace, first: str, sampling: SamplingParams,
          info: Callable[[str], None]) -> int:
    template = engine.template
    system = args.system
    if args.interactive_first and first.strip():    # the prompt is context; the first turn is the user's
        system, first = first.strip() if system is None else f"{system}\n{first.strip()}", ""
    start: list[dict] = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)
    from airobackend.chat import stop_strings       # (see main)
    stops = stop_strings(template, args.reverse_prompt or ())
    how = ("Return starts a new line, end a turn with '\\'" if args.multiline_input
           else "one line per turn (end a line with '\\' to go on)")
    info(f"== interactive chat ({template.name} template){', each turn on its own' if args.no_history else ''}. "
         f"{how}; ^C stops a reply, ^D or ^C at the prompt quits. ==")
    pending = first.strip()
    while True:
        if not pending:
            _write("\n> ")
            if args.color:
                _write(COLOR_USER)
            try:
                turn = read_turn(sys.stdin, args.multiline_input)
            except KeyboardInterrupt:
                turn = None
            if args.color:
                _write(COLOR_RESET)
            if turn is None:
                _write("\n")
                return 0
            pending = turn.strip()
            if not pending:
                continue
        else:
            _write("> " + pending + "\n")
        if args.no_history:
            messages = list(start)
        messages.append({"role": "user", "content": args.in_prefix + pending + args.in_suffix})
        pending = ""
        req = GenerationRequest(prompt=template.format(messages), max_tokens=args.n_predict, stop=stops,
                                trim_stop=True, sampling=sampling, allow_context_shift=True)
        started = [False]

        def out(text: str) -> None:
            if not started[0]:                          # the reply's first space follows "ASSISTANT:"
                text = text.lstrip()
                started[0] = bool(text)
            if text:
                _write(text)
        reply, last = _generate(engine, engine.generate(req), out)
        _write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
        if last is not None and last.finish_reason is FinishReason.ABORTED:
            info("[interrupted]")
