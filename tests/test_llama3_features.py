"""What LLaMA-3.x GGUF files carry beyond LLaMA-2's: per-pair RoPE frequency factors (the rope_freqs tensor that
convert_hf_to_gguf.py writes for rope_scaling type llama3), end-of-turn tokens that end a generation, and rope
scaling types we do not implement refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from airobackend.errors import ModelFileError
from airobackend.formats import open_model
from airobackend.formats.writer import TensorSpec, write_gguf
from airobackend.model import LlamaModel
from airobackend.quant import GGMLType
from airobackend.types import FinishReason, GenerationRequest, SamplingParams

from server.fakes import N_SPECIAL, ByteTokenizer, FakeLlama, ScriptedModel


def _copy_with(src: Path, dst: Path, *, rope_freqs=None, scale=None, extra=None) -> Path:
    """`src` re-written with a rope_freqs tensor and/or a linear rope scale / extra metadata."""
    with open_model(src) as mf:
        hp = mf.hparams
        if scale is not None:
            hp.rope_freq_scale = scale
        specs = [TensorSpec(t.name, t.type, t.ne) for t in mf.tensors.values()]
        payload = {t.name: np.array(t.data) for t in mf.tensors.values()}
        if rope_freqs is not None:
            specs.append(TensorSpec("rope_freqs.weight", GGMLType.F32, (len(rope_freqs),)))
            payload["rope_freqs.weight"] = np.asarray(rope_freqs, np.float32).view(np.uint8)
        write_gguf(dst, hparams=hp, vocab=mf.vocab, tensors=specs, data=lambda s: [payload[s.name]],
                   ftype=mf.ftype, extra=extra)
    return dst


def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    with open_model(path) as mf:
        return LlamaModel(mf, n_ctx=64).eval(tokens, 0, logits_all=True)


def test_rope_freqs_tensor_divides_the_angles(fixtures_dir: Path, tmp_path: Path) -> None:
    src = fixtures_dir / "models" / "fx-f32.gguf"
    tokens = [1, 450, 439, 860, 289, 798, 113, 285, 114, 123, 432, 398]
    plain = _logits(src, tokens)
    ones = _logits(_copy_with(src, tmp_path / "ones.gguf", rope_freqs=np.ones(32)), tokens)
    np.testing.assert_array_equal(ones, plain)                  # factors of 1 change nothing, to the bit
    # factors of 2 for every pair are linear scaling by 1/2, which the file can also say with its rope scale
    twos = _logits(_copy_with(src, tmp_path / "twos.gguf", rope_freqs=np.full(32, 2.0)), tokens)
    linear = _logits(_copy_with(src, tmp_path / "linear.gguf", scale=0.5), tokens)
    np.testing.assert_array_equal(twos, linear)
    assert np.abs(twos - plain).max() > 1e-3
    # LLaMA-3.1's factors (1 for the fast pairs, up to 8 for the slow ones): in between
    llama31 = _logits(_copy_with(src, tmp_path / "l31.gguf", rope_freqs=np.geomspace(1, 8, 32)), tokens)
    assert 0 < np.abs(llama31 - plain).max() and not np.array_equal(llama31, twos)
    with pytest.raises(ModelFileError, match="rope_freqs has 16 values"):
        _logits(_copy_with(src, tmp_path / "bad.gguf", rope_freqs=np.ones(16)), tokens)


def test_unsupported_rope_scaling_refused_by_name(fixtures_dir: Path, tmp_path: Path) -> None:
    path = _copy_with(fixtures_dir / "models" / "fx-q8_0.gguf", tmp_path / "yarn.gguf",
                      extra={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ModelFileError, match="rope scaling type 'yarn'"):
        open_model(path)


class _EotTokenizer(ByteTokenizer):
    """ByteTokenizer whose '|' is an end-of-turn token besides EOS (as <|eot_id|> is for LLaMA-3)."""
    eog_ids = frozenset({2, ord("|") + N_SPECIAL})


def test_end_of_turn_token_ends_generation() -> None:
    from airobackend.engine import Engine
    from airobackend.settings import Settings
    engine = Engine(FakeLlama(ScriptedModel("Paris.|Next question"), _EotTokenizer()), Settings(n_ctx=128))
    events = list(engine.generate(GenerationRequest(prompt="Q", max_tokens=50,
                                                    sampling=SamplingParams(temperature=0.0))))
    assert "".join(e.text for e in events) == "Paris."
    assert events[-1].finish_reason is FinishReason.EOS and events[-1].completion_tokens == 6
    # ban_eos bans every end-of-generation token, so the text goes on past it
    events = list(engine.generate(GenerationRequest(prompt="Q", max_tokens=8,
                                                    sampling=SamplingParams(temperature=0.0, ban_eos=True))))
    assert "".join(e.text for e in events) != "Paris." and events[-1].finish_reason is FinishReason.LENGTH
