"""Chat templates from model files, rendered with Jinja2 in a sandbox: every real template llama.cpp keeps for its
chat-template tests (../shared/fixtures/templates) renders a conversation with tools, tool calls and tool results,
and a template that fails gives a clear error naming the template."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from airobackend.chat import JinjaTemplate, file_template
from airobackend.errors import RequestError
from airobackend.tools import TOOLS_PREAMBLE

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
CALL = {"id": "call12345", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "18 C, sunny"},
    {"role": "assistant", "content": "18 C and sunny."},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}]},
]


def _templates(fixtures_dir: Path) -> list[Path]:
    found = sorted((fixtures_dir / "templates").glob("*.jinja"))
    assert len(found) >= 17
    return found


def test_every_real_template_renders(fixtures_dir: Path) -> None:
    """Every template shows the whole conversation: the tools, the tool call, its result and the turns around them,
    in its own syntax or, where it has none (Gemma 2, Phi-3.5, the DeepSeek R1 distills), written as text."""
    for path in _templates(fixtures_dir):
        t = JinjaTemplate(path.read_text(), bos_token="<s>", eos_token="</s>")
        with_prompt = t.format(CONVERSATION, add_generation_prompt=True, tools=TOOLS)
        without = t.format(CONVERSATION, add_generation_prompt=False, tools=TOOLS)
        plain = t.format([{"role": "user", "content": "Hello there"}])
        assert "tomorrow?" in with_prompt and "Hello there" in plain, path.name
        for shown in ("get_weather", "Paris", "18 C, sunny", "You are terse."):
            assert shown in with_prompt, (path.name, shown)
        if "add_generation_prompt" in path.read_text():           # (three always open the assistant's turn)
            assert len(with_prompt) > len(without), path.name


# ChatML as SmolLM2's file has it, without its default system turn: no syntax for tools.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _turns(prompt: str) -> list[tuple[str, str]]:
    return [tuple(t.split("<|im_end|>")[0].split("\n", 1)) for t in prompt.split("<|im_start|>")[1:]]


def test_what_the_template_cannot_show_is_written_as_text(fixtures_dir: Path) -> None:
    """llama.cpp's polyfills (minja): tools listed as JSON in the system turn, the tool call as JSON in the assistant
    turn, the result as JSON in a user turn; a template with tool syntax shows them its own way."""
    t = JinjaTemplate(CHATML)
    caps = t.capabilities()
    assert caps.system_role and not (caps.tools or caps.tool_calls or caps.tool_responses)
    turns = _turns(t.format(CONVERSATION, tools=TOOLS))
    assert [r for r, _ in turns] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert turns[0][1] == "You are terse.\n\n" + TOOLS_PREAMBLE + json.dumps(TOOLS, indent=2, ensure_ascii=False)
    assert json.loads(turns[2][1]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"},
                                                       "id": "call12345"}]}
    assert json.loads(turns[3][1]) == {"tool_response": {"content": "18 C, sunny", "name": "get_weather",
                                                         "tool_call_id": "call12345"}}
    assert turns[4][1] == "18 C and sunny." and turns[5][1] == "And tomorrow?"
    # no tools, no tool turns: the template's own rendering, untouched
    plain = [{"role": "user", "content": "Hi"}]
    assert t.format(plain) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert _turns(t.format(plain, tools=TOOLS))[0] == ("system", TOOLS_PREAMBLE + json.dumps(TOOLS, indent=2))
    # Llama 3.1 has its own syntax for all of it
    llama = JinjaTemplate((fixtures_dir / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text())
    out = llama.format(CONVERSATION, tools=TOOLS)
    assert TOOLS_PREAMBLE not in out and "tool_response" not in out and "<|start_header_id|>ipython" in out
    # Gemma 2 has no system turn: its text opens the first user turn
    gemma = JinjaTemplate((fixtures_dir / "templates" / "google-gemma-2-2b-it.jinja").read_text())
    assert "<start_of_turn>user\nBe brief.\nHi<end_of_turn>" in gemma.format(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


def test_tool_call_arguments_as_the_template_wants(fixtures_dir: Path) -> None:
    # Llama 3.1 prints arguments with tojson: it needs an object, so OpenAI's JSON string is parsed for it
    t = JinjaTemplate((fixtures_dir / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text())
    out = t.format(CONVERSATION, tools=TOOLS)
    assert '"parameters": {"city": "Paris"}' in out
    # DeepSeek R1 concatenates them as text: the string is kept
    t = JinjaTemplate((fixtures_dir / "templates" / "llama-cpp-deepseek-r1.jinja").read_text())
    assert '{"city": "Paris"}' in t.format(CONVERSATION, tools=TOOLS)


def test_bos_text_is_left_to_the_tokenizer(fixtures_dir: Path) -> None:
    src = (fixtures_dir / "templates" / "meta-llama-Llama-3.3-70B-Instruct.jinja").read_text()
    t = JinjaTemplate(src, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos=True)
    out = t.format([{"role": "user", "content": "Hi"}])
    assert out.startswith("<|start_header_id|>system") and out.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # a vocabulary that adds no BOS keeps it (SmolLM2's BOS is its template's first <|im_start|>)
    kept = JinjaTemplate(src, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos=False)
    assert kept.format([{"role": "user", "content": "Hi"}]) == "<|begin_of_text|>" + out


def test_failures_name_the_template() -> None:
    strict = JinjaTemplate("{% if messages[-1].role != 'user' %}{{ raise_exception('last must be user') }}"
                           "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert strict.format([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(RequestError, match=r"chat template \(gguf\).*last must be user"):
        strict.format([{"role": "user", "content": "ok"}, {"role": "assistant", "content": "no"}])
    with pytest.raises(RequestError, match="chat template"):
        JinjaTemplate("{% for m in messages %}{{ m.content ").format([{"role": "user", "content": "x"}])
    with pytest.raises(RequestError, match="chat template"):       # the sandbox refuses unsafe attribute access
        JinjaTemplate("{{ messages.__class__.__mro__ }}").format([{"role": "user", "content": "x"}])


def test_strftime_now_and_immutable_sandbox() -> None:
    t = JinjaTemplate("{{ strftime_now('%Y') }}|{% set x = [1] %}{{ x.append(2) }}")
    with pytest.raises(RequestError):
        t.format([{"role": "user", "content": "x"}])             # lists cannot be modified in the sandbox
    year = JinjaTemplate("{{ strftime_now('%Y') }}").format([{"role": "user", "content": "x"}])
    assert year.isdigit() and len(year) == 4


def test_file_template_from_metadata() -> None:
    md = {"tokenizer.chat_template": b"{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                     b"{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
          "tokenizer.ggml.tokens": [b"<unk>", b"<s>", b"</s>"], "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2}
    t = file_template(md)
    assert (t.bos_token, t.eos_token, t.add_bos, t.add_eos) == ("<s>", "</s>", True, False)   # SentencePiece's
    assert t.format([{"role": "user", "content": "Hi"}]) == "[user]Hi</s>[assistant]"            # BOS text cut
    assert t.format([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == "[user]Hi</s>"
    t = file_template(dict(md, **{"tokenizer.ggml.add_eos_token": True}))
    assert t.format([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == "[user]Hi"   # EOS text cut
    bpe = file_template(dict(md, **{"tokenizer.ggml.model": b"gpt2", "tokenizer.ggml.pre": b"smollm"}))
    assert not bpe.add_bos and bpe.format([{"role": "user", "content": "Hi"}]).startswith("<s>[user]")
    assert file_template({}) is None
