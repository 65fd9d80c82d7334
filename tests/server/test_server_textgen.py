"""text-generation-webui legacy API: a `websockets` client replaying the project's own api-example-stream.py and
api-example-chat-stream.py, on the main port and on the legacy streaming port; blocking routes; model actions."""
from __future__ import annotations

import asyncio
import html
import json
import shutil
import threading

import httpx
import pytest
import websockets
from starlette.testclient import TestClient

from airobackend.server import serve_async
from airobackend.settings import Settings

from fakes import free_port, live, make_app, pick_stop, scripted_engine

# text-generation-webui's api-examples/api-example-stream.py request (2023-10-25), with a fixed seed and a
# shorter max_new_tokens so the demo model answers quickly.
EXAMPLE_REQUEST = {
    'max_new_tokens': 24, 'auto_max_new_tokens': False, 'max_tokens_second': 0, 'preset': 'None', 'do_sample': True,
    'temperature': 0.7, 'top_p': 0.1, 'typical_p': 1, 'epsilon_cutoff': 0, 'eta_cutoff': 0, 'tfs': 1, 'top_a': 0,
    'repetition_penalty': 1.18, 'presence_penalty': 0, 'frequency_penalty': 0, 'repetition_penalty_range': 0,
    'top_k': 40, 'min_length': 0, 'no_repeat_ngram_size': 0, 'num_beams': 1, 'penalty_alpha': 0, 'length_penalty': 1,
    'early_stopping': False, 'mirostat_mode': 0, 'mirostat_tau': 5, 'mirostat_eta': 0.1, 'grammar_string': '',
    'guidance_scale': 1, 'negative_prompt': '', 'seed': 1234, 'add_bos_token': True, 'truncation_length': 2048,
    'ban_eos_token': False, 'custom_token_bans': '', 'skip_special_tokens': True, 'stopping_strings': []}


async def example_stream(uri: str, context: str):
    """api-example-stream.py's `run()`, verbatim apart from the URI argument."""
    request = dict(EXAMPLE_REQUEST, prompt=context)
    async with websockets.connect(uri, ping_interval=None) as websocket:
        await websocket.send(json.dumps(request))
        while True:
            incoming_data = await websocket.recv()
            incoming_data = json.loads(incoming_data)
            match incoming_data['event']:
                case 'text_stream':
                    yield incoming_data['text']
                case 'stream_end':
                    return


async def example_chat_stream(uri: str, user_input: str, history: dict):
    """api-example-chat-stream.py's `run()`: yields the whole history each time."""
    request = dict(EXAMPLE_REQUEST, user_input=user_input, history=history, mode='instruct', character='Example',
                   instruction_template='Vicuna-v1.1', your_name='You', regenerate=False, _continue=False,
                   chat_instruct_command='Continue the chat dialogue below.\n\n<|prompt|>')
    async with websockets.connect(uri, ping_interval=None) as websocket:
        await websocket.send(json.dumps(request))
        while True:
            incoming_data = json.loads(await websocket.recv())
            match incoming_data['event']:
                case 'text_stream':
                    yield incoming_data['history']
                case 'stream_end':
                    return


async def collect(agen) -> list:
    return [x async for x in agen]


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_streaming_example_on_the_main_port_matches_blocking_generate(demo_app):
    with live(demo_app) as srv:
        pieces = asyncio.run(collect(example_stream(f"ws://127.0.0.1:{srv.port}/api/v1/stream", "In a hole")))
        blocking = httpx.post(srv.url + "/api/v1/generate", json=dict(EXAMPLE_REQUEST, prompt="In a hole")).json()
    assert "".join(pieces) == blocking["results"][0]["text"]
    assert len(pieces) > 1


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_legacy_streaming_port_serves_the_websocket(demo_engine):
    """Old clients hard-code ws://host:5005/api/v1/stream: `serve` also listens on --textgen-stream-port."""
    port, stream_port = free_port(), free_port()
    app = make_app(demo_engine, port=port, textgen_stream_port=stream_port)
    settings: Settings = app.state.settings
    ready = threading.Event()
    t = threading.Thread(target=lambda: asyncio.run(serve_async(app, settings, ready=lambda _: ready.set())),
                         daemon=True)
    t.start()
    try:
        assert ready.wait(20)
        pieces = asyncio.run(collect(example_stream(f"ws://127.0.0.1:{stream_port}/api/v1/stream", "Hello")))
        assert pieces
        main = asyncio.run(collect(example_stream(f"ws://127.0.0.1:{port}/api/v1/stream", "Hello")))
        assert main == pieces
    finally:
        for s in app.state.servers:
            s.should_exit = True
        t.join(10)


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_chat_stream_example_grows_the_history(demo_app):
    history = {"internal": [["Hi", "Hello!"]], "visible": [["Hi", "Hello!"]]}
    with live(demo_app) as srv:
        states = asyncio.run(collect(example_chat_stream(f"ws://127.0.0.1:{srv.port}/api/v1/chat-stream",
                                                         "Tell me <a> story", history)))
        final = states[-1]
        assert final["internal"][:1] == [["Hi", "Hello!"]]
        user, reply = final["internal"][-1]
        assert user == "Tell me <a> story"
        assert final["visible"][-1] == [html.escape(user), html.escape(reply)]
        for a, b in zip(states, states[1:]):          # each message extends the reply so far
            assert b["internal"][-1][1].startswith(a["internal"][-1][1])
        blocking = httpx.post(srv.url + "/api/v1/chat", json=dict(EXAMPLE_REQUEST, user_input="Tell me <a> story",
                                                                 history=history, mode="instruct")).json()
        assert blocking["results"][0]["history"] == final


def test_chat_regenerate_and_continue(demo_app, demo_engine):
    from airobackend.server import chat_stops

    c = TestClient(demo_app)
    params = {"max_new_tokens": 12, "seed": 5, "ban_eos_token": True}
    fresh = c.post("/api/v1/chat", json=dict(params, user_input="Hi")).json()
    reply = fresh["results"][0]["history"]["internal"][-1][1]
    h = {"internal": [["Hi", "old answer"]], "visible": [["Hi", "old answer"]]}
    r = c.post("/api/v1/chat", json=dict(params, user_input="", history=h, regenerate=True)).json()
    assert r["results"][0]["history"]["internal"] == [["Hi", reply]]       # the same turn, answered anew
    r = c.post("/api/v1/chat", json=dict(params, user_input="", history=h, _continue=True)).json()
    prompt = demo_engine.format_chat([{"role": "user", "content": "Hi"}]) + "old answer"
    more = c.post("/api/v1/generate", json=dict(params, prompt=prompt,
                                                stopping_strings=list(chat_stops(demo_engine)))).json()
    assert r["results"][0]["history"]["internal"] == [["Hi", "old answer" + more["results"][0]["text"]]]
    bad = c.post("/api/v1/chat", json={"history": {"internal": "nope"}})
    assert bad.status_code == 400 and "history" in bad.json()["detail"]["msg"]


def test_blocking_routes(demo_app, demo_engine):
    c = TestClient(demo_app)
    ids = demo_engine.tokenize("count these tokens")
    assert c.post("/api/v1/token-count", json={"prompt": "count these tokens"}).json() == \
        {"results": [{"tokens": len(ids)}]}
    assert c.post("/api/v1/stop-stream", json={}).json() == {"results": "success"}
    info = c.post("/api/v1/model", json={"action": "info"}).json()["result"]
    assert info["model_name"] == demo_engine.model_info()["name"] and info["lora_names"] == []
    assert info["shared.settings"]["truncation_length"] == 256
    assert c.post("/api/v1/model", json={}).json() == {"result": demo_engine.model_info()["name"]}


def test_stop_strings_are_cut_from_the_output(demo_app):
    c = TestClient(demo_app)
    base = {"prompt": "The old llama said", "max_new_tokens": 40, "seed": 9, "ban_eos_token": True}
    text = c.post("/api/v1/generate", json=base).json()["results"][0]["text"]
    i, stop = pick_stop(text)
    r = c.post("/api/v1/generate", json=dict(base, stopping_strings=[stop]))
    assert r.json()["results"][0]["text"] == text[:i]
    with c.websocket_connect("/api/v1/stream") as ws:
        ws.send_text(json.dumps(dict(base, stopping_strings=[stop])))
        streamed = ""
        while (m := ws.receive_json())["event"] == "text_stream":
            streamed += m["text"]
        assert streamed == text[:i] and m == {"event": "stream_end", "message_num": m["message_num"]}


def test_websocket_exact_messages_and_errors_keep_the_socket():
    engine, _ = scripted_engine("abc")
    c = TestClient(make_app(engine))
    with c.websocket_connect("/api/v1/stream") as ws:
        ws.send_text('{"prompt": "x"}')
        msgs = []
        while True:
            raw = ws.receive_text()
            msgs.append(raw)
            if '"stream_end"' in raw:
                break
        assert [json.loads(m) for m in msgs] == [
            {"event": "text_stream", "message_num": 0, "text": "a"},
            {"event": "text_stream", "message_num": 1, "text": "b"},
            {"event": "text_stream", "message_num": 2, "text": "c"},
            {"event": "stream_end", "message_num": 3}]
        ws.send_text("{broken")
        err = ws.receive_json()
        assert err["event"] == "error" and "invalid JSON" in err["message"]
        assert ws.receive_json() == {"event": "stream_end", "message_num": 1}
        ws.send_text('{"prompt": "x", "max_new_tokens": "ten"}')
        assert "max_new_tokens" in ws.receive_json()["message"]
        assert ws.receive_json()["event"] == "stream_end"
        ws.send_text(json.dumps({"prompt": "x", "dry_sequence_breakers": ["x"] * 10_000}))
        assert "dry_sequence_breakers" in ws.receive_json()["message"]
        assert ws.receive_json()["event"] == "stream_end"
        ws.send_text('{"prompt": "x", "max_new_tokens": 2}')         # the same socket still serves
        assert ws.receive_json()["text"] == "a"


def test_model_actions_with_the_model_manager(tmp_path, demo_engine):
    from airobackend.manager import ModelManager

    folder = tmp_path / "models"
    folder.mkdir()
    src = demo_engine.model_info()["path"]
    shutil.copy(src, folder / "tiny-demo.gguf")
    manager = ModelManager(Settings(model_dir=str(folder), n_ctx=128))
    c = TestClient(make_app(manager, model_dir=str(folder), n_ctx=128))
    assert c.get("/api/v1/model").json() == {"result": "ReadOnly"}      # KoboldAI's "no model"
    listed = c.post("/api/v1/model", json={"action": "list"}).json()["result"]
    assert listed[0] == "None" and "tiny-demo.gguf" in listed
    r = c.post("/api/v1/model", json={"action": "load", "model_name": "tiny-demo.gguf", "args": {"n_ctx": 96}})
    assert r.json()["result"]["model_name"] == "tiny-demo.gguf"
    assert c.get("/api/extra/true_max_context_length").json()["value"] == 96
    r = c.post("/api/v1/model", json={"action": "load", "model_name": "missing.gguf"}).json()
    assert "error" in r and "missing.gguf" in r["error"]["message"]
    assert c.post("/api/v1/generate", json={"prompt": "x", "max_length": 2}).status_code == 200  # still serving
    assert c.post("/api/v1/model", json={"action": "unload"}).json()["result"]["model_name"] == "None"
    r = c.post("/api/v1/generate", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["detail"]["type"] == "service_unavailable"
    r = c.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"


def test_model_actions_without_a_manager_say_so(demo_model):
    from airobackend.engine import Engine
    from airobackend.llama import Llama

    engine = Engine(Llama(model_path=demo_model, n_ctx=64, verbose=False), Settings(n_ctx=64))
    c = TestClient(make_app(engine, n_ctx=64))
    r = c.post("/api/v1/model", json={"action": "list"}).json()
    assert "not available" in r["error"]["message"]
    assert c.post("/api/v1/model", json={"action": "info"}).json()["result"]["model_name"] == \
        engine.model_info()["name"]


def test_textgen_alone_answers_the_shared_routes(demo_engine):
    """With the kobold adapter disabled, GET /api/v1/model and POST /api/v1/generate are text-generation-webui's."""
    c = TestClient(make_app(demo_engine, disable_adapters=("kobold",)))
    assert c.get("/api/v1/model").json() == {"result": demo_engine.model_info()["name"]}
    r = c.post("/api/v1/generate", json={"prompt": "x", "max_length": 5, "ban_eos_token": True})
    assert set(r.json()["results"][0]) == {"text"} and demo_engine.perf()["last_token_count"] == 5
    assert c.get("/api/extra/version").status_code == 404


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_a_busy_legacy_port_does_not_stop_the_server(demo_engine):
    import socket

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = make_app(demo_engine, port=port, textgen_stream_port=taken.getsockname()[1])
        ready = threading.Event()
        t = threading.Thread(target=lambda: asyncio.run(serve_async(app, app.state.settings,
                                                                    ready=lambda _: ready.set())), daemon=True)
        t.start()
        try:
            assert ready.wait(20)
            assert len(app.state.servers) == 1
            assert httpx.get(f"http://127.0.0.1:{port}/api/extra/version").status_code == 200
        finally:
            for s in app.state.servers:
                s.should_exit = True
            t.join(10)


def test_real_model_generate_and_chat(real_app):
    """text-generation-webui's legacy routes on the real model: a greedy answer, stop strings on its text, and the
    chat route rendered with the file's template."""
    c = TestClient(real_app)
    base = {"prompt": "The capital of France is", "max_new_tokens": 24, "do_sample": False,
            "repetition_penalty": 1.0}
    text = c.post("/api/v1/generate", json=base).json()["results"][0]["text"]
    assert "Paris" in text
    i, stop = pick_stop(text)
    assert c.post("/api/v1/generate", json=dict(base, stopping_strings=[stop])).json()["results"][0]["text"] == \
        text[:i]
    r = c.post("/api/v1/chat", json={"user_input": "What color is the sky?", "max_new_tokens": 24,
                                     "do_sample": False, "repetition_penalty": 1.0}).json()
    assert "blue" in r["results"][0]["history"]["visible"][-1][1]
