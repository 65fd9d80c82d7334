"""KVCache: moving entries re-rotates keys to their new positions, within fp16 rounding; copies round-trip."""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.kernels import ops
from airobackend.kernels.dequant import f16_table
from airobackend.kvcache import KVCache
from airobackend.llama import Llama

TAB = f16_table()


def filled_cache(rng, n_ctx=40, n=30, freq_scale=1.0, n_rot=32, base=10000.0):
    """A 2-layer cache whose positions 0..n-1 hold random keys roped at their positions; also the unroped keys."""
    c = KVCache(2, 3, n_ctx, 32, n_rot=n_rot, freq_base=base, freq_scale=freq_scale)
    raw = rng.standard_normal((2, n, 3, 32)).astype(np.float32)
    for il in range(2):
        q = np.zeros((n, 3, 32), np.float32)
        k, v = raw[il].copy(), raw[il][:, :, ::-1].copy()
        c.rope_store(il, q, k, v, np.arange(n, dtype=np.int64), 0)
    c.n_past = n
    return c, raw


def roped_f16(raw_layer, positions, c):
    k = raw_layer.copy()
    ops.rope(k, np.asarray(positions, np.int64), c.n_rot, c.freq_base, c.freq_scale)
    return TAB[ops.f32_to_f16_bits(k)].transpose(1, 0, 2)          # [heads, m, hd]


@pytest.mark.parametrize("src,end,dst", [(10, 25, 3), (4, 20, 11), (0, 30, 9), (12, 30, 0)])
@pytest.mark.parametrize("freq_scale,n_rot", [(1.0, 32), (0.25, 32), (1.0, 16)])
def test_moved_keys_equal_keys_roped_at_the_new_positions(src, end, dst, freq_scale, n_rot):
    rng = np.random.default_rng(src * 100 + dst)
    c, raw = filled_cache(rng, freq_scale=freq_scale, n_rot=n_rot)
    before_v = c.v[:, :, src:end].copy()
    c.move(src, end, dst)
    for il in range(2):
        want = roped_f16(raw[il][src:end], range(dst, dst + end - src), c)
        got = TAB[c.k[il, :, dst:dst + end - src]]
        # The stored value's fp16 rounding is rotated along with it, so the bound is per rotated pair: a few fp16
        # units of the pair's larger component (stored rounding + re-encoding + the fresh value's own rounding).
        pair = np.abs(want).reshape(*want.shape[:-1], -1, 2).max(axis=-1).repeat(2, axis=-1)
        ulp = np.spacing(pair.astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(got - want) <= 2 * ulp + 1e-7), np.abs(got - want).max()
    np.testing.assert_array_equal(c.v[:, :, dst:dst + end - src], before_v)   # values are copied as they are


def test_remove_truncate_snapshot_restore():
    rng = np.random.default_rng(5)
    c, raw = filled_cache(rng)
    keep_v = c.v[:, :, 12:30].copy()
    assert c.remove(4, 12) == 22 == c.n_past
    np.testing.assert_array_equal(c.v[:, :, 4:22], keep_v)
    snap = c.snapshot()
    assert snap.n == 22 and snap.nbytes == 22 * c.bytes_per_position
    assert c.bytes_per_position == 2 * 2 * 3 * 32 * 2
    assert c.nbytes == KVCache.size_bytes(2, 3, 40, 32) == 40 * c.bytes_per_position
    c.truncate(5)
    assert c.n_past == 5
    c.k[:] = 0
    c.restore(snap)
    assert c.n_past == 22
    np.testing.assert_array_equal(c.k[:, :, :22], snap.k)
    other = KVCache(2, 3, 10, 32, n_rot=32, freq_base=10000.0)
    assert "more than the context" in other.compatible(snap) or "shape" in other.compatible(snap)
    with pytest.raises(ValueError):
        other.restore(snap)
    with pytest.raises(ValueError):
        c.remove(20, 30)                  # beyond what is filled
    with pytest.raises(ValueError):
        c.move(0, 10, 35)                 # destination past n_ctx
    with pytest.raises(ValueError):
        KVCache(1, 1, 4, 32, n_rot=32, freq_base=1e4, type_k="q3_x")


def test_model_moves_match_a_fresh_evaluation(fixtures_dir, fixture_index):
    """On a fixture model: after moving a run of cached positions right (an insertion before it) and left (a gap),
    layer 0's keys equal those of a fresh evaluation with the run at its new positions, within fp16 rounding (layer 0
    keys depend only on the token and its position), and the values are bit-identical."""
    entry = next(m for m in fixture_index["models"] if m["name"] == "fx-q8_0")
    tokens = np.load(fixtures_dir / entry["reference"])["tokens"]
    path = str(fixtures_dir / entry["files"]["ggmlv3"]["path"])
    a = Llama(path, n_ctx=40, verbose=False, kernels="generic")
    b = Llama(path, n_ctx=40, verbose=False, kernels="generic")
    a.model.eval(tokens[:16], 0)
    a.model.cache.move(6, 16, 11)                       # right by 5
    fresh = np.concatenate([tokens[:6], tokens[:5], tokens[6:16]])
    b.model.eval(fresh, 0)
    for il, exact_v in ((0, True),):
        ka, kb = TAB[a.model.cache.k[il, :, 11:21]], TAB[b.model.cache.k[il, :, 11:21]]
        assert np.abs(ka - kb).max() <= 2e-3 * np.abs(kb).max()
        if exact_v:
            np.testing.assert_array_equal(a.model.cache.v[il, :, 11:21], b.model.cache.v[il, :, 11:21])
    a.model.cache.move(11, 21, 2)                       # left by 9
    b.model.eval(np.concatenate([tokens[:2], tokens[6:16]]), 0)
    ka, kb = TAB[a.model.cache.k[0, :, 2:12]], TAB[b.model.cache.k[0, :, 2:12]]
    assert np.abs(ka - kb).max() <= 3e-3 * np.abs(kb).max()
    for llm in (a, b):
        llm.close()
