"""The text-generation-webui extension, driven the way the web UI and its OpenAI API drive it (textgen_host/README.md).

Every generation is compared with what the engine itself produces for the same prompt and settings: the extension must
hand the host exactly that text, as cumulative values, and stop when the host says so.
"""
from __future__ import annotations

import threading
import time

import pytest

from integration_support import N_CTX, engine_text
from textgen_harness import TextgenHost, default_state

PROMPT = "Once upon a time, in a quiet village by the sea,"
# Greedy and EOS banned: a deterministic text of a known length on any model, random fixture weights included.
GREEDY = dict(top_k=1, ban_eos_token=True, repetition_penalty=1.0, truncation_length=N_CTX)
GREEDY_ENGINE = dict(top_k=1, ban_eos=True, repetition_penalty=1.0)


@pytest.fixture
def host(tmp_path):
    h = TextgenHost(tmp_path / "text-generation-webui")
    yield h
    h.close()


def start_in_process(host: TextgenHost, model: str, call_form: str = "current") -> None:
    host.start(settings={"airobackend-model": model, "airobackend-n_ctx": N_CTX}, call_form=call_form)


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


@pytest.mark.parametrize("call_form", ["v2.8.1", "current"])
def test_yields_cumulative_text_equal_to_the_engine(host, model_path, call_form):
    start_in_process(host, model_path, call_form)
    values = host.generate(PROMPT, default_state(max_new_tokens=24, **GREEDY))
    expected = engine_text(model_path, PROMPT, 24, **GREEDY_ENGINE)
    assert expected
    assert values[0] == "", "outside chat the built-in loaders yield '' first; the API relies on the same shape"
    assert_cumulative(values)
    assert values[-1] == expected
    assert len(set(values)) > 3, "streamed token by token, not as one block"


def test_chat_mode_starts_with_text_and_ends_with_the_engine_text(host, fx_model):
    start_in_process(host, fx_model)
    values = host.generate(PROMPT, default_state(max_new_tokens=12, **GREEDY), is_chat=True)
    assert values[0] != ""
    assert_cumulative(values)
    assert values[-1] == engine_text(fx_model, PROMPT, 12, **GREEDY_ENGINE)


def test_non_streaming_request_gets_the_whole_reply_once(host, fx_model):
    start_in_process(host, fx_model)
    values = host.generate(PROMPT, default_state(max_new_tokens=12, stream=False, **GREEDY))
    assert values == [engine_text(fx_model, PROMPT, 12, **GREEDY_ENGINE)]


@pytest.mark.parametrize("where", ["custom_stopping_strings", "stopping_strings", "string_form"])
def test_stop_string_cuts_the_reply_and_frees_the_engine(host, fx_model, where):
    start_in_process(host, fx_model)
    full = engine_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)
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
    reference = engine_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)
    assert values[-1][:len(reference)] == reference[:len(values[-1])], "what it made before the stop is the engine's"
    host.shared.stop_everything = False
    assert host.generate(PROMPT, default_state(max_new_tokens=8, **GREEDY))[-1] == \
        engine_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)


def test_tokenizer_serves_the_hosts_encode_decode_and_token_counter(host, model_path):
    start_in_process(host, model_path)
    ids = host.script.backend.tokenize(PROMPT, add_bos=True)
    encoded = host.tg.encode(PROMPT)
    assert [int(t) for t in encoded[0]] == ids and ids[0] == 1
    assert host.tg.decode(encoded[0]) == PROMPT
    assert host.tg.get_encoded_length(PROMPT) == len(ids)
    assert host.tg.decode([int(t) for t in host.tg.encode(PROMPT, add_bos_token=False)[0]]) == PROMPT


def test_openai_api_stream_through_the_host(host, model_path):
    start_in_process(host, model_path)
    chunks, answer, usage = host.tg.openai_stream_completion(PROMPT, default_state(max_new_tokens=24, **GREEDY))
    assert answer == engine_text(model_path, PROMPT, 24, **GREEDY_ENGINE)
    # The host holds back every chunk from a U+FFFD on (its partial-character guard), which random fixture
    # weights can produce; up to there the deltas must add up to the answer exactly.
    streamed = "".join(chunks)
    assert answer.startswith(streamed) and len(chunks) > 3
    if "\ufffd" not in answer:
        assert streamed == answer
    assert usage["prompt_tokens"] == len(host.script.backend.tokenize(PROMPT))


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


@pytest.mark.parametrize("call_form", ["v2.8.1", "current"])
def test_seed_from_either_calling_convention_reproduces_the_engine(host, fx_model, call_form):
    start_in_process(host, fx_model, call_form)
    state = default_state(max_new_tokens=20, seed=1234, ban_eos_token=True, truncation_length=N_CTX,
                          mirostat_mode=0, **SAMPLED)
    first = host.generate(PROMPT, state)[-1]
    assert first == engine_text(fx_model, PROMPT, 20, seed=1234, ban_eos=True, **SAMPLED)
    assert host.generate(PROMPT, dict(state, seed=4321))[-1] != first


# ------------------------------------------------------------------------------------------------- remote mode

def start_remote(host: TextgenHost, server, call_form: str = "current") -> None:
    host.start(settings={"airobackend-mode": "remote", "airobackend-server_url": server.url}, call_form=call_form)


@pytest.mark.parametrize("call_form", ["v2.8.1", "current"])
def test_remote_mode_streams_the_servers_text(host, fx_server, fx_model, call_form):
    start_remote(host, fx_server, call_form)
    assert host.shared.model_name
    values = host.generate(PROMPT, default_state(max_new_tokens=24, **GREEDY))
    assert values[0] == ""
    assert_cumulative(values)
    assert values[-1] == engine_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)


def test_remote_mode_forwards_every_sampler_setting(host, fx_server, fx_model):
    """A seeded sampled generation on the server equals the engine's own only if seed, top_p, the repetition
    penalty and its range all arrive."""
    start_remote(host, fx_server)
    state = default_state(max_new_tokens=20, seed=1234, ban_eos_token=True, truncation_length=N_CTX, **SAMPLED)
    assert host.generate(PROMPT, state)[-1] == engine_text(fx_model, PROMPT, 20, seed=1234, ban_eos=True, **SAMPLED)


def test_remote_mode_stop_string_and_tokenizer(host, fx_server, fx_model):
    start_remote(host, fx_server)
    full = engine_text(fx_model, PROMPT, 24, **GREEDY_ENGINE)
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
        engine_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)


def test_remote_mode_sends_the_api_key(host, fx_server_with_key, fx_model, capsys):
    server = fx_server_with_key
    host.start(settings={"airobackend-mode": "remote", "airobackend-server_url": server.url})
    assert host.shared.model is None and "401" in capsys.readouterr().out, "no key: refused, reported, UI stays up"
    host.script.params["api_key"] = server.api_key
    host.script.connect()
    assert host.generate(PROMPT, default_state(max_new_tokens=8, **GREEDY))[-1] == \
        engine_text(fx_model, PROMPT, 8, **GREEDY_ENGINE)


# ------------------------------------------------------------------------------------------------- set-up paths

def test_a_bad_model_does_not_take_the_web_ui_down_and_generation_names_it(host, fx_model, capsys):
    host.start(settings={"airobackend-model": "/nowhere/airoboros-65b.q4_K_M.bin"})
    assert host.shared.model is None and "not connected yet" in capsys.readouterr().out
    with pytest.raises(Exception, match="airoboros-65b.q4_K_M"):
        host.generate(PROMPT, default_state(max_new_tokens=4, **GREEDY))


def test_ui_apply_reconnects_with_the_new_settings(host, fx_model, demo_model, monkeypatch):
    """The UI block's Apply button (wired through a recording stand-in for gradio) switches the model."""
    import sys
    import types

    recorded = {}

    class Component:
        def __init__(self, *args, **kwargs):
            self.kwargs = kwargs

        def click(self, fn, inputs, outputs):
            recorded["apply"] = (fn, inputs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    gradio = types.ModuleType("gradio")
    for name in ("Accordion", "Radio", "Dropdown", "Textbox", "Number", "Markdown", "Button"):
        setattr(gradio, name, Component)
    monkeypatch.setitem(sys.modules, "gradio", gradio)

    start_in_process(host, fx_model)
    host.script.ui()
    fn, inputs = recorded["apply"]
    values = [c.kwargs.get("value") for c in inputs]
    assert values[0] == "in-process" and values[1] == fx_model
    assert any(name.startswith("fx-q4_0") for name in inputs[1].kwargs["choices"]), "the library in the dropdown"
    values[1] = demo_model
    status = fn(*values)
    assert status.startswith("Connected: airobackend-demo"), status
    assert host.shared.model_name.startswith("airobackend-demo")
    assert host.generate(PROMPT, default_state(max_new_tokens=12, **GREEDY))[-1] == \
        engine_text(demo_model, PROMPT, 12, **GREEDY_ENGINE)


def test_older_callers_passing_is_chat_positionally(host, fx_model):
    """Extensions and hosts from 2023 call `(question, original_question, seed, state, stopping_strings, is_chat)`."""
    start_in_process(host, fx_model)
    state = default_state(max_new_tokens=6, **GREEDY)
    chat = list(host.script.custom_generate_reply(PROMPT, PROMPT, 7, state, [], True))
    plain = list(host.script.custom_generate_reply(PROMPT, PROMPT, 7, state, []))
    assert chat[0] != "" and plain[0] == "" and chat[-1] == plain[-1] == \
        engine_text(fx_model, PROMPT, 6, **GREEDY_ENGINE)
