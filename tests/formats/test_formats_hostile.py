"""Bad model files end in ModelFileError naming the file (and offset / tensor where known), never a crash, a hang or
a huge allocation: truncation of every fixture at many offsets, flipped header bytes, targeted corruptions. The
work of each open is bounded by counting the reader's header reads against the file's size (opening.py), not by
timing it."""
from __future__ import annotations

import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from airobackend.errors import ModelFileError, UnsupportedTensorType
from airobackend.formats import open_model
from opening import TooMuchWork, counted, hang_guard, open_counted


def _all_fixture_files(fixtures_dir: Path) -> list:
    files = sorted((fixtures_dir / "models").iterdir())
    legacy = fixtures_dir / "legacy" / "models"
    if legacy.is_dir():
        files += sorted(p for p in legacy.iterdir() if "q4_2" not in p.name)
    return files


def _expect_error(path: Path) -> ModelFileError:
    with hang_guard(path.name), pytest.raises(ModelFileError) as e:
        open_counted(path)
    assert path.name in str(e.value)
    return e.value


def test_the_read_count_bounds_the_work_of_an_open(fixtures_dir):
    """The bound the tests below rely on: a reader held to fewer reads than a file needs fails at once."""
    path = fixtures_dir / "models" / "fx-q4_0.gguf"
    with counted(limit=10**9) as c:
        open_model(path).close()
    assert 10 < c["reads"] < path.stat().st_size           # a read per header field, far fewer than bytes
    with pytest.raises(TooMuchWork), counted(limit=c["reads"] - 1):
        open_model(path)


def test_truncating_every_fixture_at_many_offsets(tmp_path, fixtures_dir):
    rnd = random.Random(1234)
    n = 0
    for src in _all_fixture_files(fixtures_dir):
        size = src.stat().st_size
        # every offset of the fixed header, then random ones through vocabulary, tensor table and data
        big = "32k" in src.name                       # 32000-entry vocabulary: each open parses it
        offsets = set(range(0, 48, 6 if big else 3)) | {rnd.randrange(48, size) for _ in range(4 if big else 16)}
        offsets.add(size - 1)
        p = tmp_path / ("t-" + src.name)
        shutil.copyfile(src, p)
        os.chmod(p, 0o644)
        for off in sorted(offsets, reverse=True):     # truncate in place, shortest last
            os.truncate(p, off)
            e = _expect_error(p)
            if off >= 8:
                assert "offset" in str(e) or "missing tensor" in str(e), str(e)
            n += 1
    assert n > 1400


def test_flipped_header_bytes_raise_or_open_consistently(tmp_path, fixtures_dir):
    """A flipped byte may land in a score or a name and leave a valid file; whatever opens must be consistent."""
    rnd = random.Random(99)
    raised = opened = 0
    for src in _all_fixture_files(fixtures_dir):
        mf = open_model(src)
        header_end = min(t.offset for t in mf.tensors.values())
        mf.close()
        p = tmp_path / ("f-" + src.name)
        shutil.copyfile(src, p)
        os.chmod(p, 0o644)
        for _ in range(10):
            pos = rnd.randrange(0, header_end)
            with open(p, "r+b") as f:        # flip one bit in place (the previous flip was undone)
                f.seek(pos)
                old = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([old ^ (1 << rnd.randrange(8))]))
            try:
                with hang_guard(p.name):
                    mf = open_counted(p)
            except ModelFileError as e:
                assert p.name in str(e)
                raised += 1
            else:
                for ti in mf.tensors.values():
                    assert ti.data.size == ti.nbytes and ti.offset + ti.nbytes <= mf.file_size
                mf.close()
                opened += 1
            with open(p, "r+b") as f:
                f.seek(pos)
                f.write(bytes([old]))
    assert raised > 0 and opened > 0


def _ggml_header(tmp_path: Path, fixtures_dir: Path, name: str = "fx-q4_0.ggmlv3.bin") -> tuple[bytearray, Path]:
    return bytearray((fixtures_dir / "models" / name).read_bytes()), tmp_path / "bad.bin"


def _ggml_record(raw: bytes, legacy_name: str) -> int:
    """Offset of the tensor record (n_dims field) whose name is legacy_name."""
    i = raw.index(legacy_name.encode())
    for n_dims in (1, 2):
        start = i - 12 - 4 * n_dims
        if struct.unpack_from("<3I", raw, start)[:2] == (n_dims, len(legacy_name)):
            return start
    raise AssertionError(legacy_name)


def _gguf_record(raw: bytes, name: str) -> int:
    """Offset of the field after the name (n_dims) in a GGUF tensor info."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return raw.index(key) + len(key)


def test_targeted_ggml_corruptions(tmp_path, fixtures_dir):
    raw, p = _ggml_header(tmp_path, fixtures_dir)

    def case(mutate, pattern):
        m = bytearray(raw)
        mutate(m)
        p.write_bytes(m)
        e = _expect_error(p)
        assert pattern in str(e), str(e)
        return e

    case(lambda m: m.__setitem__(slice(0, 4), b"XXXX"), "not a model file")
    case(lambda m: struct.pack_into("<I", m, 0, 0x67676C61), "LoRA")
    case(lambda m: struct.pack_into("<I", m, 4, 7), "unknown ggjt version 7")
    case(lambda m: struct.pack_into("<I", m, 8, 0xFFFFFFFF), "absurd n_vocab")
    case(lambda m: struct.pack_into("<I", m, 12, 1 << 30), "implausible hyper-parameters")
    case(lambda m: struct.pack_into("<I", m, 12, 512), "n_rot=64 differs")                    # n_embd
    case(lambda m: struct.pack_into("<I", m, 36, 0xFFFFFF00), "absurd length")                 # first vocab entry
    r = _ggml_record(raw, "layers.0.attention.wk.weight")
    case(lambda m: struct.pack_into("<I", m, r + 4, 1 << 30), "absurd tensor name length")
    case(lambda m: struct.pack_into("<I", m, r, 3), "3 dimensions")
    e = case(lambda m: struct.pack_into("<I", m, r + 8, 99), "unknown tensor type 99")
    assert isinstance(e, UnsupportedTensorType) and e.tensor == "layers.0.attention.wk.weight"
    case(lambda m: struct.pack_into("<I", m, r + 8, 14), "offset")   # Q6_K: other size, the next record is garbage
    case(lambda m: struct.pack_into("<I", m, r + 16, 0xFFFFFF), "runs past the end")          # ne[1] huge
    case(lambda m: struct.pack_into("<I", m, r + 12, 100), "not a multiple of the Q4_0 block")
    case(lambda m: struct.pack_into("<I", m, r + 12, 0), "zero dimension")


def test_shape_disagreeing_with_hparams(tmp_path, fixtures_dir):
    """Well-formed GGML v3 files whose shapes contradict the hparams."""
    from airobackend.formats.writer import TensorSpec, write_ggml_v3
    mf = open_model(fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin")
    for name, ne, bad in [("blk.1.ffn_down.weight", (512, 256), "blk.1.ffn_down.weight"),
                          # wk [256, 128] makes n_gqa 2, and wv then disagrees
                          ("blk.0.attn_k.weight", (256, 128), "blk.0.attn_v.weight"),
                          ("output.weight", (256, 1000), "output.weight")]:
        specs = [TensorSpec(t.name, t.type, ne if t.name == name else t.ne) for t in mf.tensors.values()]
        p = tmp_path / "wrongshape.bin"
        write_ggml_v3(p, hparams=mf.hparams, vocab=mf.vocab, tensors=specs, data=None, ftype=2)
        e = _expect_error(p)
        assert "disagrees with the hparams" in str(e) and e.tensor == bad, str(e)
        assert e.offset is not None


def test_targeted_gguf_corruptions(tmp_path, fixtures_dir):
    src = fixtures_dir / "models" / "fx-q4_K_M.gguf"
    raw = bytearray(src.read_bytes())
    p = tmp_path / "bad.gguf"

    def case(mutate, pattern):
        m = bytearray(raw)
        mutate(m)
        p.write_bytes(m)
        e = _expect_error(p)
        assert pattern in str(e), str(e)
        return e

    case(lambda m: struct.pack_into("<I", m, 4, 1), "GGUF v1")
    case(lambda m: struct.pack_into("<I", m, 4, 9), "unknown GGUF version 9")
    case(lambda m: struct.pack_into("<I", m, 4, 0x03000000), "big-endian")
    case(lambda m: struct.pack_into("<Q", m, 8, 1 << 60), "absurd tensor count")
    case(lambda m: struct.pack_into("<Q", m, 16, 1 << 60), "absurd metadata count")
    case(lambda m: struct.pack_into("<Q", m, 24, 1 << 50), "absurd metadata key length")
    bc = raw.index(b"llama.block_count") + len("llama.block_count") + 4
    case(lambda m: struct.pack_into("<I", m, bc, 1 << 30), "implausible hyper-parameters")   # no 2^30-layer loop
    case(lambda m: struct.pack_into("<I", m, bc, 3), "n_layer=3 needs at least 29 tensors")
    arch = raw.index(b"llama")
    case(lambda m: m.__setitem__(slice(arch, arch + 5), b"gpt2x"), "architecture 'gpt2x' is not supported")
    toks = raw.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
    case(lambda m: struct.pack_into("<Q", m, toks, 1 << 40), "runs past the end of the file")
    r = _gguf_record(raw, "blk.1.attn_v.weight")          # n_dims u32, ne u64 x2, type u32, offset u64
    case(lambda m: struct.pack_into("<I", m, r, 9), "9 dimensions")
    case(lambda m: struct.pack_into("<Q", m, r + 4, 1 << 45), "absurd dimensions")
    case(lambda m: struct.pack_into("<Q", m, r + 4, 255), "not a multiple of the Q6_K block")
    e = case(lambda m: struct.pack_into("<I", m, r + 20, 16), "IQ2_XXS")
    assert isinstance(e, UnsupportedTensorType) and e.tensor == "blk.1.attn_v.weight"
    case(lambda m: struct.pack_into("<I", m, r + 20, 1234), "1234")
    case(lambda m: struct.pack_into("<Q", m, r + 24, 1 << 40), "runs past the end")
    case(lambda m: struct.pack_into("<Q", m, r + 24, 7), "not aligned")
    case(lambda m: struct.pack_into("<Q", m, r + 24, 0), "overlaps")
    name_len = raw.index(b"blk.1.attn_v.weight") - 8
    case(lambda m: struct.pack_into("<Q", m, name_len, 1 << 33), "absurd tensor name length")
    case(lambda m: m.__setitem__(slice(r - 6, r - 1), b"xxxxx"), "missing tensor 'blk.1.attn_v.weight'")
    e = case(lambda m: struct.pack_into("<Q", m, r + 12, 64), "shape [256, 64] disagrees with the hparams")
    assert e.tensor == "blk.1.attn_v.weight" and e.offset is not None


def test_not_a_model_and_missing_file(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert "empty" in str(_expect_error(empty))
    txt = tmp_path / "readme.bin"
    txt.write_text("hello world, not a model")
    _expect_error(txt)
    with pytest.raises(ModelFileError, match="cannot open"):
        open_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="not a regular file"):
        open_model(tmp_path)                                    # a directory
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.gguf"
        os.mkfifo(fifo)
        _expect_error(fifo)                                     # must not block in open()
