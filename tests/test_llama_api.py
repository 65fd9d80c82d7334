"""The llama-cpp-python-shaped high-level API (create_completion / __call__ / create_chat_completion) on real models:
the demo model and a llama.cpp-made fixture. Greedy generation is checked token by token against the low-level API
(eval + argmax of scores), so the high-level loop is the model's own arithmetic, not a copy of it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from airobackend.errors import ContextOverflowError, RequestError
from airobackend.llama import Llama

GREEDY = dict(temperature=0.0, repeat_penalty=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def llm(demo_model):
    m = Llama(str(demo_model), n_ctx=128, n_threads=2, seed=42, verbose=False)
    yield m
    m.close()


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    m = Llama(str(fixtures_dir / "models" / "fx-q8_0.gguf"), n_ctx=96, n_threads=2, verbose=False)
    yield m
    m.close()


def greedy_low_level(m: Llama, prompt: str, n: int) -> list[int]:
    """Greedy tokens from the low-level API alone: eval, argmax of the last scores row, repeat."""
    m.reset()
    m.eval(m.tokenize(prompt.encode()))
    out = []
    for _ in range(n):
        t = int(np.argmax(m.scores[m.n_tokens - 1]))
        if t == m.token_eos():
            break
        out.append(t)
        m.eval([t])
    return out


def test_completion_dict_shape(llm):
    out = llm.create_completion("USER: Write a story about llamas\nASSISTANT:", max_tokens=6, seed=1)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"] == llm.model_path
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(llm.tokenize(b"USER: Write a story about llamas\nASSISTANT:"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 6


@pytest.mark.parametrize("which", ["llm", "fx"])
def test_greedy_completion_equals_low_level_argmax(which, request):
    m = request.getfixturevalue(which)
    prompt = "The quick brown fox"
    expected = greedy_low_level(m, prompt, 10)
    out = m(prompt, max_tokens=10, **GREEDY)
    assert out["choices"][0]["text"] == m.detokenize(expected).decode("utf-8", errors="replace")
    assert out["usage"]["completion_tokens"] == len(expected)
    # the facade's low-level state follows the engine: the prompt and the evaluated reply are in the context
    prompt_ids = m.tokenize(prompt.encode())
    assert list(m.input_ids[:len(prompt_ids)]) == prompt_ids


def test_stream_chunks_add_up_to_the_same_text(llm):
    full = llm("Hello", max_tokens=8, seed=7)
    chunks = list(llm("Hello", max_tokens=8, seed=7, stream=True))
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


def test_seed_reproducible_and_llama_seed_sequence(demo_model):
    a = Llama(str(demo_model), n_ctx=64, seed=5, verbose=False)
    b = Llama(str(demo_model), n_ctx=64, seed=5, verbose=False)
    texts_a = [a("Once upon a time", max_tokens=8, temperature=1.0)["choices"][0]["text"] for _ in range(2)]
    texts_b = [b("Once upon a time", max_tokens=8, temperature=1.0)["choices"][0]["text"] for _ in range(2)]
    assert texts_a == texts_b                      # Llama(seed=5) gives the same sequence of completions
    assert a("Once", max_tokens=8, seed=3)["choices"][0]["text"] == b("Once", max_tokens=8, seed=3)["choices"][0]["text"]


def test_stop_is_trimmed_and_echo(llm):
    free = llm("The llama", max_tokens=12, **GREEDY)["choices"][0]["text"]
    stop = free[3:5]
    assert stop.strip(), free
    out = llm("The llama", max_tokens=12, stop=[stop], **GREEDY)
    assert out["choices"][0]["text"] == free[:free.index(stop)] and out["choices"][0]["finish_reason"] == "stop"
    echoed = llm("The llama", max_tokens=3, echo=True, **GREEDY)["choices"][0]["text"]
    assert echoed.startswith("The llama") and echoed[len("The llama"):] == free[:len(echoed) - len("The llama")]


def test_token_prompt_and_logprobs(llm):
    ids = llm.tokenize(b"Hello world")
    a = llm(ids, max_tokens=4, **GREEDY)
    b = llm("Hello world", max_tokens=4, **GREEDY)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    lp = llm("Hello world", max_tokens=4, logprobs=3, **GREEDY)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    for tok, l, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert l <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(l)   # greedy picks the best


def test_max_tokens_none_runs_to_the_context_end_and_overflow_errors(demo_model):
    m = Llama(str(demo_model), n_ctx=24, verbose=False)
    out = m("Hello", max_tokens=None, logit_bias={m.token_eos(): float("-inf")})
    p = out["usage"]["prompt_tokens"]
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 24 - p + 1
    with pytest.raises(ContextOverflowError, match="exceed context window"):
        m("Hello", max_tokens=40)
    with pytest.raises(ValueError):               # llama-cpp-python raises ValueError; ours is a subclass
        m("word " * 40, max_tokens=1)
    with pytest.raises(RequestError):
        m("Hello", suffix="x")
    with pytest.raises(RequestError):
        m("Hello", top_p=5.0)


def test_chat_completion_shapes_and_template(llm):
    msgs = [{"role": "user", "content": "Tell me a joke."}]
    out = llm.create_chat_completion(msgs, max_tokens=6, seed=2)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert not choice["message"]["content"][:1].isspace()
    # the prompt is the Airoboros template (the default for these models)
    prompt = llm.engine.format_chat(msgs)
    assert prompt.endswith(" USER: Tell me a joke. ASSISTANT:")
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize(prompt.encode()))
    chunks = list(llm.create_chat_completion(msgs, max_tokens=6, seed=2, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == choice["message"]["content"]


def test_chat_format_override_and_unsupported(demo_model):
    m = Llama(str(demo_model), n_ctx=128, chat_format="chatml", verbose=False)
    assert m.engine.template.name == "chatml"
    assert m.engine.format_chat([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")
    with pytest.raises(RequestError):
        m.create_chat_completion([{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    with pytest.raises(RequestError):
        m.create_chat_completion([{"role": "robot", "content": "x"}])


def test_second_turn_reuses_the_cache(llm):
    msgs = [{"role": "user", "content": "What do llamas eat?"}]
    first = llm.create_chat_completion(msgs, max_tokens=5, **GREEDY)
    msgs += [first["choices"][0]["message"], {"role": "user", "content": "And goats?"}]
    llm.create_chat_completion(msgs, max_tokens=2, **GREEDY)
    perf = llm.engine.perf()
    assert perf["last_process_count"] < perf["last_input_count"] / 2     # the shared history was not re-evaluated


def test_prompt_cache_reuse_gives_the_same_tokens_as_a_fresh_context(demo_model):
    """Reusing the KV cache of a previous request must not change the answer (stale K/V would)."""
    from airobackend.engine import Engine
    from airobackend.types import GenerationRequest, SamplingParams
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.0, top_k=0, top_p=1.0)
    first = "USER: What do llamas eat? ASSISTANT: Grass and hay."
    second = first + " USER: And where do they live? ASSISTANT:"

    def ids(engine, prompt):
        return [t for ev in engine.generate(GenerationRequest(prompt=prompt, max_tokens=8, sampling=greedy))
                for t in ev.token_ids]
    warm = Engine(Llama(str(demo_model), n_ctx=128, n_threads=2, verbose=False))
    ids(warm, first)
    reused = ids(warm, second)
    assert warm.perf()["last_process_count"] < len(warm.tokenize(second)) - 10
    fresh = Engine(Llama(str(demo_model), n_ctx=128, n_threads=2, verbose=False))
    assert ids(fresh, second) == reused


def test_context_shift_on_a_real_model(demo_model):
    from airobackend.engine import Engine
    from airobackend.types import FinishReason, GenerationRequest, SamplingParams
    m = Llama(str(demo_model), n_ctx=32, n_threads=2, verbose=False)
    engine = Engine(m)
    memory = "A chat about llamas."
    req = GenerationRequest(prompt=" USER: Tell me a story. ASSISTANT:", memory=memory, max_tokens=70,
                            sampling=SamplingParams(seed=3, ban_eos=True))
    events = list(engine.generate(req))
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].completion_tokens == 70
    keep = engine.tokenize(memory)
    assert list(m.input_ids[:len(keep)]) == keep and m.n_tokens <= 32        # the memory stayed at the front


def test_chat_logprobs_and_unknown_arguments(llm):
    out = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2,
                                     **GREEDY)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) >= out["usage"]["completion_tokens"]
    for c in content:
        assert c["logprob"] <= 0 and len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] >= c["logprob"]
    with pytest.raises(TypeError):
        llm("Hi", max_tokns=3)                       # a misspelt argument is an error, as in llama-cpp-python


@pytest.fixture(scope="module")
def smol(smollm2):
    m = Llama(str(smollm2), n_ctx=256, n_threads=2, seed=1, verbose=False)
    yield m
    m.close()


def test_real_model_answers_through_its_own_template(smol):
    """SmolLM2's ChatML template comes from its file (its first <|im_start|> is the vocabulary's BOS, which the
    tokenizer does not add: the template's own stays); the answer is real text."""
    msgs = [{"role": "user", "content": "What color is the sky?"}]
    out = smol.create_chat_completion(msgs, max_tokens=24, **GREEDY)
    (choice,) = out["choices"]
    assert "blue" in choice["message"]["content"]
    prompt = smol.engine.format_chat(msgs)
    assert smol.engine.template.name == "gguf" and prompt.endswith("<|im_start|>assistant\n")
    ids = smol.tokenize(prompt.encode(), special=True)
    assert out["usage"]["prompt_tokens"] == len(ids) and ids[0] == smol.token_bos()    # <|im_start|>, no BOS added
    # greedy through the high-level API is the model's own argmax, token for token
    text = smol("The capital of France is", max_tokens=8, **GREEDY)["choices"][0]["text"]
    assert "Paris" in text
    assert smol.tokenize(text.encode(), add_bos=False) == greedy_low_level(smol, "The capital of France is", 8)


def test_real_model_stop_strings_on_its_text(smol):
    from server.fakes import pick_stop
    base = dict(max_tokens=32, **GREEDY)
    text = smol("Once upon a time, in a small village", **base)["choices"][0]["text"]
    i, stop = pick_stop(text)
    out = smol("Once upon a time, in a small village", stop=[stop], **base)["choices"][0]
    assert out["text"] == text[:i] and out["finish_reason"] == "stop"
    chunks = list(smol("Once upon a time, in a small village", stop=[stop], stream=True, **base))
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[:i]


def test_a_weight_the_kernels_refuse_is_a_model_file_error_naming_file_and_tensor(tmp_path):
    """The kernels raise their own UnsupportedType (they know no files); loading turns it into the application's
    UnsupportedTensorType, a ModelFileError with the path and the tensor. F32 weights have no fast kernel anywhere."""
    from airobackend.errors import ModelFileError, UnsupportedTensorType
    from airobackend.formats.writer import write_synthetic_model
    from airobackend.kernels.ggml_types import UnsupportedType
    path = tmp_path / "f32.gguf"
    write_synthetic_model(path, mix="f32", n_vocab=300, n_embd=64, n_head=2, n_layer=1, n_ff=128)
    with pytest.raises(UnsupportedTensorType) as e:
        Llama(str(path), n_ctx=16, verbose=False, kernels="fast")
    assert isinstance(e.value, ModelFileError) and isinstance(e.value, UnsupportedType)
    assert e.value.path == str(path) and e.value.tensor == "token_embd.weight"
    assert "no fast kernel for F32" in str(e.value) and str(path) in str(e.value)


def test_real_model_calls_a_tool_through_the_python_api(smol):
    """create_chat_completion with tools on a file whose template has no tool syntax: the tools reach the model as
    JSON text (llama.cpp's polyfills) and its call, forced by the grammar, takes the city from the question."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = smol.create_chat_completion(msgs, tools=[weather], tool_choice="required", max_tokens=60, **GREEDY)
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "Paris" in json.loads(call["function"]["arguments"])["city"]
    assert '"name": "get_weather"' in smol.engine.format_chat(msgs, tools=[weather])
