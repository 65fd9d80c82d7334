"""A model is ready when `load` returns: every kernel was compiled or loaded from Numba's cache during the load,
so the first request compiles and loads nothing (it used to pay 20-60 s of compilation on a first start, and a few
hundred ms of cache loading on every start, with nothing logged). Checked in a fresh interpreter, where nothing is
compiled or loaded yet, by counting the compiled forms (overloads) of every Numba function before and after each
request: the check counts work, it does not time it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SCRIPT = """
import gc, json, sys
from numba.core.dispatcher import Dispatcher
from airobackend.manager import ModelManager
from airobackend.settings import Settings
from airobackend.types import GenerationRequest, SamplingParams

def compiled():
    return {f"{d.py_func.__module__}.{d.py_func.__qualname__}{sig}" for d in gc.get_objects()
            if isinstance(d, Dispatcher) for sig in d.overloads}

manager = ModelManager(Settings(n_ctx=256))
manager.load(manager.register(sys.argv[1]))
new = []
for i in range(3):          # different prompts: the prompt cache must not shorten the later ones
    req = GenerationRequest(prompt=f"Request number {i}: hello there,", max_tokens=3,
                            sampling=SamplingParams(temperature=0.0))
    before = compiled()
    text = "".join(event.text for event in manager.generate(req))
    new.append(sorted(map(str, compiled() - before)))
print(json.dumps({"before": len(before), "new": new, "text": text}))
"""


def kernels_added_per_request(demo_model, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(demo_model)], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.e2e       # a fresh Python interpreter, where nothing is compiled or loaded yet
def test_the_first_request_after_load_compiles_and_loads_nothing(demo_model):
    result = kernels_added_per_request(demo_model)
    assert result["before"] > 10 and result["text"]        # the load made the kernels; the requests generated
    assert result["new"] == [[], [], []], result["new"]


@pytest.mark.slow
def test_the_first_request_after_a_first_start_compiles_and_loads_nothing(demo_model, tmp_path):
    """The same with an empty cache: every kernel compiles during the load (minutes on 2 busy cores)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["AIRO_CACHE_DIR"] = str(tmp_path / "cache")
    result = kernels_added_per_request(demo_model, env)
    assert result["before"] > 10 and result["new"] == [[], [], []], result["new"]


def test_a_model_switch_warms_its_kernels_and_says_so(demo_model, fixtures_dir):
    """A switch at run time goes through the same load: one line per kernel group, before the new model serves."""
    from airobackend.manager import ModelManager
    from airobackend.settings import Settings

    class Display:
        def __init__(self) -> None:
            self.lines: list[tuple[str, bool]] = []

        def __call__(self, name: str, fraction: float) -> None:
            pass

        def note(self, line: str, done: bool) -> None:
            self.lines.append((line, done))

    display = Display()
    manager = ModelManager(Settings(n_ctx=64), on_progress=display)
    manager.load(manager.register(str(demo_model)))
    done = [line for line, finished in display.lines if finished]
    assert [line.split(":")[0] for line in done] == [done[0].split(":")[0], "attention, norm and RoPE kernels",
                                                    "tokenizer kernels"]
    assert done[0].startswith("q8_0 ")                      # the demo model's weight type
    display.lines.clear()
    manager.load(manager.register(str(fixtures_dir / "models" / "fx-q4_K_M.gguf")))
    done = [line for line, finished in display.lines if finished]
    assert len(done) == 3 and done[0].startswith("q4_K, q6_K "), done
    assert all(re.search(r"(compiled|loaded from the cache) in \d+\.\d s", line) for line in done), done
