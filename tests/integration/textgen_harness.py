"""Start the miniature text-generation-webui (textgen_host/, see its README) with our extension installed in it."""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path
from typing import Optional

HOST_SRC = Path(__file__).with_name("textgen_host")
EXTENSION_SRC = Path(__file__).resolve().parents[2] / "integration" / "text_generation_webui" / "airobackend"


def default_state(**overrides) -> dict:
    """The generation state the host's OpenAI API builds for a request (GenerationOptions defaults,
    `extensions/openai` at 3013758)."""
    state = {
        "max_new_tokens": 16, "auto_max_new_tokens": False, "max_tokens_second": 0, "preset": None,
        "temperature": 1.0, "temperature_last": False, "dynamic_temperature": False, "dynatemp_low": 1.0,
        "dynatemp_high": 1.0, "dynatemp_exponent": 1.0, "smoothing_factor": 0.0, "smoothing_curve": 1.0,
        "top_p": 1.0, "min_p": 0.0, "top_k": 0, "typical_p": 1.0, "tfs": 1.0, "top_a": 0.0,
        "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "repetition_penalty_range": 1024,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0, "guidance_scale": 1.0, "negative_prompt": "", "penalty_alpha": 0.0,
        "mirostat_mode": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "do_sample": True, "seed": -1,
        "dry_multiplier": 0.0, "xtc_probability": 0.0, "truncation_length": 2048, "prompt_lookup_num_tokens": 0,
        "custom_token_bans": "", "sampler_priority": None, "ban_eos_token": False, "add_bos_token": True,
        "skip_special_tokens": True, "grammar_string": "", "custom_stopping_strings": [], "stream": True,
    }
    state.update(overrides)
    return state


class TextgenHost:
    """A text-generation-webui checkout in `root` with the extension copied in, as a user installs it.

    `generation`: "v2.8.1" or "current" (textgen_host/README.md); `user_extensions`: put the extension in
    `user_data/extensions/` (today's place for a user's extensions) instead of `extensions/`.
    """

    def __init__(self, root: Path, generation: str = "current", user_extensions: bool = False) -> None:
        self.root = root
        shutil.copytree(HOST_SRC / "modules", root / "modules")
        self._purge()
        sys.path.insert(0, str(root))
        package = importlib.import_module("modules")
        assert generation in package.GENERATIONS, generation
        package.GENERATION = self.generation = generation
        self.shared = importlib.import_module("modules.shared")
        if user_extensions:
            assert generation == "current", "v2.8.1 has no user_data/extensions"
            target = self.shared.user_data_dir / "extensions" / "airobackend"
        else:
            target = root / "extensions" / "airobackend"
        shutil.copytree(EXTENSION_SRC, target, ignore=shutil.ignore_patterns("__pycache__"))
        self.extensions = importlib.import_module("modules.extensions")
        self.tg = importlib.import_module("modules.text_generation")
        self._api = None

    def start(self, *, settings: Optional[dict] = None, extensions: tuple = ("airobackend",)) -> None:
        """`python server.py --extensions airobackend` with `settings` as settings.yaml."""
        self.shared.settings.update(settings or {})
        self.shared.args.extensions = list(extensions)
        self.extensions.load_extensions()

    @property
    def api(self):
        """A client of the web UI's OpenAI-compatible API (`--api`), running in this process."""
        if self._api is None:
            from fastapi.testclient import TestClient
            app = importlib.import_module("modules.openai_api").create_app(default_state())
            self._api = TestClient(app, raise_server_exceptions=False)
        return self._api

    @property
    def script(self):
        return self.extensions.state["airobackend"][2]

    def generate(self, prompt: str, state: dict, stopping_strings=None, is_chat: bool = False) -> list[str]:
        """Every value the host's generate_reply yields (what its UI or API receives)."""
        return list(self.tg.generate_reply(prompt, state, stopping_strings, is_chat=is_chat))

    def close(self) -> None:
        loaded = sys.modules.get("modules.extensions")
        script = loaded.state["airobackend"][2] if loaded and "airobackend" in loaded.state else None
        if script is not None and script.backend is not None:
            script.backend.close()
            script.backend = None
        if self._api is not None:
            self._api.close()
        self._purge()
        if str(self.root) in sys.path:
            sys.path.remove(str(self.root))

    @staticmethod
    def _purge() -> None:
        for name in list(sys.modules):
            if name in ("modules", "extensions") or name.startswith(("modules.", "extensions.", "user_ext_")):
                del sys.modules[name]
