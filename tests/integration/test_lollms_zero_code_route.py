"""LoLLMS without our binding: its zoo `vLLM` binding (OpenAI-compatible) pointed at `airobackend serve`.

This replays, in our words, what that binding does (ParisNeo/lollms_bindings_zoo `vLLM/__init__.py` at
1d6c41a): the model list from `GET {address}/v1/models` reading `id`, `owned_by` and `created` (an int, fed to
`datetime.utcfromtimestamp`) of every entry, and generation as `POST {address}/v1/completions` with only `model`,
`prompt`, `stream: true`, `temperature` and `max_tokens`, reading the lines that start with `data: `,
`choices[0].text` of each, until a line does not parse (`[DONE]`) or the callback returns False.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx

from integration_support import engine_text

PROMPT = "Once upon a time, in a quiet village by the sea,"


def vllm_model_info(address: str) -> list[dict]:
    data = httpx.get(f"{address}/v1/models", headers={"accept": "application/json"}).json()
    info = [{"model_name": "vllm_remote_model", "owned_by": "remote server", "created_datetime": "unknown"}]
    for model in data["data"]:
        created = datetime.fromtimestamp(model["created"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        info.append({"model_name": model["id"], "owned_by": model["owned_by"], "created_datetime": created})
    return info


def vllm_generate(address: str, model: str, prompt: str, n_predict: int, temperature: float, callback=None) -> str:
    data = {"model": model, "prompt": prompt, "stream": True, "temperature": float(temperature),
            "max_tokens": n_predict}
    text = ""
    with httpx.stream("POST", f"{address}/v1/completions", headers={"Content-Type": "application/json"},
                      content=json.dumps(data), timeout=120) as response:
        assert response.status_code == 200, response.read()
        for decoded in response.iter_lines():
            if not decoded.startswith("data: "):
                continue
            try:
                chunk = json.loads(decoded[5:].strip())["choices"][0]["text"]
            except Exception:
                break
            text += chunk
            if callback and not callback(chunk):
                break
    return text


def test_vllm_binding_lists_our_models_and_generates(fx_server, fx_model):
    info = vllm_model_info(fx_server.url)
    names = [m["model_name"] for m in info[1:]]
    assert names, "the server lists at least the loaded model"
    loaded = names[0]
    # temperature 0 is the user's way to ask for greedy decoding through this binding
    text = vllm_generate(fx_server.url, loaded, PROMPT, 16, 0.0)
    assert text == engine_text(fx_model, PROMPT, 16, top_k=1, repetition_penalty=1.0)

    pieces = []
    partial = vllm_generate(fx_server.url, loaded, PROMPT, 200, 0.0, lambda c: pieces.append(c) or len(pieces) < 3)
    assert len(pieces) == 3 and partial == "".join(pieces) and text.startswith(partial)
