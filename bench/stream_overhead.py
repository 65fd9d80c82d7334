"""What streaming costs: tokens/s streamed over SSE and WebSocket vs the engine's own tokens/s, same model, same run.

    python bench/stream_overhead.py [--model FILE] [--tokens 256] [--runs 5] [--threads N]

The engine is measured in this process (`ModelManager.generate` iterated directly: no server, no event loop). The
streams come from a real `airobackend serve` process on a loopback port with the same model, context, threads,
request and sampler settings: KoboldCpp SSE (/api/extra/generate/stream), OpenAI SSE (/v1/completions, stream) and
text-generation-webui's WebSocket (/api/v1/stream). Runs alternate between the modes (engine, kobold, openai,
websocket, engine, ...) so machine load affects them alike; only one runs at a time. Every request is greedy with
EOS banned and every filter/penalty off, so each produces exactly --tokens tokens at the same cost.

Figures per mode (median over --runs):
  decode tok/s  (tokens - 1) / (time of the last event - time of the first event), as the client sees them: the
                streaming rate, without connection set-up and prompt evaluation;
  e2e tok/s     tokens / (time of the last event - time the request was sent);
  engine tok/s  the server's own eval rate during that stream (/api/extra/perf: last_token_count / last_eval),
                which shows whether streaming slowed the generation loop itself;
  overhead      1 - streamed decode tok/s / in-process decode tok/s;
  us/token      the time streaming adds per token (the overhead on another model is about this divided by its
                time per token).
Default model: the demo model (well under 1 ms a token: the worst case for relative overhead, since a per-token cost
weighs most on the fastest model). For a larger one without downloading anything, write a 7B-wide two-layer slice:
    python -c "from airobackend.formats.writer import write_synthetic_model as w; w('/tmp/7b-slice.gguf',
      mix='q4_0', n_vocab=32000, n_embd=4096, n_head=32, n_layer=2, n_ff=11008, tile_rows=64)"
    python bench/stream_overhead.py --model /tmp/7b-slice.gguf --tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect as ws_connect

PROMPT = "Once upon a time, in a land far away, there lived"
# The same sampler chain in every mode (each protocol has its own defaults): greedy, every filter and penalty off.
SAMPLER = {"temperature": 0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical": 1.0, "tfs": 1.0, "top_a": 0.0,
           "rep_pen": 1.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server subprocess: SIGTERM (it shuts down cleanly), SIGKILL if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def engine_run(manager, n: int) -> dict:
    from airobackend.types import GenerationRequest, SamplingParams

    sampling = SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, tfs=1.0, top_a=0.0,
                              repetition_penalty=1.0, ban_eos=True)
    req = GenerationRequest(prompt=PROMPT, max_tokens=n, sampling=sampling)
    t0 = time.perf_counter()
    times = []
    for ev in manager.generate(req):
        if ev.text or ev.finish_reason is not None:
            times.append(time.perf_counter())
    perf = manager.perf()
    return dict(t0=t0, first=times[0], last=times[-1], tokens=perf["last_token_count"],
                engine=perf["last_token_count"] / perf["last_eval"])


def kobold_run(url: str, n: int) -> dict:
    body = {"prompt": PROMPT, "max_length": n, "use_default_badwordsids": True, **SAMPLER}
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", url + "/api/extra/generate/stream", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.perf_counter())
    return dict(t0=t0, first=times[0], last=times[-1])


def openai_run(url: str, n: int) -> dict:
    body = {"prompt": PROMPT, "max_tokens": n, "ignore_eos": True, "stream": True, **SAMPLER}
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return dict(t0=t0, first=times[0], last=times[-1])


def ws_run(port: int, n: int) -> dict:
    body = {"prompt": PROMPT, "max_new_tokens": n, "ban_eos_token": True, **SAMPLER}
    with ws_connect(f"ws://127.0.0.1:{port}/api/v1/stream", max_size=None) as ws:
        t0 = time.perf_counter()
        ws.send(json.dumps(body))
        times = []
        while True:
            msg = json.loads(ws.recv())
            if msg["event"] == "text_stream" and msg["text"]:
                times.append(time.perf_counter())
            if msg["event"] == "stream_end":
                times.append(time.perf_counter())
                break
    return dict(t0=t0, first=times[0], last=times[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model file (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=1024)
    args = ap.parse_args(argv)

    from airobackend.manager import ModelManager
    from airobackend.settings import Settings

    tmp = tempfile.mkdtemp(prefix="airo-bench-")
    if args.model:
        model = str(Path(args.model).resolve())
    else:
        from airobackend.demo import demo_model_path
        model = str(demo_model_path())
    manager = ModelManager(Settings(n_ctx=args.ctx, n_threads=args.threads, multiuser=0))
    manager.load(manager.register(model))

    port = free_port()
    log = open(os.path.join(tmp, "serve.log"), "w")
    cmd = [sys.executable, "-m", "airobackend", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--contextsize", str(args.ctx), "--multiuser", "0", "--quiet"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, AIRO_TEXTGEN_STREAM_PORT="0"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None:
                    raise SystemExit("serve exited: " + Path(tmp, "serve.log").read_text())
                time.sleep(0.2)
        modes = {"engine (in process)": lambda: engine_run(manager, args.tokens),
                 "KoboldCpp SSE": lambda: kobold_run(url, args.tokens),
                 "OpenAI SSE": lambda: openai_run(url, args.tokens),
                 "WebSocket": lambda: ws_run(port, args.tokens)}
        for fn in modes.values():             # warm-up: JIT, prompt cache, connections
            fn()
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.runs):
            for name, fn in modes.items():
                r = fn()
                if "engine" not in r:
                    perf = httpx.get(url + "/api/extra/perf").json()
                    assert perf["last_token_count"] == args.tokens, perf
                    r["engine"] = perf["last_token_count"] / perf["last_eval"]
                    r["tokens"] = perf["last_token_count"]
                results[name].append(r)
    finally:
        proc.terminate()
        proc.wait(30)

    n = args.tokens
    info = manager.model_info()
    print(f"model {info['name']} ({info['mix']}), {n} tokens per request, {args.runs} runs per mode, "
          f"median figures")
    print(f"{'mode':22s} {'decode tok/s':>13s} {'e2e tok/s':>10s} {'engine tok/s':>13s} {'overhead':>9s} "
          f"{'us/token':>9s}")
    base = statistics.median((n - 1) / (r["last"] - r["first"]) for r in results["engine (in process)"])
    for name, rs in results.items():
        decode = statistics.median((n - 1) / (r["last"] - r["first"]) for r in rs)
        e2e = statistics.median(n / (r["last"] - r["t0"]) for r in rs)
        eng = statistics.median(r["engine"] for r in rs)
        over = "" if name.startswith("engine") else f"{100 * (1 - decode / base):+8.1f}%"
        cost = "" if name.startswith("engine") else f"{1e6 * (1 / decode - 1 / base):+9.0f}"
        print(f"{name:22s} {decode:13.1f} {e2e:10.1f} {eng:13.1f} {over:>9s} {cost:>9s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
