"""`airobackend perplexity` given bad input: a clear error and exit 1, never a traceback; text that is not UTF-8 is
scored as llama.cpp scores it (its bytes go to the tokenizer). Agreement with llama.cpp's figures is in
test_real_model.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from airobackend import cli


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["perplexity", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["-c", "0"], "--ctx-size and --batch-size must be > 0"),
    (["-b", "-4"], "--ctx-size and --batch-size must be > 0"),
    (["-c", "64", "-b", "96"], "--batch-size 96 must be below --ctx-size 64 or a multiple of it"),
    (["--chunks", "0"], "--chunks 0: give -1 (all) or at least 1"),
    (["-c", "4096"], "you need at least 8192 tokens to evaluate perplexity with a context of 4096"),
])
def test_bad_settings_are_named(demo_model: Path, tmp_path: Path, capsys, args, message) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rc, out, err = _run(capsys, "-m", str(demo_model), "-f", str(text), "--quiet", *args)
    assert rc == 1 and message in err and "Traceback" not in err, err
    assert "Final estimate" not in out


def test_missing_files_are_named(demo_model: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = _run(capsys, "-m", str(demo_model), "-f", str(tmp_path / "absent.txt"), "--quiet")
    assert rc == 1 and "absent.txt" in err
    (tmp_path / "t.txt").write_text("x " * 600)
    rc, _, err = _run(capsys, "-m", str(tmp_path / "absent.gguf"), "-f", str(tmp_path / "t.txt"), "--quiet")
    assert rc == 1 and "absent.gguf" in err and "Traceback" not in err


def test_text_that_is_not_utf8_is_scored(demo_model: Path, tmp_path: Path, capsys) -> None:
    """Latin-1 text (invalid UTF-8) gives a finite perplexity: its bytes are tokenized as llama.cpp's perplexity
    reads the file, not refused by a decoder."""
    text = tmp_path / "latin1.txt"
    text.write_bytes("Caf\u00e9 cr\u00e8me, d\u00e9j\u00e0 vu. ".encode("latin-1") * 60)
    rc, out, err = _run(capsys, "-m", str(demo_model), "-f", str(text), "-c", "64", "--chunks", "2", "--quiet")
    assert rc == 0, err
    running, final = out.splitlines()
    assert running.startswith("[1]") and running.count(",") == 2
    ppl = float(final.split("PPL = ")[1].split()[0])
    assert math.isfinite(ppl) and ppl > 1
