"""The LoLLMS binding, loaded and called the way LoLLMS 11.0.0 and today's lollms-webui do (lollms_standin/README.md).

Every test runs in both generations of the host; what only one generation does is marked so.
"""
from __future__ import annotations

import shutil
import sys
import threading

import pytest
import yaml

from integration_support import N_CTX, engine_text
from lollms_harness import LollmsHost, Personality

PROMPT = "Once upon a time, in a quiet village by the sea,"
# LoLLMS passes these llama.cpp-named parameters; top_k=1 makes the text deterministic on any model.
GPT_PARAMS = dict(temperature=0.7, top_k=1, top_p=0.95, repeat_penalty=1.0, repeat_last_n=64)
ENGINE_PARAMS = dict(temperature=0.7, top_k=1, top_p=0.95, repetition_penalty=1.0, repetition_penalty_range=64)


@pytest.fixture(params=["11.0.0", "webui"])
def lollms(tmp_path, request):
    host = LollmsHost(tmp_path, generation=request.param)
    yield host
    host.close()


def built(lollms: LollmsHost, model: str = "", **binding_settings):
    """Select the binding (first start installs it), set its settings as the UI would, then build the model."""
    b = lollms.build(model_name=model)
    for key, value in dict(dict(ctx_size=N_CTX), **binding_settings).items():
        setattr(b.binding_config, key, value)
    b.build_model()
    return b


def test_builder_loads_the_folder_installs_once_and_then_reads_the_saved_settings(lollms, fx_model):
    b = lollms.build(model_name=fx_model)
    assert type(b).__name__ == "Airobackend" and b.binding_folder_name == "airobackend_binding"
    saved = yaml.safe_load(lollms.binding_config_file.read_text())
    assert saved["mode"] == "in-process" and saved["ctx_size"] == 2048 and saved["address"]
    # its own folder first (references land there), then the folders the model zoo downloads into
    models = lollms.paths.personal_models_path
    assert b.models_folders == [lollms.models_folder, models / "gguf", models / "ggml"]
    assert all(folder.is_dir() for folder in b.models_folders)
    # the base class got the accepted file types under the name this generation uses (renamed 2025-05-23)
    extensions = b.supported_file_extensions if lollms.generation == "11.0.0" else \
        b.SAFE_STORE_SUPPORTED_FILE_EXTENSIONS
    assert ".gguf" in extensions and ".bin" in extensions

    saved.update(mode="remote", address="http://127.0.0.1:1", ctx_size="1024")
    lollms.binding_config_file.write_text(yaml.dump(saved))
    again = lollms.build(model_name=fx_model)
    assert again.binding_config.mode == "remote"
    assert again.config.ctx_size == 1024       # the binding casts what LoLLMS hands back as text


def test_generate_streams_chunks_to_the_callback_and_returns_the_engine_text(lollms, model_path):
    b = built(lollms, model_path)
    chunks, kinds = [], []

    def callback(chunk, kind):
        chunks.append(chunk)
        kinds.append(kind)
        return True

    text = b.generate(PROMPT, 24, callback, **GPT_PARAMS)
    expected = engine_text(model_path, PROMPT, 24, **ENGINE_PARAMS)
    assert expected and text == expected and "".join(chunks) == expected
    assert len(chunks) > 3, "streamed piece by piece"
    assert set(kinds) == {lollms.types.MSG_OPERATION_TYPE.MSG_OPERATION_TYPE_ADD_CHUNK}
    assert b.config.ctx_size == N_CTX


def test_callback_returning_false_stops_the_generation_at_once(lollms, fx_model):
    b = built(lollms, fx_model)
    chunks = []

    def callback(chunk, kind):
        chunks.append(chunk)
        return len(chunks) < 3

    text = b.generate(PROMPT, N_CTX - 64, callback, **GPT_PARAMS)
    assert len(chunks) == 3 and text == "".join(chunks)
    full = engine_text(fx_model, PROMPT, 24, **ENGINE_PARAMS)
    assert full.startswith(text)
    # The engine is free again.
    assert b.generate(PROMPT, 24, None, **GPT_PARAMS) == full


def test_callback_returning_none_does_not_stop(lollms, fx_model):
    b = built(lollms, fx_model)
    assert b.generate(PROMPT, 12, lambda chunk, kind: None, **GPT_PARAMS) == \
        engine_text(fx_model, PROMPT, 12, **ENGINE_PARAMS)


def test_personality_generation_stops_at_an_antiprompt(lollms, model_path):
    b = built(lollms, model_path)
    full = engine_text(model_path, PROMPT, 24, **ENGINE_PARAMS)
    anti = full[len(full) // 2: len(full) // 2 + 3]
    personality = Personality(b, lollms.types, antiprompts=[anti], **GPT_PARAMS)
    says = personality.generate(PROMPT, max_size=24)
    assert says == full[:full.lower().find(anti.lower())]
    assert "".join(personality.received) in full and len("".join(personality.received)) < len(full)


def test_tokenize_and_detokenize_are_the_models(lollms, model_path):
    b = built(lollms, model_path)
    ids = b.tokenize(PROMPT)
    assert ids[0] == 1, "BOS first, as LoLLMS's llama.cpp bindings count a prompt"
    assert ids == b.backend.tokenize(PROMPT, add_bos=True) and len(ids) > 5
    assert b.detokenize(ids) == PROMPT
    count = b.get_nb_tokens if lollms.generation == "11.0.0" else b.count_tokens
    assert count(PROMPT) == len(ids)


def test_list_models_shows_the_library_and_build_model_loads_a_listed_name(lollms, fx_model, fixtures_dir):
    from airobackend.library import ModelLibrary
    lollms.models_folder.mkdir(parents=True)
    for name in ("fx-q4_0.gguf", "fx-q8_0.ggmlv3.bin"):
        shutil.copy(fixtures_dir / "models" / name, lollms.models_folder / name)
    b = lollms.build(model_name="")
    names = b.list_models()
    library = sorted(e.name for e in ModelLibrary(str(lollms.models_folder)).scan())
    assert len(library) == 2 and names == ["airobackend-demo"] + library
    entries = b.get_available_models()
    assert [e["name"] for e in entries] == names and all(e["variants"] for e in entries)

    ggml = next(n for n in library if "q8_0" in n)
    b.config.model_name = ggml                 # what LoLLMS sets when the user picks a model
    b.binding_config.ctx_size = N_CTX
    b.build_model()
    path = str(fixtures_dir / "models" / "fx-q8_0.ggmlv3.bin")
    assert b.generate(PROMPT, 12, None, **GPT_PARAMS) == engine_text(path, PROMPT, 12, **ENGINE_PARAMS)


def test_a_bad_request_is_reported_and_returns_what_was_made(lollms, fx_model):
    b = built(lollms, fx_model)
    assert b.generate(PROMPT, 8, None, **dict(GPT_PARAMS, repeat_penalty=-1.0)) == ""
    assert any(kind == "error" and "RequestError" in msg for kind, msg in lollms.com.messages), lollms.com.messages
    assert b.generate(PROMPT, 8, None, **GPT_PARAMS) == engine_text(fx_model, PROMPT, 8, **ENGINE_PARAMS)


def test_unknown_model_is_reported_to_the_user_and_raises(lollms):
    b = lollms.build(model_name="no-such-model")
    with pytest.raises(Exception, match="no-such-model"):
        b.build_model()
    assert any(kind == "error" and "no-such-model" in msg for kind, msg in lollms.com.messages)


# ------------------------------------------------------------------------------------------------- remote mode

def test_remote_mode_generates_lists_and_stops(lollms, fx_server, fx_model):
    b = built(lollms, "", mode="remote", address=fx_server.url + "/")
    assert b.generate(PROMPT, 24, None, **GPT_PARAMS) == engine_text(fx_model, PROMPT, 24, **ENGINE_PARAMS)
    same_model = sys.modules[type(b).__module__].bridge.same_model
    assert any(same_model(b.backend.model_name, name) for name in b.list_models())
    assert b.detokenize(b.tokenize(PROMPT)) == PROMPT
    chunks = []
    text = b.generate(PROMPT, N_CTX - 64, lambda c, k: chunks.append(c) or len(chunks) < 3, **GPT_PARAMS)
    assert len(chunks) == 3 and text == "".join(chunks)
    assert b.generate(PROMPT, 8, None, **GPT_PARAMS) == engine_text(fx_model, PROMPT, 8, **ENGINE_PARAMS)


def test_remote_mode_switches_the_servers_model_from_its_library(lollms, fx_server_with_key, fx_model):
    server = fx_server_with_key
    b = built(lollms, "", mode="remote", address=server.url, server_key=server.api_key)
    startup = b.backend.model_name
    second = next(n for n in b.list_models() if "q8_0" in n)
    try:
        b.config.model_name = second              # the user picks a model LoLLMS listed
        b.build_model()
        assert sys.modules[type(b).__module__].bridge.same_model(b.backend.model_name, second)
        assert b.generate(PROMPT, 12, None, **GPT_PARAMS) == \
            engine_text(server.second_model, PROMPT, 12, **ENGINE_PARAMS)
    finally:
        b.config.model_name = startup
        b.build_model()
    assert b.generate(PROMPT, 12, None, **GPT_PARAMS) == engine_text(fx_model, PROMPT, 12, **ENGINE_PARAMS)


def test_remote_mode_without_a_server_says_so(lollms):
    with pytest.raises(Exception, match="127.0.0.1:9"):
        built(lollms, "", mode="remote", address="http://127.0.0.1:9")
    assert any(kind == "error" and "is `airobackend serve` running?" in msg for kind, msg in lollms.com.messages)


def test_card_files_follow_the_zoo_layout():
    from lollms_harness import BINDING_SRC
    card = yaml.safe_load((BINDING_SRC / "binding_card.yaml").read_text())
    assert {"name", "author", "version", "link", "description"} <= set(card)
    models = yaml.safe_load((BINDING_SRC / "models.yaml").read_text())
    keys = {"description", "filename", "license", "owner_link", "owner", "server", "sha256", "model_type"}
    assert models and all(keys <= set(m) for m in models)
    assert (BINDING_SRC / "logo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (BINDING_SRC / "requirements.txt").is_file()


# ------------------------------------------------------------------------------------------- where models come from

def test_a_model_added_by_reference_is_listed_and_loads(lollms, fixtures_dir):
    """"Add reference to local model" (lollms_models_infos.py) calls the base class's reference_model(path): a GGUF
    file's reference lands in the binding's folder as `<file name>/<stem>.reference`, a GGML file's in `ggml/` (the
    base class picks the folder whose name is in the file name)."""
    b = lollms.build(model_name="")
    gguf, ggml = fixtures_dir / "models" / "fx-q4_0.gguf", fixtures_dir / "models" / "fx-q8_0.ggmlv3.bin"
    assert b.reference_model(gguf) and b.reference_model(ggml)
    models = lollms.paths.personal_models_path
    assert (lollms.models_folder / gguf.name / "fx-q4_0.reference").read_text() == str(gguf)
    assert (models / "ggml" / ggml.name / "fx-q8_0.ggmlv3.reference").is_file()
    names = b.list_models()
    assert names == ["airobackend-demo", gguf.name, "ggml/" + ggml.name]
    assert [e["name"] for e in b.get_available_models()] == names, "the zoo page marks listed names installed"
    for name, path in ((gguf.name, gguf), ("ggml/" + ggml.name, ggml)):
        b.config.model_name = name               # what LoLLMS sets when the user picks the model
        b.binding_config.ctx_size = N_CTX
        b.build_model()
        assert b.generate(PROMPT, 12, None, **GPT_PARAMS) == engine_text(str(path), PROMPT, 12, **ENGINE_PARAMS)


def test_models_the_zoo_downloaded_into_models_gguf_are_listed_and_load(lollms, fixtures_dir):
    """lollms-webui's model zoo downloads `repo::file` into `<personal models>/gguf/<repo name>/<file>`."""
    folder = lollms.paths.personal_models_path / "gguf" / "fx-GGUF"
    folder.mkdir(parents=True)
    shutil.copy(fixtures_dir / "models" / "fx-q4_0.gguf", folder / "fx-q4_0.gguf")
    b = lollms.build(model_name="")
    assert "gguf/fx-GGUF/fx-q4_0.gguf" in b.list_models()
    b.config.model_name = "gguf/fx-GGUF/fx-q4_0.gguf"
    b.binding_config.ctx_size = N_CTX
    b.build_model()
    assert b.generate(PROMPT, 12, None, **GPT_PARAMS) == \
        engine_text(str(fixtures_dir / "models" / "fx-q4_0.gguf"), PROMPT, 12, **ENGINE_PARAMS)


def test_a_reference_to_a_missing_file_names_the_file(lollms, tmp_path):
    gone = tmp_path / "moved-away.Q4_K_M.gguf"
    gone.write_bytes(b"GGUF")
    b = lollms.build(model_name="")
    b.reference_model(gone)
    gone.unlink()
    b.config.model_name = gone.name
    with pytest.raises(Exception, match="moved-away.Q4_K_M.gguf"):
        b.build_model()
    assert any(kind == "error" and "moved-away" in msg for kind, msg in lollms.com.messages)


# ----------------------------------------------------------------------------------------------- seed and Stop

SAMPLED = dict(temperature=1.0, top_k=0, top_p=0.9, repeat_penalty=1.1, repeat_last_n=64)
SAMPLED_ENGINE = dict(temperature=1.0, top_k=0, top_p=0.9, repetition_penalty=1.1, repetition_penalty_range=64)


def test_the_seed_is_the_one_the_host_passes(lollms, fx_model):
    b = built(lollms, fx_model)
    b.config["seed"] = 1234                       # LoLLMS's own seed setting
    chat = lollms.chat_generate(b, PROMPT, 20, None, SAMPLED)
    assert chat == engine_text(fx_model, PROMPT, 20, seed=1234, **SAMPLED_ENGINE)
    # the personality's generate passes no seed: the host's configured one still applies
    personality = Personality(b, lollms.types, **SAMPLED)
    assert personality.generate(PROMPT, max_size=20) == chat
    b.config["seed"] = 4321
    assert lollms.chat_generate(b, PROMPT, 20, None, SAMPLED) == \
        engine_text(fx_model, PROMPT, 20, seed=4321, **SAMPLED_ENGINE) != chat


def generate_and_press_stop_at_the_third_chunk(lollms: LollmsHost, b):
    """The Stop button's `stop_generation()` arrives from the host's event loop while generate() runs in another
    thread; here it is pressed once the third chunk arrived, and the generation goes on only after it landed."""
    chunks, third, stopped = [], threading.Event(), threading.Event()

    def callback(chunk, kind):
        chunks.append(chunk)
        if len(chunks) == 3:
            third.set()
            assert stopped.wait(30)
        return True

    def press_stop():
        third.wait(60)
        lollms.cancel_generation(b)
        stopped.set()

    presser = threading.Thread(target=press_stop)
    presser.start()
    text = b.generate(PROMPT, N_CTX - 64, callback, **GPT_PARAMS)
    presser.join(10)
    return text, chunks


def test_stop_button_ends_the_generation_within_a_token(lollms, fx_model):
    b = built(lollms, fx_model)
    text, chunks = generate_and_press_stop_at_the_third_chunk(lollms, b)
    assert len(chunks) == 3 and text == "".join(chunks)
    assert engine_text(fx_model, PROMPT, 24, **ENGINE_PARAMS).startswith(text)
    assert b.generate(PROMPT, 8, None, **GPT_PARAMS) == engine_text(fx_model, PROMPT, 8, **ENGINE_PARAMS)


def test_stop_button_interrupts_the_prompt_evaluation(lollms, fx_model):
    """Pressed while the engine reads a long prompt, Stop ends it after the batch in progress: no token comes."""
    b = built(lollms, fx_model)
    engine = b.backend.engine._engine             # the loaded model's Engine behind the model manager
    engine.n_batch = 16                           # a prompt of many batches
    evaluated, real_eval = [], engine.model.eval_spans

    def eval_and_press_stop(spans):                # the prompt is read through eval_spans, one batch per call
        evaluated.append(sum(len(t) for _, t in spans))
        if len(evaluated) == 1:
            lollms.cancel_generation(b)           # Stop arrives while the first batch is evaluated
        return real_eval(spans)

    engine.model.eval_spans = eval_and_press_stop
    long_prompt = " ".join(f"line {i}: the sea was calm." for i in range(20))
    assert len(b.tokenize(long_prompt)) > 4 * engine.n_batch
    chunks = []
    try:
        text = b.generate(long_prompt, 32, lambda c, k: chunks.append(c) or True, **GPT_PARAMS)
    finally:
        engine.model.eval_spans = real_eval
    assert evaluated == [16] and text == "" and chunks == []
    assert b.generate(PROMPT, 8, None, **GPT_PARAMS) == engine_text(fx_model, PROMPT, 8, **ENGINE_PARAMS)


def test_remote_mode_stop_button_closes_the_stream(lollms, fx_server, fx_model):
    b = built(lollms, "", mode="remote", address=fx_server.url)
    text, chunks = generate_and_press_stop_at_the_third_chunk(lollms, b)
    # chunks already on the wire when the connection closes may still arrive
    assert 3 <= len(chunks) < 10 and text == "".join(chunks)
    assert b.generate(PROMPT, 8, None, **GPT_PARAMS) == engine_text(fx_model, PROMPT, 8, **ENGINE_PARAMS)
