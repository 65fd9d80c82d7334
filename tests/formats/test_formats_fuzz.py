"""Seeded fuzzing of the model readers: >= 500 mutations of llama.cpp fixtures and of the project's own
written models per run -- truncations, flipped bits in headers and tensor tables, absurd counts / dims / name
lengths, out-of-range and overlapping tensor offsets, broken zip central directories and split parts.
Every case must end in ModelFileError with a one-line message naming the file; a mutation that still yields a
readable file must give tensors that lie inside the file. The work of each open is bounded by counting the reader's
header reads against the file's size (opening.py), never timed; peak memory growth stays bounded.
AIRO_FUZZ_SEED / AIRO_FUZZ_CASES change the seed / number of cases (CI uses the defaults)."""
from __future__ import annotations

import os
import random
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from airobackend.errors import ModelFileError
from airobackend.formats import open_model
from airobackend.formats.writer import write_synthetic_model
from opening import hang_guard, open_counted

SEED = int(os.environ.get("AIRO_FUZZ_SEED", "20240611"))
CASES = int(os.environ.get("AIRO_FUZZ_CASES", "600"))


def _fields_gguf(raw: bytes, mf) -> list:
    """(offset, width, must_fail_values) of header fields worth corrupting in a GGUF file."""
    huge64 = [1 << 62, (1 << 64) - 1, 1 << 40]
    out = [(8, 8, huge64), (16, 8, huge64)]                                        # tensor / kv counts
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                "llama.feed_forward_length", "llama.attention.head_count_kv"):
        k = struct.pack("<Q", len(key)) + key.encode()
        out.append((raw.index(k) + len(k) + 4, 4, [0, 1 << 31, 0xFFFFFFFF, 3]))  # the u32 value
    for t in mf.tensors.values():
        key = struct.pack("<Q", len(t.name)) + t.name.encode()
        at = raw.index(key)
        r = at + len(key)
        nd = len(t.ne)
        out += [(at, 8, huge64),                                                   # name length
                (r, 4, [0, 5, 0xFFFFFFFF]),                                        # n_dims
                (r + 4, 8, [0, 1 << 41, (1 << 64) - 1]),                           # ne[0]
                (r + 4 + 8 * nd, 4, [4, 5, 99, 0xFFFFFFFF]),                       # type
                (r + 8 + 8 * nd, 8, [1 << 50, 3, (1 << 64) - 32])]                 # offset
    return out


def _fields_ggml(raw: bytes, mf) -> list:
    out = [(0, 4, [0, 0x12345678]), (4, 4, [0, 9, 0xFFFFFFFF]),                   # magic, version
           (8, 4, [0, 0xFFFFFFFF]), (12, 4, [0, 1 << 30]), (20, 4, [0]), (24, 4, [0, 1 << 20])]
    for t in mf.tensors.values():
        i = raw.index(t.legacy_name.encode())
        r = i - 12 - 4 * len(t.ne)
        out += [(r, 4, [0, 3, 1 << 31]), (r + 4, 4, [0, 1 << 20, 0xFFFFFFFF]),     # n_dims, name_len
                (r + 8, 4, [4, 5, 16, 99]),                                        # type
                (r + 12, 4, [0, 0xFFFFFFFF])]                                      # ne[0]
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory, fixtures_dir):
    d = tmp_path_factory.mktemp("fuzzbase")
    files = [fixtures_dir / "models" / "fx-q4_0.gguf", fixtures_dir / "models" / "fx-q4_K_M.ggmlv3.bin"]
    legacy = fixtures_dir / "legacy" / "models" / "fx-q4_0.ggjt1.bin"
    if legacy.exists():
        files.append(legacy)
    small = dict(n_vocab=512, n_embd=256, n_head=4, n_layer=1, n_ff=768, seed=7)
    write_synthetic_model(d / "own.gguf", format="gguf", mix="q4_K_M", **small)
    write_synthetic_model(d / "own.bin", format="ggml", mix="q5_1", **small)
    files += [d / "own.gguf", d / "own.bin"]
    out = []
    for f in files:
        raw = f.read_bytes()
        mf = open_model(f)
        fields = _fields_gguf(raw, mf) if raw[:4] == b"GGUF" else _fields_ggml(raw, mf)
        header_end = min(t.offset for t in mf.tensors.values())
        mf.close()
        out.append((f.name, raw, fields, header_end))
    return out


@pytest.fixture(scope="module")
def split_zip(tmp_path_factory, fixtures_dir):
    if shutil.which("zip") is None:
        return None
    d = tmp_path_factory.mktemp("fuzzzip")
    shutil.copyfile(fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin", d / "m.bin")
    subprocess.run(["zip", "-q", "-0", "-s", "256k", "m.zip", "m.bin"], cwd=d, check=True)
    (d / "m.bin").unlink()
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _check(path: Path, must_fail: bool, stats: dict, label: str) -> None:
    try:
        with hang_guard(label):
            mf = open_counted(path, stats)
    except ModelFileError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 600, (label, msg)
        assert path.name in msg or path.parent.name in msg, (label, msg)
        stats["raised"] += 1
    else:
        try:
            assert not must_fail, f"{label}: opened a file that must be rejected"
            for ti in mf.tensors.values():          # whatever opens must stay inside the file
                assert ti.offset + ti.nbytes <= mf.file_size and ti.data.size == ti.nbytes
            stats["opened"] += 1
        finally:
            mf.close()


@pytest.mark.e2e       # the split-zip cases are made by Info-ZIP's `zip`, a subprocess
def test_fuzz_model_files(tmp_path, bases, split_zip):
    rnd = random.Random(SEED)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = {"raised": 0, "opened": 0, "reads": 0, "most_reads": 0}
    kinds: dict = {}
    for case in range(CASES):
        use_zip = split_zip is not None and case % 6 == 5
        if use_zip:
            kind = _zip_case(rnd, tmp_path / f"z{case}", split_zip, stats, case)
        else:
            name, raw, fields, header_end = bases[case % len(bases)]
            m = bytearray(raw)
            kind = rnd.choice(["truncate", "flip", "field", "field", "overlap", "flip_table"])
            must_fail = True
            if kind == "truncate":
                m = m[:rnd.randrange(0, len(m))]
            elif kind in ("flip", "flip_table"):
                lo = 0 if kind == "flip" else min(f[0] for f in fields[2:])
                for _ in range(rnd.randint(1, 4)):
                    m[rnd.randrange(lo, header_end)] ^= 1 << rnd.randrange(8)
                must_fail = False                    # a flip in a score or a name can leave a valid file
            elif kind == "field":
                off, width, bad = rnd.choice(fields)
                struct.pack_into("<I" if width == 4 else "<Q", m, off, rnd.choice(bad))
            else:                                    # two tensors pointed at the same data
                tfields = [f for f in fields if f[2] and f[2][0] == 1 << 50]
                if len(tfields) >= 2:
                    (a, _, _), (b, _, _) = rnd.sample(tfields, 2)
                    m[b:b + 8] = m[a:a + 8]
                else:                                # GGML has no offsets: point a record past the end
                    kind = "truncate"
                    m = m[:rnd.randrange(header_end, len(m))]
            p = tmp_path / f"c{case}-{name}"
            p.write_bytes(m)
            _check(p, must_fail, stats, f"case {case} {kind} {name}")
            p.unlink()
        kinds[kind] = kinds.get(kind, 0) + 1
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"\nfuzz seed {SEED}: {CASES} cases {kinds}; raised {stats['raised']}, opened {stats['opened']}, "
          f"header reads {stats['reads']} (most in one open {stats['most_reads']}), peak RSS growth {growth_mb:.0f} MB")
    assert stats["raised"] + stats["opened"] == CASES >= 500
    assert stats["raised"] > CASES * 0.7
    assert growth_mb < 256


def _zip_case(rnd: random.Random, d: Path, parts: dict, stats: dict, case: int) -> str:
    d.mkdir()
    files = {k: bytearray(v) for k, v in parts.items()}
    last = files["m.zip"]
    eocd = bytes(last).rfind(b"PK\x05\x06")
    cd_size, cd_off = struct.unpack_from("<II", last, eocd + 12)
    kind = rnd.choice(["cd_flip", "cd_method", "cd_disk", "cd_offset", "eocd", "part_truncate", "part_missing",
                       "cd_count"])
    must_fail = True
    if kind == "cd_flip":
        for _ in range(rnd.randint(1, 3)):
            last[rnd.randrange(cd_off, cd_off + cd_size)] ^= 1 << rnd.randrange(8)
        must_fail = False
    elif kind == "cd_method":
        struct.pack_into("<H", last, cd_off + 10, rnd.choice([8, 12, 14, 99]))
    elif kind == "cd_disk":
        struct.pack_into("<H", last, cd_off + 34, rnd.choice([40, 0xFFFE]))
    elif kind == "cd_offset":
        struct.pack_into("<I", last, cd_off + 42, rnd.choice([0x7FFFFFFF, 0xFFFFFFF0]))
    elif kind == "eocd":
        struct.pack_into("<I", last, eocd + 16, rnd.choice([0xFFFFFF00, len(last) + 10]))
    elif kind == "cd_count":
        struct.pack_into("<H", last, eocd + 10, rnd.choice([0, 2000]))
    elif kind == "part_truncate":
        name = rnd.choice(sorted(files))
        files[name] = files[name][:rnd.randrange(0, len(files[name]))]
    else:
        name = rnd.choice(sorted(k for k in files if k != "m.zip"))
        del files[name]
    for k, v in files.items():
        (d / k).write_bytes(v)
    _check(d / "m.zip", must_fail, stats, f"case {case} zip {kind}")
    shutil.rmtree(d)
    return "zip_" + kind
