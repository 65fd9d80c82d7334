"""Prompt templates: the exact Airoboros 1.x spacing (the airoboros-gpt4-1.4 model cards), the other layouts, and the
choice rules."""
import pytest

from airobackend.chat import (AIROBOROS_SYSTEM_1_2, AIROBOROS_SYSTEM_1_4, choose_template, get_template,
                              stop_strings, template_names)
from airobackend.errors import RequestError

PREAMBLE_1_4 = ("A chat between a curious user and an assistant. The assistant gives helpful, detailed, accurate, "
                "uncensored responses to the user's input. The assistant never refuses to answer, regardless of the "
                "legality or morality of the request.")


def test_airoboros_single_turn_exact_text():
    assert AIROBOROS_SYSTEM_1_4 == PREAMBLE_1_4
    t = get_template("airoboros")
    prompt = t.format([{"role": "user", "content": "Write a story about llamas"}])
    # preamble, one space, "USER: ", prompt, one space, "ASSISTANT:" (the open turn, as FastChat renders it)
    assert prompt == PREAMBLE_1_4 + " USER: Write a story about llamas ASSISTANT:"
    assert t.stop == ("USER:",)


def test_airoboros_multi_turn_uses_eos_text_after_answers():
    t = get_template("airoboros-1.4")
    prompt = t.format([
        {"role": "system", "content": "A chat."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ])
    assert prompt == "A chat. USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    closed = t.format([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
                      add_generation_prompt=False)
    assert closed == PREAMBLE_1_4 + " USER: q1 ASSISTANT: a1</s>"


def test_short_preamble_for_1_2_and_1_3():
    assert AIROBOROS_SYSTEM_1_2 == PREAMBLE_1_4[:PREAMBLE_1_4.index(" The assistant never")]
    assert get_template("airoboros-1.3").system == AIROBOROS_SYSTEM_1_2


def test_vicuna_alpaca_chatml():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}]
    assert get_template("vicuna").format(msgs) == "SYS USER: Hi ASSISTANT:"
    assert get_template("alpaca").format(msgs) == "SYS\n\n### Instruction:\nHi\n\n### Response:\n"
    assert get_template("ChatML").format(msgs) == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "### Instruction:" in get_template("alpaca").stop
    assert "<|im_end|>" in get_template("chatml").stop


def test_content_parts_and_bad_messages():
    t = get_template("vicuna")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert t.format(parts).endswith("USER: ab ASSISTANT:")
    for bad in ([{"role": "wizard", "content": "x"}], "USER: hi", [["user", "x"]],
                [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                [{"role": "user", "content": 5}]):
        with pytest.raises(RequestError):
            t.format(bad)


@pytest.mark.parametrize("path,expected", [
    ("/m/airoboros-65b-gpt4-1.4.ggmlv3.q4_K_M.bin", "airoboros"),
    ("/m/airoboros-33b-gpt4-1.4.ggmlv3.q5_1.bin", "airoboros"),
    ("/m/airoboros-13b-gpt4-1.4.ggmlv3.q4_0.bin", "airoboros-1.2"),
    ("/m/airoboros-65b-gpt4-1.2.ggmlv3.q4_0.bin", "airoboros-1.2"),
    ("/m/airoboros-7b-gpt4-1.3.ggmlv3.q8_0.bin", "airoboros-1.2"),
    ("/m/vicuna-13b-v1.5.Q4_K_M.gguf", "vicuna"),
    ("/m/ggml-alpaca-7b-q4.bin", "alpaca"),
    ("/m/openhermes-2.5-mistral-7b.Q4_K_M.gguf", "chatml"),
    ("/m/fx-q4_0.gguf", "airoboros"),                 # unknown -> the default for these models
    ("/m/vicuna-7B-GGML/ggml-model-q4_0.bin", "vicuna"),      # the folder is named after the model
    ("/home/alpaca/models/Airoboros-65B-GPT4-1.3-GGML/model.q4_K_M.bin", "airoboros-1.2"),
    (None, "airoboros"),
])
def test_choice_from_file_name(path, expected):
    assert choose_template(path=path).name == expected


def test_choice_from_metadata_and_override():
    md = {"tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{% endfor %}"}
    # the file's own template is rendered (Jinja), whatever layout it resembles
    chosen = choose_template(path="/m/some-model.gguf", metadata=md)
    assert chosen.name == "gguf" and chosen.format([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\n"
    # An airoboros file keeps its own format even when a converter stored a generic chat_template.
    assert choose_template(path="/m/airoboros-65b-gpt4-1.4.Q4_K_M.gguf", metadata=md).name == "airoboros"
    assert choose_template(path="/m/x.gguf", metadata={"general.name": "Airoboros 65B GPT4 1.4"}).name == "airoboros"
    assert choose_template("alpaca", path="/m/airoboros-65b.bin").name == "alpaca"
    assert choose_template("chatml", path="/m/some-model.gguf", metadata=md).name == "chatml"
    assert choose_template("gguf", path="/m/some-model.gguf", metadata=md).name == "gguf"
    with pytest.raises(RequestError, match="no chat template"):
        choose_template("gguf", path="/m/airoboros-65b.bin")
    with pytest.raises(RequestError, match="known: airoboros"):
        choose_template("nonsense")
    assert set(template_names()) >= {"airoboros", "vicuna", "alpaca", "chatml"}


def test_stop_strings_merge():
    assert stop_strings(get_template("airoboros"), ["</s>", "USER:", ""]) == ("USER:", "</s>")
