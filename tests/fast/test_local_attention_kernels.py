"""Local attention kernels (thl_np.fast.local_attention), each alone against
thl_np.components.local_attention (spec §4.2): the softmax both paths share (``softmax_terms``),
``local_attend`` over the decoder's ring buffers of keys and
values (any start, wrapped or not, partly or fully filled), ``local_forward`` / ``local_backward`` over the
keys and values of a training sequence's whole embedding history."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DTYPES, assert_close, assert_equal

from thl_np.components.local_attention import local_attention_backward, local_attention_forward
from thl_np.fast import local_attention as fast_local

C = np.ascontiguousarray


def attention_case(seed, dtype="float64", *, B=2, n=3, d_e=4, d_lq=3, d_v=5, scale=1.0):
    """Token embedding e, the n buffered embeddings before it, and the weights."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    r = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(dt)   # noqa: E731
    return SimpleNamespace(rng=rng, dt=dt, B=B, n=n, d_e=d_e, d_lq=d_lq, d_v=d_v, e=r(B, d_e), buffer=r(B, n, d_e),
                           Wq=r(d_lq, d_e, s=scale), Wk=r(d_lq, d_e, s=scale), Wv=r(d_v, d_e),
                           inv_sqrt=1.0 / math.sqrt(d_lq))


# ---------------------------------------------------------------------------------------------------
# softmax_terms
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, scale", [(1, 1.0), (4, 1.0), (7, 30.0)], ids=["one_row", "four_rows", "large_scores"])
def test_softmax_terms_match_local_attention_forward(n, scale, dtype):
    """exp(s − max s) and their sum: divided, the attention weights of local_attention_forward (scores of
    ±100 and more included, where an unshifted exp would overflow)."""
    c = attention_case(8, dtype, B=3, n=n, scale=scale)
    _, cache = local_attention_forward(c.e, c.buffer, c.Wq, c.Wk, c.Wv)
    for b in range(c.B):
        s = np.concatenate([cache.k[b] @ cache.q[b] * cache.scale, [np.nan]])   # a slot past n: not read
        s = s.astype(np.float64)
        tot = fast_local.softmax_terms(s, n)
        assert np.isnan(s[n]), "softmax_terms wrote past n"
        assert_close(s[:n] / tot, cache.attention[b], c.dt, f"softmax_terms of sequence {b}")


# ---------------------------------------------------------------------------------------------------
# Decode: local_attend over ring buffers
# ---------------------------------------------------------------------------------------------------
def check_attend(c, window, start):
    """As FastDecoder keeps them: ring_k / ring_v [B, W, ·] hold the keys and values of the buffered rows,
    logical row i at (start + i) % W; the other ring rows hold stale values the kernel must not read."""
    want, _ = local_attention_forward(c.e, c.buffer, c.Wq, c.Wk, c.Wv)
    ring_k = c.rng.standard_normal((c.B, window, c.d_lq)).astype(c.dt)
    ring_v = c.rng.standard_normal((c.B, window, c.d_v)).astype(c.dt)
    for i in range(c.n):
        ring_k[:, (start + i) % window] = c.buffer[:, i] @ c.Wk.T
        ring_v[:, (start + i) % window] = c.buffer[:, i] @ c.Wv.T
    out = np.full((c.B, c.d_v), np.nan, c.dt)
    fast_local.local_attend(C(c.e @ c.Wq.T), ring_k, ring_v, start, c.n, c.inv_sqrt, out)
    assert_close(out, want, c.dt, f"local_attend (W = {window}, start = {start}, n = {c.n})")


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), window=st.integers(1, 6), data=st.data(),
       d_e=st.integers(1, 5), d_lq=st.integers(1, 4), d_v=st.integers(1, 4))
def test_local_attend_matches_local_attention_forward(seed, B, window, data, d_e, d_lq, d_v):
    n = data.draw(st.integers(1, window))
    start = data.draw(st.integers(0, window - 1))
    check_attend(attention_case(seed, B=B, n=n, d_e=d_e, d_lq=d_lq, d_v=d_v), window, start)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window, start, n", [(4, 0, 1), (4, 0, 4), (4, 3, 4), (5, 2, 3), (5, 4, 5)])
def test_local_attend_matches_local_attention_forward_each_ring_position(window, start, n, dtype):
    check_attend(attention_case(6, dtype, B=3, n=n, scale=3.0), window, start)


# ---------------------------------------------------------------------------------------------------
# Training: local_forward / local_backward
# ---------------------------------------------------------------------------------------------------
T_STEPS, STEP, H0, EXTRA = 3, 1, 2, 2   # step STEP; the window is rows H0..H0+n of a longer history


def history(c):
    """The keys, values and queries fast_forward precomputes: KL, VL [B, rows of history, ·] with the buffer
    at rows H0..H0+n (other rows random, never read), QL [T, B, d_lq] with this step's query at STEP."""
    rows = H0 + c.n + EXTRA
    hist = c.rng.standard_normal((c.B, rows, c.d_e)).astype(c.dt)
    hist[:, H0:H0 + c.n] = c.buffer
    QL = c.rng.standard_normal((T_STEPS, c.B, c.d_lq)).astype(c.dt)
    QL[STEP] = c.e @ c.Wq.T
    h2 = hist.reshape(-1, c.d_e)
    return hist, QL, C((h2 @ c.Wk.T).reshape(c.B, rows, c.d_lq)), C((h2 @ c.Wv.T).reshape(c.B, rows, c.d_v))


def check_forward(c, window):
    want, cache = local_attention_forward(c.e, c.buffer, c.Wq, c.Wk, c.Wv)
    _, QL, KL, VL = history(c)
    LA = np.zeros((T_STEPS, c.B, window), c.dt)
    LOC = np.zeros((T_STEPS, c.B, c.d_v), c.dt)
    fast_local.local_forward(STEP, H0, c.n, QL, KL, VL, c.inv_sqrt, LA, LOC)
    assert_close(LOC[STEP], want, c.dt, "local_forward: ℓ")
    assert_close(LA[STEP, :, :c.n], cache.attention, c.dt, "local_forward: attention weights")
    assert not (LA[STEP, :, c.n:].any() or LA[[0, 2]].any() or LOC[[0, 2]].any()), "local_forward wrote elsewhere"


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), n=st.integers(1, 5), extra=st.integers(0, 2),
       d_e=st.integers(1, 5), d_lq=st.integers(1, 4), d_v=st.integers(1, 4))
def test_local_forward_matches_local_attention_forward(seed, B, n, extra, d_e, d_lq, d_v):
    check_forward(attention_case(seed, B=B, n=n, d_e=d_e, d_lq=d_lq, d_v=d_v), n + extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4])
def test_local_forward_matches_local_attention_forward_each_dtype(n, dtype):
    check_forward(attention_case(7, dtype, B=3, n=n, scale=3.0), 4)


def check_backward(c, window):
    """local_backward on the plain forward's weights, against local_attention_backward: d q in DQL[i]
    (checked through d e = d q Wq and dWq), d keys / d values added into DKL / DVL at the window's rows
    (checked through d buffer, dWk, dWv); the other rows untouched."""
    _, cache = local_attention_forward(c.e, c.buffer, c.Wq, c.Wk, c.Wv)
    _, QL, KL, VL = history(c)
    LA = np.zeros((T_STEPS, c.B, window), c.dt)
    LA[STEP, :, :c.n] = cache.attention
    d_out = c.rng.standard_normal((c.B, c.d_v)).astype(c.dt)
    DQL = np.zeros((T_STEPS, c.B, c.d_lq), c.dt)
    DKL0 = c.rng.standard_normal(KL.shape).astype(c.dt)
    DVL0 = c.rng.standard_normal(VL.shape).astype(c.dt)
    DKL, DVL = DKL0.copy(), DVL0.copy()
    fast_local.local_backward(STEP, H0, c.n, QL, KL, VL, c.inv_sqrt, LA, d_out, DQL, DKL, DVL)
    d_e, d_buffer, dWq, dWk, dWv = local_attention_backward(d_out, cache, c.Wq, c.Wk, c.Wv)
    dK = (DKL - DKL0)[:, H0:H0 + c.n]
    dV = (DVL - DVL0)[:, H0:H0 + c.n]
    assert_close(DQL[STEP] @ c.Wq, d_e, c.dt, "local_backward: d e = d q Wq")
    assert_close(DQL[STEP].T @ c.e, dWq, c.dt, "local_backward: dWq from d q")
    assert_close(dK @ c.Wk + dV @ c.Wv, d_buffer, c.dt, "local_backward: d buffer from d keys and d values",
                 factor=10)
    flat = c.buffer.reshape(-1, c.d_e)
    assert_close(dK.reshape(-1, c.d_lq).T @ flat, dWk, c.dt, "local_backward: dWk from d keys", factor=10)
    assert_close(dV.reshape(-1, c.d_v).T @ flat, dWv, c.dt, "local_backward: dWv from d values", factor=10)
    outside = np.r_[0:H0, H0 + c.n:KL.shape[1]]
    assert_equal(DKL[:, outside], DKL0[:, outside], "local_backward: keys outside the window")
    assert_equal(DVL[:, outside], DVL0[:, outside], "local_backward: values outside the window")
    assert not DQL[[0, 2]].any(), "local_backward wrote DQL outside step i"


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), n=st.integers(1, 5), d_e=st.integers(1, 5),
       d_lq=st.integers(1, 4), d_v=st.integers(1, 4))
def test_local_backward_matches_local_attention_backward(seed, B, n, d_e, d_lq, d_v):
    check_backward(attention_case(seed, B=B, n=n, d_e=d_e, d_lq=d_lq, d_v=d_v), n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4])
def test_local_backward_matches_local_attention_backward_each_dtype(n, dtype):
    check_backward(attention_case(8, dtype, B=3, n=n, scale=3.0), 4)
