"""text-generation-webui's OpenAI-compatible `/v1/completions`, the parts that meet an engine extension.

v2.8.1: the extension `extensions/openai` (`script.py` route, `completions.py` `completions_common`); today:
`modules/api` (same file names). Both build the generation state from the request on top of the API's defaults and
run `generate_reply`; non-streaming they return the last cumulative value, streaming they send the growth of the
cumulative value, holding back every piece that contains U+FFFD ("partial unicode character, don't send it yet"), and
count tokens with `encode`. Where they differ: today's route runs the completion in a worker thread and answers its
own `OpenAIError` as JSON, and encodes the prompt before generating also when not streaming. In both, FastAPI answers
an `HTTPException` with its status and `{"detail": ...}`, and any other exception with a bare 500.
"""
import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from modules import GENERATION, shared
from modules.text_generation import encode, generate_reply


class OpenAIError(Exception):
    def __init__(self, message=None, code=500):
        self.message, self.code = message, code


def process_parameters(body: dict, defaults: dict) -> dict:
    """The request's fields over the API's defaults (`GenerationOptions`); `max_tokens` and `stop` renamed."""
    state = dict(defaults)
    state.update({k: v for k, v in body.items() if k in defaults})
    if body.get("max_tokens") is not None:
        state["max_new_tokens"] = int(body["max_tokens"])
    if body.get("stop"):
        state["custom_stopping_strings"] = [body["stop"]] if isinstance(body["stop"], str) else list(body["stop"])
    return state


def completions_common(body: dict, defaults: dict, stream: bool):
    prompt = body["prompt"]
    state = process_parameters(body, defaults)
    state["stream"] = stream
    if not stream:
        prompt_tokens = len(encode(prompt)[0]) if GENERATION == "current" else None
        answer = ""
        for answer in generate_reply(prompt, state, is_chat=False):
            pass
        if prompt_tokens is None:
            prompt_tokens = len(encode(prompt)[0])
        yield {"object": "text_completion", "model": shared.model_name,
               "choices": [{"index": 0, "finish_reason": "stop", "text": answer}],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(encode(answer)[0])}}
        return
    prompt_tokens = len(encode(prompt)[0])

    def chunk(text, finish_reason=None):
        return {"object": "text_completion.chunk", "model": shared.model_name,
                "choices": [{"index": 0, "finish_reason": finish_reason, "text": text}]}

    yield chunk("")
    answer = seen = ""
    for answer in generate_reply(prompt, state, is_chat=False):
        new_content = answer[len(seen):]
        if not new_content or chr(0xFFFD) in new_content:  # partial unicode character, don't send it yet
            continue
        seen = answer
        yield chunk(new_content)
    last = chunk("", "stop")
    last["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(encode(answer)[0])}
    yield last


def create_app(defaults: dict) -> FastAPI:
    """The API server with `/v1/completions`; `defaults` are the API's generation defaults."""
    app = FastAPI()

    if GENERATION == "current":
        @app.exception_handler(OpenAIError)
        async def openai_error_handler(request: Request, exc: OpenAIError):
            return JSONResponse(status_code=exc.code, content={"error": {"message": exc.message}})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("stream"):
            def events():
                for resp in completions_common(body, defaults, stream=True):
                    yield f"data: {json.dumps(resp)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        def run():
            return list(completions_common(body, defaults, stream=False))[-1]
        response = await asyncio.to_thread(run) if GENERATION == "current" else run()
        return JSONResponse(response)

    return app
