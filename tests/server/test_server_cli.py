"""`airobackend serve`: KoboldCpp's command line, AIRO_* environment fallbacks, the banner, and a real start."""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from airobackend.commands import serve

from fakes import free_port
from sync import ServeOutput


def parse(argv):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_koboldcpp_command_line():
    s = serve.settings_from_args(parse(["model.gguf", "5002", "--contextsize", "4096", "--threads", "3",
                                        "--password", "k", "--multiuser", "--disable-adapter", "openai,textgen",
                                        "--cors", "http://a.example", "--quiet"]), environ={})
    assert (s.model, s.port, s.n_ctx, s.n_threads, s.api_key) == ("model.gguf", 5002, 4096, 3, "k")
    assert s.multiuser == 6 and s.disable_adapters == ("openai", "textgen") and s.cors == "http://a.example"
    assert s.quiet is True and s.host == "127.0.0.1"
    s = serve.settings_from_args(parse(["--model", "m.gguf", "--port", "7000", "--api-key", "x", "-c", "512",
                                        "--multiuser", "0", "--textgen-stream-port", "0", "--admin-key", "adm"]),
                                 environ={})
    assert (s.model, s.port, s.api_key, s.n_ctx, s.multiuser, s.textgen_stream_port, s.admin_key) == \
        ("m.gguf", 7000, "x", 512, 0, 0, "adm")
    defaults = serve.settings_from_args(parse([]), environ={})
    assert (defaults.port, defaults.host, defaults.textgen_stream_port, defaults.model) == \
        (5001, "127.0.0.1", 5005, None)


def test_multiuser_counts_as_koboldcpp_does():
    # KoboldCpp 1.76 `koboldcpp.py`: --multiuser N admits N requests (N-1 waiting); 1 (and the bare flag) lets 6 wait;
    # 0 none.
    waiting = {argv: serve.settings_from_args(parse(list(argv)), environ={}).multiuser
               for argv in [(), ("--multiuser",), ("--multiuser", "1"), ("--multiuser", "3"), ("--multiuser", "0")]}
    assert waiting == {(): 6, ("--multiuser",): 6, ("--multiuser", "1"): 6, ("--multiuser", "3"): 2,
                       ("--multiuser", "0"): 0}


def test_hparam_overrides_for_ggml_v3_files():
    # llama.cpp's spellings and KoboldCpp's --ropeconfig SCALE BASE reach the loader through Settings.
    s = serve.settings_from_args(parse(["m.bin", "--n-gqa", "8", "--rms-norm-eps", "1e-5",
                                        "--rope-freq-base", "20000", "--rope-freq-scale", "0.5"]), environ={})
    assert (s.n_gqa, s.rms_norm_eps, s.rope_freq_base, s.rope_freq_scale) == (8, 1e-5, 20000.0, 0.5)
    s = serve.settings_from_args(parse(["m.bin", "--ropeconfig", "0.25", "10000"]), environ={})
    assert (s.rope_freq_scale, s.rope_freq_base) == (0.25, 10000.0)
    s = serve.settings_from_args(parse([]), environ={"AIRO_N_GQA": "8", "AIRO_ROPE_FREQ_BASE": "5e5"})
    assert (s.n_gqa, s.rope_freq_base, s.rms_norm_eps) == (8, 5e5, None)


def test_every_flag_falls_back_to_the_environment():
    env = {"AIRO_PORT": "6001", "AIRO_HOST": "0.0.0.0", "AIRO_API_KEY": "envkey", "AIRO_N_CTX": "1024",
           "AIRO_MULTIUSER": "3", "AIRO_CORS": "http://b.example", "AIRO_DISABLE_ADAPTERS": "openai",
           "AIRO_TEXTGEN_STREAM_PORT": "0", "AIRO_MODEL": "env.gguf", "AIRO_QUIET": "1",
           "AIRO_ADMIN_KEY": "a", "AIRO_MODEL_DIR": "/models", "AIRO_N_THREADS": "2", "AIRO_MAX_BODY_BYTES": "100"}
    s = serve.settings_from_args(parse([]), environ=env)
    assert (s.port, s.host, s.api_key, s.n_ctx, s.multiuser, s.cors, s.disable_adapters) == \
        (6001, "0.0.0.0", "envkey", 1024, 3, "http://b.example", ("openai",))
    assert (s.textgen_stream_port, s.model, s.quiet, s.admin_key, s.model_dir, s.n_threads, s.max_body_bytes) == \
        (0, "env.gguf", True, "a", "/models", 2, 100)
    s = serve.settings_from_args(parse(["--port", "6002", "other.gguf"]), environ=env)
    assert s.port == 6002 and s.model == "other.gguf"          # the command line wins


def test_banner_lists_each_protocol_and_flags_the_demo_model():
    s = serve.settings_from_args(parse(["--host", "0.0.0.0", "--port", "5001"]), environ={})
    info = {"name": "tiny", "mix": "q8_0", "n_ctx": 256, "template": "airoboros"}
    text = serve.banner(s, [("0.0.0.0", 5001), ("0.0.0.0", 5005)], {"kobold", "textgen", "openai"}, info, True)
    assert "RANDOM weights" in text
    assert "http://127.0.0.1:5001/api " in text and "http://127.0.0.1:5001/v1 " in text
    assert "ws://127.0.0.1:5005/api/v1/stream" in text and "http://127.0.0.1:5001/docs" in text
    text = serve.banner(s, [("127.0.0.1", 5001)], {"openai", "llamacpp"}, info, False)
    assert "/v1" in text and "KoboldAI" not in text and "RANDOM" not in text
    assert "llamacpp" not in text, "the slot routes answer 501 without a prompt-cache folder: not advertised"
    s = serve.settings_from_args(parse(["--prompt-cache-dir", "/srv/kv"]), environ={})
    text = serve.banner(s, [("127.0.0.1", 5001)], {"openai", "llamacpp"}, info, False)
    assert "llama.cpp slots (admin)    http://127.0.0.1:5001/slots/ID?action=save|restore|erase" in text


@pytest.mark.e2e       # `airobackend` as a subprocess
def test_serve_starts_with_the_demo_model_and_stops_on_ctrl_c():
    port = free_port()
    # the demo model in the session's cache root (a fresh root would compile every kernel again)
    env = dict(os.environ, AIRO_TEXTGEN_STREAM_PORT="0", AIRO_N_CTX="128")
    proc = subprocess.Popen([sys.executable, "-m", "airobackend", "--port", str(port), "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = io.BytesIO()
    output = ServeOutput(proc.stderr, log)
    try:
        assert output.wait(), "serve exited or never listened: " + log.getvalue().decode(errors="replace")
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/model", timeout=30)
        assert r.json()["result"].startswith("koboldcpp/airobackend-demo")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        output.close()
        err = log.getvalue().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "RANDOM weights" in err                      # the banner says the demo model prints nonsense
    assert "without an API key" not in err              # loopback: nothing to warn about
    assert f"http://127.0.0.1:{port}/v1" in err


def test_serve_refuses_a_bad_model_file_with_a_clear_message(tmp_path, capsys, monkeypatch):
    junk = tmp_path / "broken.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    monkeypatch.setenv("AIRO_MODEL_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("AIRO_TEXTGEN_STREAM_PORT", "0")       # the legacy port (5005) may be taken on this machine
    assert serve.main(parse(["--model", str(junk), "--port", str(free_port())])) == 1
    assert "cannot load the model" in capsys.readouterr().err
    assert serve.main(parse(["--model", "no-such-model", "--port", str(free_port())])) == 1
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.e2e       # a uvicorn server on a loopback port
@pytest.mark.parametrize("which", ["main", "textgen stream"])
def test_a_port_in_use_stops_serve_before_the_model_loads(which, tmp_path):
    """One line naming the port and the flag that changes it, exit status 2, and no model loaded."""
    port, stream_port = free_port(), free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port if which == "main" else stream_port))
    taken.listen()
    model = tmp_path / "never-read.gguf"        # a file that cannot load: reaching the load would say so
    model.write_bytes(b"GGUF" + b"\xff" * 64)
    env = dict(os.environ, AIRO_TEXTGEN_STREAM_PORT=str(stream_port))
    try:
        proc = subprocess.run([sys.executable, "-m", "airobackend", "serve", "--model", str(model), "--port",
                               str(port), "--host", "127.0.0.1", "--quiet"],
                              env=env, capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    busy = port if which == "main" else stream_port
    assert lines[0].startswith(f"error: port {busy} on 127.0.0.1 is already in use"), lines
    assert ("--port N" if which == "main" else "--textgen-stream-port N") in lines[0]
    assert "cannot load" not in proc.stderr


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_serve_async_reports_a_main_port_taken_after_the_check(demo_engine):
    from airobackend.server import PortInUse, serve_async

    from fakes import make_app
    app = make_app(demo_engine)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app.state.settings.port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match="already in use"):
            asyncio.run(serve_async(app, app.state.settings))


@pytest.mark.e2e       # `airobackend serve` as a subprocess
@pytest.mark.parametrize("command", ["serve", "run", "inspect"])
def test_help_states_each_default_once(command):
    out = subprocess.run([sys.executable, "-m", "airobackend", command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    entries = re.split(r"\n(?=  -|  [A-Z]+ )", out.stdout)       # one entry per option or positional
    assert len(entries) > 5
    for entry in entries:
        assert "default: None" not in entry, entry
        assert entry.count("default") <= 1, entry
