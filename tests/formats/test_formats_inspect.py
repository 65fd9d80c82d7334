"""`airobackend inspect FILE [--json]`: readable summary, JSON for scripts, one-line error and exit 1 for bad files."""
from __future__ import annotations

import argparse
import json

from airobackend.commands import inspect as inspect_cmd


def _run(capsys, *argv):
    p = argparse.ArgumentParser()
    inspect_cmd.add_arguments(p)
    rc = inspect_cmd.main(p.parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_human_summary(capsys, fixtures_dir):
    rc, out, err = _run(capsys, fixtures_dir / "models" / "fxgqa-q4_K_M.ggmlv3.bin")
    assert rc == 0 and err == ""
    assert "ggjt v3" in out and "mix q4_K_M (ftype 15)" in out
    assert "n_head_kv 2 (gqa 4)" in out and "n_ff 768" in out
    assert "13 Q4_K, 5 F32, 3 Q6_K" in out and "RAM" in out and "KV cache" in out
    assert len(out.splitlines()) <= 12


def test_json_for_scripts(capsys, fixtures_dir):
    rc, out, _ = _run(capsys, fixtures_dir / "models" / "fx-q5_K_M.gguf", "--json", "--n-ctx", "4096", "--tensors")
    d = json.loads(out)
    assert rc == 0 and d["format"] == "gguf" and d["version"] == 3 and d["mix"] == "q5_K_M"
    assert d["hparams"]["n_layer"] == 2 and d["tensor_types"] == {"Q5_K": 13, "F32": 5, "Q6_K": 3}
    assert d["n_ctx"] == 4096 and d["kv_cache_bytes"] == 2 * 2 * 4096 * 256 * 2
    assert d["ram_bytes"] > d["file_size"] + d["kv_cache_bytes"]
    assert len(d["tensors"]) == 21 and {"token_embd.weight", "blk.1.ffn_down.weight"} <= {t["name"] for t in d["tensors"]}


def test_legacy_file_notes_conversion(capsys, fixtures_dir):
    p = fixtures_dir / "legacy" / "models" / "fx-q4_1.ggjt1.bin"
    if not p.exists():
        return
    rc, out, _ = _run(capsys, p)
    assert rc == 0 and "ggjt v1" in out and "16 tensors use a pre-v3 block layout" in out


def test_bad_file_one_line_error_exit_1(capsys, tmp_path, fixtures_dir):
    bad = tmp_path / "bad.bin"
    bad.write_bytes((fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin").read_bytes()[:5000])
    rc, out, err = _run(capsys, bad)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("airobackend inspect: error:") and "bad.bin" in err
    rc, _, err = _run(capsys, tmp_path / "missing.gguf")
    assert rc == 1 and "cannot open" in err
