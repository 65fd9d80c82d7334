"""Opening a model file with its work counted, for the hostile-file and fuzz tests.

The readers must do work bounded by the file, whatever counts a hostile header claims. Every header read goes
through `formats._source.Cursor` and consumes bytes of the file, so the number of reads bounds the work of one
open without timing it: `open_counted` counts them and fails the moment they pass the file's size (plus slack for
fixed-size headers and zip directories), so a reader that loops over a header fails at once instead of hanging.
`hang_guard` is only the last resort for a loop that reads nothing: it fails the test instead of hanging CI, and
no test asserts anything about elapsed time.
"""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from airobackend.formats import _source, open_model

SLACK_READS = 4096                  # reads a file may take beyond one per byte (fixed-size headers, zip directories)
HANG_GUARD_S = 120                  # far beyond any open (milliseconds); only a loop that never reads reaches it


class TooMuchWork(AssertionError):
    """The reader made more header reads than the file's bytes allow: it loops over what a header claims."""


def file_size(path: Path) -> int:
    """Bytes of the file, all parts of a split zip included."""
    path = Path(path)
    parts = sorted(path.parent.glob(path.stem + ".z[0-9][0-9]")) if path.suffix == ".zip" else []
    return sum(p.stat().st_size for p in [path, *parts])


@contextlib.contextmanager
def counted(limit: int):
    """Count Cursor reads inside the block (yields a dict whose `reads` grows); raise TooMuchWork past `limit`."""
    stats = {"reads": 0}
    unpack, take = _source.Cursor._unpack, _source.Cursor.take

    def tick() -> None:
        stats["reads"] += 1
        if stats["reads"] > limit:
            raise TooMuchWork(f"more than {limit} header reads")

    def counting_unpack(self, *a, **k):
        tick()
        return unpack(self, *a, **k)

    def counting_take(self, *a, **k):
        tick()
        return take(self, *a, **k)
    _source.Cursor._unpack, _source.Cursor.take = counting_unpack, counting_take
    try:
        yield stats
    finally:
        _source.Cursor._unpack, _source.Cursor.take = unpack, take


def open_counted(path: Path, stats: dict | None = None):
    """open_model(path) with its header reads bounded by the file's size; the count is added to stats['reads']
    and the largest count kept in stats['most_reads'] when `stats` is given."""
    with counted(file_size(path) + SLACK_READS) as c:
        try:
            return open_model(path)
        finally:
            if stats is not None:
                stats["reads"] = stats.get("reads", 0) + c["reads"]
                stats["most_reads"] = max(stats.get("most_reads", 0), c["reads"])


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang()


@contextlib.contextmanager
def hang_guard(label: str, seconds: int = HANG_GUARD_S):
    """Fail (instead of hanging forever) if the block never ends: main thread only (SIGALRM)."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang:
        raise AssertionError(f"{label}: never ended (stopped after {seconds} s)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
