"""The forward pass against llama.cpp: every fixture model, both file formats, teacher-forced and batched.

Ground truth is ../shared/fixtures/reference/<model>.npz (README there). The generic kernels compute in float32
on exactly the file's weight values, so they are compared tightly with `logits_f32deq` (llama.cpp on a dequantized
F32 copy, F16 KV cache). The fast kernels quantize activations like llama.cpp, so they are compared with `logits`
within about twice the file's noise floor. Top-1 must agree wherever the reference's top-two margin is larger than
the comparison can blur.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from airobackend.llama import Llama

FIXTURES = Path(os.environ.get("AIRO_FIXTURES", Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"))
_INDEX = FIXTURES / "reference" / "index.json"
MODELS = [m["name"] for m in json.loads(_INDEX.read_text())["models"]] if _INDEX.is_file() else ["(no fixtures)"]

F32_TOL = 1e-3          # float32 kernels vs logits_f32deq: summation order + fp16 KV rounding (README: ~1e-3)


def _fast_available() -> bool:
    try:
        from airobackend.kernels import fast  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ["generic", pytest.param("fast", marks=pytest.mark.skipif(
    not _fast_available(), reason="airobackend.kernels.fast is not present"))]


@pytest.fixture(scope="module")
def entries(fixture_index):
    return {m["name"]: m for m in fixture_index["models"]}


def _load(fixtures_dir: Path, entry: dict, fmt: str, backend: str, **kw) -> Llama:
    path = fixtures_dir / entry["files"][fmt]["path"]
    kernels = "generic" if backend == "generic" else "auto"
    return Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False, kernels=kernels, **kw)


def _tolerances(entry: dict, backend: str) -> tuple[str, float]:
    """(reference key, max abs tolerance) for a backend."""
    if backend == "generic":
        return "logits_f32deq", F32_TOL
    return "logits", 2.0 * entry["noise_floor"]["max_abs"] + F32_TOL


def _check_top1(ours: np.ndarray, ref: np.ndarray, blur: float, what: str) -> int:
    """Our argmax must equal the reference's wherever its top-two margin exceeds `blur`; returns positions checked."""
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > blur
    ours_top, ref_top = ours.argmax(-1), ref.argmax(-1)
    bad = np.nonzero(decided & (ours_top != ref_top))[0]
    assert bad.size == 0, f"{what}: argmax differs at decided positions {bad.tolist()}"
    return int(decided.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["gguf", "ggmlv3"])
@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_and_batch(fixtures_dir, entries, name, fmt, backend):
    entry = entries[name]
    ref = np.load(fixtures_dir / entry["reference"])
    key, tol = _tolerances(entry, backend)
    tokens = ref["tokens"]
    llm = _load(fixtures_dir, entry, fmt, backend)
    assert llm.n_vocab() == ref["logits"].shape[1]
    assert llm.model.n_head_kv == entry["hparams"]["n_head_kv"]      # GQA inferred for GGML v3 too

    # teacher forced: token i alone at n_past = i
    for t in tokens:
        llm.eval([int(t)])
    assert llm.n_tokens == len(tokens)
    ours = llm.scores[:len(tokens)]
    diff = np.abs(ours - ref[key])
    assert diff.max() <= tol, f"{name}.{fmt} [{backend}] teacher-forced max |diff| {diff.max():.2e} > {tol:.1e}"
    _check_top1(ours, ref[key], 2 * tol, f"{name}.{fmt} vs {key}")
    # against llama.cpp's own (quantized-activation) run, allowing for its noise floor
    llama_blur = 2 * (entry["noise_floor"]["max_abs"] + tol)
    _check_top1(ours, ref["logits"], llama_blur, f"{name}.{fmt} vs logits")
    np.testing.assert_array_equal(llm.input_ids[:len(tokens)], tokens)

    # the whole prompt as one batch (n_past 0), every position's logits
    llm.reset()
    llm.eval(tokens)
    batch_key = "batch_last_logits_f32deq" if backend == "generic" else "batch_last_logits"
    last = llm.scores[len(tokens) - 1]
    assert np.abs(last - ref[batch_key]).max() <= tol, f"{name}.{fmt} [{backend}] batch last"
    assert np.abs(llm.scores[:len(tokens)] - ref[key]).max() <= tol, f"{name}.{fmt} [{backend}] batch rows"
    llm.close()


@pytest.mark.parametrize("name,spec", [("fx-q4_0", "Q4_0W"), ("fxgqa-q4_0", "Q4_0W"), ("fx-q8_0", "Q8_0W")])
def test_wide_groups_against_llama_cpp(fixtures_dir, entries, name, spec, wide_legacy):
    # q4_0 / q8_0 weights in the wide 16-block layout (what 4096-wide models take; the fixtures' rows padded into
    # it) against llama.cpp within the same tolerances: only the float summation order differs
    test_teacher_forced_and_batch(fixtures_dir, entries, name, "gguf", "fast")
    assert wide_legacy and set(wide_legacy) == {spec}


def test_explicit_n_gqa_for_ggml_v3(fixtures_dir, entries):
    """The GGML v3 twin of a GQA model loaded with n_gqa=4 given, as mid-2023 llama.cpp required (-gqa)."""
    entry = entries["fxgqa-q4_0"]
    ref = np.load(fixtures_dir / entry["reference"])
    llm = _load(fixtures_dir, entry, "ggmlv3", "generic", n_gqa=4)
    assert llm.model.n_head_kv == 2
    llm.eval(ref["tokens"])
    assert np.abs(llm.scores[:len(ref["tokens"])] - ref["logits_f32deq"]).max() <= F32_TOL
    llm.close()


def test_last_row_only_without_logits_all_and_split_batches(fixtures_dir, entries):
    """logits_all=False keeps only the last row; n_batch smaller than the prompt gives the same logits."""
    entry = entries["fx-q4_K_M"]
    ref = np.load(fixtures_dir / entry["reference"])
    tokens = ref["tokens"]
    llm = Llama(str(fixtures_dir / entry["files"]["gguf"]["path"]), n_ctx=32, n_batch=5, n_threads=1,
                verbose=False, kernels="generic")
    llm.eval(tokens[:10])
    llm.eval(tokens[10:])
    assert llm.n_tokens == len(tokens)
    filled = np.nonzero(llm.scores.any(axis=1))[0]
    assert filled.tolist() == [9, len(tokens) - 1]          # the last row of each eval() call
    assert np.abs(llm.scores[len(tokens) - 1] - ref["batch_last_logits_f32deq"]).max() <= F32_TOL
    llm.close()
    every = Llama(str(fixtures_dir / entry["files"]["gguf"]["path"]), n_ctx=32, n_batch=5, logits_all=True,
                  verbose=False, kernels="generic")
    every.eval(tokens)                                      # 5 forward passes of 5, 5, 5, 5, 4 tokens
    assert np.abs(every.scores[:len(tokens)] - ref["logits_f32deq"]).max() <= F32_TOL
    every.close()


def test_context_overflow_and_overwrite(fixtures_dir, entries):
    """Evaluating past n_ctx raises ContextOverflowError without touching the context; re-evaluating from an
    earlier n_past overwrites the cache (prompt-cache reuse)."""
    from airobackend.errors import ContextOverflowError
    entry = entries["fx-q8_0"]
    ref = np.load(fixtures_dir / entry["reference"])
    tokens = ref["tokens"]
    llm = Llama(str(fixtures_dir / entry["files"]["gguf"]["path"]), n_ctx=24, verbose=False, kernels="generic",
                logits_all=True)
    llm.eval([5, 6, 7, 8])                      # junk that gets overwritten below
    llm.reset()
    llm.eval(tokens[:20])
    with pytest.raises(ContextOverflowError):
        llm.eval(tokens[:5])
    assert llm.n_tokens == 20
    llm.eval(tokens[20:])
    assert np.abs(llm.scores[:24] - ref["logits_f32deq"]).max() <= F32_TOL
    from airobackend.errors import RequestError
    with pytest.raises(RequestError):
        llm.model.eval([0, llm.n_vocab()], 0)             # token id out of range
    llm.close()
    seen = []
    default_ctx = Llama(str(fixtures_dir / entry["files"]["gguf"]["path"]), n_ctx=0, verbose=False,
                        progress_callback=seen.append)
    assert default_ctx.n_ctx() == 2048 and seen == [0.5, 1.0]
    # The warm-up runs every kernel group, says so per group, and leaves the cache empty: the same tokens give the
    # same logits after it as before.
    model, lines = default_ctx.model, []
    before = model.eval(tokens[:8], 0, logits_all=True).copy()
    model.warmup(report=lambda line, done: lines.append((line, done)))
    ready = [line for line, done in lines if done]
    assert len(ready) == 2 and ready[1].startswith("attention, norm and RoPE kernels: "), lines
    assert model.cache.n_past == 0
    assert np.array_equal(model.eval(tokens[:8], 0, logits_all=True), before)


def test_kv_shift_rerotates_kept_keys(fixtures_dir, entries):
    """Dropping positions n_keep..n_keep+n_discard-1 moves the later entries down and re-rotates their keys, so the
    first layer's cache equals a fresh evaluation of the shortened sequence (deeper layers legitimately differ:
    their K/V were computed while the dropped tokens were still visible, exactly as with llama.cpp's shift)."""
    from airobackend.kernels.dequant import f16_table
    tab = f16_table()
    entry = entries["fx-q4_0"]
    tokens = np.load(fixtures_dir / entry["reference"])["tokens"]
    path = str(fixtures_dir / entry["files"]["gguf"]["path"])
    a = Llama(path, n_ctx=32, verbose=False, kernels="generic")
    a.eval(tokens[:20])
    unshifted_k = tab[a.model.cache.k[0, :, :20]]
    assert a.model.cache.remove(4, 10) == 14 == a.model.cache.n_past
    b = Llama(path, n_ctx=32, verbose=False, kernels="generic")
    b.eval(np.concatenate([tokens[:4], tokens[10:20]]))
    k_shifted, k_fresh = tab[a.model.cache.k[0, :, :14]], tab[b.model.cache.k[0, :, :14]]
    err = np.abs(k_shifted - k_fresh).max()
    assert err <= 2e-3 * np.abs(k_fresh).max()                   # fp16 rounding of the re-rotated keys
    assert np.abs(unshifted_k[:, 10:20] - k_fresh[:, 4:14]).max() > 20 * err   # the rotation did change them
    np.testing.assert_array_equal(a.model.cache.v[0, :, :14], b.model.cache.v[0, :, :14])
    # evaluation continues from the shifted position
    assert a.model.eval(tokens[20:21], 14).shape == (1, a.n_vocab())
    for llm in (a, b):
        llm.close()


@pytest.mark.parametrize("fmt", ["gguf", "ggmlv3"])
def test_tokenize_detokenize_and_threads(fixtures_dir, entries, fmt):
    """tokenize() gives llama.cpp's tokens for the reference text; n_threads is honoured and does not change results."""
    import numba
    entry = entries["fx32k-q4_0"]
    ref = np.load(fixtures_dir / entry["reference"])
    path = str(fixtures_dir / entry["files"][fmt]["path"])
    one = Llama(path, n_ctx=32, n_threads=1, verbose=False, kernels="generic")
    assert one.tokenize(entry["text"].encode()) == ref["tokens"].tolist()
    assert one.detokenize(ref["tokens"][1:]).strip() == entry["text"].encode().strip()
    assert (one.token_bos(), one.token_eos()) == (1, 2)
    one.eval(ref["tokens"][:6])
    assert numba.get_num_threads() == 1
    two = Llama(path, n_ctx=32, n_threads=min(2, numba.config.NUMBA_NUM_THREADS), verbose=False, kernels="generic")
    two.eval(ref["tokens"][:6])
    assert numba.get_num_threads() == two.n_threads
    np.testing.assert_array_equal(one.scores[5], two.scores[5])     # rows are split between threads, not sums
    one.close()
    two.close()


_LEGACY_INDEX = FIXTURES / "legacy" / "reference" / "index.json"
LEGACY = ([m["name"] for m in json.loads(_LEGACY_INDEX.read_text())["models"] if m.get("shipped")]
          if _LEGACY_INDEX.is_file() else ["(no legacy fixtures)"])


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_files(fixtures_dir, name):
    """Pre-GGML-v3 files (ggml, ggmf, ggjt v1/v2) against the llama.cpp tree of their time (eps 1e-6 then).

    Tolerance 2.5e-3 instead of 1e-3: the reader converts old blocks whose scales were float32 into today's fp16
    layouts, which moves some weights by up to an fp16 rounding (worst on Q4_1's offsets: ~1.9e-3 measured), still
    ~10x below these files' noise floors.
    """
    from airobackend.errors import UnsupportedTensorType
    legacy = fixtures_dir / "legacy"
    entry = {m["name"]: m for m in json.loads((legacy / "reference" / "index.json").read_text())["models"]}[name]
    ref = np.load(legacy / entry["reference"])
    path = str(legacy / entry["file"])
    if "q4_2" in name:                                   # removed from llama.cpp in 2023: a clear refusal
        with pytest.raises(UnsupportedTensorType, match="Q4_2"):
            Llama(path, verbose=False)
        return
    llm = Llama(path, n_ctx=32, rms_norm_eps=1e-6, logits_all=True, verbose=False, kernels="generic")
    for t in ref["tokens"]:
        llm.eval([int(t)])
    assert np.abs(llm.scores[:len(ref["tokens"])] - ref["logits_f32deq"]).max() <= 2.5e-3
    llm.reset()
    llm.eval(ref["tokens"])
    assert np.abs(llm.scores[len(ref["tokens"]) - 1] - ref["batch_last_logits_f32deq"]).max() <= 2.5e-3
    llm.close()
