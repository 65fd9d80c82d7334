"""A headless Chromium driven over the Chrome DevTools Protocol (its WebSocket, with the `websockets` package), for the
tests that need a real browser's CORS, Origin and rendering behaviour.

`Chrome()` starts a fresh browser (empty profile; every name but 127.0.0.1 / localhost resolves to nothing, so a
page that needs the internet fails here as it would offline); `open(url)` gives a tab whose `evaluate(js)`
returns the value of an expression, awaiting promises. Tests skip, with the reason, when no Chromium is installed
(Debian: `apt-get install chromium`; `AIRO_CHROMIUM` names another binary).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Optional

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--remote-debugging-port=0",
         # offline: nothing but this machine resolves (a CDN asset would fail to load)
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost")


def find_chromium() -> Optional[str]:
    named = os.environ.get("AIRO_CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="no Chromium found (apt-get install chromium, or set AIRO_CHROMIUM)")


class CDPError(RuntimeError):
    pass


class Tab:
    """One page target, attached with a flat session on the browser's connection."""

    def __init__(self, chrome: "Chrome", session: str) -> None:
        self.chrome, self.session = chrome, session

    def send(self, method: str, **params: Any) -> dict:
        return self.chrome.send(method, session=self.session, **params)

    def navigate(self, url: str, timeout: float = 60) -> None:
        """Load `url` and return when its load event has fired."""
        self.send("Page.enable")
        self.chrome.clear_events()
        reply = self.send("Page.navigate", url=url)
        if reply.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {reply['errorText']}")
        self.chrome.wait_event("Page.loadEventFired", self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression (a promise is awaited)."""
        reply = self.chrome.send("Runtime.evaluate", session=self.session, timeout=timeout, expression=expression,
                                 awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in reply:
            raise CDPError(f"JavaScript failed: {json.dumps(reply['exceptionDetails'])[:800]}")
        return reply["result"].get("value")


class Chrome:
    """A headless Chromium with a new empty profile; a context manager that stops it and removes the profile."""

    def __init__(self) -> None:
        binary = find_chromium()
        if binary is None:
            pytest.skip("no Chromium found (apt-get install chromium, or set AIRO_CHROMIUM)")
        self.profile = tempfile.mkdtemp(prefix="airo-chrome-")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        self.stack = contextlib.ExitStack()
        self.ws = None

    def __enter__(self) -> "Chrome":
        from websockets.sync.client import connect

        url = self._devtools_url(timeout=60)
        self.ws = self.stack.enter_context(connect(url, max_size=None, open_timeout=30))
        return self

    def _devtools_url(self, timeout: float) -> str:
        """Chromium prints 'DevTools listening on ws://...' on stderr once it listens; read it from a thread so
        that a browser that never prints it fails after `timeout` instead of hanging."""
        found: list[str] = []
        lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                lines.append(line)
                if "DevTools listening on " in line and not found:
                    found.append(line.split("DevTools listening on ", 1)[1].strip())
                    done.set()
            done.set()
        threading.Thread(target=read, daemon=True).start()
        if not done.wait(timeout) or not found:
            self.close()
            raise CDPError("Chromium did not start:\n" + "".join(lines[-20:]))
        return found[0]

    def send(self, method: str, session: Optional[str] = None, timeout: float = 60, **params: Any) -> dict:
        assert self.ws is not None
        mid = next(self.ids)
        message: dict = {"id": mid, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=timeout))
            if reply.get("id") == mid:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def clear_events(self) -> None:
        self.events.clear()

    def wait_event(self, method: str, session: Optional[str], timeout: float) -> dict:
        assert self.ws is not None
        while True:
            for e in self.events:
                if e["method"] == method and e.get("sessionId") == session:
                    self.events.remove(e)
                    return e
            reply = json.loads(self.ws.recv(timeout=timeout))
            if "method" in reply:
                self.events.append(reply)

    def open(self, url: str) -> Tab:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tab = Tab(self, session)
        tab.navigate(url)
        return tab

    def close(self) -> None:
        if self.ws is not None:
            self.ws = None
            try:
                self.stack.close()
            except Exception:  # the browser may already be gone
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __exit__(self, *exc: Any) -> None:
        self.close()
