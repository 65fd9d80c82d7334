"""The generated kernel source (kernels/codegen.py): deterministic, written out by `airobackend kernels --dump`,
and every function in it compiles and computes what the numpy reference does on tensors of the llama.cpp fixtures."""
from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest

from airobackend.cli import main as cli_main
from airobackend.formats import open_model
from airobackend.kernels import codegen, fast, reference, specs
from airobackend.kernels.fast import prepare_fast
from airobackend.kernels.ggml_types import GGMLType as G

pytestmark = pytest.mark.skipif(specs.ISA == "none", reason="no AVX2 / AVX-512 VNNI on this CPU")

# a llama.cpp fixture holding 2-D tensors of each type (the k-quant mixes hold several k-types)
FIXTURE_FILES = {
    G.Q4_0: "fx-q4_0", G.Q4_1: "fx-q4_1", G.Q5_0: "fx-q5_0", G.Q5_1: "fx-q5_1", G.Q8_0: "fx-q8_0",
    G.Q2_K: "fx-q2_K", G.Q3_K: "fx-q3_K_M", G.Q4_K: "fx-q4_K_M", G.Q5_K: "fx-q5_K_M", G.Q6_K: "fx-q6_K",
    G.F16: "fx-f16",
}
GENERATED = {"fill1", "quantize1", "quantize_few", "matvec", "matvec_x", "matmat", "matmat_few"}


def test_generation_is_deterministic_and_valid_python():
    assert set(specs.SPECS) == set(FIXTURE_FILES)
    for spec in specs.SPECS.values():
        text = codegen.generate_source(spec)
        assert text == codegen.generate_source(type(spec)())      # a fresh spec object: same text
        compile(text, f"fast_{spec.name}.py", "exec")
        assert f"for ISA {specs.ISA}" in text.splitlines()[0]


def test_dump_writes_the_source_the_cache_imports(tmp_path, capsys):
    assert cli_main(["kernels", "--dump", str(tmp_path / "src")]) == 0
    printed = capsys.readouterr().out
    dumped = sorted((tmp_path / "src").glob("fast_*.py"))
    assert len(dumped) == len(specs.all_specs())
    for spec in specs.all_specs():
        path = tmp_path / "src" / f"fast_{type(spec).__name__.lower()}.py"
        assert str(path) in printed
        assert path.read_text() == codegen.generate_source(spec)
        assert Path(codegen.kernel_module(spec).__file__).read_text() == path.read_text()


def _fixture_tensor(fixtures_dir, t):
    with open_model(str(fixtures_dir / "models" / f"{FIXTURE_FILES[t]}.gguf")) as mf:
        for ti in mf.tensors.values():
            if int(ti.type) == int(t) and len(ti.ne) == 2:
                n_cols, n_rows = (int(n) for n in ti.ne)
                return np.array(ti.data).reshape(n_rows, -1), n_rows, n_cols
    raise AssertionError(f"no 2-D {t.name} tensor in {FIXTURE_FILES[t]}")


@pytest.mark.parametrize("t,wide", [(t, False) for t in sorted(FIXTURE_FILES)] + [pytest.param(
    t, True, marks=pytest.mark.skipif(not specs.WIDE, reason="no wide layout for this ISA")) for t in (G.Q4_0, G.Q8_0)],
                         ids=lambda v: G(v).name if not isinstance(v, bool) else ("wide" if v else ""))
def test_every_generated_function_compiles_and_matches_the_reference(fixtures_dir, t, wide, monkeypatch):
    # wide: the fixture's q4_0 / q8_0 rows (too short for it on their own) padded into the 16-block groups of
    # Q4_0W / Q8_0W
    if wide:
        monkeypatch.setattr(fast, "wide_fits", lambda spec, n_blk: True)
    raw, n_rows, n_cols = _fixture_tensor(fixtures_dir, t)
    W = reference.dequantize(raw, t, n_rows * n_cols).reshape(n_rows, n_cols).astype(np.float64)
    fw = prepare_fast(t, raw, n_rows, n_cols)
    assert fw.spec.layout.startswith("wide") == wide
    mod = codegen.kernel_module(fw.spec)
    rng = np.random.default_rng(int(t))
    X = rng.standard_normal((10, n_cols)).astype(np.float32)

    one = fw.matvec(X[0], np.empty(n_rows, np.float32))                     # matvec_x: quantize1 + matvec
    handle = fw.quantize_input(X[:1])                                        # quantize1
    np.testing.assert_array_equal(fw.matvec_q(handle, np.empty(n_rows, np.float32)), one)   # matvec
    A = np.zeros_like(handle[3])
    mod.fill1(X[0], A, *fw._a1)                                              # fill1 on its own (quantize1's gaps
    filled = (handle[0], 1, 1, A)                                            # between regions hold no data)
    np.testing.assert_array_equal(fw.matvec_q(filled, np.empty(n_rows, np.float32)), one)
    many = fw.matmat(X, np.empty((10, n_rows), np.float32))                 # matmat (more than 8 tokens)
    for n in range(1, 9):                                                   # matmat_few (up to 8): tiles of
        few = fw.matmat(X[:n], np.empty((n, n_rows), np.float32))           # 4, 3, 2 and 1 tokens
        np.testing.assert_array_equal(few, many[:n])    # the same sums in the same order: the same bits
        if t != G.F16:      # F16: the mat-vec keeps fp16 activations and 4 accumulators (see F16)
            np.testing.assert_array_equal(few[0], one)

    tol = 1e-3 if t == G.F16 else 3e-2      # 8-bit activations against float ones (fp16 for F16 weights)
    for got, x in [(one, X[0])] + list(zip(many, X)):
        want = W @ x.astype(np.float64)
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), G(t).name
    compiled = {name for name, f in vars(mod).items()
                if isinstance(f, numba.core.registry.CPUDispatcher) and f.py_func.__module__ == mod.__name__}
    assert compiled == GENERATED
    assert all(getattr(mod, name).signatures for name in GENERATED)
