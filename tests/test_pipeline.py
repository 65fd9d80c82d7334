"""Pipeline stages in this process (airobackend.pipeline with LocalStages): the split, and a StagedModel giving the
single-process model's logits exactly, through micro-chunks, cache moves, snapshots and the generation loop. The same
model over Ray actors is tested in test_ray.py; this is the arithmetic it must reproduce."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from airobackend.errors import RequestError
from airobackend.formats import open_model
from airobackend.model import LlamaModel
from airobackend.pipeline import LocalStages, Stage, StagedModel, _chunks, head_ram, split_layers, stage_ram

FIXTURES = Path(os.environ.get("AIRO_FIXTURES", Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"))
MODELS = FIXTURES / "models"
needs_fixtures = pytest.mark.skipif(not MODELS.is_dir(),
                                    reason=f"llama.cpp fixtures not found at {FIXTURES} (set AIRO_FIXTURES)")


def staged(path, n_stages, n_ctx=64, micro_batch=0):
    mf = open_model(path)
    ranges = split_layers(mf.hparams.n_layer, n_stages)
    return StagedModel(mf, LocalStages([Stage(str(path), lo, hi, n_ctx=n_ctx, n_threads=1) for lo, hi in ranges]),
                       ranges, n_ctx=n_ctx, n_threads=1, micro_batch=micro_batch)


def test_split_layers_covers_every_layer_in_order():
    assert split_layers(80, 3) == [(0, 26), (26, 53), (53, 80)]
    assert split_layers(2, 2) == [(0, 1), (1, 2)]
    assert split_layers(5, 1) == [(0, 5)]
    for n_layer in range(1, 12):
        for n in range(1, n_layer + 1):
            r = split_layers(n_layer, n)
            assert r[0][0] == 0 and r[-1][1] == n_layer and all(a[1] == b[0] and a[0] < a[1] for a, b in zip(r, r[1:]))
            assert max(h - lo for lo, h in r) - min(h - lo for lo, h in r) <= 1


def test_more_stages_than_layers_is_refused():
    with pytest.raises(RequestError, match="3 stages for a model of 2 layers"):
        split_layers(2, 3)
    with pytest.raises(RequestError):
        split_layers(2, 0)


def test_chunks_keep_positions_across_spans():
    got = _chunks([(0, 5), (10, 3)], 3)
    assert got == [(0, 3, [(0, 3)]), (3, 6, [(3, 2), (10, 1)]), (6, 8, [(11, 2)])]


@needs_fixtures
@pytest.mark.parametrize("name", ["fx-q4_K_M.gguf", "fxgqa-q4_0.gguf", "fx-f16.ggmlv3.bin"])
@pytest.mark.parametrize("micro_batch", [0, 3])
def test_two_stages_give_the_single_process_logits(name, micro_batch):
    path = MODELS / name
    ref = LlamaModel(open_model(path), n_ctx=64, n_threads=1)
    st = staged(path, 2, micro_batch=micro_batch)
    toks = [1, 300, 400, 500, 600, 700, 800, 900, 10, 20, 30]
    # Same kernels, same order of operations: identical, not merely close.
    np.testing.assert_array_equal(ref.eval(toks, 0, logits_all=True), st.eval(toks, 0, logits_all=True))
    for i, t in enumerate([5, 77, 123]):
        np.testing.assert_array_equal(ref.eval([t], len(toks) + i), st.eval([t], len(toks) + i))
    np.testing.assert_array_equal(ref.hidden_states(toks), st.hidden_states(toks))


@needs_fixtures
def test_cache_operations_run_on_every_stage():
    path = MODELS / "fx-q8_0.gguf"
    ref = LlamaModel(open_model(path), n_ctx=64, n_threads=1)
    st = staged(path, 2)
    toks = list(range(100, 120))
    ref.eval(toks, 0)
    st.eval(toks, 0)
    # The context shift's remove (with key re-rotation), then the next token: the same logits.
    assert ref.cache.remove(1, 8, 20) == st.cache.remove(1, 8, 20) == 13
    np.testing.assert_array_equal(ref.eval([42], 13), st.eval([42], 13))
    ref.cache.move(2, 6, 30)
    st.cache.move(2, 6, 30)
    a, b = ref.cache.snapshot(34), st.cache.snapshot(34)
    np.testing.assert_array_equal(a.k, b.k)
    np.testing.assert_array_equal(a.v, b.v)
    assert st.cache.compatible(a) is None and st.cache.bytes_per_position == ref.cache.bytes_per_position
    # A snapshot of the single-process cache restored into the stages carries on identically.
    st.cache.truncate(0)
    st.cache.restore(a)
    np.testing.assert_array_equal(ref.eval([7], 34), st.eval([7], 34))
    bad = type(a)(a.type_k, a.type_v, 3, a.k[:1, :, :3], a.v[:1, :, :3])
    assert "shape" in st.cache.compatible(bad)


def greedy(engine, prompt, n=60):
    """Greedy text of `prompt` (context shift allowed, end token banned so that every token is generated) and the
    number of prompt tokens the engine evaluated."""
    from airobackend.types import GenerationRequest, SamplingParams

    req = GenerationRequest(prompt=prompt, max_tokens=n, allow_context_shift=True,
                            sampling=SamplingParams(temperature=0.0, top_k=1, ban_eos=True, seed=1))
    text = "".join(ev.text for ev in engine.generate(req))
    return text, engine.perf()["last_process_count"]


@needs_fixtures
def test_generation_through_the_engine_matches_with_context_shift():
    from airobackend.engine import Engine
    from airobackend.llama import Llama
    from airobackend.settings import Settings

    path = str(MODELS / "fx-q4_0.gguf")
    ref = Llama(path, n_ctx=32, n_threads=1, verbose=False)
    st = Llama(path, n_ctx=32, n_threads=1, verbose=False)
    st.model = staged(path, 2, n_ctx=32)
    engines = [Engine(x, Settings(n_ctx=32)) for x in (ref, st)]
    # 60 tokens in a 32-token context: the engine shifts the context; greedy output must not change.
    a, b = (greedy(e, "The quick brown fox") for e in engines)
    assert a == b and len(a[0]) > 0
    # Without a shift, the next turn starts with the last one's text: the prompt cache evaluates only the new tail.
    c, d = (greedy(e, "Once upon a time", 8) for e in engines)
    assert c == d
    e, f = (greedy(eng, "Once upon a time" + c[0], 4) for eng in engines)
    assert e == f and e[1] <= 2


@needs_fixtures
def test_stage_ram_adds_up_to_the_model():
    mf = open_model(MODELS / "fx-q4_K_M.gguf")
    ranges = split_layers(mf.hparams.n_layer, 2)
    kw = dict(n_ctx=2048, n_batch=512)
    stages = [stage_ram(mf, lo, hi, **kw) for lo, hi in ranges]
    layer_bytes = sum(t.nbytes for n, t in mf.tensors.items() if n.startswith("blk."))
    other = sum(t.nbytes for n, t in mf.tensors.items() if not n.startswith("blk."))
    kv = 2 * 2 * 2048 * mf.hparams.n_embd_gqa * mf.hparams.n_layer
    assert sum(stages) > layer_bytes + kv and head_ram(mf, **kw) > other
    layer = [sum(t.nbytes for n, t in mf.tensors.items() if n.startswith(f"blk.{i}.")) for i in range(2)]
    assert stages[1] - stages[0] == layer[1] - layer[0]    # the same KV share and scratch; its own layer's bytes


@needs_fixtures
def test_inspect_prints_the_ram_of_each_stage(capsys):
    import json

    from airobackend.cli import main

    path = str(MODELS / "fx-q4_K_M.gguf")
    assert main(["inspect", path, "--stages", "2", "--n-ctx", "512", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    mf = open_model(path)
    want = [head_ram(mf, n_ctx=512)] + [stage_ram(mf, lo, hi, n_ctx=512) for lo, hi in [(0, 1), (1, 2)]]
    assert [s["ram_bytes"] for s in d["stages"]] == want
    assert [s["layers"] for s in d["stages"]] == [None, [0, 0], [1, 1]]
    assert main(["inspect", path, "--stages", "2"]) == 0
    text = capsys.readouterr().out
    assert "stage 2 (layers 1-1)" in text and "head" in text
    assert main(["inspect", path, "--stages", "3"]) == 1
    assert "3 stages for a model of 2 layers" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--stages", "2"], "need a Ray cluster"),
    (["--replicas", "2"], "need a Ray cluster"),
    (["--ray", "local", "--stages", "2", "--replicas", "2"], "cannot be combined"),
    (["--ray", "local", "--stages", "0"], "at least 1"),
])
def test_serve_refuses_cluster_flags_that_cannot_work(argv, message, capsys):
    from airobackend.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    import sys

    from airobackend.cluster import ClusterError, connect

    monkeypatch.setitem(sys.modules, "ray", None)          # as if Ray were not installed
    with pytest.raises(ClusterError, match=r"pip install 'airobackend\[ray\]'"):
        connect("127.0.0.1:6379")


def test_a_failed_stage_or_replica_is_the_protocols_503():
    import json

    from airobackend.errors import BackendUnavailable
    from airobackend.plugins import get_plugin_manager
    from airobackend.server import error_for_exception

    pm = get_plugin_manager(load_entrypoints=False)
    exc = BackendUnavailable("stage 2 of 2 (layers 40-79, node b) failed (ActorDiedError)")
    openai = error_for_exception(pm, "/v1/completions", exc)
    kobold = error_for_exception(pm, "/api/v1/generate", exc)
    assert openai.status_code == kobold.status_code == 503
    assert openai.headers["retry-after"] == kobold.headers["retry-after"] == "5"
    assert json.loads(openai.body)["error"]["code"] == "backend_unavailable"
    assert json.loads(openai.body)["error"]["message"] == str(exc)
    assert json.loads(kobold.body)["detail"]["msg"] == str(exc)
