"""One forward pass over several sequences (LlamaModel.eval_batch): each sequence's logits equal its own evaluation.

Batched, a sequence's rows go through the mat-mat kernels together with the other sequences' rows, where alone a
decode token goes through the mat-vec kernel. Activations are quantized per row, so for the int8 kernels the integer
dot products are the same and the block scales are summed in the same order: measured bit-identical on this CPU
(bound 1e-6 of the logit range, for other kernel choices). For F16 weights the mat-vec sums with four interleaved
float32 accumulators and the mat-mat with one: measured 3.6e-4 of the logit range after two layers (bound 1e-3).
The argmax never changes.
"""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.errors import ContextOverflowError, RequestError
from airobackend.llama import Llama

# max |batched - alone| / max |alone| over all logits (see the module docstring for the measured values)
BOUND = {"f16": 1e-3}


def _model(fixtures_dir, fixture_index, name, kernels="auto"):
    entry = next(m for m in fixture_index["models"] if m["name"] == name)
    llm = Llama(str(fixtures_dir / entry["files"]["gguf"]["path"]), n_ctx=64, verbose=False, kernels=kernels)
    return llm, list(entry["tokens"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ["fx-q4_0", "fx-q4_K_M", "fxgqa-q4_K_M", "fx-f16"])
def test_batched_step_equals_each_sequence_alone(fixtures_dir, fixture_index, name):
    """Three sequences at different positions, each in its own cache: two decode one token, one evaluates a prompt
    chunk; then a step of three decode tokens. Every sequence's logits and cache match its evaluation alone."""
    _batched_step_equals_alone(fixtures_dir, fixture_index, name)


@pytest.mark.parametrize("name,spec", [("fx-q4_0", "Q4_0W"), ("fx-q8_0", "Q8_0W")])
def test_batched_step_equals_alone_in_wide_groups(fixtures_dir, fixture_index, name, spec, wide_legacy):
    """The same with the wide legacy layouts (one block per i32 lane; mat-vec, few-token and prompt mat-mat read
    them)."""
    _batched_step_equals_alone(fixtures_dir, fixture_index, name)
    assert wide_legacy and set(wide_legacy) == {spec}


def _batched_step_equals_alone(fixtures_dir, fixture_index, name):
    llm, toks = _model(fixtures_dir, fixture_index, name)
    m = llm.model
    try:
        prompts = [toks[:9], toks[3:17], [1] + toks[10:14]]
        alone = [m.new_cache() for _ in prompts]
        batched = [m.new_cache() for _ in prompts]
        for c in (alone, batched):
            m.eval(prompts[0], 0, cache=c[0])
            m.eval(prompts[1], 0, cache=c[1])
            m.eval(prompts[2][:2], 0, cache=c[2])
        # step 1: one token for sequences 0 and 1, the rest of sequence 2's prompt (3 tokens)
        steps = [[(0, [toks[20]]), (1, [toks[21]]), (2, prompts[2][2:])],
                 [(0, [toks[22]]), (1, [toks[23]]), (2, [toks[5]])]]
        worst = 0.0
        for step in steps:
            seqs = [(batched[i], batched[i].n_past, t) for i, t in step]
            got = m.eval_batch(seqs)
            for (i, t), g in zip(step, got):
                want = m.eval(t, alone[i].n_past, cache=alone[i])[-1]
                assert g.shape == want.shape == (m.n_vocab,)
                worst = max(worst, _rel(g, want))
                assert int(np.argmax(g)) == int(np.argmax(want))
        assert worst <= BOUND.get(name.split("-")[1], 1e-6), worst
        assert [a.n_past for a in alone] == [b.n_past for b in batched]   # step 2 read step 1's cache entries
    finally:
        llm.close()


@pytest.fixture(scope="module")
def q8_generic(fixtures_dir, fixture_index):
    llm, toks = _model(fixtures_dir, fixture_index, "fx-q8_0", kernels="generic")
    yield llm.model, toks
    llm.close()


def test_want_flags_and_one_sequence_twice(q8_generic):
    """A sequence whose chunk is not its last gets no logits (want False); a batch of one sequence equals eval()."""
    m, toks = q8_generic
    a, b = m.new_cache(), m.new_cache()
    out = m.eval_batch([(a, 0, toks[:6]), (b, 0, toks[:3])], want=[False, True])
    assert out[0] is None and out[1].shape == (m.n_vocab,)
    assert (a.n_past, b.n_past) == (6, 3)
    ref = m.new_cache()
    want = m.eval(toks[:8], 0, cache=ref)[-1]
    got = m.eval_batch([(a, 6, toks[6:8])])[0]
    assert _rel(got, want) == 0.0            # the generic kernels: the same sums in the same order


def test_bad_batches_are_refused(q8_generic):
    m, toks = q8_generic
    c = m.new_cache(n_ctx=4)
    with pytest.raises(RequestError):
        m.eval_batch([])
    with pytest.raises(RequestError):
        m.eval_batch([(c, 0, [1])], want=[True, False])
    with pytest.raises(ContextOverflowError):
        m.eval_batch([(c, 2, toks[:3])])
    with pytest.raises(RequestError):
        m.eval_batch([(c, 0, [m.n_vocab])])
    assert c.n_past == 0                     # nothing was written
