"""Helpers for the hardening tests: a real `airobackend serve` process on a loopback port, its RSS, and strict
parsers of the three streaming framings (KoboldCpp SSE, OpenAI SSE, text-generation-webui WebSocket).

The parsers raise `Malformed` on anything a strict client would trip over, so a soak test can count every stream
that is not well-formed to its end.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import httpx

from sync import ServeOutput

REPO = Path(__file__).resolve().parents[2]


class Malformed(AssertionError):
    """A stream that a strict client of its protocol would not accept."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (VmRSS from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def listening_addresses(pid: int, port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) on which the process `pid` listens on `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port and inode in inodes:   # 0A = LISTEN
                out.append(addr)
    return out


class ServerProcess:
    """`python -m airobackend serve ARGS` on 127.0.0.1:<free port>, stderr to a file; a context manager."""

    def __init__(self, workdir: Path, *args: str, host: Optional[str] = "127.0.0.1",
                 env: Optional[dict] = None) -> None:
        self.port = free_port()
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "airobackend", "serve", "--port", str(self.port), "--quiet", *args]
        if host is not None:
            cmd += ["--host", host]
        self.cmd = cmd
        # The cache root (compiled kernels) stays the session's: a fresh one would compile every kernel again.
        self.env = dict(os.environ, AIRO_TEXTGEN_STREAM_PORT="0", AIRO_MODEL_DIR=str(self.workdir / "no-models"))
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=str(self.workdir), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._output = ServeOutput(self.proc.stdout, self._log)
        if self._output.wait():
            return self
        self.__exit__(None, None, None)
        raise RuntimeError("serve exited or never listened:\n" + self.stderr_text())

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._output.close()
        self.proc.stdout.close()
        self._log.close()


# ---------------------------------------------------------------------------------------------- strict parsers

def _json(data: str, what: str) -> dict:
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise Malformed(f"{what}: data is not JSON ({e}): {data[:200]!r}") from None
    if not isinstance(value, dict):
        raise Malformed(f"{what}: data is not a JSON object: {data[:200]!r}")
    return value


def _utf8(body: bytes, what: str) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed(f"{what}: body is not UTF-8 ({e})") from None


def parse_kobold_sse(body: bytes) -> tuple[str, str]:
    """KoboldCpp's stream: only `event: message\\ndata: {"token", "finish_reason"}\\n\\n` blocks, LF line ends
    (KoboldAI Lite's regex), "null" until the last block, whose reason is "stop" or "length".
    Returns (text, finish_reason)."""
    text = _utf8(body, "kobold")
    if "\r" in text:
        raise Malformed("kobold: CR in the stream (Lite's parser expects LF only)")
    if not text.endswith("\n\n"):
        raise Malformed(f"kobold: stream not terminated by a blank line: ...{text[-80:]!r}")
    blocks = text[:-2].split("\n\n")
    out, reason = [], None
    for i, block in enumerate(blocks):
        lines = block.split("\n")
        if len(lines) != 2 or lines[0] != "event: message" or not lines[1].startswith("data: "):
            raise Malformed(f"kobold: block {i} is not an event:/data: pair: {block[:200]!r}")
        ev = _json(lines[1][6:], "kobold")
        if set(ev) != {"token", "finish_reason"} or not isinstance(ev["token"], str):
            raise Malformed(f"kobold: block {i} has fields {sorted(ev)}")
        last = i == len(blocks) - 1
        if not last and ev["finish_reason"] != "null":
            raise Malformed(f"kobold: finish_reason {ev['finish_reason']!r} before the end")
        if last:
            if ev["finish_reason"] not in ("stop", "length"):
                raise Malformed(f"kobold: last finish_reason {ev['finish_reason']!r}")
            reason = ev["finish_reason"]
        out.append(ev["token"])
    return "".join(out), reason


def parse_openai_sse(body: bytes, *, chat: bool) -> tuple[str, str]:
    """An OpenAI stream: `data: <chunk>\\n\\n` blocks (SSE comments allowed: keep-alives), one id/created/model for
    all chunks, JSON null finish_reason until the last chunk ("stop"/"length"), then a terminated `data: [DONE]`.
    Chat streams open with the assistant role. Returns (text, finish_reason)."""
    what = "chat" if chat else "completion"
    text = _utf8(body, what)
    if not text.endswith("data: [DONE]\n\n"):
        raise Malformed(f"{what}: stream does not end with a terminated data: [DONE]: ...{text[-80:]!r}")
    blocks = text[:-len("data: [DONE]\n\n")].split("\n\n")
    if blocks[-1] != "":
        raise Malformed(f"{what}: [DONE] glued to a previous event")
    chunks = []
    for i, block in enumerate(blocks[:-1]):
        if block.startswith(":") and "\n" not in block:
            continue                                     # an SSE comment (keep-alive)
        if not block.startswith("data: ") or "\n" in block:
            raise Malformed(f"{what}: block {i} is not one data: line: {block[:200]!r}")
        chunks.append(_json(block[6:], what))
    if not chunks:
        raise Malformed(f"{what}: no chunk before [DONE]")
    obj = "chat.completion.chunk" if chat else "text_completion"
    first = chunks[0]
    if not isinstance(first.get("id"), str) or not isinstance(first.get("created"), int):
        raise Malformed(f"{what}: chunk without id/created: {first}")
    out, reason = [], None
    for i, c in enumerate(chunks):
        if "error" in c:
            raise Malformed(f"{what}: error chunk mid-stream: {c}")
        if c.get("object") != obj or (c["id"], c["created"], c.get("model")) != \
                (first["id"], first["created"], first.get("model")):
            raise Malformed(f"{what}: chunk {i} does not belong to the stream: {c}")
        if not c.get("choices"):                         # a usage chunk (only when asked for)
            continue
        if len(c["choices"]) != 1 or c["choices"][0].get("index") != 0:
            raise Malformed(f"{what}: chunk {i} choices {c['choices']}")
        ch = c["choices"][0]
        if reason is not None:
            raise Malformed(f"{what}: content after the finish chunk: {c}")
        if ch.get("finish_reason") is not None:
            if ch["finish_reason"] not in ("stop", "length"):
                raise Malformed(f"{what}: finish_reason {ch['finish_reason']!r}")
            reason = ch["finish_reason"]
        if chat:
            delta = ch.get("delta")
            if not isinstance(delta, dict):
                raise Malformed(f"{what}: chunk {i} without a delta: {c}")
            if i == 0 and delta.get("role") != "assistant":
                raise Malformed(f"{what}: first chunk does not carry the assistant role: {c}")
            piece = delta.get("content", "")
        else:
            piece = ch.get("text")
        if not isinstance(piece, str):
            raise Malformed(f"{what}: chunk {i} text is {piece!r}")
        out.append(piece)
    if reason is None:
        raise Malformed(f"{what}: no chunk carried a finish_reason")
    return "".join(out), reason


class TextgenStream:
    """Checks text-generation-webui's /api/v1/stream messages one by one: text_stream with message_num 0, 1, ...,
    then stream_end with the next number; an `error` event (our busy / bad-request answer) before stream_end."""

    def __init__(self) -> None:
        self.n = 0
        self.text: list[str] = []
        self.error: Optional[str] = None
        self.ended = False

    def feed(self, raw) -> bool:
        """Take one message; True once stream_end arrived."""
        if self.ended:
            raise Malformed("textgen: message after stream_end")
        if not isinstance(raw, str):
            raise Malformed("textgen: binary message")
        msg = _json(raw, "textgen")
        if msg.get("message_num") != self.n:
            raise Malformed(f"textgen: message_num {msg.get('message_num')} where {self.n} was due: {msg}")
        self.n += 1
        ev = msg.get("event")
        if ev == "text_stream":
            if self.error is not None or set(msg) != {"event", "message_num", "text"} \
                    or not isinstance(msg["text"], str):
                raise Malformed(f"textgen: bad text_stream {msg}")
            self.text.append(msg["text"])
        elif ev == "error":
            if self.error is not None or not isinstance(msg.get("message"), str):
                raise Malformed(f"textgen: bad error event {msg}")
            self.error = msg["message"]
        elif ev == "stream_end":
            if set(msg) != {"event", "message_num"}:
                raise Malformed(f"textgen: bad stream_end {msg}")
            self.ended = True
        else:
            raise Malformed(f"textgen: unknown event {msg}")
        return self.ended


BUSY_MESSAGE = "Server is busy; please try again later."


def check_kobold_busy(r: httpx.Response) -> None:
    """KoboldCpp's 503 (KoboldCpp 1.76 `koboldcpp.py`)."""
    if r.json() != {"detail": {"msg": BUSY_MESSAGE, "type": "service_unavailable"}}:
        raise Malformed(f"kobold busy body {r.text[:200]}")


def check_openai_busy(r: httpx.Response) -> None:
    """OpenAI's error envelope with a 503 (llama.cpp's server: type unavailable_error)."""
    err = r.json().get("error")
    if not isinstance(err, dict) or err.get("type") != "unavailable_error" or err.get("message") != BUSY_MESSAGE:
        raise Malformed(f"openai busy body {r.text[:200]}")
