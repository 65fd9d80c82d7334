"""Continuous batching through the server: real concurrent streaming clients against `airobackend serve --parallel N`.

    python bench/batching_http.py [--model FILE] [--parallel 1,4] [--streams 1,2,4,8] [--tokens 32] [--rounds 3]
                                  [--protocols kobold,openai,ws] [--threads 2]

One `airobackend serve` per --parallel value (all on the same model, started once, alive together and measured in
turn), each admitting every client (--multiuser) so none is answered busy. Per server, protocol and stream count N:
N clients, one thread and one connection each (as N frontends), start together and each streams --tokens tokens
(greedy, EOS banned, every filter off, a prompt of its own that no slot holds yet) over
  kobold   KoboldCpp SSE                 POST /api/extra/generate/stream
  openai   OpenAI SSE                    POST /v1/completions, "stream": true
  ws       text-generation-webui         WebSocket /api/v1/stream (the legacy API's streaming socket)
Printed (medians over --rounds; rounds alternate servers, protocols and stream counts, so machine load affects them
alike):
  agg tok/s        all clients' tokens / (last client's last token - the moment the requests were sent): HTTP,
                   prompts, scheduling and streaming included;
  per-stream       each client's (tokens - 1) / (its last token - its first token), the median client;
  vs 1             agg tok/s / the same server's and protocol's 1-stream agg tok/s, measured in the same run;
  CPU tok/s        all clients' tokens / (the server process's CPU seconds during the measurement / its threads):
                   on a machine that other work shares, the figure that moves least (the HTTP layer's CPU is in it);
  TTFT             per server and protocol: 3 clients stream long answers; once each has its first token, a 4th
                   request is sent; the seconds to its first token (with --parallel 1 it waits for the 3 to finish).
The server's own count of generated tokens (GET /metrics, llamacpp:tokens_predicted_total) is checked against the
clients' after every measurement, so each figure counts the tokens the server really made.

Default model: bench/batching.py's 7B-wide two-layer q4_0 slice (written once under ~/.cache/airobackend/bench or
$AIRO_BENCH_DIR; its vocabulary is synthetic, the text it makes is nonsense, which costs the same). The whole
machine is shared by the clients and the server: run it where nothing else runs, or quote the load it prints.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect as ws_connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import default_model            # noqa: E402  (bench/ is not a package)
from stream_overhead import SAMPLER, free_port, stop_server  # noqa: E402

PROTOCOLS = {"kobold": "KoboldCpp SSE", "openai": "OpenAI SSE", "ws": "TGW WebSocket"}
BASE_PROMPT = "once upon a time, in a land far away, there lived a"


def load_line() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


class Server:
    """One `airobackend serve --parallel N` on a loopback port (its log in `log_path`)."""

    def __init__(self, model: str, parallel: int, ctx: int, threads: int, waiting: int, log_path: str) -> None:
        self.parallel, self.threads = parallel, threads or os.cpu_count() or 1
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "airobackend", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--contextsize", str(ctx), "--parallel", str(parallel),
               "--multiuser", str(waiting + 1), "--prompt-cache-mb", "0", "--quiet"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, AIRO_TEXTGEN_STREAM_PORT="0"))
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit("serve exited: " + Path(log_path).read_text()[-3000:])
            time.sleep(0.2)
        raise SystemExit("serve did not start")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system, all its threads; /proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def predicted(self) -> int:
        """llamacpp:tokens_predicted_total of GET /metrics."""
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith("llamacpp:tokens_predicted_total "):
                return int(float(line.split()[1]))
        raise RuntimeError("no llamacpp:tokens_predicted_total in /metrics")

    def idle(self) -> None:
        """Wait until no slot is busy and nothing waits (aborted streams end within a step)."""
        for _ in range(600):
            p = httpx.get(self.url + "/api/extra/perf", timeout=30).json()
            if p["idle"] == 1 and p["queue"] == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"server with --parallel {self.parallel} never went idle: {p}")

    def close(self) -> None:
        stop_server(self.proc)
        self.log.close()


class Stream:
    """One streaming client: `run()` sends its request and records when it was sent and when each token came;
    `first` is set once the first token is in, `ended` when it is over; `stop` makes it hang up after the next
    token."""

    def __init__(self, server: Server, proto: str, prompt: str, n_tokens: int) -> None:
        self.server, self.proto, self.prompt, self.n = server, proto, prompt, n_tokens
        self.sent = 0.0
        self.times: list[float] = []
        self.first = threading.Event()
        self.stop = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def _token(self) -> bool:
        self.times.append(time.perf_counter())
        self.first.set()
        return self.stop.is_set()

    def run(self, start: threading.Barrier | None = None) -> None:
        try:
            if start is not None:
                start.wait()
            getattr(self, "_" + self.proto)()
        except BaseException as e:      # reported by the caller
            self.error = e
            self.first.set()
        finally:
            self.ended.set()

    def _kobold(self) -> None:
        body = {"prompt": self.prompt, "max_length": self.n, "use_default_badwordsids": True, **SAMPLER}
        with httpx.Client(timeout=600) as http:
            self.sent = time.perf_counter()
            with http.stream("POST", self.server.url + "/api/extra/generate/stream", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: ") and json.loads(line[6:]).get("token") and self._token():
                        return

    def _openai(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": self.n, "ignore_eos": True, "stream": True, **SAMPLER}
        with httpx.Client(timeout=600) as http:
            self.sent = time.perf_counter()
            with http.stream("POST", self.server.url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("text") and self._token():
                        return

    def _ws(self) -> None:
        body = {"prompt": self.prompt, "max_new_tokens": self.n, "ban_eos_token": True, **SAMPLER}
        with ws_connect(f"ws://127.0.0.1:{self.server.port}/api/v1/stream", max_size=None, open_timeout=60) as ws:
            self.sent = time.perf_counter()
            ws.send(json.dumps(body))
            while True:
                msg = json.loads(ws.recv(timeout=600))
                if msg["event"] == "stream_end":
                    return
                if msg["event"] == "text_stream" and msg["text"] and self._token():
                    return


def start(streams: list[Stream], together: bool = True) -> list[threading.Thread]:
    barrier = threading.Barrier(len(streams)) if together and len(streams) > 1 else None
    threads = [threading.Thread(target=s.run, args=(barrier,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return threads


def join(threads: list[threading.Thread], streams: list[Stream]) -> None:
    for t in threads:
        t.join(1800)
        if t.is_alive():
            raise RuntimeError("a client hung")
    for s in streams:
        if s.error is not None:
            raise RuntimeError(f"{s.proto} client failed: {type(s.error).__name__}: {s.error}")


def concurrent(server: Server, proto: str, n: int, n_tok: int, tag: str) -> tuple[float, float, float]:
    """n clients at once, n_tok tokens each: (aggregate tok/s, median per-stream tok/s, aggregate tokens per
    second of the server's CPU time per thread)."""
    before = server.predicted()
    cpu0 = server.cpu_seconds()
    streams = [Stream(server, proto, f"{tag} client {i} of {n}: {BASE_PROMPT}", n_tok) for i in range(n)]
    join(start(streams), streams)
    cpu = server.cpu_seconds() - cpu0
    made = server.predicted() - before
    if made != n * n_tok:
        raise RuntimeError(f"the server made {made} tokens for {n} x {n_tok} requested ({proto}, --parallel "
                           f"{server.parallel})")
    t0 = min(s.sent for s in streams)
    t_end = max(s.times[-1] for s in streams)
    per = [(len(s.times) - 1) / (s.times[-1] - s.times[0]) for s in streams if len(s.times) > 1]
    return (n * n_tok / (t_end - t0), statistics.median(per) if per else float("nan"),
            n * n_tok / max(cpu / server.threads, 1e-9))


def first_token_under_load(server: Server, proto: str, n_tok: int, busy_tokens: int, tag: str) -> float:
    """Seconds to the first token of a request sent while 3 others stream (those in slots have had their first
    token; with fewer than 4 slots the rest wait in line, as the new one does). A try in which a busy stream ended
    before all three were in (a loaded machine starts client threads late) is thrown away and made again."""
    running = min(3, server.parallel)
    for attempt in range(5):
        busy = [Stream(server, proto, f"{tag} busy {i} try {attempt}: {BASE_PROMPT}", busy_tokens) for i in range(3)]
        threads = start(busy, together=False)
        for s in busy[:running]:             # the ones in slots are decoding; the rest wait in line
            s.first.wait()
        while True:
            in_line = httpx.get(server.url + "/api/extra/perf", timeout=30).json()["queue"]
            ready = in_line >= 3 - running
            spoiled = any(s.ended.is_set() for s in busy)
            if ready or spoiled:
                break
            time.sleep(0.02)
        late = None
        if ready and not spoiled:
            late = Stream(server, proto, f"{tag} late: {BASE_PROMPT}", n_tok)
            late.stop.set()                  # hang up after the first token
            t = threading.Thread(target=late.run, daemon=True)
            t.start()
            late.first.wait()
            threads.append(t)
        for s in busy:                       # then the others hang up too
            s.stop.set()
        join(threads, busy + ([late] if late else []))
        server.idle()
        if late is not None:
            return late.times[0] - late.sent
    raise RuntimeError(f"no valid time-to-first-token try in 5 ({proto}, --parallel {server.parallel}): "
                       f"raise --busy-tokens")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a GGUF/GGML file (default: bench/batching.py's 7B-wide two-layer slice)")
    ap.add_argument("--mix", default="q4_0", help="mix of the default slice")
    ap.add_argument("--layers", type=int, default=2, help="layers of the default slice")
    ap.add_argument("--parallel", default="1,4", help="--parallel of each server")
    ap.add_argument("--streams", default="1,2,4,8", help="concurrent clients")
    ap.add_argument("--protocols", default="kobold,openai,ws", help=f"of {','.join(PROTOCOLS)}")
    ap.add_argument("--tokens", type=int, default=32, help="tokens each client streams")
    ap.add_argument("--busy-tokens", type=int, default=0,
                    help="tokens of the 3 busy streams of the TTFT figure (default 2 x --tokens; 0 = no TTFT)")
    ap.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-token figure")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512, help="--contextsize (each slot's)")
    args = ap.parse_args(argv)
    parallels = sorted({int(p) for p in args.parallel.split(",")})
    streams = sorted({int(s) for s in args.streams.split(",")} | {1})
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols or min(parallels) < 1 or args.tokens < 2 or args.rounds < 1:
        ap.error(f"--protocols from {','.join(PROTOCOLS)} (got {bad or 'none'}); --parallel >= 1, --tokens >= 2, "
                 f"--rounds >= 1")
    busy_tokens = 0 if args.no_ttft else (args.busy_tokens or 2 * args.tokens)

    model = str(Path(args.model).resolve()) if args.model else str(default_model(args.mix, args.layers))
    tmp = tempfile.mkdtemp(prefix="airo-batching-http-")
    print(f"model {Path(model).name}; servers --parallel {'/'.join(map(str, parallels))}, {args.threads} threads "
          f"each, context {args.ctx}; {args.tokens} tokens per client, {args.rounds} rounds, medians; logs in {tmp}")
    print(f"before: {load_line()} ({os.cpu_count()} CPUs)", flush=True)
    servers = {}
    try:
        for p in parallels:
            servers[p] = Server(model, p, args.ctx, args.threads, max(streams) + 4,
                                os.path.join(tmp, f"serve-np{p}.log"))
        for s in servers.values():            # warm-up: kernels, the batch shapes, connections, each protocol
            for proto in protocols:
                concurrent(s, proto, min(s.parallel, max(streams)), 4, "warm")
        agg: dict = {}
        per: dict = {}
        cpu: dict = {}
        ttft: dict = {}
        for r in range(args.rounds):
            for n in streams:
                for proto in protocols:
                    for p, s in servers.items():
                        a, b, c = concurrent(s, proto, n, args.tokens, f"round {r}")
                        agg.setdefault((p, proto, n), []).append(a)
                        per.setdefault((p, proto, n), []).append(b)
                        cpu.setdefault((p, proto, n), []).append(c)
            if busy_tokens:
                for proto in protocols:
                    for p, s in servers.items():
                        ttft.setdefault((p, proto), []).append(
                            first_token_under_load(s, proto, args.tokens, busy_tokens, f"round {r}"))
            print(f"round {r + 1}/{args.rounds} done, {load_line()}", flush=True)
    finally:
        for s in servers.values():
            s.close()
    print(f"after: {load_line()}\n")

    med = {k: statistics.median(v) for k, v in agg.items()}
    print("| --parallel | clients | " + " | ".join(f"{PROTOCOLS[p]}: agg tok/s (vs 1), per-stream" for p in protocols)
          + " |")
    print("|---|---|" + "---|" * len(protocols))
    for p in parallels:
        for n in streams:
            cells = [f"{med[(p, proto, n)]:.1f} ({med[(p, proto, n)] / med[(p, proto, 1)]:.2f}x), "
                     f"{statistics.median(per[(p, proto, n)]):.1f}" for proto in protocols]
            print(f"| {p} | {n} | " + " | ".join(cells) + " |")
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    print("\nin the server's CPU time per thread (tokens / (CPU seconds / threads)): the figure a shared machine "
          "moves least")
    print("| --parallel | clients | " + " | ".join(f"{PROTOCOLS[p]}: CPU tok/s (vs 1)" for p in protocols) + " |")
    print("|---|---|" + "---|" * len(protocols))
    for p in parallels:
        for n in streams:
            print(f"| {p} | {n} | " + " | ".join(f"{mc[(p, proto, n)]:.1f} ({mc[(p, proto, n)] / mc[(p, proto, 1)]:.2f}x)"
                                                 for proto in protocols) + " |")
    if len(parallels) > 1:
        lo, hi = parallels[0], parallels[-1]
        print(f"\n1 client, --parallel {hi} / --parallel {lo} agg tok/s: "
              + ", ".join(f"{PROTOCOLS[proto]} {med[(hi, proto, 1)] / med[(lo, proto, 1)]:.2f}" for proto in protocols))
        n = max(streams)
        print(f"{n} clients, --parallel {hi} / --parallel {lo} agg tok/s: "
              + ", ".join(f"{PROTOCOLS[proto]} {med[(hi, proto, n)] / med[(lo, proto, n)]:.2f}" for proto in protocols))
        for n in (1, max(streams)):
            print(f"{n} client{'s' if n > 1 else ''}, --parallel {hi} / --parallel {lo} in CPU time: "
                  + ", ".join(f"{PROTOCOLS[proto]} {mc[(hi, proto, n)] / mc[(lo, proto, n)]:.2f}"
                              for proto in protocols))
    if ttft:
        print(f"\ntime to first token of a request sent while 3 others stream ({busy_tokens} tokens each), seconds:")
        for p in parallels:
            print(f"  --parallel {p}: " + ", ".join(f"{PROTOCOLS[proto]} {statistics.median(ttft[(p, proto)]):.3f}"
                                                     for proto in protocols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
