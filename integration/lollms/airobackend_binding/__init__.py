"""LoLLMS binding for airobackend: GGML/GGUF LLaMA models (Airoboros and friends) on airobackend's CPU engine.

Two modes, chosen in the binding settings:
* `in-process` (default): the engine runs inside LoLLMS; needs airobackend in LoLLMS's environment
  (`pip install /path/to/airobackend`). Models are found where LoLLMS puts them (see `Airobackend._local_models`);
  an empty model name runs the demo model.
* `remote`: talks to a running `airobackend serve` at `address` (nothing to install).

Contract followed, for both generations of the `lollms` package (tests/integration/lollms_standin/README.md):
LoLLMS 11.0.0 (PyPI wheel, `lollms/binding.py`) and today's lollms-webui (`lollms/binding.py`, ParisNeo/lollms-webui
`e6afb66a`). LoLLMS loads this folder's `__init__.py`, takes the class named by `binding_name`, instantiates it as
`Binding(config, lollms_paths=..., installation_option=..., lollmsCom=...)`, calls `build_model()`, then `tokenize`,
`detokenize`, `generate(prompt, n_predict, callback, **gpt_params)` (callback(chunk, MSG_OPERATION_TYPE_ADD_CHUNK) per
new piece of text; returning False stops the generation), `stop_generation()` for its Stop button, and
`list_models` / `get_available_models` for its UI.

The folder is not called `airobackend`: LoLLMS imports a binding under its folder name, which would shadow the
`airobackend` package itself.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from lollms.binding import LLMBinding, LOLLMSConfig
from lollms.config import BaseConfig, ConfigTemplate, InstallOption, TypedConfig
from lollms.paths import LollmsPaths
from lollms import types as _lollms_types

# LoLLMS >= 9.5 names the chunk operation MSG_OPERATION_TYPE_ADD_CHUNK; older releases used MSG_TYPE.MSG_TYPE_CHUNK.
if hasattr(_lollms_types, "MSG_OPERATION_TYPE"):
    ADD_CHUNK = _lollms_types.MSG_OPERATION_TYPE.MSG_OPERATION_TYPE_ADD_CHUNK
else:  # pragma: no cover - old LoLLMS
    ADD_CHUNK = _lollms_types.MSG_TYPE.MSG_TYPE_CHUNK


def _load_bridge():
    # LoLLMS loads this file with SourceFileLoader as a plain module, so the sibling is loaded by path.
    name = "airobackend_lollms_bridge"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("airo_bridge.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


bridge = _load_bridge()

__author__ = "airobackend"
__license__ = "MIT"

binding_name = "Airobackend"
binding_folder_name = "airobackend_binding"
DEMO_MODEL = "airobackend-demo"
MODEL_SUFFIXES = (".bin", ".gguf", ".zip", ".reference")
# The models folders (under LoLLMS's personal models path) this binding reads: its own first (LoLLMS writes the
# references of "add reference to local model" there), then the shared folders the model zoo downloads into
# (lollms-webui `LLMBinding.install_model_async`: `models/gguf/<repo>/<file>`; GGML files go to `models/ggml/`).
MODELS_DIR_NAMES = (binding_folder_name, "gguf", "ggml")


def _file_extensions_argument() -> dict:
    """The base class's keyword for the accepted file extensions, read from its signature.

    LoLLMS 11.0.0 calls it `supported_file_extensions`; lollms-webui renamed it `SAFE_STORE_SUPPORTED_FILE_EXTENSIONS`
    on 2025-05-23 (`lollms/binding.py`), and passing the other name is a TypeError. A host with neither gets nothing.
    """
    parameters = inspect.signature(LLMBinding.__init__).parameters
    for name in ("SAFE_STORE_SUPPORTED_FILE_EXTENSIONS", "supported_file_extensions"):
        if name in parameters:
            return {name: list(MODEL_SUFFIXES)}
    return {}


class Airobackend(LLMBinding):
    """airobackend as a LoLLMS text binding."""

    def __init__(self, config: LOLLMSConfig, lollms_paths: Optional[LollmsPaths] = None,
                 installation_option: InstallOption = InstallOption.INSTALL_IF_NECESSARY, lollmsCom=None) -> None:
        if lollms_paths is None:
            lollms_paths = LollmsPaths()
        binding_config = TypedConfig(
            ConfigTemplate([
                {"name": "mode", "type": "str", "value": "in-process", "options": ["in-process", "remote"],
                 "help": "in-process: run the engine inside LoLLMS (pip install /path/to/airobackend); "
                         "remote: use a running `airobackend serve`"},
                {"name": "address", "type": "str", "value": "http://127.0.0.1:5001",
                 "help": "remote mode: the URL of `airobackend serve`"},
                {"name": "server_key", "type": "str", "value": "", "help": "remote mode: the server's --api-key"},
                {"name": "model_dir", "type": "str", "value": "",
                 "help": "in-process mode: folder of GGML/GGUF files (empty: the models folders LoLLMS uses)"},
                {"name": "ctx_size", "type": "int", "value": 2048, "min": 64,
                 "help": "context size in tokens"},
                {"name": "n_threads", "type": "int", "value": 0, "min": 0, "help": "threads (0: all physical cores)"},
            ]),
            BaseConfig(config={}),
        )
        super().__init__(Path(__file__).parent, lollms_paths, config, binding_config, installation_option,
                         models_dir_names=list(MODELS_DIR_NAMES), lollmsCom=lollmsCom, **_file_extensions_argument())
        self.config.ctx_size = int(self.binding_config.config.ctx_size)  # saved values may come back as text
        self.backend = None
        self._stream_lock = threading.Lock()
        self._stream = None               # the generation in progress, for stop_generation()

    # -- life cycle
    def install(self) -> None:
        """Nothing to download: in-process mode needs the airobackend package, remote mode nothing at all."""
        super().install()
        if importlib.util.find_spec("airobackend") is None:
            self.warning(f"airobackend is not installed in LoLLMS's Python: in-process mode needs it "
                         f"({bridge.INSTALL_HINT}); remote mode works without it.")

    def settings_updated(self) -> None:
        self.config.ctx_size = int(self.binding_config.config.ctx_size)
        if self.backend is not None:
            self.build_model()

    def build_model(self, model_name: Optional[str] = None) -> "Airobackend":
        super().build_model(model_name)
        self.destroy_model()
        cfg = self.binding_config
        try:
            self.backend = bridge.connect(cfg.mode, model=self._model_path(self.model_name),
                                          model_dir=str(self._model_dirs()[0]), n_ctx=int(cfg.ctx_size),
                                          n_threads=int(cfg.n_threads), server_url=cfg.address,
                                          api_key=cfg.server_key)
            name, n_ctx = self.backend.model_name, self.backend.n_ctx
        except Exception as e:
            self.backend = None
            self.error(f"airobackend: cannot use {self.model_name or DEMO_MODEL!r}: {e}")
            raise
        self.config.ctx_size = min(int(cfg.ctx_size), n_ctx)
        self.info(f"airobackend: {name} ready")
        return self

    def destroy_model(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    # -- models
    def _model_dirs(self) -> list[Path]:
        if str(self.binding_config.model_dir).strip():
            return [Path(self.binding_config.model_dir).expanduser()]
        return [Path(p) for p in self.models_folders]

    def _local_models(self) -> dict[str, str]:
        """Every model LoLLMS put where this binding looks, as {name LoLLMS shows: file path}.

        In each models folder: GGML/GGUF/split-zip files, also one level down (`gguf/<repo>/<file>.gguf` from the
        model zoo); references made by "add reference to local model" (`reference_model` in lollms `binding.py`
        writes `<folder>/<file name>/<stem>.reference` holding the path; LoLLMS lists it by the `<file name>` folder,
        as its own `list_models` does); and flat `<name>.reference` files. Names in the first folder are bare, names
        in the others start with the folder's name (`gguf/<repo>/<file>.gguf`); the first of two equal names wins.
        """
        found: dict[str, str] = {}
        for i, folder in enumerate(self._model_dirs()):
            if not folder.is_dir():
                continue
            prefix = "" if i == 0 else folder.name + "/"
            for name in bridge.list_library(str(folder)):
                found.setdefault(prefix + name, str(folder / name))
            for ref in sorted(folder.glob("*/*.reference")) + sorted(folder.glob("*.reference")):
                name = ref.parent.name if ref.parent != folder else ref.name
                found.setdefault(prefix + name, _read_reference(ref))
        return found

    def _model_path(self, name: Optional[str]) -> str:
        """'' for the demo model (in-process) or the server's current model (remote); the file of a name from
        `list_models`; else the name itself, which the model library resolves (of the first models folder
        in-process, of the server in remote mode) or refuses with the names it knows."""
        if not name or name == DEMO_MODEL:
            return ""
        if self.binding_config.mode != "in-process" or Path(name).is_absolute():
            return name
        return self._local_models().get(name, name)

    def list_models(self) -> list[str]:
        """The models LoLLMS can select: the local ones (in-process, see `_local_models`) or the server's list."""
        if self.binding_config.mode != "in-process":
            return self._remote().list_models()
        return [DEMO_MODEL] + sorted(self._local_models(), key=str.lower)

    def get_available_models(self, app=None) -> list[dict]:
        """Entries for LoLLMS's model zoo page (the shape the zoo's API bindings return); their names are those of
        `list_models`, which is how the page marks them installed."""
        return [{"category": "generic", "datasets": "unknown", "icon": "/bindings/airobackend_binding/logo.png",
                 "license": "see the model card", "model_creator": "local file", "name": name,
                 "quantizer": None, "rank": "1.0", "type": "api" if self.binding_config.mode != "in-process" else "file",
                 "variants": [{"name": name, "size": 0}]}
                for name in self.list_models()]

    def _remote(self):
        return bridge.RemoteBackend(self.binding_config.address, api_key=self.binding_config.server_key)

    # -- tokens
    def _need_backend(self):
        if self.backend is None:
            raise RuntimeError("airobackend: no model built yet (LoLLMS calls build_model() first)")
        return self.backend

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of `prompt` as the model will see it, BOS first (as the zoo's llama.cpp bindings count)."""
        return self._need_backend().tokenize(prompt, add_bos=True)

    def detokenize(self, tokens_list: list) -> str:
        return self._need_backend().detokenize([int(t) for t in tokens_list])

    # -- generation
    def generate(self, prompt: str, n_predict: int = 128, callback: Optional[Callable[..., Any]] = None,
                 verbose: bool = False, **gpt_params: Any) -> str:
        """Generate up to `n_predict` tokens; each new piece of text goes to `callback(chunk, ADD_CHUNK)`.

        A callback that returns False stops the generation at once (LoLLMS does that when its antiprompt shows up);
        other return values, None included, continue. `stop_generation()` from another thread stops it too. The
        seed is the one LoLLMS passes (its own `seed` setting; lollms-webui `app._generate`), else its config's.
        Returns the text generated; an error is reported to the user (`self.error`) and ends the generation with the
        text made so far.
        """
        b = self._need_backend()
        options = options_from_gpt_params(gpt_params, n_predict, default_seed=_config_seed(self.config))
        stream = b.stream(prompt, options)
        with self._stream_lock:
            self._stream = stream
        text = ""
        deltas = iter(stream)
        try:
            for delta in deltas:
                text += delta
                if verbose:
                    print(delta, end="", flush=True)
                if callback is not None and callback(delta, ADD_CHUNK) is False:
                    break
        except Exception as e:
            # LoLLMS shows a binding's errors as notifications and keeps what was generated (as the zoo's
            # bindings do); a bad request or a lost server must not take the discussion down.
            self.error(f"airobackend: {type(e).__name__}: {e}")
        finally:
            deltas.close()  # stops the engine (or closes the server connection) when we leave early
            with self._stream_lock:
                if self._stream is stream:
                    self._stream = None
        return text

    def stop_generation(self) -> None:
        """LoLLMS's Stop button: lollms-webui's `cancel_generation` event (events/lollms_generation_events.py) calls
        `model.stop_generation()` from its event loop while `generate` runs in a worker thread. The engine stops
        within one prompt batch while it reads the prompt, within one token after; `generate` returns the text made
        so far. (LoLLMS 11.0.0 has no Stop hook in the binding; its callback returning False does the same.)"""
        with self._stream_lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()


def _read_reference(ref: Path) -> str:
    """The model path a LoLLMS reference file holds (written on Windows with either separator)."""
    return ref.read_text(encoding="utf-8").strip()


def _config_seed(config: Any) -> int:
    try:
        return int(config["seed"])
    except (KeyError, TypeError, ValueError):
        return -1


def options_from_gpt_params(gpt_params: dict, n_predict: Optional[int], default_seed: int = -1) -> dict:
    """LoLLMS's generation parameters (llama.cpp names) as airobackend options; unknown ones are ignored."""
    g = gpt_params.get
    o: dict = {"max_tokens": max(1, int(n_predict if n_predict is not None else 128))}
    for ours, theirs, cast in (("temperature", "temperature", float), ("top_k", "top_k", int),
                               ("top_p", "top_p", float), ("min_p", "min_p", float),
                               ("repetition_penalty", "repeat_penalty", float),
                               ("repetition_penalty_range", "repeat_last_n", int)):
        if g(theirs) is not None:
            o[ours] = cast(g(theirs))
    seed = g("seed")
    o["seed"] = int(default_seed if seed is None else seed)
    if g("stop"):
        o["stop"] = [g("stop")] if isinstance(g("stop"), str) else list(g("stop"))
    if o.get("temperature", 1.0) <= 0:
        o["top_k"] = 1
    return o
