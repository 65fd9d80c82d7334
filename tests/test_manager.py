"""ModelManager: load / unload / switch at run time, RAM check, requests racing with loads.

The switching rules are tested with a scripted engine (a test double whose generation the test holds and releases,
so every interleaving is deterministic); load -> generate -> switch -> generate is then run on the real Engine with
llama.cpp-made fixture files.
"""
from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest

from airobackend.errors import EngineBusy, InsufficientMemory, ModelFileError, ModelNotLoaded, RequestError
from airobackend.library import GB
from airobackend.manager import ConsoleProgress, ModelManager, mem_available
from airobackend.settings import Settings
from airobackend.types import FinishReason, GenerationEvent, GenerationRequest, SamplingParams

from sync import settle, watched

TIMEOUT = 10.0


class ScriptedEngine:
    """Engine double: yields its model's name token by token; `gate` (when set) holds each token until released."""

    def __init__(self, entry, settings):
        self.name, self.settings = entry.name, settings
        self.gate: threading.Semaphore | None = None
        self.started = threading.Event()
        self.aborted = threading.Event()
        self.closed = False
        self.served = 0

    def generate(self, req):
        self.served += 1
        self.started.set()
        for piece in (self.name, ":", req.prompt or ""):
            if self.aborted.is_set():
                yield GenerationEvent(finish_reason=FinishReason.ABORTED)
                return
            if self.gate is not None:
                self.gate.acquire(timeout=TIMEOUT)
            yield GenerationEvent(text=piece)
        yield GenerationEvent(finish_reason=FinishReason.LENGTH)

    def abort(self, genkey=None):
        self.aborted.set()
        if self.gate is not None:
            self.gate.release(10)
        return True

    def tokenize(self, text, add_bos=True):
        return [1] + [ord(c) for c in text] if add_bos else [ord(c) for c in text]

    def model_info(self):
        return {"name": "engine-" + self.name, "n_ctx": self.settings.n_ctx, "template": self.settings.template}

    def perf(self):
        return {"queue": 0, "idle": 1}

    def close(self):
        self.closed = True


class Factory:
    """Builds ScriptedEngines; `fail` names a model whose load raises; `hold` blocks a load until released."""

    def __init__(self):
        self.built: dict[str, ScriptedEngine] = {}
        self.fail: set[str] = set()
        self.hold: threading.Event | None = None
        self.loading = threading.Event()
        self.calls: list[str] = []

    def __call__(self, entry, settings, progress):
        self.calls.append(entry.name)
        self.loading.set()
        progress(0.5)
        if self.hold is not None:
            assert self.hold.wait(TIMEOUT)
        if entry.name in self.fail:
            raise ModelFileError("tensor data runs past the end of the file", path=entry.path)
        e = ScriptedEngine(entry, settings)
        self.built[entry.name] = e
        return e, None


@pytest.fixture()
def library_dir(tmp_path, fixtures_dir) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("fx-q2_K.gguf", "fx-q4_K_M.ggmlv3.bin", "fx-q8_0.gguf", "fx-f16.gguf"):
        shutil.copyfile(fixtures_dir / "models" / name, d / name)
    return d


def make(library_dir, *, mem=1 << 50, multiuser=1, factory=None, **kw):
    settings = Settings(model_dir=str(library_dir), n_ctx=256, multiuser=multiuser, **kw)
    factory = factory or Factory()
    mem_box = {"bytes": mem}
    mgr = ModelManager(settings, mem_available=lambda: mem_box["bytes"], engine_factory=factory)
    return watched(mgr), factory, mem_box


def text_of(events) -> str:
    return "".join(ev.text for ev in events)


def run_in_thread(fn, *args, **kw):
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kw)
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


# ---------------------------------------------------------------- basics

def test_no_model_raises_model_not_loaded(library_dir):
    mgr, _, _ = make(library_dir)
    assert mgr.loaded_name is None and mgr.load_progress == 0.0
    with pytest.raises(ModelNotLoaded):
        mgr.generate(GenerationRequest(prompt="x"))
    for call in (lambda: mgr.tokenize("x"), mgr.model_info, mgr.perf, lambda: mgr.format_chat([]),
                 lambda: mgr.some_future_engine_method):
        with pytest.raises(ModelNotLoaded):
            call()
    assert mgr.abort() is False and mgr.partial_text() == ""


def test_load_generate_switch_generate(library_dir):
    mgr, factory, _ = make(library_dir)
    listed = mgr.list_models()
    assert [m["name"] for m in listed] == ["fx-f16.gguf", "fx-q2_K.gguf", "fx-q4_K_M.ggmlv3.bin", "fx-q8_0.gguf"]
    assert not any(m["loaded"] for m in listed)

    entry = mgr.load("fx-q2_K.gguf")
    assert entry.mix == "q2_K" and mgr.loaded_name == "fx-q2_K.gguf" and mgr.load_progress == 1.0
    assert text_of(mgr.generate(GenerationRequest(prompt="hi"))) == "fx-q2_K.gguf:hi"
    assert mgr.model_info()["library_name"] == "fx-q2_K.gguf"
    assert [m["name"] for m in mgr.list_models() if m["loaded"]] == ["fx-q2_K.gguf"]

    mgr.load("fx-q4_K_M.ggmlv3.bin", n_ctx=512, template="vicuna")
    assert text_of(mgr.generate(GenerationRequest(prompt="yo"))) == "fx-q4_K_M.ggmlv3.bin:yo"
    info = mgr.model_info()
    assert (info["library_name"], info["n_ctx"], info["template"]) == ("fx-q4_K_M.ggmlv3.bin", 512, "vicuna")
    assert factory.built["fx-q2_K.gguf"].closed, "the old engine is released after the switch"
    assert mgr.tokenize("ab") == [1, 97, 98]


def test_unknown_name_and_option(library_dir):
    mgr, factory, _ = make(library_dir)
    with pytest.raises(RequestError, match="no model named"):
        mgr.load("../../etc/passwd")
    with pytest.raises(RequestError, match="unknown load option"):
        mgr.load("fx-q2_K.gguf", gpu_layers=99)
    assert factory.calls == []


def test_unload(library_dir):
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q8_0.gguf")
    mgr.unload()
    assert mgr.loaded_name is None and factory.built["fx-q8_0.gguf"].closed
    with pytest.raises(ModelNotLoaded):
        mgr.generate(GenerationRequest(prompt="x"))


def test_progress_reported(library_dir):
    seen = []
    mgr, factory, _ = make(library_dir)
    mgr._on_progress = lambda name, f: seen.append((name, f))
    during = []

    def factory_peek(entry, settings, progress):
        progress(0.25)
        during.append((mgr.loading_name, mgr.load_progress))
        return factory(entry, settings, progress)

    mgr._factory = factory_peek
    mgr.load("fx-q8_0.gguf")
    assert during == [("fx-q8_0.gguf", 0.25)]
    assert seen[0] == ("fx-q8_0.gguf", 0.0) and seen[-1] == ("fx-q8_0.gguf", 1.0)
    assert ("fx-q8_0.gguf", 0.5) in seen


def test_console_progress_bar():
    import io
    buf = io.StringIO()
    bar = ConsoleProgress(buf, width=10)
    for f in (0.0, 0.5, 0.5, 1.0):
        bar("m.gguf", f)
    out = buf.getvalue()
    assert out.count("\r") == 3 and "[#####.....]  50%" in out and out.endswith("[##########] 100%\n")


def test_mem_available_reads_proc_meminfo():
    n = mem_available()
    assert n > 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = next(int(l.split()[1]) for l in meminfo.read_text().splitlines() if l.startswith("MemAvailable:"))
        assert abs(n - kb * 1024) < 2 * GB   # read a moment apart


# ---------------------------------------------------------------- RAM check

def test_refused_load_names_both_numbers_and_what_fits(library_dir):
    mgr, factory, mem = make(library_dir)
    lib = {e.name: e for e in mgr.library.scan()}
    f16, q8, q2 = lib["fx-f16.gguf"], lib["fx-q8_0.gguf"], lib["fx-q2_K.gguf"]
    # Memory for the q8_0 file but not for the f16 one.
    mem["bytes"] = (q8.ram_for(256) + f16.ram_for(256)) // 2
    with pytest.raises(InsufficientMemory) as info:
        mgr.load("fx-f16.gguf")
    msg = str(info.value)
    assert f"{f16.ram_for(256) / GB:.1f} GB" in msg and f"{mem['bytes'] / GB:.1f} GB" in msg
    assert "fx-q8_0.gguf" in msg and "fx-q2_K.gguf" in msg and "fx-f16.gguf (" in msg
    # Largest (best) first among those that fit.
    assert msg.index("fx-q8_0.gguf") < msg.index("fx-q2_K.gguf")
    assert "--allow-disk" in msg
    assert factory.calls == [] and mgr.loaded_name is None

    # Nothing fits at all.
    mem["bytes"] = q2.ram_for(256) // 2
    with pytest.raises(InsufficientMemory, match="No model in the library fits"):
        mgr.load("fx-f16.gguf")


def test_ram_check_counts_the_kv_cache_type(library_dir):
    # a context long enough for the cache to matter: f16 does not fit, a q8_0 cache does (and the refusal says so)
    mgr, factory, mem = make(library_dir)
    f16 = {e.name: e for e in mgr.library.scan()}["fx-f16.gguf"]
    need_f16, need_q8 = f16.ram_for(16384), f16.ram_for(16384, "q8_0", "q8_0")
    assert need_q8 < need_f16
    mem["bytes"] = (need_f16 + need_q8) // 2
    with pytest.raises(InsufficientMemory) as info:
        mgr.load("fx-f16.gguf", n_ctx=16384)
    assert "q8_0 KV cache" in str(info.value) and f"{need_q8 / GB:.1f} GB" in str(info.value)
    mgr.load("fx-f16.gguf", n_ctx=16384, cache_type_k="q8_0", cache_type_v="q8_0")
    used = factory.built["fx-f16.gguf"].settings
    assert (used.cache_type_k, used.cache_type_v, used.n_ctx) == ("q8_0", "q8_0", 16384)
    with pytest.raises(InsufficientMemory, match="with a q4_0/f16 KV cache"):
        mgr.load("fx-f16.gguf", n_ctx=1 << 20, cache_type_k="q4_0")
    # the library lists RAM for the server's cache types
    q8_lib, _, _ = make(library_dir, cache_type_k="q8_0", cache_type_v="q8_0")
    assert {e.name: e for e in q8_lib.library.scan()}["fx-f16.gguf"].ram_bytes == f16.ram_for(256, "q8_0", "q8_0")


def test_kv_of_every_parallel_slot_is_counted(library_dir):
    """--parallel 4: four contexts of KV cache; a model that fits with one slot is refused with four."""
    mgr, factory, mem = make(library_dir, parallel=4)
    f16 = next(e for e in mgr.library.scan() if e.name == "fx-f16.gguf")
    kv = f16.ram_for(256) - f16.ram_for(1)
    assert kv > 0
    mem["bytes"] = f16.ram_for(256) + 2 * kv
    with pytest.raises(InsufficientMemory):
        mgr.load("fx-f16.gguf")
    mem["bytes"] = f16.ram_for(256) + 3 * kv
    mgr.load("fx-f16.gguf")
    assert mgr.loaded_name == "fx-f16.gguf"


def test_refusal_keeps_old_model_serving(library_dir):
    mgr, _, mem = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    mem["bytes"] = 1
    with pytest.raises(InsufficientMemory):
        mgr.load("fx-f16.gguf")
    assert mgr.loaded_name == "fx-q2_K.gguf"
    assert text_of(mgr.generate(GenerationRequest(prompt="!"))) == "fx-q2_K.gguf:!"


def test_allow_disk_loads_with_a_warning(library_dir, caplog):
    mgr, _, mem = make(library_dir)
    mem["bytes"] = 1
    with caplog.at_level(logging.WARNING, logger="airobackend.manager"):
        mgr.load("fx-f16.gguf", allow_disk=True)
    assert mgr.loaded_name == "fx-f16.gguf"
    assert any("disk-bound" in r.getMessage() for r in caplog.records)
    # The setting (--allow-disk) does the same.
    mgr2, _, mem2 = make(library_dir, allow_disk=True)
    mem2["bytes"] = 1
    mgr2.load("fx-f16.gguf")
    assert mgr2.loaded_name == "fx-f16.gguf"


def test_old_model_memory_counts_as_room_when_switching(library_dir):
    """The old model's own buffers come back at the switch; its mmapped weights are page cache, already counted."""
    mgr, factory, mem = make(library_dir)
    mgr.load("fx-f16.gguf")
    lib = {e.name: e for e in mgr.library.scan()}
    old, new = lib["fx-f16.gguf"], lib["fx-q8_0.gguf"]
    anon = old.ram_for(256) - old.file_size
    mem["bytes"] = new.ram_for(256) - anon // 2         # fits only with the old model's buffers given back
    mgr.load("fx-q8_0.gguf")
    assert mgr.loaded_name == "fx-q8_0.gguf"
    # It did not fit beside the old one, so the old one was released before the new one was built.
    assert factory.built["fx-f16.gguf"].closed


# ---------------------------------------------------------------- failures

def test_failed_load_leaves_previous_model_serving(library_dir):
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    factory.fail.add("fx-q8_0.gguf")
    with pytest.raises(ModelFileError, match="runs past the end"):
        mgr.load("fx-q8_0.gguf")
    assert mgr.loaded_name == "fx-q2_K.gguf" and not factory.built["fx-q2_K.gguf"].closed
    assert text_of(mgr.generate(GenerationRequest(prompt="a"))) == "fx-q2_K.gguf:a"
    assert "runs past the end" in mgr.last_error


def test_failed_load_after_release_restores_previous_model(library_dir):
    mgr, factory, mem = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    lib = {e.name: e for e in mgr.library.scan()}
    mem["bytes"] = lib["fx-q8_0.gguf"].ram_for(256) - 1    # the new one fits only after the old one is released
    factory.fail.add("fx-q8_0.gguf")
    with pytest.raises(ModelFileError):
        mgr.load("fx-q8_0.gguf")
    assert factory.calls == ["fx-q2_K.gguf", "fx-q8_0.gguf", "fx-q2_K.gguf"]
    assert mgr.loaded_name == "fx-q2_K.gguf"
    assert text_of(mgr.generate(GenerationRequest(prompt="b"))) == "fx-q2_K.gguf:b"


def test_unreadable_file_refused_before_anything_changes(library_dir):
    (library_dir / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    with pytest.raises(ModelFileError, match="bad.gguf"):
        mgr.load("bad.gguf")
    assert factory.calls == ["fx-q2_K.gguf"] and mgr.loaded_name == "fx-q2_K.gguf"
    assert "bad.gguf" not in [m["name"] for m in mgr.list_models()]
    [bad] = [m for m in mgr.list_models(include_unreadable=True) if m["name"] == "bad.gguf"]
    assert bad["error"] and str(library_dir) not in bad["error"]


# ---------------------------------------------------------------- loads racing with requests

def test_load_waits_for_stream_in_flight_and_queues_new_requests(library_dir):
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    old = factory.built["fx-q2_K.gguf"]
    old.gate = threading.Semaphore(0)

    stream = mgr.generate(GenerationRequest(prompt="old"))
    old.gate.release()
    first = next(stream)                      # the stream is running on the old model
    assert first.text == "fx-q2_K.gguf"

    loader, load_box = run_in_thread(mgr.load, "fx-q8_0.gguf")
    settle(mgr, lambda: mgr.loading_name is not None)
    assert mgr.loading_name == "fx-q8_0.gguf"
    # A request arriving during the load waits in line (the stream holds the old model: nothing can move on).
    late, late_box = run_in_thread(lambda: text_of(mgr.generate(GenerationRequest(prompt="new"))))
    settle(mgr, lambda: mgr._waiting == 1)
    assert loader.is_alive() and late.is_alive(), "the load waits for the stream; the new request waits for the load"
    assert "fx-q8_0.gguf" not in factory.calls, "the new model is not built while the old one streams"
    assert mgr.perf()["queue"] >= 1

    old.gate.release(5)                       # let the old stream finish
    rest = list(stream)
    assert text_of([first, *rest]) == "fx-q2_K.gguf:old" and rest[-1].finish_reason == FinishReason.LENGTH
    loader.join(TIMEOUT)
    late.join(TIMEOUT)
    assert "error" not in load_box and "error" not in late_box, (load_box, late_box)
    assert late_box["result"] == "fx-q8_0.gguf:new", "the waiting request is served by the new model"
    assert old.closed and old.served == 1


def test_request_during_load_is_busy_when_nobody_may_wait(library_dir):
    mgr, factory, _ = make(library_dir, multiuser=0)
    factory.hold = threading.Event()
    loader, box = run_in_thread(mgr.load, "fx-q2_K.gguf")
    assert factory.loading.wait(TIMEOUT)
    with pytest.raises(EngineBusy):
        mgr.generate(GenerationRequest(prompt="x"))
    with pytest.raises(EngineBusy, match="already loading"):
        mgr.load("fx-q8_0.gguf")
    factory.hold.set()
    loader.join(TIMEOUT)
    assert "error" not in box and mgr.loaded_name == "fx-q2_K.gguf"


def test_waiting_line_is_bounded(library_dir):
    mgr, factory, _ = make(library_dir, multiuser=2)       # as the Engine's queue: two may wait
    factory.hold = threading.Event()
    loader, _ = run_in_thread(mgr.load, "fx-q2_K.gguf")
    assert factory.loading.wait(TIMEOUT)
    waiters = [run_in_thread(lambda: text_of(mgr.generate(GenerationRequest(prompt="w")))) for _ in range(2)]
    settle(mgr, lambda: mgr._waiting == 2)
    with pytest.raises(EngineBusy, match="busy"):
        mgr.generate(GenerationRequest(prompt="third"))
    factory.hold.set()
    loader.join(TIMEOUT)
    for t, box in waiters:
        t.join(TIMEOUT)
        assert box.get("result") == "fx-q2_K.gguf:w"


def test_request_waiting_for_a_load_can_be_aborted(library_dir):
    mgr, factory, _ = make(library_dir)
    factory.hold = threading.Event()
    loader, _ = run_in_thread(mgr.load, "fx-q2_K.gguf")
    assert factory.loading.wait(TIMEOUT)
    waiter, box = run_in_thread(lambda: list(mgr.generate(GenerationRequest(prompt="w", genkey="KCPP1234"))))
    settle(mgr, lambda: mgr._waiting == 1)
    assert mgr.abort("KCPP1234") is True
    waiter.join(TIMEOUT)
    assert [ev.finish_reason for ev in box["result"]] == [FinishReason.ABORTED]
    factory.hold.set()
    loader.join(TIMEOUT)
    assert factory.built["fx-q2_K.gguf"].served == 0


def test_load_can_abort_streams_in_flight(library_dir):
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    old = factory.built["fx-q2_K.gguf"]
    old.gate = threading.Semaphore(0)
    events = []
    reader, _ = run_in_thread(lambda: events.extend(mgr.generate(GenerationRequest(prompt="long"))))
    assert old.started.wait(TIMEOUT)
    mgr.load("fx-q8_0.gguf", abort_running=True)
    reader.join(TIMEOUT)
    assert events and events[-1].finish_reason == FinishReason.ABORTED
    assert mgr.loaded_name == "fx-q8_0.gguf"


def test_closing_a_stream_early_frees_the_slot(library_dir):
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    it = mgr.generate(GenerationRequest(prompt="x"))
    next(it)
    it.close()                                # a client that went away
    loader, box = run_in_thread(mgr.load, "fx-q8_0.gguf")
    loader.join(TIMEOUT)
    assert not loader.is_alive() and "error" not in box


def test_aborting_unload_closes_a_stream_its_caller_stopped_reading(library_dir):
    # A caller that keeps a stream but never reads it again (a host plugin holding the iterator) must not make
    # close() or an aborting switch wait forever for a generation that cannot end.
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    kept = mgr.generate(GenerationRequest(prompt="x"))
    next(kept)
    closer, box = run_in_thread(mgr.close)
    closer.join(TIMEOUT)
    assert not closer.is_alive() and "error" not in box
    assert mgr._active == 0 and mgr.loaded_name is None and factory.built["fx-q2_K.gguf"].closed
    assert list(kept) == [], "the closed stream ends; it does not release the slot a second time"
    assert mgr._active == 0


def test_aborting_unload_waits_for_a_stream_being_read(library_dir):
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")
    engine = factory.built["fx-q2_K.gguf"]
    engine.gate = threading.Semaphore(0)
    events = []
    reader, _ = run_in_thread(lambda: events.extend(mgr.generate(GenerationRequest(prompt="long"))))
    assert engine.started.wait(TIMEOUT)
    mgr.unload(abort_running=True)
    reader.join(TIMEOUT)
    assert events[-1].finish_reason == FinishReason.ABORTED, "the reader saw the abort, not a closed stream"
    assert mgr._active == 0 and engine.closed


def test_engine_error_before_any_event_frees_the_slot(library_dir):
    mgr, factory, _ = make(library_dir)
    mgr.load("fx-q2_K.gguf")

    def bad_generate(req):
        raise RequestError("max_tokens must be >= 0")

    factory.built["fx-q2_K.gguf"].generate = bad_generate
    with pytest.raises(RequestError):
        mgr.generate(GenerationRequest(prompt="x"))
    assert mgr._active == 0


# ---------------------------------------------------------------- the real engine on llama.cpp-made files

def test_real_engine_load_generate_switch_generate(tmp_path, fixtures_dir, fixture_index):
    """Switch between two llama.cpp-made files of different shape (fx q2_K as GGML v3, the GQA model as GGUF): each
    generation's first greedy token is llama.cpp's for the model loaded at that moment (both top-2 margins are
    several times the files' noise floors: 0.105 vs 0.014 and 0.022 vs 0.0005)."""
    d = tmp_path / "models"
    d.mkdir()
    for name in ("fx-q2_K.ggmlv3.bin", "fxgqa-f16.gguf"):
        shutil.copyfile(fixtures_dir / "models" / name, d / name)
    mgr = ModelManager(Settings(model_dir=str(d), n_ctx=128, n_threads=1))
    greedy = SamplingParams(temperature=0.0, top_k=1, repetition_penalty=1.0, seed=1)
    models = {m["name"]: m for m in fixture_index["models"]}

    def first_token(name, model):
        mgr.load(name)
        req = GenerationRequest(tokens=models[model]["tokens"], max_tokens=2, sampling=greedy, add_bos=False)
        out = list(mgr.generate(req))
        assert out[-1].finish_reason is not None
        return [t for ev in out for t in ev.token_ids][0], mgr.model_info()

    tok, info = first_token("fx-q2_K.ggmlv3.bin", "fx-q2_K")
    assert (tok, info["library_name"], info["n_ctx"]) == (models["fx-q2_K"]["greedy"][0], "fx-q2_K.ggmlv3.bin", 128)
    tok, info = first_token("fxgqa-f16.gguf", "fxgqa-f16")
    assert (tok, info["library_name"]) == (models["fxgqa-f16"]["greedy"][0], "fxgqa-f16.gguf")
    tok, _ = first_token("fx-q2_K.ggmlv3.bin", "fx-q2_K")
    assert tok == models["fx-q2_K"]["greedy"][0]
    mgr.unload()
    assert mgr.loaded_name is None


def test_prefetch_reports_progress_over_every_part(tmp_path):
    from airobackend.manager import prefetch
    parts = [tmp_path / "m.z01", tmp_path / "m.zip"]
    parts[0].write_bytes(b"a" * 3000)
    parts[1].write_bytes(b"b" * 1000)
    seen = []
    prefetch(parts, seen.append, 0.0, 0.8, chunk=1000)
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_parse_load_options_takes_our_names_and_each_protocols_spelling():
    """The core knows its own option names; each adapter brings its protocol's (text-generation-webui's load args,
    KoboldCpp's config fields), checked as ours are and named as the client wrote them."""
    from airobackend.adapters.kobold import config_overrides
    from airobackend.adapters.textgen import load_options
    from airobackend.manager import parse_load_options
    assert parse_load_options(None) == {}
    assert parse_load_options({"n_ctx": 4096, "threads": 2, "contextsize": 8192}) == {"n_ctx": 4096}
    got = load_options({"n_ctx": 4096, "threads": "2", "no_mmap": True, "compress_pos_emb": 4,
                        "instruction_template": "Vicuna-v1.1", "allow_disk": "true", "n_gpu_layers": 40,
                        "loader": "llama.cpp", "wbits": "None", "contextsize": None})
    assert got == {"n_ctx": 4096, "n_threads": 2, "use_mmap": False, "rope_freq_scale": 0.25,
                   "template": "Vicuna-v1.1", "allow_disk": True}
    assert config_overrides({"contextsize": 8192, "blasbatchsize": 256}) == {"n_ctx": 8192, "n_batch": 256}
    assert load_options({"contextsize": 8192}) == {} and config_overrides({"max_seq_len": 8192}) == {}
    for bad, field in (({"n_ctx": "big"}, "args.n_ctx"), ({"n_ctx": 10**9}, "args.n_ctx"),
                       ({"threads": 1.5}, "args.threads"), ({"rms_norm_eps": float("nan")}, "args.rms_norm_eps"),
                       ({"allow_disk": "maybe"}, "args.allow_disk"), ({"n_gqa": True}, "args.n_gqa"),
                       ({"template": 5}, "args.template"), ({"max_seq_len": 3}, "args.max_seq_len")):
        with pytest.raises(RequestError, match=field.replace(".", r"\.")):
            load_options(bad)
    with pytest.raises(RequestError, match=r"overrides\.contextsize"):
        config_overrides({"contextsize": "big"})
    with pytest.raises(RequestError, match="must be an object"):
        parse_load_options(["n_ctx", 5])


def test_load_errors_reach_clients_without_paths(library_dir):
    mgr, factory, _ = make(library_dir)
    factory.fail.add("fx-q8_0.gguf")     # raises ModelFileError(path=<absolute path of the file>)
    with pytest.raises(ModelFileError) as info:
        mgr.load("fx-q8_0.gguf")
    assert "fx-q8_0.gguf" in str(info.value) and str(library_dir) not in str(info.value)
    assert str(library_dir) not in mgr.last_error


def test_unknown_template_refused_before_anything_changes(library_dir):
    mgr, factory, _ = make(library_dir)
    with pytest.raises(RequestError, match="unknown prompt template"):
        mgr.load("fx-q2_K.gguf", template="no-such-template")
    assert factory.calls == []


def test_start_load_marks_the_load_before_returning(library_dir):
    mgr, factory, mem = make(library_dir)
    factory.hold = threading.Event()
    entry = mgr.start_load("fx-q2_K.gguf")
    assert entry.name == "fx-q2_K.gguf" and mgr.loading_name == "fx-q2_K.gguf"   # visible at once
    with pytest.raises(EngineBusy):
        mgr.start_load("fx-q8_0.gguf")
    factory.hold.set()
    settle(mgr, lambda: mgr.loading_name is None)
    assert mgr.loaded_name == "fx-q2_K.gguf" and mgr.loading_name is None
    # Refusals come out of start_load itself; a failure later is in last_error.
    mem["bytes"] = 1
    with pytest.raises(InsufficientMemory):
        mgr.start_load("fx-f16.gguf")
    mem["bytes"] = 1 << 50
    factory.fail.add("fx-q8_0.gguf")
    mgr.start_load("fx-q8_0.gguf")
    settle(mgr, lambda: mgr.loading_name is None)
    assert "runs past the end" in mgr.last_error and mgr.loaded_name == "fx-q2_K.gguf"
