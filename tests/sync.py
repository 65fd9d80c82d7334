"""Waiting for a state of the model manager, on its own condition: never a sleep, never a polling loop."""
from __future__ import annotations

import threading

TIMEOUT = 60.0      # a guard that turns a hang into a failure; nothing is timed


class SeenCondition(threading.Condition):
    """A condition that also tells `seen` (a condition of its own) each time a thread starts waiting on it or
    notifies it, so a test can wait for whatever state that thread reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Condition()
        self.waiting = 0            # threads of the manager waiting on it now (changed under its lock)

    def _tell(self) -> None:
        with self.seen:
            self.seen.notify_all()

    def wait(self, timeout=None):
        self.waiting += 1
        self._tell()
        try:
            return super().wait(timeout)
        finally:
            self.waiting -= 1

    def notify_all(self) -> None:
        super().notify_all()
        self._tell()


def watched(manager):
    """`manager` (a fresh ModelManager) with its condition replaced by a SeenCondition."""
    manager._cond = SeenCondition()
    return manager


def settle(manager, state, timeout: float = TIMEOUT) -> None:
    """Wait until `state()` holds. `state` must read the manager's fields without taking its lock (the manager may
    hold that lock while it tells `seen`)."""
    with manager._cond.seen:
        assert manager._cond.seen.wait_for(state, timeout), "the manager never reached the awaited state"


READY_LINE = b"airobackend ready"      # what `serve` prints once every port listens (commands/serve.py banner)


class ServeOutput:
    """The output of an `airobackend serve` child, copied line by line to `log` (a binary file) as it comes;
    `ready` is set at the line that says it listens, or at the end of the output (the child exited), so a test
    waits for that event instead of asking the port again and again."""

    def __init__(self, stream, log) -> None:
        self.listening = False
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._copy, args=(stream, log), daemon=True)
        self._thread.start()

    def _copy(self, stream, log) -> None:
        try:
            for line in iter(stream.readline, b""):
                log.write(line)
                log.flush()
                if line.startswith(READY_LINE):
                    self.listening = True
                    self.ready.set()
        finally:
            self.ready.set()

    def wait(self, timeout: float = 120.0) -> bool:
        """True once the server listens; False when it exited first (or never said so: a hang guard)."""
        return self.ready.wait(timeout) and self.listening

    def close(self) -> None:
        """After the child exited: the rest of its output is in the log."""
        self._thread.join(30)
