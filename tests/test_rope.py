"""Context beyond the trained length: the trained context of GGML files, and KoboldCpp's automatic RoPE base."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airobackend.formats import open_model
from airobackend.llama import Llama
from airobackend.rope import choose_rope, ntk_rope_base


def test_koboldcpp_ntk_values():
    # KoboldCpp 1.76 prints "Using Automatic RoPE scaling, Pre-GGUF (scale:1.000, base:30138.9)" for 4096
    assert ntk_rope_base(10000.0, 2048, 4096) == pytest.approx(30138.9, abs=0.05)
    assert ntk_rope_base(10000.0, 2048, 8192) == pytest.approx(90835.4, abs=0.1)
    assert ntk_rope_base(10000.0, 2048, 2048) == 10000.0
    assert ntk_rope_base(10000.0, 4096, 4096) == 10000.0
    assert ntk_rope_base(500000.0, 8192, 16384) > 500000.0


@pytest.mark.parametrize("fmt", ["ggmlv3.bin", "gguf"])
def test_automatic_rope_for_4096_on_a_llama1_shaped_file(fixtures_dir, fmt):
    path = str(fixtures_dir / "models" / f"fx-q4_0.{fmt}")
    with open_model(path) as mf:
        assert mf.hparams.n_ctx_train == 2048
        choice = choose_rope(mf, 4096)
        assert choice.source == "auto" and choice.rope_freq_base == pytest.approx(30138.9, abs=0.05)
        assert choose_rope(mf, 2048).source == "file" and choose_rope(mf, 2048).rope_freq_base == 10000.0
    llm = Llama(path, n_ctx=4096, verbose=False)
    assert llm.model.freq_base == pytest.approx(30138.9, abs=0.05) == llm.model.cache.freq_base
    assert llm.rope.n_ctx_train == 2048 and llm.rope.source == "auto"
    llm.close()
    given = Llama(path, n_ctx=4096, verbose=False, rope_freq_base=10000.0)    # the user's value wins
    assert given.model.freq_base == 10000.0 and given.rope.source == "user"
    given.close()
    linear = Llama(path, n_ctx=4096, verbose=False, rope_freq_scale=0.5)
    assert linear.model.freq_base == 10000.0 and linear.model.freq_scale == 0.5
    linear.close()


def test_ggml_trained_context_by_shape(fixtures_dir, tmp_path):
    """GGML files do not say: 2048 for LLaMA-1 shapes (a grouped-query toy model included), 4096 for LLaMA-2 70B's."""
    from airobackend.formats.writer import write_synthetic_model
    with open_model(str(fixtures_dir / "models" / "fxgqa-q4_0.ggmlv3.bin")) as mf:
        assert mf.hparams.n_head_kv == 2 and mf.hparams.n_ctx_train == 2048
    path = tmp_path / "l2-70b-shape.ggmlv3.bin"          # headers only (sparse): the shape is what counts
    write_synthetic_model(path, format="ggml", mix="q4_0", n_vocab=512, n_embd=8192, n_head=64, n_head_kv=8,
                          n_layer=80, n_ff=28672, sparse=True)
    with open_model(str(path)) as mf:
        assert mf.hparams.n_ctx_train == 4096
        assert choose_rope(mf, 4096).source == "file" and choose_rope(mf, 8192).source == "auto"


@pytest.mark.e2e       # `airobackend inspect` as a subprocess
def test_inspect_prints_the_rope_values(fixtures_dir):
    path = str(fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin")
    out = subprocess.run([sys.executable, "-m", "airobackend", "inspect", path, "--n-ctx", "4096", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rope = json.loads(out)["rope"]
    assert rope["source"] == "auto" and rope["n_ctx_train"] == 2048
    assert rope["rope_freq_base"] == pytest.approx(30138.9, abs=0.05)
    text = subprocess.run([sys.executable, "-m", "airobackend", "inspect", path, "--n-ctx", "4096"],
                          capture_output=True, text=True, check=True).stdout
    assert "RoPE base 30138.9" in text and "automatic" in text
