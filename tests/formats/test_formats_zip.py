"""Models read straight out of stored zip archives made by Info-ZIP `zip -0` (single, ZIP64, split with -s)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from airobackend.errors import ModelFileError
from airobackend.formats import open_model

pytestmark = pytest.mark.skipif(shutil.which("zip") is None, reason="Info-ZIP `zip` not installed (apt-get install zip)")


def _zip(tmp_path: Path, src: Path, name: str, *flags: str) -> Path:
    work = tmp_path / name
    work.mkdir()
    local = work / src.name
    shutil.copyfile(src, local)
    subprocess.run(["zip", "-q", "-0", *flags, f"{name}.zip", src.name], cwd=work, check=True)
    local.unlink()
    return work / f"{name}.zip"


def _straddling(mf) -> list:
    segs = mf._source.segments
    return [n for n, t in mf.tensors.items()
            if not any(s.start <= t.offset and t.offset + t.nbytes <= s.end for s in segs)]


def _same_tensors(a, b) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for n, t in a.tensors.items():
        assert (t.type, t.ne) == (b.tensors[n].type, b.tensors[n].ne)
        assert np.array_equal(t.data, b.tensors[n].data), n


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
@pytest.mark.parametrize("fixture", ["fx-q4_0.ggmlv3.bin", "fx-q6_K.gguf"])
def test_split_zip_two_parts_with_a_straddling_tensor(tmp_path, fixtures_dir, fixture):
    src = fixtures_dir / "models" / fixture
    size = src.stat().st_size
    z = _zip(tmp_path, src, "split", "-s", f"{(size // 2 + 4095) // 1024}k")
    assert sorted(p.name for p in z.parent.iterdir()) == ["split.z01", "split.zip"]
    ref = open_model(src)
    for path in (z, z.with_suffix(".z01")):            # users may point at either part
        mf = open_model(path)
        assert mf.container == "zip" and mf.member == fixture and mf.file_size == size
        strad = _straddling(mf)
        assert len(strad) == 1, strad                  # the split size was chosen so that one tensor straddles
        assert mf.tensors[strad[0]].data.base is None            # copied once across the part boundary
        _same_tensors(mf, ref)
        others = [t for n, t in mf.tensors.items() if n not in strad]
        assert all(t.data.base is not None for t in others)       # zero-copy views into the parts
        assert mf.hparams == ref.hparams and mf.vocab.pieces == ref.vocab.pieces
        mf.close()


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
def test_split_zip_many_parts_and_zip64(tmp_path, fixtures_dir):
    src = fixtures_dir / "models" / "fx-q4_K_M.ggmlv3.bin"
    z = _zip(tmp_path, src, "many", "-fz", "-s", "64k")   # -fz: ZIP64 records, as for members over 4 GiB
    parts = sorted(p.name for p in z.parent.iterdir())
    assert len(parts) > 10
    assert b"PK\x06\x06" in z.read_bytes()
    _same_tensors(open_model(z), open_model(src))


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
def test_single_stored_zip(tmp_path, fixtures_dir):
    src = fixtures_dir / "models" / "fxgqa-q4_K_M.gguf"
    z = _zip(tmp_path, src, "single")
    mf = open_model(z)
    assert _straddling(mf) == [] and mf.hparams.n_gqa == 4
    _same_tensors(mf, open_model(src))


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
def test_deflated_member_says_extract_it(tmp_path, fixtures_dir):
    work = tmp_path / "d"
    work.mkdir()
    shutil.copyfile(fixtures_dir / "models" / "fx-q4_0.gguf", work / "m.gguf")
    subprocess.run(["zip", "-q", "m.zip", "m.gguf"], cwd=work, check=True)
    with pytest.raises(ModelFileError, match=r"compressed \(deflate\); extract it with 7-Zip or unzip") as e:
        open_model(work / "m.zip")
    assert "m.zip" in str(e.value)


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
def test_missing_part_is_named(tmp_path, fixtures_dir):
    src = fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin"
    z = _zip(tmp_path, src, "gone", "-s", "700k")
    os.remove(z.with_suffix(".z01"))
    with pytest.raises(ModelFileError, match=r"'gone.z01' is missing"):
        open_model(z)
    with pytest.raises(ModelFileError):
        open_model(z.with_suffix(".z01"))


def test_not_a_zip_and_empty_archive(tmp_path):
    p = tmp_path / "x.zip"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFileError, match="end-of-central-directory"):
        open_model(p)
    e = tmp_path / "e.zip"
    e.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ModelFileError):
        open_model(e)


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
def test_7zip_byte_volumes(tmp_path, fixtures_dir):
    """7-Zip's 'split to volumes' cuts one ordinary zip into NAME.zip.001, .002, ... at byte boundaries."""
    src = fixtures_dir / "models" / "fx-q4_0.gguf"
    z = _zip(tmp_path, src, "vol")
    raw = z.read_bytes()
    z.unlink()
    cut = len(raw) // 3
    for i, chunk in enumerate((raw[:cut], raw[cut:2 * cut], raw[2 * cut:]), start=1):
        (z.parent / f"vol.zip.{i:03d}").write_bytes(chunk)
    mf = open_model(z.parent / "vol.zip.001")
    assert mf.member == "fx-q4_0.gguf" and len(_straddling(mf)) >= 1
    _same_tensors(mf, open_model(src))
    (z.parent / "vol.zip.003").unlink()
    with pytest.raises(ModelFileError):
        open_model(z.parent / "vol.zip.001")
