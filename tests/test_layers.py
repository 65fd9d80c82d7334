"""The test layers (tests/layers.py): each test is exactly one of unit, e2e or slow, and a unit test that starts a
process or a listening server fails, naming what it started."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layers import LAYERS

HERE = Path(__file__).resolve().parent


def test_every_collected_test_has_exactly_one_layer(request):
    for item in request.session.items:
        marked = [name for name in LAYERS if item.get_closest_marker(name)]
        assert len(marked) == 1 or marked[:1] == ["e2e"] and marked[1:] == ["slow"], (item.nodeid, marked)


def test_the_default_run_leaves_out_only_slow_tests(pytestconfig):
    assert pytestconfig.getini("addopts")[-2:] == ["-m", "not slow"]


SAMPLE = '''
import socket
import subprocess
import sys

import pytest


@pytest.fixture
def child():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_pure():
    assert sum(range(4)) == 6


def test_spawns():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_spawns_in_a_fixture(child):
    pass


def test_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()


@pytest.mark.e2e
def test_spawns_and_says_so():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.slow
def test_slow_spawns():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


@pytest.mark.e2e        # runs pytest on a sample suite in a subprocess
def test_a_unit_test_that_starts_a_process_or_a_server_fails(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from layers import (pytest_collection_modifyitems, pytest_runtest_call, pytest_runtest_setup,
                            pytest_runtest_teardown)
        """))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    unit\n    e2e\n    slow\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)

    def run(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args, "test_sample.py"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        return r.stdout + r.stderr

    out = run()
    assert "PASSED test_sample.py::test_pure" in out
    assert "PASSED test_sample.py::test_spawns_and_says_so" in out and "PASSED test_sample.py::test_slow_spawns" in out
    assert "FAILED test_sample.py::test_spawns - Failed: a unit test started a subprocess" in out, out
    assert "FAILED test_sample.py::test_listens - Failed: a unit test started a listening" in out, out
    assert "ERROR test_sample.py::test_spawns_in_a_fixture - Failed: a unit test started" in out, out
    assert "a listening socket ('127.0.0.1'," in out and "(during call): mark it e2e" in out
    # selection by layer
    out = run("-m", "unit")
    assert "2 failed, 1 passed, 2 deselected, 1 error" in out and "test_spawns_and_says_so" not in out, out
    out = run("-m", "e2e")
    assert "1 passed, 5 deselected" in out, out
