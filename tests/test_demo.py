"""The demo model: deterministic, written to the user cache, a real LLaMA GGUF with a sensible English vocabulary."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from airobackend.demo import BANNER, DemoSpec, _corpus_text, demo_model_path, is_demo_model, train_vocab
from airobackend.formats import open_model
from airobackend.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_written_once_deterministically_into_the_cache(demo_model, tmp_path, monkeypatch):
    assert REPO not in demo_model.parents and is_demo_model(demo_model)
    again = demo_model_path(tmp_path / "other")
    assert again.name == demo_model.name and _sha(again) == _sha(demo_model)   # same bytes on every machine
    mtime = again.stat().st_mtime_ns
    assert demo_model_path(tmp_path / "other") == again and again.stat().st_mtime_ns == mtime   # not rewritten
    monkeypatch.setenv("AIRO_CACHE_DIR", str(tmp_path / "env"))
    assert demo_model_path().parent == tmp_path / "env"                          # Settings' AIRO_CACHE_DIR
    assert not list((tmp_path / "other").glob("*.tmp"))
    assert "random weights" in BANNER.lower() and "nonsense" in BANNER


def test_concurrent_first_use(tmp_path):
    results, errors = [], []

    def go():
        try:
            results.append(demo_model_path(tmp_path / "race"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    with open_model(results[0]) as mf:
        assert mf.format == "gguf"


def test_llama_architecture_gguf(demo_model):
    spec = DemoSpec()
    with open_model(demo_model) as mf:
        hp = mf.hparams
        assert mf.format == "gguf" and mf.metadata.get("general.architecture") in ("llama", b"llama")
        assert (hp.n_embd, hp.n_layer, hp.n_head, hp.n_ff) == (spec.n_embd, spec.n_layer, spec.n_head, spec.n_ff)
        assert mf.mix_name.lower() == "q8_0"
        assert mf.tensors["blk.0.attn_q.weight"].type.name == "Q8_0"
        assert mf.tensors["output_norm.weight"].type.name == "F32"
        assert len(mf.tensors) == 2 + 1 + 9 * spec.n_layer
        assert 1000 < hp.n_vocab <= spec.n_vocab_max and (hp.bos_id, hp.eos_id, hp.unk_id) == (1, 2, 0)
        v = mf.vocab
        assert v.pieces[3] == b"<0x00>" and v.pieces[258] == b"<0xFF>" and list(v.types[3:259]) == [6] * 256


def test_vocabulary_tokenizes_english_sensibly(demo_model):
    tok = Tokenizer.from_file(str(demo_model))
    ids = tok.encode("USER: Write a story about llamas\nASSISTANT:")
    pieces = [tok.token_bytes(i) for i in ids[1:]]
    assert b" story" in pieces and b" llamas" in pieces and b" about" in pieces
    words = _corpus_text().split()
    single = sum(len(tok.encode(w, add_bos=False)) == 1 for w in words)
    assert single / len(words) > 0.95                     # corpus words are whole pieces
    for s in ["Hello, world!", "Résumé of a naïve café 🦙", "tabs\tand\nnewlines  double  spaces"]:
        assert tok.decode(tok.encode(s)).decode() == s     # byte fallback covers what the corpus lacks


def test_train_vocab_is_deterministic_and_replayable():
    text = "the cat sat on the mat the cat ate the rat"
    a, b = train_vocab(text, 400), train_vocab(text, 400)
    assert a == b
    pieces, scores, types = a
    assert len(pieces) == len(scores) == len(types) <= 400
    merged = [p for p, t in zip(pieces[259:], types[259:]) if len(p.decode()) > 1]
    assert "\u2581the".encode() in merged and "\u2581cat".encode() in merged
    # every merged piece can be built from two earlier pieces (what llama.cpp's merge loop needs)
    index = {p: i for i, p in enumerate(pieces)}
    for p in merged:
        s = p.decode()
        assert any(s[:k].encode() in index and s[k:].encode() in index
                   and max(index[s[:k].encode()], index[s[k:].encode()]) != index[p] for k in range(1, len(s)))
    assert all(np.diff([sc for sc, p in zip(scores[259:], pieces[259:]) if p in merged]) < 0)


def test_demo_model_generates(demo_model):
    from airobackend.llama import Llama
    llm = Llama(str(demo_model), n_ctx=64, n_threads=2, verbose=False)
    try:
        out = llm("Once upon a time", max_tokens=8, seed=1)
        assert out["usage"]["completion_tokens"] >= 1 and "\ufffd" not in out["choices"][0]["text"]
        llm.reset()
        llm.eval(llm.tokenize(b"Hello"))
        assert np.isfinite(llm.scores[llm.n_tokens - 1]).all()
    finally:
        llm.close()
