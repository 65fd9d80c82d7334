"""The fast int8 kernels (airobackend.kernels.fast) against float64 oracles.

Two oracles per product:
* tight: dequantized weights @ the activation quantized like llama.cpp (an independent numpy Q8_0 / Q8_K / fp16
  quantizer here), so only float summation order differs (~1e-6 relative);
* loose: dequantized weights @ the float activation, within the error 8-bit activations bring (~6e-3 relative).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from airobackend.kernels import codegen, fast, repack, simd, specs
from airobackend.quant import BLOCK, GGMLType as G

sys.path.insert(0, str(Path(__file__).parent))
from blocks import dequantize, random_blocks  # noqa: E402

pytestmark = pytest.mark.skipif(fast.ISA == "none", reason="no AVX2 / AVX-512 VNNI on this CPU")

ALL = [G.Q4_0, G.Q4_K, G.Q6_K, G.Q8_0, G.Q5_K, G.Q3_K, G.Q2_K, G.Q5_0, G.Q5_1, G.Q4_1, G.F16]
LEGACY = {G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0}


# ------------------------------------------------------------------------------------------ numpy activation oracle
def _f16(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float64)


def q8_activation(t: G, x: np.ndarray) -> np.ndarray:
    """x (f32[n]) as llama.cpp's CPU matmul sees it, dequantized to float64."""
    x = np.asarray(x, np.float32)
    if t == G.F16:
        return _f16(x)
    if t in LEGACY:
        b = x.reshape(-1, 32)
        amax = np.abs(b).max(axis=1).astype(np.float32)
        d = (amax / np.float32(127.0)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.rint(b * inv[:, None]).astype(np.float64)
        return (q * _f16(d)[:, None]).reshape(-1)
    b = x.reshape(-1, 256)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), idx]
    out = np.zeros(b.shape, np.float64)
    nz = mx != 0
    iscale = (np.float32(-127.0) / mx[nz]).astype(np.float32)
    q = np.minimum(127, np.rint((b[nz] * iscale[:, None]).astype(np.float32)))
    out[nz] = q * (np.float32(1.0) / iscale).astype(np.float64)[:, None]
    return out.reshape(-1)


def check(t: G, raw: np.ndarray, n_rows: int, n_cols: int, n_tok: int, rng, tight_tol=2e-5):
    fw = fast.prepare_fast(t, raw, n_rows, n_cols)
    assert fw is not None, f"no fast kernel for {t.name}"
    W = dequantize(t, raw, n_cols)
    X = (rng.standard_normal((n_tok, n_cols)) * rng.uniform(0.1, 3.0, size=(n_tok, 1))).astype(np.float32)
    out = np.full(n_rows, np.nan, np.float32)
    fw.matvec(X[0], out)
    Out = np.full((n_tok, n_rows), np.nan, np.float32)
    fw.matmat(X, Out)
    for got, x in [(out, X[0])] + [(Out[i], X[i]) for i in range(n_tok)]:
        ref_q = W @ q8_activation(t, x)
        ref = W @ x.astype(np.float64)
        scale = np.abs(ref).max()
        assert np.isfinite(got).all()
        tight = np.abs(got - ref_q).max() / scale
        loose = np.abs(got - ref).max() / scale
        # q4_1/q5_1: llama.cpp's Q8_1 carries s = fp16(d*sum q) for the m term, not d*sum q: allow that rounding
        assert tight < (2e-3 if t in (G.Q4_1, G.Q5_1) else tight_tol), (t.name, tight)
        if n_rows >= 16:   # a relative bound needs enough rows for max|ref| to be a meaningful scale
            assert loose < (1e-3 if t == G.F16 else 3e-2), (t.name, loose)
    return fw


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_random_blocks_odd_rows(t):
    rng = np.random.default_rng(int(t))
    n_cols = 512
    for n_rows, n_tok in [(37, 6), (1, 1), (69, 9), (37, 2)]:    # 2 and 6: the few-token kernels, 9: matmat
        raw = random_blocks(t, n_rows, n_cols, rng)
        raw.flags.writeable = False                 # mmapped tensors are read-only
        check(t, raw, n_rows, n_cols, n_tok, rng)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_long_rows_take_the_prefetching_matvec(t):
    # 65B ffn_down rows (22016 columns): the activation row outgrows L1, so the mat-vec prefetches the weight
    # stream; it must give the same numbers as the plain loop and the oracle.
    rng = np.random.default_rng(100 + int(t))
    n_rows, n_cols = 19, 22016 if t not in LEGACY else 22016 - 96
    raw = random_blocks(t, n_rows, n_cols, rng)
    fw = check(t, raw, n_rows, n_cols, 1, rng)
    assert fw._pf
    x = rng.standard_normal(n_cols).astype(np.float32)
    with_pf = fw.matvec(x, np.empty(n_rows, np.float32)).copy()
    fw._pf = False
    assert np.array_equal(fw.matvec(x, np.empty(n_rows, np.float32)), with_pf)
    short = fast.prepare_fast(t, random_blocks(t, 3, 512, rng), 3, 512)
    # in memory, short rows: the repacked types but q8_0
    assert short._pf == (t in (G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K))


def test_f16_activation_rounding_matches_numpy():
    # F16 weights see activations rounded to fp16 (round half to even): ties, subnormals, overflow to inf, -0
    from airobackend.kernels import q8
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(3 * 64) * np.float32(3e4)).astype(np.float32)
    x[:8] = [2049.0, 2051.0, -2049.0, 1e-8, -3e-5, 65520.0, 1e9, -0.0]     # 65520 and 1e9 round to inf
    x[8:16] = (rng.standard_normal(8) * 1e-6).astype(np.float32)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
        ref_rows = np.stack([ref, ref[::-1]]).astype(np.float32)
    b = np.empty(2 * x.size, np.int8)
    q8.f16_bytes(x, b)
    assert np.array_equal(b.view(np.uint16), ref.view(np.uint16))
    X = np.stack([x, x[::-1]])
    out = np.full(X.size, np.nan, np.float32)
    q8.f16_round_rows(X.reshape(-1), out)
    assert np.array_equal(out.view(np.uint32), ref_rows.reshape(-1).view(np.uint32))


@pytest.mark.parametrize("gfni", [
    pytest.param(True, id="gfni", marks=pytest.mark.skipif(not simd._HAS_GFNI, reason="this CPU has no GFNI")),
    pytest.param(False, id="shift-mask")])
def test_bitfield_extracts_every_field_of_every_byte(gfni, monkeypatch):
    # the q2_K/q3_K bit fields; with GFNI a bit-matrix product whose matrix layout is easy to get backwards. Each byte
    # value appears in both 256-bit halves (which may take their field from other bits), and the fields are moved
    # to `dst`. The shift-and-mask path (CPUs without GFNI) is compiled here by turning GFNI off for the codegen.
    import numba
    from airobackend.kernels import simd
    monkeypatch.setattr(simd, "_HAS_GFNI", gfni)
    a = np.concatenate([np.arange(256), np.roll(np.arange(256), 32)]).astype(np.uint8)
    upper = (np.arange(a.size) % 64) >= 32
    cases = [(lo, n, 0, None) for lo in range(8) for n in range(1, 9 - lo)]
    cases += [(0, 1, 2, 1), (2, 3, 0, 5), (6, 2, 0, None), (3, 3, 0, 3), (1, 2, 4, 3), (4, 2, 1, 6)]
    for lo, n, dst, lo_hi in cases:
        f = simd.make_bitfield(lo, n, dst, lo_hi)

        @numba.njit
        def run(a, out):
            for k in range(0, a.shape[0], 64):
                simd.store_i(out, k, f(simd.load_i(a, k)))
        out = np.zeros_like(a)
        run(a, out)
        src = np.where(upper, lo if lo_hi is None else lo_hi, lo)
        want = (((a >> src) & ((1 << n) - 1)) << dst).astype(np.uint8)
        assert np.array_equal(out, want), (lo, n, dst, lo_hi, gfni)


@pytest.mark.parametrize("spec_cls", [
    pytest.param(specs.Q3_K, id="packed-scales", marks=pytest.mark.skipif(
        not simd._HAS_VBMI, reason="this CPU has no AVX-512 VBMI")),
    pytest.param(specs.Q3_K_I8, id="int8-scales")])
def test_q3k_both_block_layouts(spec_cls, monkeypatch):
    # q3_K is repacked into 110-byte blocks with the scales as packed 6-bit fields where VBMI decodes them, else into
    # 114-byte blocks with int8 scales; both against the oracle, the long-row (prefetching) loop included.
    monkeypatch.setitem(specs.SPECS, int(G.Q3_K), spec_cls())
    rng = np.random.default_rng(33)
    for n_rows, n_cols, n_tok in [(37, 512, 5), (19, 22016, 1)]:
        raw = random_blocks(G.Q3_K, n_rows, n_cols, rng)
        fw = check(G.Q3_K, raw, n_rows, n_cols, n_tok, rng)
        assert type(fw.spec) is spec_cls
        assert fw.W.nbytes == raw.nbytes * (114 if spec_cls is specs.Q3_K_I8 else 110) // 110


@pytest.mark.skipif(not simd._HAS_VBMI, reason="this CPU has no AVX-512 VBMI")
@pytest.mark.parametrize("t", [G.Q4_K, G.Q5_K], ids=lambda t: t.name)
def test_k4_repack_puts_every_quant_in_its_sub_block_lane(t):
    """repack_k4: part p's byte 4k + b (low nibble of chunk p // 2 for even p, high for odd) holds weight
    16k + 4p + b, q5_K's fifth bit of it sits at bit p (+ 4 for the second 32 bytes) of byte m % 32 of the 32 high-bit
    bytes; the 16 header bytes (d, dmin, scales) are copied."""
    q5 = t == G.Q5_K
    bb, qo = (176, 48) if q5 else (144, 16)
    raw = random_blocks(t, 3, 512, np.random.default_rng(5))
    out = repack.repack_k4(raw, 2, q5)
    assert out.shape == raw.shape
    for r in range(3):
        for blk in range(2):
            src = raw[r, blk * bb:(blk + 1) * bb].astype(np.int64)
            dst = out[r, blk * bb:(blk + 1) * bb].astype(np.int64)
            np.testing.assert_array_equal(dst[:16], src[:16])
            w = np.arange(256)
            byte = src[qo + 32 * (w // 64) + w % 32]
            q = np.where(w % 64 < 32, byte & 15, byte >> 4)
            if q5:
                q = q + 16 * ((src[16 + w % 32] >> (w // 32)) & 1)
            for p in range(4):
                m = np.arange(64)
                b = dst[qo + 64 * (p // 2) + m]
                got = (b & 15) if p % 2 == 0 else (b >> 4)
                if q5:
                    got = got + 16 * ((dst[16 + m % 32] >> (p + 4 * (m // 32))) & 1)
                np.testing.assert_array_equal(got, q[16 * (m // 4) + 4 * p + m % 4], err_msg=f"part {p}")


def test_k6_repack_puts_every_quant_in_its_sub_block_lane():
    """repack_k6: part p's byte 4k + b (nibble p % 2 of the 64-byte chunk p // 2, bits 2p, 2p + 1 of the 64 high-bit
    bytes above 4) holds the 6-bit quant of weight 16k + 4p + b as llama.cpp's dequantize_row_q6_K reads it; the 16
    int8 scales and d are copied."""
    raw = random_blocks(G.Q6_K, 3, 512, np.random.default_rng(6))
    out = repack.repack_k6(raw, 2)
    assert out.shape == raw.shape
    w = np.arange(256)
    h, g, l = w // 128, (w // 32) % 4, w % 32
    for r in range(3):
        for blk in range(2):
            src = raw[r, blk * 210:(blk + 1) * 210].astype(np.int64)
            dst = out[r, blk * 210:(blk + 1) * 210].astype(np.int64)
            np.testing.assert_array_equal(dst[192:], src[192:])
            q = ((src[64 * h + 32 * (g % 2) + l] >> (4 * (g // 2))) & 15) | (((src[128 + 32 * h + l] >> (2 * g)) & 3) << 4)
            for p in range(4):
                m = np.arange(64)
                got = ((dst[64 * (p // 2) + m] >> (4 * (p % 2))) & 15) | (((dst[128 + m] >> (2 * p)) & 3) << 4)
                np.testing.assert_array_equal(got, q[16 * (m // 4) + 4 * p + m % 4], err_msg=f"part {p}")


def test_q3k_scale_fields_decode_to_every_value():
    # every 6-bit value in every lane: 16 lanes x 64 values through the repacked layout's bit positions
    import numba
    from airobackend.kernels import simd
    vals = (np.arange(64 * 16).reshape(64, 16) * 7 + np.arange(16)) % 64 - 32      # [case, lane] in -32..31
    raw = np.zeros((64, 16), np.uint8)
    for c in range(64):
        halves = [0, 0]
        for k in range(16):
            halves[k % 4 >= 2] |= (int(vals[c, k]) & 63) << simd.q3k_scale_bit(k)
        raw[c, :6] = np.frombuffer(halves[0].to_bytes(8, "little"), np.uint8)[:6]
        raw[c, 8:14] = np.frombuffer(halves[1].to_bytes(8, "little"), np.uint8)[:6]
        raw[c, 6:8], raw[c, 14:16] = 0xFF, 0xFF         # neighbouring bytes: must not leak in
    raw = raw.reshape(-1)

    @numba.njit
    def run(a, out):
        for c in range(64):
            simd.store_i(out, 64 * c, simd.load_q3k_scales(a, 16 * c))
    out = np.zeros(64 * 64, np.uint8)
    run(raw, out)
    words = out.view(np.int16).reshape(64, 16, 2)
    assert np.array_equal(words[:, :, 0], vals)         # low word: the value, sign-extended
    assert not words[:, :, 1].any()                      # high word 0 (vpdpwssd multiplies it too)


@pytest.mark.parametrize("t", sorted(LEGACY), ids=lambda t: t.name)
def test_legacy_partial_group(t):
    # 96 columns = 3 blocks: the repack pads the last group of 4 blocks with zero blocks
    rng = np.random.default_rng(7)
    raw = random_blocks(t, 13, 96, rng)
    check(t, raw, 13, 96, 5, rng)


@pytest.mark.parametrize("t", [G.Q4_0, G.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_cols,wide", [(512, True), (1024, True), (8448, True), (1280, False), (96, False)])
def test_wide_groups_in_every_kernel(t, n_cols, wide):
    # q4_0 / q8_0 rows of whole 16-block groups, or short of them by at most 1/32 (8448 = 264 blocks, padded by 8
    # zero blocks as a 7B's ffn_down), take the one-block-per-lane layout (specs.Q4_0W, Q8_0W); 40 and 3 blocks keep
    # the 4-block groups. The mat-vec, every few-token count and a ragged prompt batch (11 tokens: tiles of 4, 4 and
    # 3) agree with the oracle and, for the same row, bit for bit with each other (batched decoding equals one
    # sequence alone).
    rng = np.random.default_rng(n_cols)
    n_rows = 37
    raw = random_blocks(t, n_rows, n_cols, rng)
    fw = check(t, raw, n_rows, n_cols, 11, rng)
    assert (fw.spec.layout.startswith("wide")) == (wide and int(t) in specs.WIDE)     # AVX-512 only
    assert fw.W.nbytes == n_rows * -(-n_cols // fw.spec.step_w) * fw.spec.step_bytes
    X = rng.standard_normal((11, n_cols)).astype(np.float32)
    one = fw.matvec(X[0], np.empty(n_rows, np.float32))
    many = fw.matmat(X, np.empty((11, n_rows), np.float32))
    for n in range(1, 9):
        few = fw.matmat(X[:n], np.empty((n, n_rows), np.float32))
        np.testing.assert_array_equal(few, many[:n], err_msg=f"{n} tokens")
        np.testing.assert_array_equal(few[0], one)


@pytest.mark.parametrize("t", [G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K], ids=lambda t: t.name)
def test_few_tokens_in_column_blocks(t):
    # A 7B's ffn_down rows (11008 columns): 4 tokens of k-quant activations outgrow L1, so the few-token kernel takes
    # the rows in column blocks, keeping the partial sums between blocks. Every token count agrees with the oracle
    # and, bit for bit, with the mat-vec of each token alone (batched decoding equals one sequence alone); 37 rows:
    # two row chunks, the second ragged.
    rng = np.random.default_rng(int(t) + 11008)
    n_rows, n_cols = 37, 11008
    raw = random_blocks(t, n_rows, n_cols, rng)
    fw = check(t, raw, n_rows, n_cols, 6, rng)
    assert codegen.few_blocks(fw.spec, fw.n_steps) > 1
    assert codegen.few_blocks(fw.spec, 4096 // 256) == 1      # a 4096-wide row stays whole
    X = rng.standard_normal((8, n_cols)).astype(np.float32)
    alone = np.stack([fw.matvec(x, np.empty(n_rows, np.float32)).copy() for x in X])
    for n in range(2, 9):
        few = fw.matmat(X[:n], np.empty((n, n_rows), np.float32))
        np.testing.assert_array_equal(few, alone[:n], err_msg=f"{n} tokens")


def test_q4_0_wide_repack_puts_block_j_in_lane_j():
    # 64-byte load k of a group: i32 lane j = bytes 4k..4k+3 of block j's quants; then d of block j at half j;
    # 40 blocks = 2 groups + 8 zero blocks
    spec = specs.Q4_0W()
    raw = random_blocks(G.Q4_0, 3, 40 * 32, np.random.default_rng(4))
    out = repack.repack_legacy(spec, raw, 40)
    assert out.shape == (3, 3 * 288)
    src = raw.reshape(3, 40, 18)
    for g in range(3):
        grp = out[:, 288 * g:288 * (g + 1)]
        for j in range(16):
            b = 16 * g + j
            qs = grp[:, 64 * np.arange(4)[:, None] + 4 * j + np.arange(4)].reshape(3, 16)
            d = grp[:, 256 + 2 * j:258 + 2 * j]
            if b < 40:
                np.testing.assert_array_equal(qs, src[:, b, 2:])
                np.testing.assert_array_equal(d, src[:, b, :2])
            else:
                assert not qs.any() and not d.any()


def test_shape_and_type_gates():
    rng = np.random.default_rng(1)
    assert fast.prepare_fast(G.F32, np.zeros((4, 4 * 256 * 4), np.uint8), 4, 1024) is None
    assert fast.prepare_fast(G.F16, random_blocks(G.F16, 3, 48, rng), 3, 48) is None     # not a multiple of 64
    with pytest.raises(ValueError):
        fast.prepare_fast(G.Q4_0, np.zeros((3, 10), np.uint8), 3, 64)


def test_shape_mismatch_is_an_error_not_a_stray_write():
    rng = np.random.default_rng(2)
    fw = fast.prepare_fast(G.Q4_0, random_blocks(G.Q4_0, 8, 64, rng), 8, 64)
    with pytest.raises(ValueError):
        fw.matvec(np.zeros(96, np.float32), np.zeros(8, np.float32))
    with pytest.raises(ValueError):
        fw.matvec(np.zeros(64, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        fw.matmat(np.zeros((3, 64), np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError):
        fw.matmat(np.zeros((3, 32), np.float32), np.zeros((3, 8), np.float32))


def test_non_contiguous_output_and_input():
    rng = np.random.default_rng(3)
    raw = random_blocks(G.Q4_K, 40, 256, rng)
    fw = fast.prepare_fast(G.Q4_K, raw, 40, 256)
    X = rng.standard_normal((3, 512)).astype(np.float32)[:, ::2]        # strided input
    big = np.zeros((3, 80), np.float32)
    fw.matmat(X, big[:, ::2])                                             # strided output
    ref = np.zeros((3, 40), np.float32)
    fw.matmat(np.ascontiguousarray(X), ref)
    np.testing.assert_array_equal(big[:, ::2], ref)
    v = np.zeros(80, np.float32)
    fw.matvec(X[1], v[::2])
    np.testing.assert_allclose(v[::2], ref[1], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ real llama.cpp tensors
FIXTURE_FILES = {
    G.Q4_0: "fx-q4_0", G.Q4_1: "fx-q4_1", G.Q5_0: "fx-q5_0", G.Q5_1: "fx-q5_1", G.Q8_0: "fx-q8_0",
    G.Q2_K: "fx-q2_K", G.Q3_K: "fx-q3_K_M", G.Q4_K: "fx-q4_K_M", G.Q5_K: "fx-q5_K_M", G.Q6_K: "fx-q6_K",
    G.F16: "fx-f16",
}


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_fixture_tensors(t, fixtures_dir):
    import gguf
    path = fixtures_dir / "models" / f"{FIXTURE_FILES[t]}.gguf"
    reader = gguf.GGUFReader(str(path))
    rng = np.random.default_rng(11)
    seen = 0
    for ten in reader.tensors:
        if int(ten.tensor_type) != int(t) or len(ten.shape) != 2:
            continue
        n_cols, n_rows = int(ten.shape[0]), int(ten.shape[1])
        raw = np.asarray(ten.data).view(np.uint8).reshape(n_rows, -1)
        assert raw.shape[1] == n_cols // BLOCK[t][0] * BLOCK[t][1]
        check(t, raw, n_rows, n_cols, 5, rng)
        seen += 1
        if seen == 2:
            break
    assert seen, f"no {t.name} tensor in {path.name}"


def test_weights_read_from_the_file_mapping_prefetch(fixtures_dir):
    # weights used in place from the model file's mapping take the prefetching mat-vec (its pages, 4 KB or 2 MB,
    # stream better with it); repacked q8_0 and q6_K do not, repacked q4_0 and q4_K do; short F16 rows in memory not
    from airobackend.formats import open_model

    def prefetching(fixture):
        mf = open_model(str(fixtures_dir / "models" / fixture))
        got = set()
        for ti in mf.tensors.values():
            if len(ti.shape) == 2 and int(ti.type) in specs.SPECS:
                n_rows, n_cols = ti.shape
                w = fast.prepare_fast(ti.type, ti.data.reshape(n_rows, -1), n_rows, n_cols)
                got.add((w.spec.name, w._pf))
        return got
    assert prefetching("fx-q4_K_M.gguf") == {("q4_K", True), ("q6_K", False)}    # both repacked into memory
    assert prefetching("fx-q4_0.gguf") == {("q4_0", True), ("q6_K", False)}
    assert prefetching("fx-q8_0.gguf") == {("q8_0", False)}
    rng = np.random.default_rng(3)
    assert not fast.prepare_fast(G.F16, random_blocks(G.F16, 4, 512, rng), 4, 512)._pf


def _mapping_rss_kb(addr: int) -> int:
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= addr < hi:
                return next(int(x.split()[1]) for x in lines[i + 1:] if x.startswith("Rss:"))
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_repacked_weights_release_the_file_pages(tmp_path):
    # a repacked tensor's bytes in the model file's mapping are dropped from the process once copied, so RSS stays
    # about the file size instead of file + copy; the numbers must not change, and in-place weights keep theirs
    import mmap
    rng = np.random.default_rng(11)
    n_rows, n_cols = 512, 4096                          # ~1.2 MB each: hundreds of whole pages
    raws = {t: random_blocks(t, n_rows, n_cols, rng) for t in (G.Q4_0, G.Q3_K, G.Q4_K, G.Q6_K, G.F16)}
    for t, raw in raws.items():
        path = tmp_path / f"{t.name}.bin"
        path.write_bytes(raw.tobytes())
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(mm, np.uint8).reshape(raw.shape)
        addr = view.ctypes.data
        assert int(view.sum(dtype=np.uint64)) == int(raw.sum(dtype=np.uint64))     # every page resident now
        before = _mapping_rss_kb(addr)
        assert before * 1024 >= raw.nbytes - mmap.PAGESIZE
        fw = fast.prepare_fast(t, view, n_rows, n_cols)
        after = _mapping_rss_kb(addr)
        if t != G.F16:                                  # q4_0 and the k-quants are repacked
            assert after * 1024 <= 2 * mmap.PAGESIZE, (before, after)
        else:
            assert after == before                      # F16 is read in place: nothing to release
        x = rng.standard_normal(n_cols).astype(np.float32)
        ref = fast.prepare_fast(t, raw, n_rows, n_cols).matvec(x, np.empty(n_rows, np.float32))
        assert np.array_equal(fw.matvec(x, np.empty(n_rows, np.float32)), ref)
        del fw, view


# ------------------------------------------------------------------------------------------ the AVX2 build
_AVX2_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {here!r})
from airobackend.kernels import fast
assert fast.ISA == "avx2", fast.ISA
import test_fast as T
from airobackend.quant import GGMLType as G
rng = np.random.default_rng(5)
for name in {types!r}:
    t = G[name]
    raw = random = T.random_blocks(t, 21, 512, rng)
    T.check(t, raw, 21, 512, 5, rng)
    print("ok", name)
if {ops!r}:
    # the SIMD attention / SwiGLU / KV-store kernels built for an AVX2 CPU against their portable twins
    from airobackend.kernels import ops
    for n_tok, n_past, hd in [(1, 40, 128), (19, 7, 128), (5, 3, 32)]:
        q = rng.standard_normal((n_tok, 4, hd)).astype(np.float32)
        kc = np.zeros((2, 80, hd), np.uint16)
        vc = np.zeros((2, 80, hd), np.uint16)
        ops.store_kv(rng.standard_normal((n_past + n_tok, 2, hd)).astype(np.float32), kc, 0)
        ops.store_kv(rng.standard_normal((n_past + n_tok, 2, hd)).astype(np.float32), vc, 0)
        a, b = np.empty((n_tok, 4 * hd), np.float32), np.empty((n_tok, 4 * hd), np.float32)
        ops.attention_simd(q, kc, vc, n_past, a)
        ops.attention_rows(q, kc, vc, n_past, b)
        assert np.abs(a - b).max() < 2e-3, np.abs(a - b).max()
    g, u = rng.standard_normal((2, 64)).astype(np.float32) * 9, rng.standard_normal((2, 64)).astype(np.float32)
    x = g.copy()
    ops.silu_mul(x, u)
    assert np.allclose(x, g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-6, atol=1e-7)
    print("ok ops")
"""


def _run_avx2(types, ops=False):
    # NUMBA_CPU_NAME=haswell: LLVM itself targets an AVX2 CPU (no AVX-512 anywhere, as on such a machine)
    env = dict(os.environ, AIRO_SIMD="avx2", NUMBA_CPU_NAME="haswell")
    code = _AVX2_SCRIPT.format(here=str(Path(__file__).parent), types=[t.name for t in types], ops=ops)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == len(types) + ops


@pytest.mark.slow      # a second build of the kernels for AVX2 in a subprocess: minutes of compiling
@pytest.mark.e2e
@pytest.mark.skipif(simd.detect_isa("avx2") != "avx2", reason="CPU lacks AVX2")
def test_avx2_path_main_types():
    _run_avx2([G.Q4_0, G.Q4_K, G.Q6_K, G.Q8_0], ops=True)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(simd.detect_isa("avx2") != "avx2", reason="CPU lacks AVX2")
def test_avx2_path_other_types():
    _run_avx2([G.Q5_K, G.Q3_K, G.Q2_K, G.Q5_0, G.Q5_1, G.Q4_1, G.F16])


@pytest.mark.e2e
def test_simd_env_none_disables():
    r = subprocess.run([sys.executable, "-c", "from airobackend.kernels import fast; import numpy as np;"
                        "print(fast.ISA, fast.prepare_fast(2, np.zeros((1, 18), np.uint8), 1, 32))"],
                       env=dict(os.environ, AIRO_SIMD="none"), capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["none", "None"], r.stdout + r.stderr
