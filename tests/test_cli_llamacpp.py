"""llama.cpp's `main` command lines work as `airobackend run`: the Airoboros 65B GPT4 1.3 model card's two lines
exactly as printed there (with `airobackend run` in place of `./main`), every flag of main's --help of mid-2023
(examples/common.cpp: implemented, or accepted with one line saying it is ignored), and the interactive-mode
conventions (`-ins`, `--multiline-input`, `--no-history`, `--in-prefix/--in-suffix`, `--interactive-first`)."""
from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from airobackend.chat import get_template
from airobackend.cli import build_parser
from airobackend.commands import run as run_cmd
from airobackend.types import FinishReason, GenerationEvent, SamplingParams

CARD_FILE = "airoboros-65b-gpt4-1.3.ggmlv3.q5_0.bin"
CARD_LINE = ('./main -t 10 -ngl 32 -m airoboros-65b-gpt4-1.3.ggmlv3.q5_0.bin --color -c 2048 --temp 0.7 '
             '--repeat_penalty 1.1 -n -1 -p "USER: Write a story about llamas\\nASSISTANT:"')
# "If you want to have a chat-style conversation, replace the -p <PROMPT> argument with -i -ins"
CARD_CHAT = CARD_LINE.split(" -p ")[0] + " -i -ins"

# Every option of llama.cpp main's --help (examples/common.cpp, July 2023), with a value where it takes one.
MAIN_FLAGS = [
    ["-h"], ["-i"], ["--interactive"], ["--interactive-first"], ["-ins"], ["--instruct"], ["--multiline-input"],
    ["-r", "USER:"], ["--reverse-prompt", "USER:"], ["--color"], ["-s", "1"], ["--seed", "1"], ["-t", "2"],
    ["--threads", "2"], ["-p", "x"], ["--prompt", "x"], ["-e"], ["--prompt-cache", "f.bin"],
    ["--prompt-cache-all"], ["--prompt-cache-ro"], ["--random-prompt"], ["--in-prefix", " "],
    ["--in-suffix", "x"], ["-f", "p.txt"], ["--file", "p.txt"], ["-n", "8"], ["--n-predict", "8"], ["-c", "512"],
    ["--ctx-size", "512"], ["-b", "8"], ["--batch-size", "8"], ["-gqa", "8"], ["--gqa", "8"], ["-eps", "1e-5"],
    ["--rms-norm-eps", "1e-5"], ["--top-k", "40"], ["--top-p", "0.9"], ["--tfs", "1"], ["--typical", "1"],
    ["--repeat-last-n", "64"], ["--repeat-penalty", "1.1"], ["--presence-penalty", "0"],
    ["--frequency-penalty", "0"], ["--mirostat", "2"], ["--mirostat-lr", "0.1"], ["--mirostat-ent", "5"],
    ["-l", "15043+1"], ["--logit-bias", "2-inf"], ["--grammar", "root ::= \"a\""], ["--grammar-file", "g.gbnf"],
    ["--cfg-negative-prompt", "x"], ["--cfg-scale", "1.5"], ["--rope-freq-base", "10000"],
    ["--rope-freq-scale", "1"], ["--ignore-eos"], ["--no-penalize-nl"], ["--memory-f32"], ["--temp", "0.7"],
    ["--perplexity"], ["--perplexity-lines"], ["--keep", "-1"], ["--chunks", "4"], ["--mlock"], ["--no-mmap"],
    ["--numa"], ["-ngl", "32"], ["--n-gpu-layers", "32"], ["--gpu-layers", "32"], ["-ts", "3,1"],
    ["--tensor-split", "3,1"], ["-mg", "0"], ["--main-gpu", "0"], ["-lv"], ["--low-vram"], ["--mtest"],
    ["--export"], ["--verbose-prompt"], ["--lora", "a.bin"], ["--lora-base", "b.bin"], ["-m", "m.bin"],
    ["--model", "m.bin"], ["-a", "x"], ["--alias", "x"], ["--embedding"],
    # the later spellings the users type as well
    ["-fa"], ["--flash-attn"],
]


def _parse(argv):
    return build_parser().parse_args(["run", *argv])


@pytest.mark.parametrize("flag", MAIN_FLAGS, ids=lambda f: f[0])
def test_every_flag_of_llama_cpp_main_is_accepted(flag, capsys):
    if flag == ["-h"]:
        with pytest.raises(SystemExit) as e:
            _parse(flag)
        assert e.value.code == 0
        return
    args = _parse(flag)
    assert args.command == "run"
    opt = next(o for o in run_cmd.OPTIONS if flag[0] in o.flags)
    lines = run_cmd.ignored_lines(args)
    if opt.ignored:                       # said once, with the flag and why
        assert len(lines) == 1 and lines[0].startswith(f"airobackend: {opt.flags[0]}") and "ignored" in lines[0]
    else:
        assert lines == []


def test_gpu_flags_are_said_to_be_ignored_in_one_line():
    lines = run_cmd.ignored_lines(_parse(["-ngl", "32", "-mg", "1", "-ts", "3,1", "-lv", "-p", "x"]))
    assert lines == ["airobackend: -ngl 32, -mg 1, -ts 3,1, -lv: GPU options, and this engine runs on the CPU; "
                     "ignored"]


def test_multi_letter_flags_are_not_split():
    args = _parse(["-ngl", "32", "-n", "-1", "-ins", "-i", "-c", "2048"])
    assert (args.n_gpu_layers, args.n_predict, args.instruct, args.interactive, args.n_ctx) == (32, -1, True,
                                                                                                 True, 2048)


def test_logit_bias_spellings():
    assert run_cmd.parse_logit_bias(["15043+1", "15043-1.5", "2-inf", " 7 + 2e1 "]) == \
        {15043: -1.5, 2: float("-inf"), 7: 20.0}
    for bad in ("15043", "x+1", "2+inf", "-3+1"):
        with pytest.raises(Exception, match="logit-bias"):
            run_cmd.parse_logit_bias([bad])
    args = _parse(["-l", "5+2", "--logit-bias", "2-inf"])
    assert run_cmd.sampling_from_args(args, run_cmd.build_settings(args, {})).logit_bias == {5: 2.0,
                                                                                            2: float("-inf")}


# ------------------------------------------------------------------------------------- interactive conventions

@pytest.mark.parametrize("multiline,text,turns", [
    (False, "one\ntwo\n", ["one", "two"]),
    (False, "one \\\ngoes on\nthree\n", ["one \ngoes on", "three"]),      # '\' continues the turn
    (False, "no newline/\nnext\n", ["no newline", "next"]),
    (True, "first line\nsecond\\\nnext\\\n", ["first line\nsecond", "next"]),   # '\' ends it
    (True, "a\nb/\n", ["a\nb"]),
    (True, "unfinished\n", ["unfinished"]),                                      # the end of input ends it
])
def test_read_turn(multiline, text, turns):
    stream = io.StringIO(text)
    got = []
    while (turn := run_cmd.read_turn(stream, multiline)) is not None:
        got.append(turn)
    assert got == turns


class RecordingEngine:
    """What _chat needs of an Engine: the template, and generate() (recording each prompt)."""

    def __init__(self) -> None:
        self.template = get_template("airoboros")
        self.prompts: list[str] = []

    def generate(self, req):
        self.prompts.append(req.prompt)
        yield GenerationEvent(text=f" reply {len(self.prompts)}")
        yield GenerationEvent(finish_reason=FinishReason.EOS)

    def abort(self, genkey=None) -> bool:
        return True


def _chat(monkeypatch, capsys, argv, stdin, first=""):
    engine = RecordingEngine()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = _parse(["-i", *argv])
    assert run_cmd._chat(engine, args, first, SamplingParams(), lambda line: None) == 0
    capsys.readouterr()
    return engine.prompts


def test_history_and_no_history(monkeypatch, capsys):
    with_history = _chat(monkeypatch, capsys, [], "first question\nsecond question\n")
    assert "first question" in with_history[1] and "reply 1" in with_history[1]
    alone = _chat(monkeypatch, capsys, ["--no-history"], "first question\nsecond question\n")
    assert "second question" in alone[1] and "first question" not in alone[1] and "reply 1" not in alone[1]
    assert alone[1] == get_template("airoboros").format([{"role": "user", "content": "second question"}])


def test_multiline_turns_prefix_and_suffix(monkeypatch, capsys):
    prompts = _chat(monkeypatch, capsys, ["--multiline-input", "--in-prefix", "[", "--in-suffix", "]"],
                    "line one\nline two\\\n")
    assert prompts == [get_template("airoboros").format([{"role": "user", "content": "[line one\nline two]"}])]


def test_interactive_first_keeps_the_prompt_as_context(monkeypatch, capsys):
    prompts = _chat(monkeypatch, capsys, ["--interactive-first"], "hello\n", first="You are a llama.")
    assert prompts == [get_template("airoboros").format([{"role": "system", "content": "You are a llama."},
                                                         {"role": "user", "content": "hello"}])]


# ------------------------------------------------------------------------------------- the model card, verbatim

def _card_run(fixtures_dir, tmp_path, line: str, stdin: str = "") -> subprocess.CompletedProcess:
    shutil.copyfile(fixtures_dir / "models" / "fx-q5_0.ggmlv3.bin", tmp_path / CARD_FILE)   # a q5_0 GGML v3 file
    argv = shlex.split(line)
    assert argv[0] == "./main"
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "airobackend", "run", *argv[1:]], cwd=str(tmp_path), env=env,
                          input=stdin, capture_output=True, text=True, timeout=900)


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_the_model_cards_command_line(fixtures_dir, tmp_path):
    out = _card_run(fixtures_dir, tmp_path, CARD_LINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("\x1b[33mUSER: Write a story about llamas\nASSISTANT:\x1b[0m")   # --color
    assert "airobackend: -ngl 32: GPU options, and this engine runs on the CPU; ignored" in out.stderr
    assert "invalid" not in out.stderr


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_the_model_cards_chat_line(fixtures_dir, tmp_path):
    out = _card_run(fixtures_dir, tmp_path, CARD_CHAT, stdin="Write a story about llamas\n")
    assert out.returncode == 0, out.stderr
    assert "== interactive chat (airoboros" in out.stderr          # the template the file name implies
    assert "airobackend: -ngl 32: GPU options, and this engine runs on the CPU; ignored" in out.stderr
    assert out.stdout.count("> ") >= 2          # the turn asked for, then the next prompt (end of input quits)


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_random_and_verbose_prompt(demo_model):
    env = {k: v for k, v in os.environ.items() if k != "AIRO_MODEL"}
    out = subprocess.run([sys.executable, "-m", "airobackend", "run", "-m", str(demo_model), "--random-prompt",
                          "--verbose-prompt", "-n", "1", "-s", "3", "--temp", "0", "-c", "64"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert any(out.stdout.startswith(p) for p in run_cmd.RANDOM_PROMPTS), out.stdout
    assert "number of tokens in prompt = " in out.stderr
