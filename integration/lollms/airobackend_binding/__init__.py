"""LoLLMS binding for airobackend: GGML/GGUF LLaMA models (Airoboros and friends) on airobackend's CPU engine.

Two modes, chosen in the binding settings:
* `in-process` (default): the engine runs inside LoLLMS; needs `pip install airobackend` in LoLLMS's environment.
  Models are the GGML/GGUF/split-zip files in LoLLMS's models folder for this binding
  (`<personal models path>/airobackend_binding/`) or in `model_dir`; an empty model name runs the demo model.
* `remote`: talks to a running `airobackend serve` at `address` (nothing to install).

Contract followed (LoLLMS `lollms/binding.py`, PyPI lollms 11.0.0; ../shared/docs/protocols.md §5.1): LoLLMS loads this
folder's `__init__.py`, takes the class named by `binding_name`, instantiates it as
`Binding(config, lollms_paths=..., installation_option=..., lollmsCom=...)`, calls `build_model()`, then `tokenize`,
`detokenize`, `generate(prompt, n_predict, callback, **gpt_params)` (callback(chunk, MSG_OPERATION_TYPE_ADD_CHUNK) per
new piece of text; returning False stops the generation) and `list_models` / `get_available_models` for its UI.

The folder is not called `airobackend`: LoLLMS imports a binding under its folder name, which would shadow the
`airobackend` package itself.
"""
from __future__ import annotations

import importlib.util
import sys
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


class Airobackend(LLMBinding):
    """airobackend as a LoLLMS text binding."""

    def __init__(self, config: LOLLMSConfig, lollms_paths: Optional[LollmsPaths] = None,
                 installation_option: InstallOption = InstallOption.INSTALL_IF_NECESSARY, lollmsCom=None) -> None:
        if lollms_paths is None:
            lollms_paths = LollmsPaths()
        binding_config = TypedConfig(
            ConfigTemplate([
                {"name": "mode", "type": "str", "value": "in-process", "options": ["in-process", "remote"],
                 "help": "in-process: run the engine inside LoLLMS (pip install airobackend); "
                         "remote: use a running `airobackend serve`"},
                {"name": "address", "type": "str", "value": "http://127.0.0.1:5001",
                 "help": "remote mode: the URL of `airobackend serve`"},
                {"name": "server_key", "type": "str", "value": "", "help": "remote mode: the server's --api-key"},
                {"name": "model_dir", "type": "str", "value": "",
                 "help": "in-process mode: folder of GGML/GGUF files (empty: LoLLMS's models folder for this binding)"},
                {"name": "ctx_size", "type": "int", "value": 2048, "min": 64,
                 "help": "context size in tokens"},
                {"name": "n_threads", "type": "int", "value": 0, "min": 0, "help": "threads (0: all physical cores)"},
                {"name": "seed", "type": "int", "value": -1, "help": "-1: a new random seed per generation"},
            ]),
            BaseConfig(config={}),
        )
        super().__init__(Path(__file__).parent, lollms_paths, config, binding_config, installation_option,
                         supported_file_extensions=list(MODEL_SUFFIXES), lollmsCom=lollmsCom)
        self.config.ctx_size = int(self.binding_config.config.ctx_size)  # saved values may come back as text
        self.backend = None

    # -- life cycle
    def install(self) -> None:
        """Nothing to download: in-process mode needs the airobackend package, remote mode nothing at all."""
        super().install()
        if importlib.util.find_spec("airobackend") is None:
            self.warning("airobackend is not installed in LoLLMS's Python: in-process mode needs "
                         "`pip install airobackend`; remote mode works without it.")

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
        return list(self.models_folders)

    def _model_path(self, name: Optional[str]) -> str:
        """'' for the demo model (in-process) or the server's current model (remote); a file path for a file (a
        LoLLMS `.reference` file holds the path of a file elsewhere); else the name itself, which the model library
        resolves (of the first models folder in-process, of the server in remote mode)."""
        if not name or name == DEMO_MODEL:
            return ""
        if self.binding_config.mode != "in-process":
            return name
        if Path(name).is_absolute():
            return name
        for folder in self._model_dirs():
            p = folder / name
            if p.suffix == ".reference" and p.is_file():
                return p.read_text(encoding="utf-8").strip()
            if p.is_file():
                return str(p)
        return name

    def list_models(self) -> list[str]:
        """The model files LoLLMS can select: the library folder's models (in-process) or the server's list."""
        if self.binding_config.mode != "in-process":
            return self._remote().list_models()
        names = []
        for folder in self._model_dirs():
            names += bridge.list_library(str(folder))
            names += [p.name for p in folder.glob("*.reference")]
        return [DEMO_MODEL] + sorted(set(names))

    def get_available_models(self, app=None) -> list[dict]:
        """Entries for LoLLMS's model zoo page (the shape the zoo's API bindings return)."""
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

        A callback that returns False stops the generation at once (LoLLMS does that when its antiprompt shows up or
        the user presses Stop); other return values, None included, continue. Returns the text generated; an error
        is reported to the user (`self.error`) and ends the generation with the text made so far.
        """
        b = self._need_backend()
        options = options_from_gpt_params(gpt_params, n_predict, default_seed=int(self.binding_config.seed))
        text = ""
        deltas = iter(b.stream(prompt, options))
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
        return text


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
