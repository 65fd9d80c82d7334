"""The package layout promises: kernels and adapters live under airobackend, never as top-level packages."""
import importlib
import subprocess
import sys

import pytest


def test_subpackages_are_namespaced():
    import airobackend.adapters
    import airobackend.kernels
    assert airobackend.kernels.__name__ == "airobackend.kernels"
    assert airobackend.adapters.__name__ == "airobackend.adapters"
    # Our directories must not shadow PyPI's unrelated top-level `kernels` / `adapters` packages.
    for name in ("kernels", "adapters"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "airobackend" not in str(spec.origin or "")


def test_settings_from_env_and_overrides():
    from airobackend.settings import Settings
    s = Settings.from_env({"AIRO_PORT": "6000", "AIRO_QUIET": "yes", "AIRO_DISABLE_ADAPTERS": "kobold,openai"},
                          n_ctx=4096)
    assert (s.port, s.quiet, s.disable_adapters, s.n_ctx) == (6000, True, ("kobold", "openai"), 4096)
    with pytest.raises(ValueError, match="AIRO_PORT"):
        Settings.from_env({"AIRO_PORT": "five"})


@pytest.mark.e2e       # `airobackend` as a subprocess
def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "airobackend", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ("serve", "run", "inspect"):
        assert cmd in out.stdout


def test_every_package_folder_is_installed():
    """`pip install /path/to/airobackend` (how the host integrations install it) builds a wheel from the packages
    setuptools finds under pyproject's [tool.setuptools.packages.find]: every folder of the tree with an __init__.py,
    kernels/ and adapters/ included through their airobackend/ links, must be among them."""
    import tomllib
    from pathlib import Path

    from setuptools import find_packages
    root = Path(__file__).resolve().parents[1]
    find = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    listed = set(find_packages(str(root), include=find["include"]))
    on_disk = set()
    for pkg, folder in {"airobackend": root / "airobackend", "airobackend.kernels": root / "kernels",
                        "airobackend.adapters": root / "adapters"}.items():
        for init in folder.rglob("__init__.py"):
            on_disk.add(".".join((pkg, *init.parent.relative_to(folder).parts)))
    assert {"airobackend.commands", "airobackend.kernels", "airobackend.adapters"} <= on_disk
    assert on_disk <= listed, f"folders not packaged: {sorted(on_disk - listed)}"
