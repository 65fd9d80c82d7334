"""text-generation-webui extension: generate with airobackend, in this process or through `airobackend serve`.

Copy (or link) this folder to `text-generation-webui/extensions/airobackend` and start the web UI with
`--extensions airobackend` (add `--api` for its OpenAI-compatible API). See README.md next to this file.

How it plugs in (text-generation-webui `modules/extensions.py`, `modules/text_generation.py` at commit 3013758):
* `params` are the settings; `settings.yaml` keys `airobackend-<param>` override them before `setup()` runs.
* `setup()` connects the backend and sets `shared.model`, `shared.tokenizer` and `shared.model_name`: the chat tab and
  the OpenAI API refuse to generate without a model object, and count tokens through `shared.tokenizer`.
* `custom_generate_reply` replaces the model's generation function. The host calls it as
  `(question, original_question, seed, state, stopping_strings, is_chat=...)` up to v2.8.1 and as
  `(question, original_question, state, stopping_strings, is_chat=...)` since commit ae02ffc6 (2025-04-20); both are
  accepted. It yields the *cumulative* reply (the host applies stop strings to each value and slices deltas itself),
  yields '' first outside chat like the built-in loaders, and stops when the host sets `shared.stop_everything`
  (the Stop button) or `state['stop_event']`.
* A failed connection (bad model path, server down, package missing) does not take the web UI down: the extension
  installs a placeholder model whose every use retries and, failing again, raises an error that the web UI shows
  with its message (see `unavailable`); the settings block shows it too.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

try:  # imported by the host as the package module `extensions.airobackend.script`
    from . import airo_bridge as bridge
except ImportError:  # loaded as a plain file
    _spec = importlib.util.spec_from_file_location("airobackend_tgw_bridge", Path(__file__).with_name("airo_bridge.py"))
    bridge = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(bridge)

params = {
    "display_name": "airobackend",
    "is_tab": False,
    "mode": "in-process",                 # 'in-process' (the engine runs inside the web UI) or 'remote'
    "model": "",                          # a .bin/.gguf/.zip path or a library name; '' = the demo model
                                          # (remote: a name in the server's library to switch to; '' = keep)
    "model_dir": "",                      # in-process: the model library listed in the UI; '' = the web UI's own
                                          # (--model-dir: models/ up to v2.8.1, user_data/models/ today)
    "n_ctx": 2048,
    "n_threads": 0,                       # 0 = all physical cores
    "server_url": "http://127.0.0.1:5001",  # remote: a running `airobackend serve`
    "api_key": "",
}

backend: Optional[Any] = None
last_error = ""                       # why the last connection failed ('' once connected)
NOT_CONNECTED = "airobackend (not connected)"
_backend_lock = threading.Lock()
# How often the Stop-button watcher looks at shared.stop_everything while a generation runs (seconds).
_STOP_POLL_S = 0.05


def _shared():
    from modules import shared  # the host's module; imported late so this file also loads outside the host
    return shared


def connect() -> Any:
    """(Re)connect the backend from `params` and install it as the host's model and tokenizer.

    The new backend is checked (model name, context size) before it replaces the old one, so a failed Apply
    leaves the previous connection serving.
    """
    global backend, last_error
    with _backend_lock:
        if backend is not None and params["mode"] == "in-process":
            backend.close()           # in-process: free the old model's memory before loading the next
            backend = None
        shared = _shared()
        try:
            model_dir = params["model_dir"] or getattr(getattr(shared, "args", None), "model_dir", "") or "models"
            b = bridge.connect(params["mode"], model=params["model"], model_dir=model_dir,
                               n_ctx=int(params["n_ctx"]), n_threads=int(params["n_threads"]),
                               server_url=params["server_url"], api_key=params["api_key"])
            name, n_ctx = b.model_name, b.n_ctx
        except Exception as e:
            last_error = f"airobackend: cannot connect ({params['mode']}): {e}"
            if backend is None:
                # No model at all: the host would only say "no model is loaded" and its API would fail on its
                # tokenizer, both without the reason. The placeholder routes every use here, to retry and to tell why.
                shared.model = AirobackendModel(None, NOT_CONNECTED)
                shared.tokenizer = AirobackendTokenizer(None)
                shared.model_name = NOT_CONNECTED
            raise unavailable(last_error) from e
        if backend is not None:
            backend.close()
        shared.model = AirobackendModel(b, name)
        shared.tokenizer = AirobackendTokenizer(b)
        shared.model_name = name
        if isinstance(getattr(shared, "settings", None), dict) and "truncation_length" in shared.settings:
            shared.settings["truncation_length"] = n_ctx
        backend, last_error = b, ""
        return b


def _backend() -> Any:
    return backend if backend is not None else connect()


def setup() -> None:
    """Called once by the host after `params` were updated from settings.yaml."""
    try:
        connect()
    except Exception as e:
        # Never take the web UI down: report, and retry on the first use (the UI and the API show the error then).
        print(f"{e}; every generation retries")


def unavailable(message: str) -> Exception:
    """The error for a backend that cannot be had, of a type both of the host's front doors show with its message.

    The web UI (Gradio) shows the text of a `gradio.Error` and a bare "Error" for anything else; the OpenAI API
    (FastAPI: `extensions/openai` up to v2.8.1, `modules/api` today) answers an `HTTPException` with its status and
    `detail` and a bare 500 for anything else. So the error is both, as far as those packages are installed.
    """
    return _unavailable_class()(message)


@contextlib.contextmanager
def _server_state() -> Iterator[None]:
    """A server that went away (or has no model) after the connection was made: the same error as a failed
    connection, so that the web UI and the API say why instead of a bare "Error" / 500; the next use simply tries
    the server again."""
    try:
        yield
    except bridge.Unreachable as e:
        raise unavailable(f"airobackend: {e}") from e


@functools.lru_cache(maxsize=None)
def _unavailable_class() -> type:
    bases: list = []
    try:
        from starlette.exceptions import HTTPException
        bases.append(HTTPException)
    except ImportError:
        HTTPException = None
    try:
        from gradio import Error as GradioError
        bases.append(GradioError)
    except ImportError:
        GradioError = None

    def __init__(self, message: str) -> None:
        if HTTPException is not None:
            HTTPException.__init__(self, status_code=503, detail=message)
        if GradioError is not None:
            GradioError.__init__(self, message)
        bridge.BridgeError.__init__(self, message)
        self.text = message

    return type("AirobackendUnavailable", (*bases, bridge.BridgeError),
                {"__init__": __init__, "__str__": lambda self: self.text, "__module__": __name__})


class AirobackendModel:
    """What the host sees as `shared.model`: its presence tells the UI and API that a model is loaded."""

    def __init__(self, backend: Any, name: str) -> None:
        self.backend, self.name = backend, name

    def __repr__(self) -> str:
        return f"AirobackendModel({self.name!r})"


class AirobackendTokenizer:
    """`shared.tokenizer`: `encode` / `decode` the way the host calls a Hugging Face tokenizer.

    The host asks for `return_tensors='pt'` and needs a `[1, n]` result; that is a torch tensor when torch is installed
    (always true in a full text-generation-webui install) and a numpy array otherwise.
    """

    def __init__(self, backend: Optional[Any]) -> None:
        self.backend = backend            # None: the placeholder of a failed connection (each use retries)
        self.bos_token_id = backend.bos_id if backend is not None else None
        self.eos_token_id = 2 if self.bos_token_id == 1 else None   # LLaMA's ids; only used for ban_eos by the host

    def _b(self) -> Any:
        return self.backend if self.backend is not None else _backend()

    def encode(self, text: str, return_tensors: Optional[str] = None, add_special_tokens: bool = True,
               add_bos_token: Optional[bool] = None, **_: Any) -> Any:
        add_bos = add_special_tokens if add_bos_token is None else bool(add_bos_token)
        with _server_state():
            ids = self._b().tokenize(str(text), add_bos=add_bos)
        if return_tensors == "pt":
            try:
                import torch
                return torch.tensor([ids], dtype=torch.long)
            except ImportError:
                return _as_array([ids])
        if return_tensors == "np":
            return _as_array([ids])
        return ids

    def decode(self, ids: Any, skip_special_tokens: bool = True, **_: Any) -> str:
        """Text of `ids` as a SentencePiece tokenizer decodes it: no leading space from the first piece."""
        with _server_state():
            b = self._b()
            flat = [int(t) for t in _flatten(ids)]
            if flat and b.bos_id is not None and flat[0] != b.bos_id:
                flat = [b.bos_id] + flat          # the engine drops the space after BOS, as llama.cpp does
            return b.detokenize(flat)


def _as_array(rows):
    import numpy
    return numpy.array(rows, dtype=numpy.int64).reshape(len(rows), -1)


def _flatten(ids: Any) -> list:
    """Token ids from a list, a [1, n] nesting, a numpy array or a torch tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [t for x in ids for t in _flatten(x)]
    return [ids]


def custom_tokenized_length(prompt: str) -> int:
    """The UI's token counter."""
    with _server_state():
        return len(_backend().tokenize(prompt, add_bos=True))


# ---------------------------------------------------------------------------------------------------------------
# Generation


def _split_args(args: tuple, kwargs: dict) -> tuple[Optional[int], dict, Any]:
    """(seed, state, stopping_strings) from either calling convention (see the module docstring)."""
    if "state" in kwargs:
        return kwargs.get("seed"), kwargs["state"], kwargs.get("stopping_strings", args[0] if args else None)
    if not args:
        raise TypeError("custom_generate_reply: missing the state argument")
    if isinstance(args[0], dict):                       # (state, stopping_strings)
        return None, args[0], args[1] if len(args) > 1 else kwargs.get("stopping_strings")
    # (seed, state, stopping_strings): the seed was already drawn by the host when state['seed'] was -1
    return int(args[0]), args[1], args[2] if len(args) > 2 else kwargs.get("stopping_strings")


def _stop_strings(stopping_strings: Any, state: dict) -> list[str]:
    """The host's own union of its stop lists (text_generation.py: str entries are a comma list of quoted strings)."""
    out: list[str] = []
    for st in (stopping_strings, state.get("custom_stopping_strings")):
        if isinstance(st, str):
            try:
                st = ast.literal_eval(f"[{st}]")
            except (ValueError, SyntaxError):
                st = [st]
        if isinstance(st, (list, tuple)):
            out += [s for s in st if isinstance(s, str) and s]
    return out


def options_from_state(state: dict, stopping_strings: Any = None, seed: Optional[int] = None) -> dict:
    """Map the host's generation state (its preset sliders / API fields) to airobackend's sampling options."""
    g = state.get
    o: dict = {
        "max_tokens": int(g("max_new_tokens", 200)),
        "stop": _stop_strings(stopping_strings, state),
        "add_bos": bool(g("add_bos_token", True)),
        "temperature": float(g("temperature", 1.0)),
        "top_k": int(g("top_k", 0)),
        "top_p": float(g("top_p", 1.0)),
        "min_p": float(g("min_p", 0.0)),
        "typical_p": float(g("typical_p", 1.0)),
        "tfs": float(g("tfs", 1.0)),
        "top_a": float(g("top_a", 0.0)),
        "repetition_penalty": float(g("repetition_penalty", 1.0)),
        "repetition_penalty_range": int(g("repetition_penalty_range", 0)),   # 0 = whole context, as in the host
        "presence_penalty": float(g("presence_penalty", 0.0)),
        "frequency_penalty": float(g("frequency_penalty", 0.0)),
        "mirostat": int(g("mirostat_mode", 0)),
        "mirostat_tau": float(g("mirostat_tau", 5.0)),
        "mirostat_eta": float(g("mirostat_eta", 0.1)),
        "ban_eos": bool(g("ban_eos_token", False)),
        "seed": int(seed if seed is not None else g("seed", -1)),
    }
    if g("dynamic_temperature"):
        low, high = float(g("dynatemp_low", 1.0)), float(g("dynatemp_high", 1.0))
        o.update(temperature=(low + high) / 2, dynatemp_range=(high - low) / 2,
                 dynatemp_exponent=float(g("dynatemp_exponent", 1.0)))
    if not g("do_sample", True) or o["temperature"] <= 0:
        o["top_k"] = 1                                   # greedy, as the host does for do_sample=False / temperature 0
    bans = str(g("custom_token_bans", "") or "")
    if bans.strip():
        o["banned_tokens"] = [int(x) for x in bans.replace("\n", ",").split(",") if x.strip()]
    if str(g("grammar_string", "") or "").strip():
        o["grammar"] = g("grammar_string")
    return o


def _prepare_prompt(b: Any, question: str, state: dict, o: dict):
    """Left-truncate the prompt to `truncation_length - max_new_tokens` tokens, as the host's loaders do."""
    limit = int(state.get("truncation_length") or b.n_ctx)
    limit = min(limit, b.n_ctx)
    ids = b.tokenize(question, add_bos=o["add_bos"])
    if state.get("auto_max_new_tokens"):
        o["max_tokens"] = max(1, limit - len(ids))
    max_prompt = max(1, limit - o["max_tokens"])
    if len(ids) <= max_prompt:
        return question
    return ids[-max_prompt:]


def _without_replacement_chars(text: str) -> str:
    """`text` without U+FFFD, the character the engine puts for bytes that are no UTF-8 (random or broken weights).

    The host drops every streamed piece that holds one as "a partial character" (its OpenAI API compares each
    cumulative value with what it sent), so from the first U+FFFD on a streamed answer would stop growing while the
    whole answer has all of it; its own Hugging Face loader never shows one in a stream either. Leaving the character
    out makes the streamed and the whole text the same. (Bytes of a character split over tokens never get here: the
    engine holds them back until the character is complete.)
    """
    return text.replace("\ufffd", "")


def _stop_requested(state: dict) -> bool:
    ev = state.get("stop_event")
    return bool(getattr(_shared(), "stop_everything", False)) or bool(ev is not None and ev.is_set())


def custom_generate_reply(question: str, original_question: str, *args: Any, is_chat: bool = False,
                          **kwargs: Any) -> Iterator[str]:
    """Generate `question`'s continuation; yields the whole reply so far (see the module docstring)."""
    with _server_state():
        yield from _generate(question, args, is_chat, kwargs)


def _generate(question: str, args: tuple, is_chat: bool, kwargs: dict) -> Iterator[str]:
    seed, state, stopping_strings = _split_args(args, kwargs)
    tail = args[3:] if args and not isinstance(args[0], dict) else args[2:]
    if tail:                              # is_chat passed positionally (older extensions call it that way)
        is_chat = bool(tail[0])
    b = _backend()
    o = options_from_state(state, stopping_strings, seed)
    prompt = _prepare_prompt(b, question, state, o)
    stream = b.stream(prompt, o)

    # The Stop button only flips a flag; watch it so that a long prompt evaluation stops too, not just the next token.
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_STOP_POLL_S):
            if _stop_requested(state):
                stream.cancel()
                return

    watcher = threading.Thread(target=watch, name="airobackend-stop-watch", daemon=True)
    watcher.start()
    deltas = iter(stream)
    try:
        if not is_chat:
            yield ""
        reply = ""
        streaming = bool(state.get("stream", True))
        for delta in deltas:
            reply += _without_replacement_chars(delta)
            if streaming:
                yield reply
            if _stop_requested(state):
                break
        if not streaming:
            yield reply
    finally:
        done.set()
        deltas.close()          # the host stopped reading early (stop string, Stop button): free the engine now
        watcher.join(timeout=1.0)


def ui() -> None:
    """Settings under the generation tab: mode, model (from the library), server URL; 'Apply' reconnects."""
    import gradio as gr

    def models() -> list[str]:
        try:
            return _backend().list_models()
        except Exception as e:
            print(f"airobackend: cannot list models ({e})")
            return []

    def apply(mode, model, model_dir, n_ctx, n_threads, url, key):
        params.update(mode=mode, model=model or "", model_dir=model_dir, n_ctx=int(n_ctx), n_threads=int(n_threads),
                      server_url=url, api_key=key)
        t0 = time.time()
        try:
            b = connect()
            return f"Connected: {b.model_name} ({time.time() - t0:.1f} s)"
        except Exception as e:
            return f"Error: {e}"

    with gr.Accordion("airobackend", open=True):
        mode = gr.Radio(["in-process", "remote"], value=params["mode"], label="Mode")
        model = gr.Dropdown(choices=models(), value=params["model"] or None, allow_custom_value=True,
                            label="Model (library name or file path; empty = demo model)")
        model_dir = gr.Textbox(value=params["model_dir"], label="Model folder (in-process; empty = the web UI's models folder)")
        n_ctx = gr.Number(value=params["n_ctx"], precision=0, label="Context size")
        n_threads = gr.Number(value=params["n_threads"], precision=0, label="Threads (0 = all cores)")
        url = gr.Textbox(value=params["server_url"], label="Server URL (remote)")
        key = gr.Textbox(value=params["api_key"], type="password", label="API key (remote)")
        status = gr.Markdown(value=f"Error: {last_error}" if last_error else "")
        gr.Button("Apply").click(apply, [mode, model, model_dir, n_ctx, n_threads, url, key], status)
