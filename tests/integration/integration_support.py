"""Helpers shared by the host-integration tests: the engine's own output as reference, a live server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from sync import ServeOutput

REPO = Path(__file__).resolve().parents[2]
TGW_EXTENSION = REPO / "integration" / "text_generation_webui" / "airobackend"
LOLLMS_BINDING = REPO / "integration" / "lollms" / "airobackend_binding"
FX_MODEL = "fx-q4_0.gguf"
N_CTX = 512


def require_engine() -> None:
    """Import the engine's modules: a broken import must fail the host tests, not skip them."""
    import airobackend.engine  # noqa: F401
    import airobackend.llama  # noqa: F401
    import airobackend.manager  # noqa: F401
    import airobackend.sampling  # noqa: F401


_REFERENCE: dict = {}


def engine_text(path: str, prompt: str, max_tokens: int, **sampling) -> str:
    """What the engine itself generates through its public API (Llama + Engine + GenerationRequest).

    The integrations must hand exactly this to their host: nothing lost, doubled or reordered on the way.
    """
    key = (path, prompt, max_tokens, tuple(sorted(sampling.items())))
    if key not in _REFERENCE:
        from airobackend.engine import Engine
        from airobackend.llama import Llama
        from airobackend.settings import Settings
        from airobackend.types import GenerationRequest, SamplingParams
        engine = Engine(Llama(model_path=path, n_ctx=N_CTX, verbose=False), Settings(n_ctx=N_CTX))
        req = GenerationRequest(prompt=prompt, max_tokens=max_tokens, sampling=SamplingParams(**sampling))
        _REFERENCE[key] = "".join(ev.text for ev in engine.generate(req))
    return _REFERENCE[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`airobackend serve` in a child process on a loopback port."""

    def __init__(self, model: str, log_path: Path, api_key: str = "", model_dir: str = "",
                 env: Optional[dict] = None) -> None:
        self.port, self.stream_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, **(env or {}), AIRO_MODEL=model, AIRO_HOST="127.0.0.1", AIRO_PORT=str(self.port),
                   AIRO_TEXTGEN_STREAM_PORT=str(self.stream_port), AIRO_N_CTX=str(N_CTX), AIRO_QUIET="1")
        if api_key:
            env["AIRO_API_KEY"] = api_key
        if model_dir:
            env["AIRO_MODEL_DIR"] = model_dir
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "airobackend", "serve"], env=env, cwd=str(log_path.parent),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._log_path = log_path
        self._output = ServeOutput(self.proc.stdout, self._log)
        if not self._output.wait():
            self.stop()
            raise RuntimeError(f"airobackend serve exited or never listened:\n{self.log()}")

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._output.close()
        self.proc.stdout.close()
        self._log.close()


def serve_available() -> None:
    require_engine()
    import airobackend.commands.serve  # noqa: F401
    import airobackend.server  # noqa: F401