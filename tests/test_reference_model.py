"""The numpy forward pass (airobackend/reference_model.py) against llama.cpp's logits and against LlamaModel, on the
llama.cpp-made fixtures: a plain model, a grouped-query one with mixed k-quants, and the full 32000-token vocabulary."""
from __future__ import annotations

import numpy as np
import pytest

from airobackend import reference_model
from airobackend.formats import open_model
from airobackend.model import LlamaModel

TOL = 1e-3      # float32 on the file's own weight values, fp16 KV cache: as tests/test_model_fidelity.py allows


@pytest.mark.parametrize("name", ["fx-q8_0", "fxgqa-q4_K_M", "fx32k-q4_0"])
def test_reference_forward_pass_agrees_with_llama_cpp_and_the_model(fixtures_dir, name):
    ref = np.load(fixtures_dir / "reference" / f"{name}.npz")
    tokens = ref["tokens"]
    with open_model(str(fixtures_dir / "models" / f"{name}.gguf")) as mf:
        logits = reference_model.forward(reference_model.load_weights(mf), mf.hparams, tokens)
        assert logits.shape == ref["logits_f32deq"].shape
        # llama.cpp on a dequantized copy of the same file, every position teacher-forced
        assert np.abs(logits - ref["logits_f32deq"]).max() <= TOL
        # the kernels' forward pass on the same batch (generic float32 kernels: no activation quantization)
        ours = LlamaModel(mf, n_ctx=64, kernels="generic").eval(tokens, 0, logits_all=True)
        assert np.abs(logits - ours).max() <= TOL
    assert (logits.argmax(-1)[-1], ) == (ref["greedy_f32deq"][0], )
