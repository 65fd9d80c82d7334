"""The bridge both integrations vendor: one file, two copies, clear errors before any engine is involved."""
from __future__ import annotations

import importlib.util
import re
import socket

import pytest

from integration_support import LOLLMS_BINDING, TGW_EXTENSION


def load_bridge():
    spec = importlib.util.spec_from_file_location("airo_bridge_under_test", TGW_EXTENSION / "airo_bridge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_integration_folders_carry_the_same_bridge():
    a = (TGW_EXTENSION / "airo_bridge.py").read_bytes()
    b = (LOLLMS_BINDING / "airo_bridge.py").read_bytes()
    assert a == b, "edit integration/text_generation_webui/airobackend/airo_bridge.py and copy it to the LoLLMS folder"


def test_bridge_needs_only_the_standard_library():
    """Remote mode must work in a host that has nothing installed; airobackend is imported lazily, in-process only."""
    import ast
    import sys
    names = set()
    for node in ast.parse((TGW_EXTENSION / "airo_bridge.py").read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names and names <= set(sys.stdlib_module_names) | {"__future__"}, names


def test_unknown_options_and_modes_are_refused_with_the_known_names():
    bridge = load_bridge()
    with pytest.raises(bridge.BridgeError, match="temprature.*known"):
        bridge.check_options({"temprature": 0.5})
    assert bridge.check_options({"temperature": 0.5, "top_k": None}) == {"temperature": 0.5}
    with pytest.raises(bridge.BridgeError, match="unknown mode 'cloud'"):
        bridge.connect("cloud")
    with pytest.raises(bridge.BridgeError, match="remote mode needs the URL"):
        bridge.connect("remote", server_url="")
    with pytest.raises(bridge.BridgeError, match="not an http"):
        bridge.RemoteBackend("ftp://example.org")


def test_remote_urls_are_normalised():
    bridge = load_bridge()
    assert bridge.RemoteBackend("127.0.0.1:5001/").url == "http://127.0.0.1:5001"
    assert bridge.RemoteBackend("https://host.example/airo/").url == "https://host.example/airo"


def test_a_server_that_is_not_there_is_named_in_the_error():
    bridge = load_bridge()
    with socket.socket() as s:          # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = bridge.RemoteBackend(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(bridge.BridgeError, match=f"127.0.0.1:{port}.*airobackend serve"):
        backend.list_models()
    with pytest.raises(bridge.BridgeError, match=f"127.0.0.1:{port}"):
        list(backend.stream("hello", {"max_tokens": 4}))


def test_model_names_with_and_without_extensions_are_the_same_model():
    same = load_bridge().same_model
    assert same("fx-q8_0.ggmlv3.bin", "fx-q8_0.ggmlv3") and same("fx-q8_0.ggmlv3.bin", "fx-q8_0")
    assert same("airoboros-65b.Q4_K_M.gguf", "airoboros-65b.Q4_K_M")
    assert not same("fx-q8_0.ggmlv3.bin", "fx-q4_0.gguf")


def test_every_install_hint_names_a_command_that_works():
    """The project is not on PyPI, so `pip install airobackend` does not resolve: hints name the project's folder."""
    import re
    assert load_bridge().INSTALL_HINT.startswith("pip install /path/to/airobackend")
    files = [p for folder in (TGW_EXTENSION, LOLLMS_BINDING) for p in folder.iterdir() if p.suffix in (".py", ".md", ".txt")]
    files.append(TGW_EXTENSION.parents[1] / "README.md")
    for path in files:
        assert not re.search(r"pip install airobackend(?![\w/-])", path.read_text()), path


def test_an_in_process_load_says_in_the_hosts_console_what_it_is_doing(fx_model, capsys):
    """The hosts do not show airobackend's log: the load and the kernel warm-up (minutes on a first start) are
    printed, one line per kernel group, so the host does not sit silent."""
    backend = load_bridge().InProcessBackend(fx_model, n_ctx=128)
    try:
        out = capsys.readouterr().out
    finally:
        backend.close()
    assert "airobackend: loading fx-q4_0" in out and ": 100%" in out, out
    kernels = [line for line in out.splitlines() if re.search(r"kernels.*(compiled|loaded from the cache) in", line)]
    assert len(kernels) == 3 and all(line.startswith("airobackend: ") for line in kernels), out
