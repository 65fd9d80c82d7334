"""The bytes of a model file, seen through mmap: a plain file, or a stored zip member spread over split parts.

Readers never call `read()` on the file; they parse headers through a bounds-checked `Cursor` and hand out
zero-copy numpy views of tensor data. Every out-of-range access raises ModelFileError naming file and offset.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import Callable, Optional

import numpy as np

from ..errors import ModelFileError


class Segment:
    """A contiguous run of logical bytes that lies in one mapped file."""

    __slots__ = ("start", "end", "arr", "mv", "file_path", "file_offset")

    def __init__(self, start: int, arr: np.ndarray, file_path: str, file_offset: int) -> None:
        self.start, self.end = start, start + arr.size
        self.arr = arr                    # read-only uint8 view into the mmap
        self.mv = memoryview(arr)         # for struct.unpack_from
        self.file_path, self.file_offset = file_path, file_offset


class Source:
    """Logical byte string made of one or more mapped segments (split zip parts)."""

    def __init__(self, path: str, segments: list[Segment], maps: list, *, size: Optional[int] = None) -> None:
        self.path = path
        self.segments = segments
        self._maps = maps                 # keep the mmaps alive
        self.size = size if size is not None else (segments[-1].end if segments else 0)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def open_file(cls, path: str) -> "Source":
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):      # a FIFO would block open(), a device has no size
                raise ModelFileError("not a regular file", path=path)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise ModelFileError("empty file", path=path, offset=0)
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelFileError(f"cannot open: {e.strerror or e}", path=path) from e
        arr = np.frombuffer(mm, dtype=np.uint8)
        return cls(path, [Segment(0, arr, path, 0)], [mm])

    def sub(self, start: int, length: int, path: Optional[str] = None) -> "Source":
        """The logical range [start, start+length) as a new Source (used for zip members)."""
        if start < 0 or length < 0 or start + length > self.size:
            raise ModelFileError(f"range {start}+{length} lies outside the {self.size} bytes available",
                                 path=path or self.path, offset=start)
        segs = []
        for s in self.segments:
            lo, hi = max(start, s.start), min(start + length, s.end)
            if lo < hi:
                segs.append(Segment(lo - start, s.arr[lo - s.start:hi - s.start], s.file_path,
                                    s.file_offset + lo - s.start))
        return Source(path or self.path, segs, self._maps, size=length)

    # -- access -------------------------------------------------------------------------------------------------
    def _seg_index(self, off: int) -> int:
        segs = self.segments
        lo, hi = 0, len(segs) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if segs[mid].start <= off:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def view(self, off: int, n: int, *, what: str = "data", tensor: Optional[str] = None) -> np.ndarray:
        """Read-only uint8 array of bytes [off, off+n): zero-copy inside one segment, a copy across segments."""
        if off < 0 or n < 0 or off + n > self.size:
            raise ModelFileError(f"{what} ({n} bytes) runs past the end of the file ({self.size} bytes)",
                                 path=self.path, offset=off, tensor=tensor)
        if n == 0:
            return np.zeros(0, np.uint8)
        i = self._seg_index(off)
        s = self.segments[i]
        if off + n <= s.end:
            return s.arr[off - s.start:off - s.start + n]
        out = np.empty(n, np.uint8)
        pos = 0
        while pos < n:
            s = self.segments[i]
            lo = off + pos - s.start
            k = min(n - pos, s.end - (off + pos))
            out[pos:pos + k] = s.arr[lo:lo + k]
            pos += k
            i += 1
        out.flags.writeable = False
        return out

    def bytes(self, off: int, n: int, *, what: str = "data") -> bytes:
        return self.view(off, n, what=what).tobytes()

    def close(self) -> None:
        self.segments = []
        maps, self._maps = self._maps, []
        for mm in maps:
            try:
                mm.close()
            except BufferError:
                pass        # numpy views handed out are still alive; the map goes when they do


class Cursor:
    """Sequential, bounds-checked little-endian reader over a Source (fast path inside one segment)."""

    __slots__ = ("src", "pos", "_mv", "_base", "_end")

    def __init__(self, src: Source, pos: int = 0) -> None:
        self.src = src
        self.pos = pos
        self._window(pos)

    def _window(self, pos: int) -> None:
        if self.src.segments and pos < self.src.size:
            s = self.src.segments[self.src._seg_index(pos)]
            self._mv, self._base, self._end = s.mv, s.start, s.end
        else:
            self._mv, self._base, self._end = memoryview(b""), pos, pos

    def fail(self, msg: str, *, offset: Optional[int] = None, tensor: Optional[str] = None) -> ModelFileError:
        return ModelFileError(msg, path=self.src.path, offset=self.pos if offset is None else offset, tensor=tensor)

    @property
    def remaining(self) -> int:
        return self.src.size - self.pos

    def take(self, n: int, what: str, tensor: Optional[str] = None):
        """n bytes as a memoryview/bytes; raises 'truncated' naming `what`."""
        p = self.pos
        if p + n <= self._end:
            self.pos = p + n
            return self._mv[p - self._base:p - self._base + n]
        if n < 0 or p + n > self.src.size:
            raise self.fail(f"file truncated while reading {what} (need {n} bytes, {max(0, self.src.size - p)} left)",
                            tensor=tensor)
        out = self.src.view(p, n, what=what).tobytes()
        self.pos = p + n
        self._window(self.pos)
        return out

    def _unpack(self, st: struct.Struct, what: str, tensor: Optional[str] = None):
        p = self.pos
        if p + st.size <= self._end:
            self.pos = p + st.size
            return st.unpack_from(self._mv, p - self._base)
        return st.unpack(self.take(st.size, what, tensor))

    def u32(self, what: str, tensor: Optional[str] = None) -> int:
        return self._unpack(_U32, what, tensor)[0]

    def u64(self, what: str, tensor: Optional[str] = None) -> int:
        return self._unpack(_U64, what, tensor)[0]

    def f32(self, what: str, tensor: Optional[str] = None) -> float:
        return self._unpack(_F32, what, tensor)[0]

    def unpack(self, st: struct.Struct, what: str, tensor: Optional[str] = None) -> tuple:
        return self._unpack(st, what, tensor)

    def seek(self, pos: int) -> None:
        self.pos = pos
        if not (self._base <= pos < self._end):
            self._window(pos)


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F32 = struct.Struct("<f")

Loader = Callable[[], np.ndarray]
