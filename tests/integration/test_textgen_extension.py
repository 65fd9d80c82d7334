"""The text-generation-webui extension, driven the way the web UI and its OpenAI API drive it (textgen_host/README.md),
in both generations of the host: v2.8.1 and today's.

Every generation is compared with what the engine itself produces for the same prompt and settings: the extension must
hand the host exactly that text (less U+FFFD, see `shown_text`), as cumulative values, and stop when the host says so.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import types

import httpx
import pytest

from integration_support import N_CTX, Server, engine_text
from textgen_harness import TextgenHost, default_state

PROMPT = "Once upon a time, in a quiet village by the sea,"
# Greedy and EOS banned: a deterministic text of a known length on any model, random fixture weights included.
GREEDY = dict(top_k=1, ban_eos_token=True, repetition_penalty=1.0, truncation_length=N_CTX)
GREEDY_ENGINE = dict(top_k=1, ban_eos=True, repetition_penalty=1.0)


@pytest.fixture(params=["v2.8.1", "current"])
def host(tmp_path, request):
    h = TextgenHost(tmp_path / "text-generation-webui", generation=request.param)
    yield h
    h.close()


def shown_text(path: str, prompt: str, max_tokens: int, **sampling) -> str:
    """What the web UI must show for a generation: the engine's text less U+FFFD (see `_without_replacement_chars`
    in the extension: the host drops streamed pieces that hold one)."""
    return engine_text(path, prompt, max_tokens, **sampling).replace("\ufffd", "")


def start_in_process(host: TextgenHost, model: str) -> None:
    host.start(settings={"airobackend-model": model, "airobackend-n_ctx": N_CTX})


def assert_cumulative(values: list[str]) -> None:
    for before, after in zip(values, values[1:]):
        assert after.startswith(before), (before, after)


def test_settings_yaml_applies_before_setup_and_setup_installs_model(host, fx_model):
    start_in_process(host, fx_model)
    assert host.script.params["model"] == fx_model and host.script.params["n_ctx"] == N_CTX
    assert host.shared.model is not None, "the chat tab and the OpenAI API refuse to generate without shared.model"
    assert host.shared.model_name.startswith("fx-q4_0")   # the library name of the file
    assert host.shared.settings["truncation_length"] == N_CTX
    assert host.shared.tokenizer.bos_token_id == 1


def test_yields_cumulative_text_equal_to_the_engine(host, model_path):
    start_in_process(host, model_path)
    values = host.generate(PROMPT, default_state(max_new_tokens=24, **GREEDY))
    expected = shown_text(model_path, PROMPT, 24, **GREEDY_ENGINE)
    assert expected
    assert values[0] == "", "outside chat the built-in loaders yield '' first; the API relies on the same shape"
    assert_cumulative(values)
    assert values[-1] == expected
    assert len(set(values)) > 3, "streamed token by token, not as one block"


def test_chat_mode_starts_with_text_and_ends_with_the_shown_text(host, fx_model):
    start_in_process(host, fx_model)
    values = host.generate(PROMPT, default_state(max_new_tokens=12, **GREEDY), is_chat=True)
    assert values[0] != ""
    assert_cumulative(values)
    assert values[-1] == shown_text(fx_model, PROMPT, 12, **GREEDY_ENGINE)


def test_non_streaming_request_gets_the_whole_reply_once(host, fx_model):
    start_in_process(host, fx_model)
    values = host.generate(PROMPT, default_state(max_new_tokens=12, stream=False, **GREEDY))
    assert values == [shown_text(fx_model, PROMPT, 12, **GREEDY_ENGINE)]


@pytest.mark.parametrize("where", ["custom_stopping_strings", "stopping_strings", "string_form"])
def test_stop_string_cuts_the_reply_and_frees_the_engine(host, fx_model, where):
    start_in_process(host, fx_model)
    full = shown_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[:full.find(stop)]
    state = default_state(max_new_tokens=24, **GREEDY)
    stopping_strings = None
    if where == "custom_stopping_strings":
        state["custom_stopping_strings"] = [stop]
    elif where == "stopping_strings":
        stopping_strings = [stop]
    else:  # the UI's text box: a comma-separated list of quoted strings
        state["custom_stopping_strings"] = f'{stop!r}, "never-matches-this"'
    values = host.generate(PROMPT, state, stopping_strings)
    assert values[-1] == cut
    assert all(stop not in v for v in values)
    # The engine is free again: the next request runs to its end with the same text.
    assert host.generate(PROMPT, default_state(max_new_tokens=24, **GREEDY))[-1] == full


def _press_stop_when_generating(host: TextgenHost, press) -> threading.Thread:
    """Press Stop once the engine has produced some text (watched through its partial text, by genkey)."""
    backend = host.script.backend
    streams = []
    generate = backend.stream
    backend.stream = lambda prompt, options: streams.append(generate(prompt, options)) or streams[-1]

    def run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if streams and len(backend.engine.partial_text(streams[0].genkey)) > 8:
                break
            time.sleep(0.001)
        press()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("how", ["stop_everything", "stop_event"])
def test_stop_button_ends_a_running_generation(host, fx_model, how):
    """Non-streaming, so the host sees nothing until the end: only the extension can notice the Stop button."""
    start_in_process(host, fx_model)
    max_new = N_CTX - 64
    state = default_state(max_new_tokens=max_new, stream=False, **GREEDY)
    if how == "stop_event":
        state["stop_event"] = threading.Event()
        press = state["stop_event"].set
    else:
        press = host.tg.stop_everything_event
    presser = _press_stop_when_generating(host, press)
    values = host.generate(PROMPT, state)
    presser.join(5)
    n_generated = len(host.script.backend.tokenize(values[-1], add_bos=False))
    assert 0 < n_generated < max_new // 2
    reference = shown_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)
    assert values[-1][:len(reference)] == reference[:len(values[-1])], "what it made before the stop is the engine's"
    host.shared.stop_everything = False
    assert host.generate(PROMPT, default_state(max_new_tokens=8, **GREEDY))[-1] == \
        shown_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)


def test_tokenizer_serves_the_hosts_encode_decode_and_token_counter(host, model_path):
    start_in_process(host, model_path)
    ids = host.script.backend.tokenize(PROMPT, add_bos=True)
    encoded = host.tg.encode(PROMPT)
    assert [int(t) for t in encoded[0]] == ids and ids[0] == 1
    assert host.tg.decode(encoded[0]) == PROMPT
    assert host.tg.get_encoded_length(PROMPT) == len(ids)
    assert host.tg.decode([int(t) for t in host.tg.encode(PROMPT, add_bos_token=False)[0]]) == PROMPT


def complete(host: TextgenHost, stream: bool, **body) -> tuple[str, dict]:
    """`POST /v1/completions` as an OpenAI client sends it: the text (streamed: the deltas joined) and the usage."""
    body = dict(prompt=PROMPT, stream=stream, **body)
    if not stream:
        r = host.api.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["usage"]
    text, usage = "", None
    with host.api.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                text += chunk["choices"][0]["text"]
                usage = chunk.get("usage") or usage
    return text, usage


def test_openai_api_streamed_and_whole_completions_are_the_same_text(host, model_path):
    start_in_process(host, model_path)
    whole, usage = complete(host, False, max_tokens=24, **GREEDY)
    streamed, stream_usage = complete(host, True, max_tokens=24, **GREEDY)
    assert whole == streamed == shown_text(model_path, PROMPT, 24, **GREEDY_ENGINE)
    assert usage == stream_usage and usage["prompt_tokens"] == len(host.script.backend.tokenize(PROMPT))


def test_bytes_that_are_no_utf8_do_not_cut_the_streamed_answer(host, fx_model):
    """The fixture model's random weights make byte tokens that are no UTF-8: the engine's text holds U+FFFD there.
    The host drops every streamed piece containing one, so the answer must reach it without them, whole."""
    raw = engine_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)
    first = raw.index("\ufffd")              # the case is there
    start_in_process(host, fx_model)
    streamed, _ = complete(host, True, max_tokens=24, **GREEDY)
    assert streamed == raw.replace("\ufffd", "") and len(streamed) > first
    assert complete(host, False, max_tokens=24, **GREEDY)[0] == streamed
    assert host.generate(PROMPT, default_state(max_new_tokens=24, **GREEDY))[-1] == streamed


def test_prompt_longer_than_the_context_is_left_truncated_like_the_host_does(host, fx_model):
    start_in_process(host, fx_model)
    long_prompt = " ".join(f"line {i}: the sea was calm." for i in range(200))
    backend = host.script.backend
    ids = backend.tokenize(long_prompt)
    assert len(ids) > N_CTX
    # truncation_length above the model's context: the extension clamps it to the context it has.
    values = host.generate(long_prompt, default_state(max_new_tokens=16, **dict(GREEDY, truncation_length=4096)))
    from airobackend.types import GenerationRequest, SamplingParams
    req = GenerationRequest(tokens=ids[-(N_CTX - 16):], max_tokens=16, sampling=SamplingParams(**GREEDY_ENGINE))
    assert values[-1] == "".join(ev.text for ev in backend.engine.generate(req))
    assert len(backend.tokenize(values[-1], add_bos=False)) >= 12


SAMPLED = dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, typical_p=1.0, tfs=1.0, top_a=0.0,
               repetition_penalty=1.1, repetition_penalty_range=64, presence_penalty=0.0, frequency_penalty=0.0)


def test_seed_from_either_calling_convention_reproduces_the_engine(host, fx_model):
    start_in_process(host, fx_model)
    state = default_state(max_new_tokens=20, seed=1234, ban_eos_token=True, truncation_length=N_CTX,
                          mirostat_mode=0, **SAMPLED)
    first = host.generate(PROMPT, state)[-1]
    assert first == shown_text(fx_model, PROMPT, 20, seed=1234, ban_eos=True, **SAMPLED)
    assert host.generate(PROMPT, dict(state, seed=4321))[-1] != first


# ------------------------------------------------------------------------------------------------- remote mode

def start_remote(host: TextgenHost, server) -> None:
    host.start(settings={"airobackend-mode": "remote", "airobackend-server_url": server.url})


def test_remote_mode_streams_the_servers_text(host, fx_server, fx_model):
    start_remote(host, fx_server)
    assert host.shared.model_name
    values = host.generate(PROMPT, default_state(max_new_tokens=24, **GREEDY))
    assert values[0] == ""
    assert_cumulative(values)
    assert values[-1] == shown_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)


def test_remote_mode_forwards_every_sampler_setting(host, fx_server, fx_model):
    """A seeded sampled generation on the server equals the engine's own only if seed, top_p, the repetition
    penalty and its range all arrive."""
    start_remote(host, fx_server)
    state = default_state(max_new_tokens=20, seed=1234, ban_eos_token=True, truncation_length=N_CTX, **SAMPLED)
    assert host.generate(PROMPT, state)[-1] == shown_text(fx_model, PROMPT, 20, seed=1234, ban_eos=True, **SAMPLED)


def test_remote_mode_stop_string_and_tokenizer(host, fx_server, fx_model):
    start_remote(host, fx_server)
    full = shown_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    values = host.generate(PROMPT, default_state(max_new_tokens=24, custom_stopping_strings=[stop], **GREEDY))
    assert values[-1] == full[:full.find(stop)]
    assert host.tg.decode(host.tg.encode(PROMPT)[0]) == PROMPT
    assert host.tg.get_encoded_length(PROMPT) == len(host.tg.encode(PROMPT)[0])


def test_remote_mode_stop_button_closes_the_stream(host, fx_server, fx_model):
    start_remote(host, fx_server)
    max_new = N_CTX - 64
    stream_state = default_state(max_new_tokens=max_new, **GREEDY)
    got = []
    for value in host.tg.generate_reply(PROMPT, stream_state, None, is_chat=False):
        got.append(value)
        if len(got) == 4:
            host.tg.stop_everything_event()
    n_generated = len(host.script.backend.tokenize(got[-1], add_bos=False))
    assert 0 < n_generated < max_new // 2
    host.shared.stop_everything = False
    assert host.generate(PROMPT, default_state(max_new_tokens=8, **GREEDY))[-1] == \
        shown_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)


def test_remote_mode_sends_the_api_key(host, fx_server_with_key, fx_model, capsys):
    server = fx_server_with_key
    host.start(settings={"airobackend-mode": "remote", "airobackend-server_url": server.url})
    assert host.shared.model_name == host.script.NOT_CONNECTED and "401" in capsys.readouterr().out
    r = host.api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 503 and "401" in r.json()["detail"], "no key: refused, and the API client is told why"
    host.script.params["api_key"] = server.api_key
    host.script.connect()
    assert host.generate(PROMPT, default_state(max_new_tokens=8, **GREEDY))[-1] == \
        shown_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)


# ------------------------------------------------------------------------------------------------- set-up paths

class FakeGradio(types.ModuleType):
    """A recording stand-in for gradio: its components remember their arguments, `Error` is its exception whose
    message the web UI shows (any other exception shows as a bare "Error")."""

    def __init__(self):
        super().__init__("gradio")
        self.recorded = {}
        recorded = self.recorded

        class Component:
            def __init__(self, *args, **kwargs):
                self.kwargs = kwargs
                recorded.setdefault(type(self).__name__, []).append(self)

            def click(self, fn, inputs, outputs):
                recorded["apply"] = (fn, inputs)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        for name in ("Accordion", "Radio", "Dropdown", "Textbox", "Number", "Markdown", "Button"):
            setattr(self, name, type(name, (Component,), {}))

        class Error(Exception):
            def __init__(self, message="Error raised.", duration=10, visible=True):
                super().__init__(message)
                self.message, self.duration, self.visible = message, duration, visible

        self.Error = Error


@pytest.fixture
def gradio(monkeypatch):
    fake = FakeGradio()
    monkeypatch.setitem(sys.modules, "gradio", fake)
    return fake


def test_a_failed_load_is_shown_in_the_ui_and_the_api_and_the_next_use_retries(host, fx_model, gradio, capsys):
    host.start(settings={"airobackend-model": "/nowhere/airoboros-65b.q4_K_M.bin"})
    assert "airoboros-65b.q4_K_M" in capsys.readouterr().out, "the console says why"
    # a placeholder model, so that the host's own "no model is loaded" checks pass and every use comes here
    assert host.shared.model is not None and host.shared.model_name == host.script.NOT_CONNECTED
    # the web UI: the error is a gradio.Error carrying the reason, and the settings block shows it
    with pytest.raises(gradio.Error, match="airoboros-65b.q4_K_M"):
        host.generate(PROMPT, default_state(max_new_tokens=4, **GREEDY))
    host.script.ui()
    assert "airoboros-65b.q4_K_M" in gradio.recorded["Markdown"][0].kwargs["value"]
    # the OpenAI API: 503 with the reason (a streamed answer has sent its 200 before the error: it just ends)
    r = host.api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 503 and "airoboros-65b.q4_K_M" in r.json()["detail"], r.text
    # fixed without a restart: the next use connects
    host.script.params["model"] = fx_model
    assert complete(host, False, max_tokens=8, **GREEDY)[0] == shown_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)
    assert host.shared.model_name.startswith("fx-q4_0")


@pytest.mark.e2e       # `airobackend serve` as a subprocess
def test_a_server_that_goes_away_after_connecting_is_shown_in_the_ui_and_the_api(host, fx_model, gradio, tmp_path):
    """Remote mode, connected, then the server unloads its model and later stops: each request says why, in the
    web UI (gradio.Error) and the API (503 with the reason), as a failed connection does; not a bare 500."""
    server = Server(fx_model, tmp_path / "serve.log")
    try:
        start_remote(host, server)
        assert complete(host, False, max_tokens=8, **GREEDY)[0] == shown_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)
        assert httpx.post(server.url + "/v1/internal/model/unload").status_code == 200
        r = host.api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 503 and "HTTP 503" in r.json()["detail"], r.text
    finally:
        server.stop()
    with pytest.raises(gradio.Error, match="cannot reach airobackend|lost the connection"):
        host.generate(PROMPT, default_state(max_new_tokens=4, **GREEDY))
    with pytest.raises(gradio.Error, match="cannot reach airobackend"):
        host.tg.encode(PROMPT)
    r = host.api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 503 and server.url in r.json()["detail"], r.text


def test_ui_apply_reconnects_with_the_new_settings(host, fx_model, demo_model, gradio):
    """The UI block's Apply button switches the model."""
    start_in_process(host, fx_model)
    host.script.ui()
    fn, inputs = gradio.recorded["apply"]
    values = [c.kwargs.get("value") for c in inputs]
    assert values[0] == "in-process" and values[1] == fx_model
    assert any(name.startswith("fx-q4_0") for name in inputs[1].kwargs["choices"]), "the library in the dropdown"
    values[1] = str(demo_model)
    status = fn(*values)
    assert status.startswith("Connected: airobackend-demo"), status
    assert host.shared.model_name.startswith("airobackend-demo")
    assert host.generate(PROMPT, default_state(max_new_tokens=12, **GREEDY))[-1] == \
        shown_text(demo_model, PROMPT, 12, **GREEDY_ENGINE)
    values[1] = "/nowhere/else.gguf"      # in-process, the old model is freed before the next one loads
    assert fn(*values).startswith("Error: airobackend: cannot connect") and "else.gguf" in host.script.last_error
    assert host.shared.model_name == host.script.NOT_CONNECTED


def test_todays_web_ui_loads_the_extension_from_user_data(tmp_path, fx_model):
    """Today's web UI prefers `user_data/extensions/<name>/script.py`, loaded as a plain module from its file."""
    host = TextgenHost(tmp_path / "text-generation-webui", generation="current", user_extensions=True)
    try:
        start_in_process(host, fx_model)
        assert host.script.__name__ == "user_ext_airobackend"
        assert host.generate(PROMPT, default_state(max_new_tokens=8, **GREEDY))[-1] == \
            shown_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)
    finally:
        host.close()


def test_older_callers_passing_is_chat_positionally(host, fx_model):
    """Extensions and hosts from 2023 call `(question, original_question, seed, state, stopping_strings, is_chat)`."""
    start_in_process(host, fx_model)
    state = default_state(max_new_tokens=6, **GREEDY)
    chat = list(host.script.custom_generate_reply(PROMPT, PROMPT, 7, state, [], True))
    plain = list(host.script.custom_generate_reply(PROMPT, PROMPT, 7, state, []))
    assert chat[0] != "" and plain[0] == "" and chat[-1] == plain[-1] == \
        shown_text(fx_model, PROMPT, 6, **GREEDY_ENGINE)
