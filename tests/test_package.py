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


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "airobackend", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ("serve", "run", "inspect"):
        assert cmd in out.stdout


def test_every_package_folder_is_installed():
    """`pip install /path/to/airobackend` (how the host integrations install it) builds a wheel from the package list
    in pyproject.toml: a folder missing there is missing from every non-editable install (`airobackend serve` once)."""
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    where = {pkg: root / folder for pkg, folder in tool["package-dir"].items()}
    found = set()
    for pkg, folder in where.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((pkg, *rel)))
    assert found == listed, f"packages on disk {sorted(found)}, listed {sorted(listed)}"
