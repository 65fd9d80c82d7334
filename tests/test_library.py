"""The model library: a folder of GGML (every generation), GGUF and split-zip files listed from headers alone."""
from __future__ import annotations

import json
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from airobackend.errors import RequestError
from airobackend.library import GB, ModelLibrary, size_class, split_parts
from airobackend.quant import BLOCK, GGMLType


# ---------------------------------------------------------------- a header-only GGML v3 writer (sparse files)

def _ggjt3_header(path: Path, *, n_vocab: int, n_embd: int, n_head: int, n_layer: int, n_ff: int, n_mult: int,
                  ftype: int, n_head_kv: int | None = None, wtype: GGMLType = GGMLType.Q4_K) -> int:
    """Write a GGML v3 (ggjt v3) file of full size whose tensor data is a hole: 40 GB take no disk and no time.

    Independent of the project's reader and writer: the ggjt v3 layout of llama.cpp's `llama.cpp` at dadbed9.
    Returns the file size.
    """
    n_head_kv = n_head_kv or n_head
    kv = n_embd // n_head * n_head_kv
    tensors = [("tok_embeddings.weight", wtype, (n_embd, n_vocab)), ("norm.weight", GGMLType.F32, (n_embd,)),
               ("output.weight", GGMLType.Q6_K, (n_embd, n_vocab))]
    for i in range(n_layer):
        p = f"layers.{i}."
        tensors += [(p + "attention.wq.weight", wtype, (n_embd, n_embd)),
                    (p + "attention.wk.weight", wtype, (n_embd, kv)),
                    (p + "attention.wv.weight", wtype, (n_embd, kv)),
                    (p + "attention.wo.weight", wtype, (n_embd, n_embd)),
                    (p + "attention_norm.weight", GGMLType.F32, (n_embd,)),
                    (p + "feed_forward.w1.weight", wtype, (n_embd, n_ff)),
                    (p + "feed_forward.w2.weight", wtype, (n_ff, n_embd)),
                    (p + "feed_forward.w3.weight", wtype, (n_embd, n_ff)),
                    (p + "ffn_norm.weight", GGMLType.F32, (n_embd,))]
    with open(path, "wb") as f:
        f.write(struct.pack("<II", 0x67676A74, 3))
        f.write(struct.pack("<7I", n_vocab, n_embd, n_mult, n_head, n_layer, n_embd // n_head, ftype))
        for i in range(n_vocab):
            piece = b"" if i in (1, 2) else bytes([i - 3]) if 3 <= i < 259 else f"t{i}".encode()
            f.write(struct.pack("<I", len(piece)) + piece + struct.pack("<f", -float(i)))
        offset = f.tell()
        for name, t, ne in tensors:
            raw = name.encode()
            head = struct.pack("<3I", len(ne), len(raw), int(t)) + struct.pack(f"<{len(ne)}I", *ne) + raw
            offset += len(head)
            offset += -offset & 31
            per_block, nbytes = BLOCK[t]
            n = 1
            for d in ne:
                n *= d
            f.write(head)
            f.seek(offset)
            offset += n // per_block * nbytes
            f.seek(offset)
        f.truncate(offset)
    return offset


def _copy(fixtures_dir: Path, name: str, dest: Path) -> Path:
    out = dest / name
    shutil.copyfile(fixtures_dir / "models" / name, out)
    return out


needs_zip = pytest.mark.skipif(shutil.which("zip") is None, reason="Info-ZIP `zip` not installed (apt-get install zip)")


def _split_zip(src: Path, dest_zip: Path) -> list[Path]:
    """NAME.zip + NAME.z01 made with `zip -0 -s` (stored, split), as the seed card's files are."""
    subprocess.run(["zip", "-q", "-0", "-j", "-s", "1m", str(dest_zip), str(src)], check=True)
    return split_parts(dest_zip)


def _by_name(entries):
    return {e.name: e for e in entries}


# ---------------------------------------------------------------- listing

@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
@needs_zip
def test_lists_ggml_gguf_and_split_zip(tmp_path, fixtures_dir, fixture_index):
    lib_dir = tmp_path / "models"
    lib_dir.mkdir()
    for name in ("fx-q4_K_M.ggmlv3.bin", "fx-q4_K_M.gguf", "fxgqa-q4_0.gguf", "fx-q8_0.ggmlv3.bin"):
        _copy(fixtures_dir, name, lib_dir)
    legacy = fixtures_dir / "legacy" / "models"
    for name in ("fx-f16.ggml.bin", "fx-q4_0.ggmf.bin", "fx-q4_0.ggjt1.bin", "fx-q4_0.ggjt2.bin", "fx-q4_2.ggjt1.bin"):
        shutil.copyfile(legacy / name, lib_dir / name)
    parts = _split_zip(fixtures_dir / "models" / "fx-q6_K.ggmlv3.bin", lib_dir / "fx-q6_K.ggmlv3.zip")
    assert len(parts) >= 2, "the split archive should have at least one .z01 part"
    (lib_dir / "notes.txt").write_text("not a model")
    (lib_dir / "sub").mkdir()
    _copy(fixtures_dir, "fx-q2_K.gguf", lib_dir / "sub")

    entries = _by_name(ModelLibrary(lib_dir, n_ctx=512).scan())

    # Every model file, the split archive once (its .z01 part is not a separate model), nothing else.
    assert "notes.txt" not in entries
    assert not any(n.endswith(".z01") for n in entries)
    assert {"fx-q4_K_M.ggmlv3.bin", "fx-q4_K_M.gguf", "fxgqa-q4_0.gguf", "fx-q8_0.ggmlv3.bin",
            "fx-q6_K.ggmlv3.zip", "sub/fx-q2_K.gguf"} <= set(entries)

    models = {m["name"]: m for m in fixture_index["models"]}
    for file_name, model, fmt in (("fx-q4_K_M.ggmlv3.bin", "fx-q4_K_M", "ggjt"), ("fx-q4_K_M.gguf", "fx-q4_K_M", "gguf"),
                                  ("fxgqa-q4_0.gguf", "fxgqa-q4_0", "gguf"), ("fx-q8_0.ggmlv3.bin", "fx-q8_0", "ggjt"),
                                  ("fx-q6_K.ggmlv3.zip", "fx-q6_K", "ggjt"), ("sub/fx-q2_K.gguf", "fx-q2_K", "gguf")):
        e = entries[file_name]
        ref = models[model]
        assert e.loadable, e.error
        assert e.format == fmt
        assert e.mix == model.split("-", 1)[1]
        hp = ref["hparams"]
        assert e.hparams["n_layer"] == hp["n_layer"] and e.hparams["n_embd"] == hp["n_embd"]
        assert e.hparams["n_head_kv"] == hp["n_head_kv"], "n_head_kv comes from the shape of wk (GGML v3 too)"
        # The parameter count from the shapes, checked against the tensor list llama.cpp wrote.
        n_params = (hp["n_vocab"] * hp["n_embd"] * 2 + hp["n_embd"]
                    + hp["n_layer"] * (2 * hp["n_embd"] * hp["n_embd"]
                                       + 2 * hp["n_embd"] * hp["n_embd"] // hp["n_gqa"]
                                       + 3 * hp["n_embd"] * hp["n_ff"] + 2 * hp["n_embd"]))
        assert e.n_params == n_params
        assert e.size_class == f"{n_params / 1e6:.1f}M"
        assert e.template == "airoboros"            # no name or metadata hint: the project's default
        assert e.ram_bytes > e.file_size
        assert e.n_ctx == 512
    # A split archive's size is that of all its parts; a plain file's is its own size.
    assert entries["fx-q6_K.ggmlv3.zip"].file_size == sum(p.stat().st_size for p in parts)
    assert entries["fx-q6_K.ggmlv3.zip"].parts == tuple(p.name for p in parts)
    assert entries["fx-q8_0.ggmlv3.bin"].file_size == models["fx-q8_0"]["files"]["ggmlv3"]["size"]

    # Every older GGML generation is listed with its format and version and the llama.cpp-made tensor shapes.
    for name, fmt, version, mix in (("fx-f16.ggml.bin", "ggml", 0, "f16"), ("fx-q4_0.ggmf.bin", "ggmf", 1, "q4_0"),
                                    ("fx-q4_0.ggjt1.bin", "ggjt", 1, "q4_0"), ("fx-q4_0.ggjt2.bin", "ggjt", 2, "q4_0")):
        e = entries[name]
        assert e.loadable, e.error
        assert (e.format, e.version, e.mix) == (fmt, version, mix)
        assert e.n_params == entries["fx-q8_0.ggmlv3.bin"].n_params
    # Q4_2 no longer exists anywhere: listed, not loadable, with the reader's reason (and no path in it).
    q4_2 = entries["fx-q4_2.ggjt1.bin"]
    assert not q4_2.loadable and "Q4_2" in q4_2.error and str(tmp_path) not in q4_2.error


def test_bad_file_listed_with_reason_and_others_unaffected(tmp_path, fixtures_dir):
    _copy(fixtures_dir, "fx-q4_0.gguf", tmp_path)
    bad = tmp_path / "broken.ggmlv3.bin"
    bad.write_bytes((fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin").read_bytes()[:5000])  # truncated
    entries = _by_name(ModelLibrary(tmp_path).scan())
    assert entries["fx-q4_0.gguf"].loadable
    assert not entries["broken.ggmlv3.bin"].loadable
    assert "broken.ggmlv3.bin" in entries["broken.ggmlv3.bin"].error
    assert str(tmp_path) not in entries["broken.ggmlv3.bin"].error, "reasons reach clients: no paths"


def test_template_from_file_name(tmp_path, fixtures_dir):
    shutil.copyfile(fixtures_dir / "models" / "fx-q4_0.gguf", tmp_path / "airoboros-65b-gpt4-1.4.q4_0.gguf")
    shutil.copyfile(fixtures_dir / "models" / "fx-q4_0.gguf", tmp_path / "vicuna-7b-v1.1.q4_0.gguf")
    shutil.copyfile(fixtures_dir / "models" / "fx-q4_0.gguf", tmp_path / "airoboros-65b-gpt4-1.2.q4_0.gguf")
    entries = _by_name(ModelLibrary(tmp_path).scan())
    assert entries["airoboros-65b-gpt4-1.4.q4_0.gguf"].template == "airoboros"
    assert entries["airoboros-65b-gpt4-1.2.q4_0.gguf"].template == "airoboros-1.2"
    assert entries["vicuna-7b-v1.1.q4_0.gguf"].template == "vicuna"
    # An explicit --template wins.
    assert {e.template for e in ModelLibrary(tmp_path, template="chatml").scan()} == {"chatml"}


def test_size_class_of_full_size_65b_and_70b_without_reading_tensor_data(tmp_path):
    size_65 = _ggjt3_header(tmp_path / "airoboros-65B-gpt4-1.3.ggmlv3.q4_K_M.bin", n_vocab=32000, n_embd=8192,
                            n_head=64, n_layer=80, n_ff=22016, n_mult=256, ftype=15)
    size_70 = _ggjt3_header(tmp_path / "llama-2-70b.ggmlv3.q4_K_M.bin", n_vocab=32000, n_embd=8192, n_head=64,
                            n_layer=80, n_ff=28672, n_mult=4096, ftype=15, n_head_kv=8)
    assert size_65 > 35e9 and size_70 > 35e9
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    entries = _by_name(ModelLibrary(tmp_path, n_ctx=2048).scan())
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    e65, e70 = entries["airoboros-65B-gpt4-1.3.ggmlv3.q4_K_M.bin"], entries["llama-2-70b.ggmlv3.q4_K_M.bin"]
    assert e65.loadable, e65.error
    assert e70.loadable, e70.error
    assert (e65.size_class, e65.mix, e65.file_size) == ("65B", "q4_K_M", size_65)
    assert (e70.size_class, e70.mix, e70.hparams["n_head_kv"]) == ("70B", "q4_K_M", 8)
    # Listing touched a few MB of headers, not the ~80 GB of (sparse) tensor data: fewer than 64k page faults.
    assert faults < 65536, f"{faults} page faults: listing read tensor data"
    # The RAM figure: the file plus a KV cache that grows with the context.
    assert e65.ram_bytes > e65.file_size
    assert e65.ram_for(4096) > e65.ram_for(2048) > e65.ram_for(512) > e65.file_size
    assert 35 * GB < e65.ram_bytes < 60 * GB


def test_size_class_rules():
    assert size_class(32, 4096, 32, 32, 6_700_000_000) == "7B"
    assert size_class(40, 5120, 40, 40, 13_000_000_000) == "13B"
    assert size_class(60, 6656, 52, 52, 32_500_000_000) == "33B"
    assert size_class(80, 8192, 64, 64, 65_000_000_000) == "65B"
    assert size_class(80, 8192, 64, 8, 69_000_000_000) == "70B"
    assert size_class(2, 256, 4, 4, 2_200_000) == "2.2M"
    assert size_class(4, 4096, 32, 32, 1_100_000_000) == "1.1B"   # a 7B-shaped slice is not a 7B


def test_listing_is_cached_and_sees_changes(tmp_path, fixtures_dir):
    calls = []
    from airobackend.formats import open_model

    def counting_open(path, **kw):
        calls.append(path)
        return open_model(path, **kw)

    _copy(fixtures_dir, "fx-q4_0.gguf", tmp_path)
    lib = ModelLibrary(tmp_path, opener=counting_open)
    assert [e.name for e in lib.scan()] == ["fx-q4_0.gguf"]
    lib.scan()
    assert len(calls) == 1, "an unchanged file is not parsed again"
    _copy(fixtures_dir, "fx-q5_0.gguf", tmp_path)
    assert [e.name for e in lib.scan()] == ["fx-q4_0.gguf", "fx-q5_0.gguf"]
    assert len(calls) == 2


def test_find_resolves_only_listed_names(tmp_path, fixtures_dir):
    _copy(fixtures_dir, "fx-q4_0.gguf", tmp_path)
    (tmp_path / "sub").mkdir()
    _copy(fixtures_dir, "fx-q8_0.gguf", tmp_path / "sub")
    lib = ModelLibrary(tmp_path)
    assert lib.find("fx-q4_0.gguf").name == "fx-q4_0.gguf"
    assert lib.find("fx-q4_0").name == "fx-q4_0.gguf"              # stem
    assert lib.find("fx-q8_0.gguf").name == "sub/fx-q8_0.gguf"     # unique file name in a subfolder
    for bad in ("../etc/passwd", "/etc/passwd", str(fixtures_dir / "models" / "fx-q5_0.gguf"), "nope"):
        with pytest.raises(RequestError, match="no model named"):
            lib.find(bad)


def test_models_linked_into_the_folder_are_listed_by_the_links_name(tmp_path, fixtures_dir):
    """A large model kept elsewhere and linked into the folder, or into a subfolder (LoLLMS's models/gguf/<repo>/),
    is listed, found and loadable under the link's name; it used to make the whole listing fail."""
    target = fixtures_dir / "models" / "fx-q4_0.gguf"
    (tmp_path / "repo").mkdir()
    (tmp_path / "airo.gguf").symlink_to(target)
    (tmp_path / "repo" / "fx.gguf").symlink_to(target)
    _copy(fixtures_dir, "fx-q8_0.gguf", tmp_path)
    lib = ModelLibrary(tmp_path)
    assert [e.name for e in lib.scan()] == ["airo.gguf", "fx-q8_0.gguf", "repo/fx.gguf"]
    e = lib.find("repo/fx.gguf")
    assert e.loadable and Path(e.path).resolve() == target.resolve()
    assert lib.find("airo").name == "airo.gguf"
    assert str(fixtures_dir) not in lib.redact(f"cannot read {e.path}")


def test_register_outside_file_and_missing_folder(tmp_path, fixtures_dir):
    lib = ModelLibrary(tmp_path / "does-not-exist")
    assert lib.scan() == []
    name = lib.register(fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin")
    assert name == "fx-q4_0.ggmlv3.bin"
    [e] = lib.scan()
    assert e.loadable and e.path == str((fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin").resolve())
    with pytest.raises(RequestError):
        lib.register(tmp_path / "missing.bin")


def test_entry_dict_hides_path(tmp_path, fixtures_dir):
    _copy(fixtures_dir, "fx-q4_0.gguf", tmp_path)
    [e] = ModelLibrary(tmp_path).scan()
    d = e.to_dict()
    assert "path" not in d and str(tmp_path) not in json.dumps(d)
    assert e.to_dict(with_path=True)["path"] == e.path


SMALL = dict(n_vocab=512, n_layer=1)     # one layer is enough to list; keeps the numpy quantizers quick


@pytest.mark.e2e       # Info-ZIP's `zip`, a subprocess
@needs_zip
def test_lists_models_written_by_the_project_writer(tmp_path):
    """GGUF, GGML v3 and a split archive made from the project's own writer, next to each other."""
    from airobackend.formats.writer import write_synthetic_model

    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    write_synthetic_model(lib_dir / "syn-7b-slice.q5_K_S.gguf", format="gguf", mix="q5_K_S", seed=3, **SMALL)
    write_synthetic_model(lib_dir / "syn-gqa.q4_K_M.ggmlv3.bin", format="ggml", mix="q4_K_M", n_head=8, n_head_kv=2,
                          seed=4, **SMALL)
    src = tmp_path / "syn-q8_0.ggmlv3.bin"
    write_synthetic_model(src, format="ggml", mix="q8_0", seed=5, **SMALL)
    parts = _split_zip(src, lib_dir / "syn-q8_0.ggmlv3.zip")
    entries = _by_name(ModelLibrary(lib_dir).scan())
    assert sorted(entries) == ["syn-7b-slice.q5_K_S.gguf", "syn-gqa.q4_K_M.ggmlv3.bin", "syn-q8_0.ggmlv3.zip"]
    assert [(e.format, e.mix) for e in entries.values()] == [("gguf", "q5_K_S"), ("ggjt", "q4_K_M"), ("ggjt", "q8_0")]
    assert entries["syn-gqa.q4_K_M.ggmlv3.bin"].hparams["n_head_kv"] == 2
    assert entries["syn-q8_0.ggmlv3.zip"].weights_bytes == src.stat().st_size
    assert entries["syn-q8_0.ggmlv3.zip"].file_size == sum(p.stat().st_size for p in parts)
    assert all(e.loadable and e.n_params == entries["syn-7b-slice.q5_K_S.gguf"].n_params
               for e in entries.values() if "gqa" not in e.name)
