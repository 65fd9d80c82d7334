"""The test layers: every test is `unit`, `e2e` or `slow`, and a `unit` test that starts a process or a server fails.

- `slow`: long (soak, large shapes, second kernel builds); deselected by the default run, run with `-m slow`.
- `e2e`: starts something outside the test's own calls: a subprocess (the CLI, a host, a browser, bench scripts) or
  a listening server (uvicorn on a loopback port). Marked by hand (`@pytest.mark.e2e`, `pytestmark`), or implied by
  a fixture that starts one (E2E_FIXTURES).
- `unit`: everything else; added at collection. Each unit test runs under a `Watch` for its setup, call and
  teardown: a process spawned (subprocess, multiprocessing, fork, os.system) or a socket put to listen fails it,
  naming what it started, so the layer stays true as tests change.

The default run (`-m 'not slow'`, what CI runs) is unit + e2e. tests/conftest.py imports the hooks below.
AIRO_LAYERS_LOG=FILE records, per test, what it started (one JSON line each) and fails none: for reviewing layers.
"""
from __future__ import annotations

import _posixsubprocess
import contextlib
import json
import os
import socket
import subprocess
import traceback

import pytest

LAYERS = ("unit", "e2e", "slow")

# Fixtures that start a server or a subprocess: a test using one (directly or through another fixture) is e2e.
E2E_FIXTURES = frozenset({
    "fx_server", "fx_server_with_key",          # tests/integration: `airobackend serve` as a subprocess
    "parallel_server",                          # tests/server/test_server_parallel.py: uvicorn on a loopback port
    "cluster",                                  # tests/test_ray.py: a Ray cluster of this machine (raylets, workers)
})


def classify(item) -> str:
    """The layer of a collected test, from its markers and the fixtures it uses."""
    if item.get_closest_marker("slow"):
        return "slow"
    if item.get_closest_marker("e2e") or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "e2e"
    return "unit"


_outside = [0]       # > 0 while a one-off cache fill runs (`outside_the_test`)


@contextlib.contextmanager
def outside_the_test():
    """What runs in the block is not the test's own doing (a session fixture filling a cache once, such as the real
    model's download): a Watch does not count it."""
    _outside[0] += 1
    try:
        yield
    finally:
        _outside[0] -= 1


class Watch:
    """While installed, records each process spawned and each socket put to listen (and lets them happen)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def _note(self, what: str) -> None:
        if _outside[0]:
            return
        where = "".join(traceback.format_stack(limit=6)[:-2]).rstrip()
        self.started.append(f"{what}\n{where}")

    def _wrap(self, owner, name: str, what) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self._note(what(*args) if callable(what) else what)
            return original(*args, **kwargs)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self) -> "Watch":
        self._wrap(subprocess.Popen, "_execute_child", lambda popen, args, *rest: f"a subprocess: {args!r}"[:200])
        self._wrap(_posixsubprocess, "fork_exec", "a process (multiprocessing)")
        self._wrap(os, "fork", "a forked process")
        self._wrap(os, "system", lambda cmd: f"a shell: {cmd!r}"[:200])
        self._wrap(socket.socket, "listen", lambda sock, *a: f"a listening socket {sock.getsockname()}")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def check_unit(item, phase: str, watch: Watch) -> None:
    if watch.started:
        pytest.fail(f"a unit test started {watch.started[0]}\n(during {phase}): mark it e2e, or use no process or "
                    "server (tests/layers.py)", pytrace=False)


# ---------------------------------------------------------------------------------------------- hooks

_LAYER = pytest.StashKey[str]()
_STARTED = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)             # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = classify(item)
        item.stash[_LAYER] = layer
        if layer != "slow":
            item.add_marker(layer)


def _watched(item, phase: str):
    log = os.environ.get("AIRO_LAYERS_LOG")
    layer = item.stash.get(_LAYER, "unit")
    if layer != "unit" and not log:
        return (yield)
    with Watch() as watch:
        result = yield
    if log:
        item.stash.setdefault(_STARTED, []).extend(s.splitlines()[0] for s in watch.started)
        if phase == "teardown":
            with open(log, "a") as f:
                f.write(json.dumps({"id": item.nodeid, "layer": layer, "started": item.stash[_STARTED]}) + "\n")
        return result
    check_unit(item, phase, watch)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _watched(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _watched(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    return (yield from _watched(item, "teardown"))
