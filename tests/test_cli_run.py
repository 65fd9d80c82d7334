"""`airobackend run` as a user runs it: a subprocess whose stdout is read while it generates."""
from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from airobackend.commands import run as run_cmd

PROMPT_ARG = "USER: Write a story about llamas\\nASSISTANT:"     # as typed in a shell: backslash-n
PROMPT = "USER: Write a story about llamas\nASSISTANT:"


def _env(demo_model: Path) -> dict:
    """The test session's environment: its cache root holds the compiled kernels (and, without -m, the demo model
    is the one in it: the same file as `demo_model`)."""
    env = dict(os.environ)
    env.pop("AIRO_MODEL", None)
    env["PYTHONUNBUFFERED"] = "0"            # our flushes, not Python's, must make the text appear
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "airobackend", "run", *args]


class Reader:
    """Reads a child's stdout as it arrives, remembering when each piece came."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.data, self.times = proc, b"", []

    def until(self, predicate, timeout: float) -> bool:
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while time.monotonic() < end:
            if predicate(self.data):
                return True
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return predicate(self.data)
                self.data += chunk
                self.times.append(time.monotonic())
        return predicate(self.data)


@pytest.mark.e2e       # `airobackend run` as a subprocess
@pytest.mark.parametrize("which", ["demo", "fx-q4_0.ggmlv3.bin"])
def test_prints_tokens_as_generated_and_ctrl_c_stops_cleanly(which, demo_model, request):
    # -n -1 on a 2048 context: without ^C this would run for minutes, so text seen before the exit was printed
    # while generating.
    model = [] if which == "demo" else ["-m", str(request.getfixturevalue("fixtures_dir") / "models" / which)]
    proc = subprocess.Popen(_cli(*model, "-p", PROMPT_ARG, "-n", "-1", "-c", "2048", "-t", "2", "--temp", "0.7",
                                 "--repeat_penalty", "1.1", "--color", "-s", "5", "--ignore-eos"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(demo_model))
    try:
        out = Reader(proc)
        shown = (run_cmd.COLOR_PROMPT + PROMPT + run_cmd.COLOR_RESET).encode()
        # the prompt (escapes processed, in color), then generated text arriving in several pieces
        assert out.until(lambda d: d.startswith(shown) and len(d) > len(shown) + 20, 240), out.data
        n_pieces = len(out.times)
        assert out.until(lambda d: len(out.times) >= n_pieces + 2, 60)
        assert proc.poll() is None, "the run ended by itself: it was not printing while generating"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err
    assert "[interrupted]" in err and "stop: aborted" in err
    if which == "demo":
        assert "random weights" in err.lower()               # the demo banner says it prints nonsense
    assert "Traceback" not in err


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_fixture_model_greedy_output_matches_the_python_api(fixtures_dir, tmp_path):
    model = fixtures_dir / "models" / "fx-q8_0.gguf"
    proc = subprocess.run(_cli("-m", str(model), "-p", "The quick brown fox", "-n", "12", "-c", "128", "-t", "2",
                               "--temp", "0", "--repeat-penalty", "1.0", "--no-display-prompt"),
                          capture_output=True, timeout=300, env=_env(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr.decode()
    printed = proc.stdout.decode()
    from airobackend.llama import Llama
    llm = Llama(str(model), n_ctx=128, n_threads=2, verbose=False)
    try:
        llm.eval(llm.tokenize(b"The quick brown fox"))
        ids = []
        for _ in range(12):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if t == llm.token_eos():
                break
            ids.append(t)
            llm.eval([t])
        expected = llm.detokenize(ids).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert printed.rstrip("\n") == expected


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_interactive_chat_reads_stdin_lines(demo_model):
    proc = subprocess.run(_cli("-i", "-n", "6", "-c", "512", "-t", "2", "-s", "1", "--temp", "0"),
                          input=b"Hello there\n\nTell me a joke\n", capture_output=True, timeout=300,
                          env=_env(demo_model))
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    # a "> " prompt per line read (two turns, the empty line, then EOF); stdin is not echoed, so each reply
    # follows its prompt on the same line
    parts = out.split("\n> ")
    assert len(parts) == 5 and parts[0] == "", out
    assert parts[1].strip() and parts[3].strip() and parts[2] == "" and parts[4] == "\n", out
    assert "airoboros" in proc.stderr.decode()


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_until_the_context_is_full_and_bad_input(demo_model, tmp_path):
    proc = subprocess.run(_cli("-p", "Hello", "-n", "-1", "-c", "24", "--ignore-eos", "-t", "2"),
                          capture_output=True, timeout=300, env=_env(demo_model))
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    n_prompt = int(err.split("prompt: ")[1].split(" tokens")[0])
    n_gen = int(err.split("generated: ")[1].split(" tokens")[0])
    assert n_prompt + n_gen == 24 + 1 and "stop: length" in err     # the last token fits no more
    bad = subprocess.run(_cli("-m", str(tmp_path / "missing.gguf"), "-p", "x"), capture_output=True, timeout=120,
                         env=_env(demo_model))
    assert bad.returncode == 1 and "error" in bad.stderr.decode() and b"Traceback" not in bad.stderr
    bad = subprocess.run(_cli("-p", "x", "--top-p", "3"), capture_output=True, timeout=300, env=_env(demo_model))
    assert bad.returncode == 1 and "top_p" in bad.stderr.decode() and bad.stdout == b""


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    run_cmd.add_arguments(p)
    return p.parse_args(list(argv))


def test_option_table_spellings_and_env_fallback():
    a = _parse("-m", "f.gguf", "-p", "x", "-n", "-1", "-c", "2048", "-t", "2", "--temp", "0.7",
               "--repeat_penalty", "1.2", "--top-k", "5", "--top-p", "0.5", "--repeat-last-n", "32", "-s", "9",
               "--n-gqa", "8", "--rope-freq-base", "20000", "--rope-freq-scale", "0.5", "--color")
    s = run_cmd.build_settings(a, environ={"AIRO_N_CTX": "512", "AIRO_N_THREADS": "7", "AIRO_TEMPLATE": "vicuna"})
    assert (s.model, s.n_ctx, s.n_threads, s.seed, s.n_gqa, s.rope_freq_base, s.rope_freq_scale) == \
        ("f.gguf", 2048, 2, 9, 8, 20000.0, 0.5)              # flags win over the environment
    assert s.template == "vicuna"                            # not given: from AIRO_TEMPLATE
    sp = run_cmd.sampling_from_args(a, s)
    assert (sp.temperature, sp.repetition_penalty, sp.top_k, sp.top_p, sp.repetition_penalty_range, sp.seed) == \
        (0.7, 1.2, 5, 0.5, 32, 9)
    assert a.n_predict == -1 and a.color and a.escape
    b = _parse("--ctx-size", "64", "--threads", "3", "--n-predict", "5", "--prompt", "y", "--seed", "1",
               "--repeat-penalty", "1.0", "--top_k", "2", "-gqa", "4", "--no-escape")
    assert (b.n_ctx, b.n_threads, b.n_predict, b.prompt, b.seed, b.repeat_penalty, b.top_k, b.n_gqa, b.escape) == \
        (64, 3, 5, "y", 1, 1.0, 2, 4, False)
    d = run_cmd.build_settings(_parse(), environ={})
    assert d.n_ctx == 2048 and d.model is None               # Settings defaults
    dests = [o.dest for o in run_cmd.OPTIONS]
    flags = [f for o in run_cmd.OPTIONS for f in o.flags]
    assert len(flags) == len(set(flags)) and len(dests) == len(set(dests)) + 1   # 'escape' has -e and --no-escape


@pytest.mark.parametrize("typed,expected", [
    (r"USER: hi\nASSISTANT:", "USER: hi\nASSISTANT:"),
    (r"a\tb\\n\'\"", "a\tb\\n'\""),
    (r"\x41\x4a!", "AJ!"),
    (r"\q \x4", r"\q \x4"),                                   # unknown escapes stay as typed
    ("trailing\\", "trailing\\"),
])
def test_process_escapes(typed, expected):
    assert run_cmd.process_escapes(typed) == expected


@pytest.mark.e2e       # `airobackend run` as a subprocess
def test_real_model_answers_stops_and_chats(smollm2, tmp_path):
    """`airobackend run` on the real model: a greedy answer, a reverse prompt on its text, and -i through the
    file's own chat template."""
    common = ("-m", str(smollm2), "-c", "256", "-t", "2", "--temp", "0", "--repeat-penalty", "1.0")
    proc = subprocess.run(_cli(*common, "-p", "The capital of France is", "-n", "24", "--no-display-prompt"),
                          capture_output=True, timeout=300, env=_env(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode().rstrip("\n")
    assert "Paris" in text
    from server.fakes import pick_stop
    i, stop = pick_stop(text)
    proc = subprocess.run(_cli(*common, "-p", "The capital of France is", "-n", "24", "--no-display-prompt",
                               "-r", stop), capture_output=True, timeout=300, env=_env(tmp_path / "x"))
    out = proc.stdout.decode().rstrip("\n")
    # as llama.cpp's main: the token that completes the reverse prompt is printed whole, then generation stops
    assert out.startswith(text[:i + len(stop)]) and text.startswith(out) and len(out) < len(text)
    proc = subprocess.run(_cli(*common, "-i", "-n", "24"), input=b"What color is the sky?\n",
                          capture_output=True, timeout=300, env=_env(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert "blue" in proc.stdout.decode() and "gguf template" in proc.stderr.decode()
