"""Read a model straight out of a *stored* zip archive, single or split (`NAME.z01`, `NAME.z02`, ..., `NAME.zip`,
as Info-ZIP `zip -s` and WinZip write them, or 7-Zip's byte volumes `NAME.zip.001`, `NAME.zip.002`, ...).

The parts are mapped, never read or extracted: the member's bytes become a `Source` of segments, one per part it
touches, so tensor data stay zero-copy views (a tensor straddling a part boundary is copied once on first use).
ZIP64 (members over 4 GiB, as for 65B files) is supported. A compressed or encrypted member gets a clear error.
"""
from __future__ import annotations

import os
import re
import struct
from typing import Optional

from ..errors import ModelFileError
from ._source import Cursor, Segment, Source

SIG_EOCD = 0x06054B50
SIG_EOCD64 = 0x06064B50
SIG_LOC64 = 0x07064B50
SIG_CEN = 0x02014B50
SIG_LOC = 0x04034B50
MODEL_EXT = (".bin", ".gguf", ".ggml", ".ggmlv3")
MAX_PARTS = 1000


_VOLUME = re.compile(r"\.zip\.(\d{3})$", re.IGNORECASE)


def looks_like_zip(path: str) -> bool:
    low = path.lower()
    if low.endswith(".zip") or (len(low) > 4 and low[-4:-2] == ".z" and low[-2:].isdigit()) or _VOLUME.search(low):
        return True
    if not os.path.isfile(path):          # never open() a FIFO or device just to sniff it
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"PK\x03\x04", b"PK\x07\x08", b"PK\x05\x06")
    except OSError:
        return False


def _main_zip(path: str) -> str:
    low = path.lower()
    if len(low) > 4 and low[-4:-2] == ".z" and low[-2:].isdigit():   # user pointed at NAME.z01
        cand = path[:-4] + ".zip"
        if os.path.exists(cand):
            return cand
        raise ModelFileError(f"this is part {int(low[-2:])} of a split zip; the last part {os.path.basename(cand)!r} "
                             f"is missing", path=path)
    return path


def _open_volumes(path: str) -> tuple[Source, str]:
    """7-Zip's split volumes NAME.zip.001, .002, ...: plain byte slices of one ordinary (single-disk) zip."""
    base = path[:_VOLUME.search(path).start()] + ".zip"
    srcs: list = []
    try:
        i = 1
        while os.path.exists(f"{base}.{i:03d}"):
            if i > MAX_PARTS:
                raise ModelFileError("absurd number of volumes", path=path)
            srcs.append(Source.open_file(f"{base}.{i:03d}"))
            i += 1
        if not srcs:
            raise ModelFileError(f"first volume {os.path.basename(base)}.001 is missing", path=path)
    except ModelFileError:
        for s in srcs:
            s.close()
        raise
    segs, maps, pos = [], [], 0
    for s in srcs:
        for seg in s.segments:
            segs.append(Segment(pos + seg.start, seg.arr, seg.file_path, seg.file_offset))
        maps.extend(s._maps)
        pos += s.size
    name = f"{base}.001"
    whole = Source(name, segs, maps, size=pos)
    try:
        disk, cd_disk, n_entries, cd_size, cd_off = _find_eocd(whole, name)
        if disk or cd_disk:
            raise ModelFileError(f"volumes end with disk number {disk}: a volume after "
                                 f"{os.path.basename(base)}.{len(srcs):03d} is missing", path=name)
        return _member(whole, name, [0], cd_disk, n_entries, cd_size, cd_off)
    except ModelFileError:
        whole.close()
        raise


def open_zip_member(path: str) -> tuple[Source, str]:
    """Map the archive's parts and return (Source over the model member, member name)."""
    if _VOLUME.search(path):
        return _open_volumes(path)
    zpath = _main_zip(path)
    last = Source.open_file(zpath)
    try:
        disk, cd_disk, n_entries, cd_size, cd_off = _find_eocd(last, zpath)
    except ModelFileError:
        last.close()
        raise
    n_parts = disk + 1
    if n_parts > MAX_PARTS:
        last.close()
        raise ModelFileError(f"absurd number of split parts ({n_parts})", path=zpath)
    # The logical archive is the parts in order: NAME.z01, NAME.z02, ..., NAME.zip.
    stem = zpath[:-4]
    sources = []
    try:
        for i in range(1, n_parts):
            part = f"{stem}.z{i:02d}"
            if not os.path.exists(part):
                raise ModelFileError(f"split zip part {os.path.basename(part)!r} is missing (the archive has "
                                     f"{n_parts} parts; keep all of them next to the .zip)", path=zpath)
            sources.append(Source.open_file(part))
    except ModelFileError:
        for s in sources:
            s.close()
        last.close()
        raise
    sources.append(last)
    segs, maps, starts, pos = [], [], [], 0
    for s in sources:
        starts.append(pos)
        for seg in s.segments:
            segs.append(Segment(pos + seg.start, seg.arr, seg.file_path, seg.file_offset))
        maps.extend(s._maps)
        pos += s.size
    whole = Source(zpath, segs, maps, size=pos)
    try:
        return _member(whole, zpath, starts, cd_disk, n_entries, cd_size, cd_off)
    except ModelFileError:
        whole.close()
        raise


def _find_eocd(src: Source, path: str):
    size = src.size
    tail_len = min(size, 22 + 65535)
    tail = src.bytes(size - tail_len, tail_len, what="zip end record")
    i = tail.rfind(b"PK\x05\x06")
    while i >= 0 and len(tail) - i < 22:
        i = tail.rfind(b"PK\x05\x06", 0, i)
    if i < 0:
        raise ModelFileError("not a zip archive (no end-of-central-directory record); if this is a split archive "
                             "pass the NAME.zip part", path=path)
    eocd = size - tail_len + i
    disk, cd_disk, _n_here, n_entries, cd_size, cd_off, _clen = struct.unpack_from("<4H2IH", tail, i + 4)
    if 0xFFFF in (disk, cd_disk, n_entries) or 0xFFFFFFFF in (cd_size, cd_off):
        if eocd < 20:
            raise ModelFileError("ZIP64 locator missing", path=path, offset=eocd)
        loc = src.bytes(eocd - 20, 20, what="zip64 locator")
        sig, d64, off64, _total = struct.unpack("<IIQI", loc)
        if sig != SIG_LOC64:
            raise ModelFileError("ZIP64 locator missing or damaged", path=path, offset=eocd - 20)
        # The zip64 record lives on the last disk for the archives we accept (zip -s and 7-Zip write it there).
        if off64 + 56 > size:
            raise ModelFileError("ZIP64 end record lies outside the last part", path=path, offset=eocd - 20)
        rec = src.bytes(off64, 56, what="zip64 end record")
        (sig, _sz, _vm, _vn, disk, cd_disk, _nh, n_entries, cd_size, cd_off) = struct.unpack("<IQHHIIQQQQ", rec)
        if sig != SIG_EOCD64:
            raise ModelFileError("ZIP64 end record damaged", path=path, offset=off64)
    return disk, cd_disk, n_entries, cd_size, cd_off


def _member(whole: Source, path: str, starts: list, cd_disk: int, n_entries: int, cd_size: int, cd_off: int):
    if cd_disk >= len(starts):
        raise ModelFileError(f"central directory on part {cd_disk + 1}, but only {len(starts)} parts exist",
                             path=path)
    cd_start = starts[cd_disk] + cd_off
    if cd_start + cd_size > whole.size or n_entries * 46 > cd_size or n_entries == 0:
        raise ModelFileError(f"central directory damaged ({n_entries} entries, {cd_size} bytes at {cd_start})",
                             path=path, offset=cd_start)
    c = Cursor(whole, cd_start)
    entries = []
    for _ in range(n_entries):
        epos = c.pos
        (sig, _vm, _vn, flags, method, _t, _d, _crc, csize, usize, nlen, xlen, clen, dstart, _ia, _ea,
         loff) = c.unpack(_CEN, "central directory entry")
        if sig != SIG_CEN:
            raise ModelFileError("central directory damaged (bad entry signature)", path=path, offset=epos)
        name = bytes(c.take(nlen, "member name")).decode("utf-8", "replace")
        extra = bytes(c.take(xlen, "extra field"))
        c.take(clen, "member comment")
        usize, csize, loff, dstart = _zip64(extra, usize, csize, loff, dstart)
        entries.append((name, flags, method, csize, usize, dstart, loff, epos))
    files = [e for e in entries if not e[0].endswith("/")]
    models = [e for e in files if e[0].lower().endswith(MODEL_EXT)] or files
    if not models:
        raise ModelFileError("the zip archive holds no file", path=path)
    name, flags, method, csize, usize, dstart, loff, epos = max(models, key=lambda e: e[4])
    where = f"{path}!{name}"
    if method != 0:
        kind = {8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstd"}.get(method, f"method {method}")
        raise ModelFileError(f"member {name!r} is compressed ({kind}); extract it with 7-Zip or unzip first and "
                             f"open the extracted file", path=path, offset=epos)
    if flags & 1:
        raise ModelFileError(f"member {name!r} is encrypted; extract it with 7-Zip first", path=path, offset=epos)
    if csize != usize:
        raise ModelFileError(f"stored member {name!r} has compressed size {csize} != size {usize}", path=path,
                             offset=epos)
    if dstart >= len(starts):
        raise ModelFileError(f"member {name!r} starts on part {dstart + 1}, but only {len(starts)} parts exist",
                             path=path, offset=epos)
    lpos = starts[dstart] + loff
    lc = Cursor(whole, lpos)
    sig, *_rest, lnlen, lxlen = lc.unpack(_LOC, "local header")
    if sig != SIG_LOC:
        raise ModelFileError(f"local header of {name!r} damaged", path=path, offset=lpos)
    data = lpos + 30 + lnlen + lxlen
    if data + usize > whole.size:
        raise ModelFileError(f"member {name!r} ({usize} bytes) runs past the end of the archive parts", path=path,
                             offset=data)
    if lpos < cd_start < data + usize:
        # The central directory follows the data; if it now starts inside the member, a part before it is short.
        raise ModelFileError(f"member {name!r} overlaps the central directory: a split part is truncated or "
                             f"damaged (compare the part sizes with the download)", path=path, offset=cd_start)
    return whole.sub(data, usize, path=where), name


def _zip64(extra: bytes, usize: int, csize: int, loff: int, dstart: int):
    p = 0
    while p + 4 <= len(extra):
        hid, hlen = struct.unpack_from("<HH", extra, p)
        body = extra[p + 4:p + 4 + hlen]
        if hid == 0x0001:
            q = 0

            def nxt(fmt: str, cur: int) -> int:
                nonlocal q
                n = struct.calcsize(fmt)
                if q + n > len(body):
                    return cur
                v = struct.unpack_from(fmt, body, q)[0]
                q += n
                return v
            if usize == 0xFFFFFFFF:
                usize = nxt("<Q", usize)
            if csize == 0xFFFFFFFF:
                csize = nxt("<Q", csize)
            if loff == 0xFFFFFFFF:
                loff = nxt("<Q", loff)
            if dstart == 0xFFFF:
                dstart = nxt("<I", dstart)
        p += 4 + hlen
    return usize, csize, loff, dstart


_CEN = struct.Struct("<IHHHHHHIIIHHHHHII")
_LOC = struct.Struct("<IHHHHHIIIHH")


def member_name(path: str) -> Optional[str]:
    """Name of the model member inside a zip archive (None if unreadable)."""
    try:
        src, name = open_zip_member(path)
        src.close()
        return name
    except ModelFileError:
        return None
