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
