"""A LoLLMS installation in a temporary folder (the stand-in package of lollms_standin/, see its README) with our
binding copied into its bindings zoo, and LoLLMS's own ways of calling a binding: the personality's generate() and
lollms-webui's chat generation and Stop button."""
from __future__ import annotations

import importlib
import shutil
import sys
from functools import partial
from pathlib import Path

STANDIN = Path(__file__).with_name("lollms_standin")
BINDING_SRC = Path(__file__).resolve().parents[2] / "integration" / "lollms" / "airobackend_binding"
FOLDER = BINDING_SRC.name


class LollmsHost:
    """`generation`: "11.0.0" (the PyPI wheel) or "webui" (today's lollms-webui), see lollms_standin/README.md."""

    def __init__(self, root: Path, generation: str = "webui") -> None:
        self.root = root
        _purge()
        sys.path.insert(0, str(STANDIN))
        package = importlib.import_module("lollms")
        assert generation in package.GENERATIONS, generation
        package.GENERATION = self.generation = generation
        self.types = importlib.import_module("lollms.types")
        config_mod = importlib.import_module("lollms.config")
        self.InstallOption = config_mod.InstallOption
        self.paths = importlib.import_module("lollms.paths").LollmsPaths(
            personal_path=root / "personal", bindings_zoo_path=root / "bindings_zoo")
        shutil.copytree(BINDING_SRC, self.paths.bindings_zoo_path / FOLDER,
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.com = importlib.import_module("lollms.com").LoLLMsCom()
        self.models_folder = self.paths.personal_models_path / FOLDER
        self.bindings = []
        self.cancel_gen = False

    def config(self, **values):
        cfg = importlib.import_module("lollms.main_config").LOLLMSConfig(lollms_paths=self.paths)
        cfg.config.update(binding_name=FOLDER, **values)
        return cfg

    @property
    def binding_config_file(self) -> Path:
        return self.paths.personal_configuration_path / "bindings" / FOLDER / "config.yaml"

    def build(self, **config_values):
        """What LoLLMS does when the user selects the binding: BindingBuilder, then build_model()."""
        config = self.config(**config_values)
        builder = importlib.import_module("lollms.binding").BindingBuilder()
        binding = builder.build_binding(config, self.paths, self.InstallOption.INSTALL_IF_NECESSARY, lollmsCom=self.com)
        self.bindings.append(binding)
        return binding

    def chat_generate(self, binding, prompt, n_predict, callback, personality_params: dict):
        """lollms-webui `LollmsApplication._generate` (lollms/app.py, text-only branch with the personality's
        parameters): the host's seed and thread count go with every call."""
        return binding.generate(prompt, callback=callback, n_predict=n_predict, seed=binding.config["seed"],
                                n_threads=binding.config["n_threads"], **personality_params)

    def cancel_generation(self, binding) -> None:
        """lollms-webui's Stop button, the socket.io event `cancel_generation` (events/lollms_generation_events.py),
        run on the server's event loop while the generation runs in a worker thread."""
        binding.stop_generation()
        self.cancel_gen = True

    def close(self) -> None:
        for b in self.bindings:
            b.destroy_model()
        _purge()
        if str(STANDIN) in sys.path:
            sys.path.remove(str(STANDIN))


def _purge() -> None:
    for name in list(sys.modules):
        if name == "lollms" or name.startswith("lollms.") or name in (FOLDER, "airobackend_lollms_bridge"):
            del sys.modules[name]


class Personality:
    """LoLLMS's `AIPersonality.generate` / `process` (lollms 11.0.0 personality.py l.1593-1614, lollms-webui
    personality.py l.1590-1611): count the prompt's tokens (`get_nb_tokens` in 11.0.0, `count_tokens` in the webui),
    ask for at most the rest of the context, without a seed, and stop (callback returns False) at an antiprompt."""

    def __init__(self, binding, types, antiprompts=(), temperature=0.7, top_k=50, top_p=0.95, repeat_penalty=1.0,
                 repeat_last_n=40) -> None:
        self.model, self.types, self.antiprompts = binding, types, list(antiprompts)
        self.params = dict(temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty,
                           repeat_last_n=repeat_last_n)
        self.bot_says = ""
        self.received = []

    def process(self, text, message_type, callback=None, show_progress=False):
        if text is None:
            return True
        if message_type == self.types.MSG_OPERATION_TYPE.MSG_OPERATION_TYPE_ADD_CHUNK:
            bot_says = self.bot_says + text
        elif message_type == self.types.MSG_OPERATION_TYPE.MSG_OPERATION_TYPE_SET_CONTENT:
            bot_says = text
        else:
            raise AssertionError(f"unexpected message type {message_type!r}")
        self.received.append(text)
        for anti in self.antiprompts:
            if anti.lower() in bot_says.lower():
                self.bot_says = bot_says[:bot_says.lower().find(anti.lower())]
                return False
        self.bot_says = bot_says
        return True

    def generate(self, prompt, max_size=None, ctx_size=2048, max_n_predict=1024):
        self.bot_says = ""
        webui = sys.modules["lollms"].GENERATION == "webui"
        ntokens = self.model.count_tokens(prompt) if webui else self.model.get_nb_tokens(prompt)
        self.model.generate(prompt, max_size if max_size else min(ctx_size - ntokens, max_n_predict),
                            partial(self.process, callback=None, show_progress=False), **self.params)
        return self.bot_says
