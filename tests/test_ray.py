"""More than one machine, on a real Ray cluster of this machine (ray.cluster_utils.Cluster: several raylets, each a
node of 1 CPU): pipeline stages as Ray actors giving the single-process model's logits and greedy text, a stage
killed mid-stream, replicas serving concurrent clients with prefix affinity, and the refusals before loading.

Ray is in the test extras; skipped, with the reason, where it is not installed (`pip install 'airobackend[ray]'`)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

# Ray resolves 127.0.0.1 to the machine's network address unless clusters are "off" for this platform; tests stay
# on the loopback interface. Must be set before ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'airobackend[ray]')")

from airobackend.errors import BackendUnavailable, ModelFileError, RequestError  # noqa: E402
from airobackend.formats import open_model  # noqa: E402
from airobackend.model import LlamaModel  # noqa: E402
from airobackend.settings import Settings  # noqa: E402
from airobackend.types import GenerationRequest, SamplingParams  # noqa: E402

FIXTURES = Path(os.environ.get("AIRO_FIXTURES", Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"))
MODELS = FIXTURES / "models"
needs_fixtures = pytest.mark.skipif(not MODELS.is_dir(),
                                    reason=f"llama.cpp fixtures not found at {FIXTURES} (set AIRO_FIXTURES)")
STORE = 80 << 20            # object store per node (Ray's minimum is 75 MiB): activations of a few batches
# A loaded 2-core machine starts raylets and worker processes slowly (a stage worker imports Numba): Ray's own waits
# for them are made generous, so the tests wait for the event, however late it comes, rather than time out.
SLOW_START = {"worker_register_timeout_seconds": 600}
NODES_UP_S = 600


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory) -> Path:
    """The model folder of the two nodes besides the head (AIRO_RAY_MODEL_DIR in their environment): a stage or
    replica placed there opens the file of the same name in it, not the head's path."""
    return tmp_path_factory.mktemp("node-models")


def on_nodes(path: Path, node_dir: Path) -> Path:
    """`path`, copied to the other nodes' model folder."""
    shutil.copyfile(path, node_dir / path.name)
    return path


@pytest.fixture(scope="module")
def cluster(node_dir):
    from ray.cluster_utils import Cluster

    from airobackend.cluster import NODE_MODEL_DIR

    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=STORE,
                                                          include_dashboard=False, _system_config=SLOW_START))
    for _ in range(2):
        c.add_node(wait=False, num_cpus=1, object_store_memory=STORE, env_vars={NODE_MODEL_DIR: str(node_dir)})
    c.wait_for_nodes(timeout=NODES_UP_S)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c.address
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory, node_dir) -> Path:
    """A model of three layers (the demo model's recipe), for three stages; on every node."""
    from airobackend.demo import DemoSpec, demo_model_path
    path = demo_model_path(tmp_path_factory.mktemp("demo3"), DemoSpec(n_layer=3, n_embd=128, n_head=4, n_ff=256))
    return on_nodes(Path(path), node_dir)


def greedy(engine, prompt, n=24, **kw):
    """Greedy output of a prompt (text -> text; token list -> token list)."""
    key = "prompt" if isinstance(prompt, str) else "tokens"
    req = GenerationRequest(max_tokens=n, allow_context_shift=True, **{key: prompt}, **kw,
                            sampling=SamplingParams(temperature=0.0, top_k=1, ban_eos=True, seed=1))
    events = list(engine.generate(req))
    return "".join(ev.text for ev in events) if key == "prompt" else [t for ev in events for t in ev.token_ids]


@contextlib.contextmanager
def replica_set(address, path, **settings):
    """Two replicas of `path` on the cluster (one thread each), closed when the block ends."""
    from airobackend.replicas import start_replicas
    rs = start_replicas(Settings(model=str(path), n_threads=1, ray=address, replicas=2, **settings), str(path))
    try:
        yield rs
    finally:
        rs.close()


def stages(address, path, n, n_ctx=64):
    from airobackend.cluster import start_stages
    return start_stages(address, str(path), n, n_ctx=n_ctx, n_threads=1)


@needs_fixtures
def test_two_stages_on_two_nodes_give_the_single_process_logits(cluster, node_dir):
    path = on_nodes(MODELS / "fx-q4_K_M.gguf", node_dir)
    st = stages(cluster, path, 2)
    try:
        ref = LlamaModel(open_model(path), n_ctx=64, n_threads=1)
        info = st.stage_info()
        assert [i["layers"] for i in info] == [(0, 1), (1, 2)] and len({i["pid"] for i in info}) == 2
        # Two nodes of three: at least one stage is on a node that keeps its copy in its own folder.
        assert str(node_dir / path.name) in [i["path"] for i in info]
        toks = [1, 300, 400, 500, 600, 700, 800, 900, 10, 20, 30]
        # The same kernels in the same order on every node: identical (tolerance 0), not merely close.
        np.testing.assert_array_equal(ref.eval(toks, 0, logits_all=True), st.eval(toks, 0, logits_all=True))
        for i, t in enumerate([5, 77]):
            np.testing.assert_array_equal(ref.eval([t], len(toks) + i), st.eval([t], len(toks) + i))
        ref.cache.remove(1, 6, 13)
        st.cache.remove(1, 6, 13)
        np.testing.assert_array_equal(ref.eval([9], 8), st.eval([9], 8))
        assert st.health()["status"] == "ok"
    finally:
        st.close()


def test_three_stages_greedy_text_and_context_shift(cluster, three_layers):
    from airobackend.engine import Engine
    from airobackend.llama import Llama

    ref = Llama(str(three_layers), n_ctx=48, n_threads=1, verbose=False)
    st = Llama(str(three_layers), n_ctx=48, n_threads=1, verbose=False, ray=cluster, stages=3)
    try:
        assert [r for r in st.model.ranges] == [(0, 1), (1, 2), (2, 3)]
        a, b = (Engine(x, Settings(n_ctx=48)) for x in (ref, st))
        # 80 tokens in a 48-token context: shifted on every stage alike.
        assert greedy(a, "Once upon a time", 80) == greedy(b, "Once upon a time", 80)
    finally:
        st.close()


def test_greedy_text_through_the_server(cluster, three_layers):
    from starlette.testclient import TestClient

    from airobackend.manager import ModelManager
    from airobackend.server import create_app

    settings = Settings(model=str(three_layers), n_ctx=64, n_threads=1, ray=cluster, stages=2)
    body = {"prompt": "The sea", "max_length": 12, "temperature": 0.01, "top_k": 1, "rep_pen": 1.0}
    texts = []
    for s in (Settings(model=str(three_layers), n_ctx=64, n_threads=1), settings):
        manager = ModelManager(s)
        manager.load(manager.register(str(three_layers)))
        try:
            with TestClient(create_app(manager, s)) as client:
                r = client.post("/api/v1/generate", json=body)
                assert r.status_code == 200, r.text
                texts.append(r.json()["results"][0]["text"])
                health = client.get("/health").json()
        finally:
            manager.unload()
    assert texts[0] == texts[1] and texts[0]
    assert [s["state"] for s in health["stages"]] == ["up", "up"]


def test_killed_stage_ends_the_stream_with_an_error_and_serving_resumes(cluster, three_layers):
    from airobackend.engine import Engine
    from airobackend.llama import Llama

    ref = Engine(Llama(str(three_layers), n_ctx=64, n_threads=1, verbose=False), Settings(n_ctx=64))
    llama = Llama(str(three_layers), n_ctx=64, n_threads=1, verbose=False, ray=cluster, stages=2,
                  ray_options=dict(restarts=1))
    try:
        engine = Engine(llama, Settings(n_ctx=64))
        req = GenerationRequest(prompt="Far away", max_tokens=40, allow_context_shift=True,
                                sampling=SamplingParams(temperature=0.0, top_k=1, ban_eos=True))
        events = engine.generate(req)
        next(events)                                          # generating: the stages hold the prompt
        victim = llama.model.stage_info()[1]["pid"]
        os.kill(victim, 9)
        with pytest.raises(BackendUnavailable, match="stage 2 of 2"):
            for _ in events:
                pass
        assert not engine.is_running()
        # Ray restarts the stage (its cache empty); the next request evaluates its prompt again and is right.
        assert greedy(engine, "Far away", 12) == greedy(ref, "Far away", 12)
        info = llama.model.stage_info()
        assert info[1]["pid"] != victim and llama.model.health()["status"] == "ok"
        # Stage 2 dies again, while idle, with no restarts left: the health report says so before any request,
        # and the next request ends with the protocols' 503 error at once.
        watch = llama.model.transport.watch
        os.kill(info[1]["pid"], 9)
        assert watch.wait(lambda w: w.state[1] == "dead", timeout=300)
        health = llama.model.health()
        assert health["status"] == "error" and [s["state"] for s in health["stages"]] == ["up", "down"]
        with pytest.raises(BackendUnavailable, match="stage 2 of 2"):
            greedy(engine, "Far away", 4)
    finally:
        llama.close()


@needs_fixtures
def test_stage_count_and_addresses_refused_before_loading(cluster):
    from airobackend.cluster import ClusterError, connect

    with pytest.raises(RequestError, match="3 stages for a model of 2 layers"):
        stages(cluster, MODELS / "fx-q4_0.gguf", 3)
    ray.shutdown()
    try:
        with pytest.raises(ClusterError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
            connect("127.0.0.1:9")
    finally:
        ray.init(address=cluster, include_dashboard=False, log_to_driver=False)


@needs_fixtures
def test_a_node_without_the_file_or_with_another_is_refused_by_name(cluster, node_dir, tmp_path):
    # Only the head has this file: a stage placed on either other node cannot open it in its model folder.
    lonely = tmp_path / "lonely.gguf"
    shutil.copyfile(MODELS / "fx-q4_0.gguf", lonely)
    with pytest.raises(ModelFileError, match=rf"stage \d \(layers .*\) on node .* cannot read the model file at "
                                              rf"{node_dir / 'lonely.gguf'}: FileNotFoundError"):
        stages(cluster, lonely, 2)
    # The other nodes hold a file of that name with other contents: refused by fingerprint, not by name or size.
    twin = tmp_path / "twin.gguf"
    shutil.copyfile(MODELS / "fx-q4_0.gguf", twin)
    shutil.copyfile(MODELS / "fx-q4_1.gguf", node_dir / "twin.gguf")
    with pytest.raises(ModelFileError, match=f"has a different model file at {node_dir / 'twin.gguf'}"):
        stages(cluster, twin, 2)
    # Nothing was left placed: the cluster's three CPUs can still take three stages.
    st = stages(cluster, on_nodes(twin, node_dir), 2)
    st.close()


@needs_fixtures
def test_nodes_that_differ_are_refused_by_name(tmp_path):
    from airobackend.cluster import ClusterError, check_reports, node_report

    path = MODELS / "fx-q4_0.gguf"
    head = node_report(str(path), 0)
    missing = node_report(str(tmp_path / "absent.gguf"), 0)
    assert missing["error"] and "FileNotFoundError" in missing["error"]
    with pytest.raises(ModelFileError, match="stage 2 on node .* cannot read the model file"):
        check_reports([head, missing], head, str(path), False, ["stage 1", "stage 2"])
    other = dict(head, file="0" * 32)
    with pytest.raises(ModelFileError, match="different model file"):
        check_reports([other], head, str(path), False, ["replica 1"])
    with pytest.raises(ClusterError, match="runs airobackend 0.0.9"):
        check_reports([dict(head, version="0.0.9")], head, str(path), False, ["stage 1"])
    # Other code first: what the rest of its report means (here its fingerprint) is not known. A report without the
    # keys this version adds is refused for its code too, and the Ray node is named where the report has it.
    with pytest.raises(ClusterError, match=r"stage 1 on node \S+ \(Ray node 0123456789ab\) runs airobackend 0.0.9"):
        check_reports([dict(head, version="0.0.9", file="0" * 32, node="0123456789abcdef")], head, str(path), False,
                      ["stage 1"])
    with pytest.raises(ClusterError, match=r"stage 1 on node \S+ runs airobackend None \(code None\)"):
        check_reports([{k: v for k, v in head.items() if k not in ("version", "code", "node")}], head, str(path), False,
                      ["stage 1"])
    short = dict(head, need=10 ** 15)
    from airobackend.errors import InsufficientMemory
    with pytest.raises(InsufficientMemory, match="stage 1 on node"):
        check_reports([short], head, str(path), False, ["stage 1"])
    check_reports([short], head, str(path), True, ["stage 1"])       # allowed to run from disk


@needs_fixtures
@pytest.mark.e2e
@pytest.mark.parametrize("older", [False, True], ids=["another-version", "from-before-the-node-check"])
def test_a_node_with_another_airobackend_is_refused_by_name_before_anything_is_loaded(tmp_path, older):
    import airobackend
    from airobackend.cluster import code_digest

    # The other node's install: a copy of this package at another version, first on its raylet's PYTHONPATH; older:
    # from before the node check (its airobackend.cluster has no node_report for the head's probe to call).
    other = tmp_path / "other"
    shutil.copytree(Path(airobackend.__file__).parent, other / "airobackend",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name, old, new in [("__init__.py", f'__version__ = "{airobackend.__version__}"', '__version__ = "0.0.9+other"'),
                           ("cluster.py", "def node_report(", "def report(")][:1 + older]:
        f = other / "airobackend" / name
        assert old in f.read_text()
        f.write_text(f.read_text().replace(old, new))
    # The driver runs from a folder without airobackend: Ray puts the driver's folder first on every worker's path.
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ray_mixed_versions.py")),
                           str(MODELS / "fx-q4_0.gguf"), str(other)], cwd=run, capture_output=True, text=True,
                          timeout=NODES_UP_S + 900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.splitlines()[-1])

    odd = out["odd_node"]
    (head_node,) = set(out["imports"]) - {odd}
    assert out["imports"][head_node] == {"file": airobackend.__file__, "cluster": airobackend.cluster.__file__,
                                         "version": airobackend.__version__, "code": code_digest()}
    theirs = out["imports"][odd]
    assert theirs["file"] == str(other / "airobackend" / "__init__.py")
    assert theirs["cluster"] == str(other / "airobackend" / "cluster.py")
    assert theirs["version"] == "0.0.9+other" and theirs["code"] != code_digest()

    if older:
        why = (rf"cannot run the head's node check \(AttributeError: Can't get attribute 'node_report' on <module "
               rf"'airobackend\.cluster' from '{re.escape(theirs['cluster'])}'>\)")
    else:
        why = (rf"runs airobackend 0\.0\.9\+other \(code {theirs['code']}\), the head "
               rf"{re.escape(airobackend.__version__)} \(code {code_digest()}\)")
    refusal = (rf"(stage [12] \(layers \d-\d\)|replica [12]) on node {re.escape(socket.gethostname())} "
               rf"\(Ray node {odd[:12]}\) {why}: install the same version on every node")
    assert out["api"], "Llama(..., ray=..., stages=2) was not refused"
    assert out["api"]["type"] == "ClusterError" and re.fullmatch(refusal, out["api"]["message"])
    for how in ("--stages", "--replicas"):
        serve = out["serve " + how]
        assert serve["rc"] == 1 and re.search("error: cannot load the model: " + refusal + "\n", serve["stderr"])
    # Refused before anything was loaded: no stage or replica actor was ever created (the table lists dead ones too).
    assert out["actors"] == ["Witness"]


def test_replicas_serve_concurrent_clients_with_prefix_affinity(cluster, three_layers, node_dir):
    with replica_set(cluster, three_layers, n_ctx=64, multiuser=2) as rs:
        out: dict = {}
        prompts = {"a": [1, 50, 60, 70, 80], "b": [1, 90, 100, 110]}

        def client(k):
            out[k] = greedy(rs, prompts[k], 16, genkey=k)

        threads = [threading.Thread(target=client, args=(k,)) for k in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(out) == {"a", "b"} and all(len(v) == 16 for v in out.values())
        # The returning conversation goes to the replica holding it: only the new tail is evaluated there (on the
        # other replica the whole prompt would be).
        for k in ("b", "a"):
            assert greedy(rs, prompts[k] + out[k] + [120], 4) and rs.perf()["last_process_count"] <= 2
        assert rs.health()["status"] == "ok"
        # One replica of the two, at least, runs on a node that keeps its copy in its own folder.
        assert str(node_dir / three_layers.name) in [ray.get(a.info.remote())["path"] for a in rs.actors]


def test_replica_killed_mid_stream_others_keep_serving(cluster, three_layers):
    with replica_set(cluster, three_layers, n_ctx=64, ray_restarts=0) as rs:
        req = GenerationRequest(prompt="Deep in the forest", max_tokens=60, genkey="k1",
                                sampling=SamplingParams(temperature=0.0, top_k=1, ban_eos=True))
        events = rs.generate(req)
        next(events)
        victim = rs._keys["k1"]
        pid = ray.get(rs.actors[victim].info.remote())["pid"]
        os.kill(pid, 9)
        with pytest.raises(BackendUnavailable, match=f"replica {victim + 1} of 2"):
            for _ in events:
                pass
        assert greedy(rs, "Deep in the forest", 6)                       # the other replica serves
        health = rs.health()
        assert health["status"] == "degraded" and health["replicas"][victim]["state"] == "down"


def test_abort_by_genkey_reaches_the_replica_running_it(cluster, three_layers):
    from airobackend.types import FinishReason

    with replica_set(cluster, three_layers, n_ctx=256) as rs:
        req = GenerationRequest(prompt="Long ago", max_tokens=200, genkey="mine",
                                sampling=SamplingParams(temperature=0.0, top_k=1, ban_eos=True))
        events = rs.generate(req)
        first = next(events)
        assert rs.is_running("mine") and rs.partial_text("mine").startswith(first.text)
        assert rs.abort("mine")
        last = list(events)[-1]
        assert last.finish_reason is FinishReason.ABORTED and last.completion_tokens < 200
        assert not rs.abort("nobody")


def test_replicas_behind_the_server(cluster, three_layers):
    from starlette.testclient import TestClient

    from airobackend.manager import ModelManager
    from airobackend.server import create_app

    settings = Settings(model=str(three_layers), n_ctx=64, n_threads=1, ray=cluster, replicas=2)
    manager = ModelManager(settings)
    manager.load(manager.register(str(three_layers)))
    try:
        with TestClient(create_app(manager, settings)) as client:
            body = {"prompt": "The sea", "max_length": 8, "temperature": 0.01, "top_k": 1, "rep_pen": 1.0}
            r = client.post("/api/v1/generate", json=body)
            assert r.status_code == 200 and r.json()["results"][0]["text"]
            r = client.post("/v1/completions", json={"prompt": "The sea", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"]
            health = client.get("/health").json()
            assert health["status"] == "ok" and [x["state"] for x in health["replicas"]] == ["up", "up"]
            # llama.cpp's slot files are one cache's: refused clearly with replicas, the server keeps serving.
            r = client.post("/slots/0?action=save", json={"filename": "a.bin"})
            assert r.status_code == 400 and "replicas" in r.text
    finally:
        manager.unload()


def test_a_replica_that_dies_idle_is_out_of_rotation_before_any_request(cluster, three_layers):
    with replica_set(cluster, three_layers, n_ctx=64, ray_restarts=0) as rs:
        os.kill(ray.get(rs.actors[0].info.remote())["pid"], 9)
        # Ray tells the watch when the process dies; no request is made meanwhile.
        assert rs.watch.wait(lambda w: w.state[0] == "dead", timeout=300)
        health = rs.health()
        assert health["status"] == "degraded" and [x["state"] for x in health["replicas"]] == ["down", "up"]
        # Every request goes to the live replica: none ends with an error first.
        for prompt in ([1, 30, 31], [1, 30, 32]):
            assert len(greedy(rs, prompt, 3)) == 3
        assert rs.watch.deaths == [1, 0]


def test_a_restarted_replica_is_taken_back(cluster, three_layers):
    with replica_set(cluster, three_layers, n_ctx=64, ray_restarts=1) as rs:
        before = [ray.get(a.info.remote()) for a in rs.actors]
        os.kill(before[0]["pid"], 9)
        assert rs.watch.wait(lambda w: w.deaths[0] == 1, timeout=300)
        # Ray restarts it (the engine loads again); the set takes it back once it answers, a new instance.
        assert rs.wait_ready(300)
        assert ray.get(rs.actors[0].info.remote())["instance"] != before[0]["instance"]
        assert rs.health()["status"] == "ok"
        out = {}
        threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, greedy(rs, [1, 40 + k], 4)))
                   for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(len(v) == 4 for v in out.values())
