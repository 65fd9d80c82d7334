"""Embeddings from the loaded model, as llama.cpp's embedding mode makes them with `--pooling mean`.

llama.cpp (src/llama.cpp `append_pooling`, examples/server `send_embedding`, common/common.cpp
`common_embd_normalize`, commit c392e509) pools the tensor "result_norm", the hidden states after the final RMSNorm,
averaging them over every token of the input (BOS included, since inputs are tokenized with add_special), and its
server then divides the vector by its Euclidean norm. `LlamaModel.hidden_states` gives that tensor; this module turns
request inputs into token lists and hidden states into vectors:

    seqs = token_inputs(body["input"], tokenize, n_vocab, max_tokens=engine.n_batch, truncate=False)
    vectors = engine.embed(seqs)          # [len(seqs)] float32 vectors of n_embd, L2-normalised
"""
from __future__ import annotations

import base64
from typing import Any, Callable, Sequence

import numpy as np

from airobackend.errors import FieldError, check_token_ids
from airobackend.types import EngineAPI

MAX_INPUTS = 2048          # OpenAI's limit on the number of inputs of one request


def mean_pool(hidden: np.ndarray) -> np.ndarray:
    """The mean over the tokens (rows) of `hidden` [n, n_embd], accumulated in float64, as float32."""
    return np.asarray(hidden, dtype=np.float64).mean(axis=0).astype(np.float32)


def normalize(v: np.ndarray) -> np.ndarray:
    """`v` divided by its Euclidean norm (llama.cpp's common_embd_normalize with embd_norm 2; zero stays zero)."""
    norm = float(np.sqrt(np.sum(np.asarray(v, dtype=np.float64) ** 2)))
    return (np.asarray(v, dtype=np.float64) * (1.0 / norm if norm > 0 else 0.0)).astype(np.float32)


def token_inputs(value: Any, tokenize: Callable[[str], Sequence[int]], n_vocab: int, *, max_tokens: int,
                 truncate: bool, param: str = "input") -> list[list[int]]:
    """Token lists of an embeddings `input`: a string, a list of strings, a list of token ids or a list of such
    lists (OpenAI's forms). Strings are tokenized with BOS. An input longer than `max_tokens` is cut to it when
    `truncate`, else refused; an empty input, more than MAX_INPUTS inputs or a bad token id is refused."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str) or is_ids(value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise FieldError(f"'{param}' must be a string, a list of strings, a list of token ids or a list of such "
                         f"lists, and not empty", param)
    if len(items) > MAX_INPUTS:
        raise FieldError(f"'{param}' has {len(items)} inputs; at most {MAX_INPUTS} are allowed", param)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = list(tokenize(item))
        elif is_ids(item):
            ids = check_token_ids(list(item), n_vocab, f"{param}[{i}]", param)
        else:
            raise FieldError(f"'{param}[{i}]' must be a string or a non-empty list of token ids", param)
        if not ids:
            raise FieldError(f"'{param}[{i}]' is empty", param)
        if len(ids) > max_tokens:
            if not truncate:
                raise FieldError(f"'{param}[{i}]' has {len(ids)} tokens; at most {max_tokens} (the batch size) can "
                                 f"be embedded at once", param)
            ids = ids[:max_tokens]
        out.append(ids)
    return out


def embeddings_response(engine: EngineAPI, body: dict, model: str, *, truncate_default: bool) -> dict:
    """Answer an embeddings request body ({"input", "encoding_format", "truncate", "dimensions"}) in OpenAI's shape
    (which KoboldCpp's /api/extra/embeddings also answers with): {"object": "list", "data": [{"object":
    "embedding", "index", "embedding"}], "model", "usage"}. Blocks while the model is busy (call it in a thread)."""
    from airobackend.server import Fields       # here: the server brings FastAPI, which Llama.embed never needs

    f = Fields(body)
    fmt = f.str("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise FieldError("'encoding_format' must be \"float\" or \"base64\"", "encoding_format")
    info = engine.model_info()
    n_embd = int(info.get("n_embd") or 0)
    dims = f.int("dimensions", None, lo=1)
    if dims is not None and n_embd and dims != n_embd:
        raise FieldError(f"'dimensions': this model's embeddings have {n_embd} dimensions, not {dims}", "dimensions")
    n_batch = int(getattr(engine, "n_batch", 0) or info.get("n_batch") or 512)
    seqs = token_inputs(body.get("input", body.get("content")), lambda s: engine.tokenize(s, True),
                        int(info["n_vocab"]), max_tokens=n_batch, truncate=f.bool("truncate", truncate_default))
    vectors = engine.embed(seqs)
    data = []
    for i, v in enumerate(vectors):
        vec = np.asarray(v, dtype="<f4")
        emb: Any = base64.b64encode(vec.tobytes()).decode("ascii") if fmt == "base64" else vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(s) for s in seqs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}}
