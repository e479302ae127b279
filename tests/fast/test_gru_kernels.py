"""GRU kernels (thl_np.fast.gru), each alone against thl_np.components.gru (spec §4.5): ``gru_reset`` +
``gru_update`` around the decoder's two products, ``gru_forward`` / ``gru_backward`` for a training step, for
Tier 0 (the embedding's part of the pre-activations precomputed; its context r, or r + the local attention's
output, formed by the caller) and for a higher tier (its input the tier below's new state), tiers side by side
in one array as the fast paths keep them."""
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DTYPES, assert_close, assert_equal, fast_gru_weights, gru_weights, tier_offsets

from thl_np.components.gru import gru_backward, gru_forward
from thl_np.fast import gru as fast_gru

C = np.ascontiguousarray
T_STEPS, STEP, SLOT, N_SLOTS = 3, 1, 1, 2   # step STEP of a 3-step tape; the tier's SLOT-th active step


def gru_case(seed, dtype="float64", *, B=2, dims=(3, 4, 2), k=1, d_e=3, d_v=4, use_loc=True):
    """One tier's step: tier k of ``dims`` (k = 0: input [e; ctx], else [s^{k-1}_new; ctx])."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    offs = tier_offsets(dims)
    d = dims[k]
    n_in = d_e if k == 0 else dims[k - 1]
    S = (0.7 * rng.standard_normal((T_STEPS + 1, B, offs[-1]))).astype(dt)
    R = rng.standard_normal((T_STEPS, B, d_v)).astype(dt)
    LOC = rng.standard_normal((T_STEPS, B, d_v)).astype(dt)
    E = rng.standard_normal((T_STEPS, B, d_e)).astype(dt)
    use_loc = use_loc and k == 0   # the local attention's output joins Tier 0's context only
    ctx = R[STEP] + LOC[STEP] if use_loc else R[STEP]
    lower = E[STEP] if k == 0 else S[STEP + 1, :, offs[k - 1]:offs[k]]
    s_prev = S[STEP, :, offs[k]:offs[k + 1]]
    W = gru_weights(rng, d, n_in, d_v, dt)
    return SimpleNamespace(rng=rng, dt=dt, B=B, k=k, d=d, n_in=n_in, d_v=d_v, off=offs[k],
                           off_lo=offs[k - 1] if k else 0, d_lo=dims[k - 1] if k else 0, S=S, R=R, LOC=LOC, E=E,
                           use_loc=use_loc, ctx=C(ctx), x=np.concatenate([lower, ctx], axis=1), s_prev=C(s_prev), W=W,
                           F=fast_gru_weights(*W, tier0=k == 0, n_in=n_in, d_v=d_v))


def plain(c):
    s_new, cache = gru_forward(c.s_prev, c.x, *c.W)
    names = ("s_prev", "p", "z", "r_g", "p_h", "s_tilde")
    return SimpleNamespace(s_new=s_new, cache=cache, **{n: getattr(cache, n) for n in names})


# ---------------------------------------------------------------------------------------------------
# Decode: gru_reset and gru_update
# ---------------------------------------------------------------------------------------------------
def check_decode(c):
    """As FastDecoder: zr = p [W_z; W_r]^T + [b_z; b_r]; gru_reset makes p the candidate's input; then
    gru_update with the candidate's pre-activation p W_h^T + b_h writes the tier's columns of S."""
    want = plain(c)
    W_z, b_z, W_r, b_r, W_h, b_h = c.W
    p = C(np.concatenate([c.s_prev, c.x], axis=1))
    zr = C(p @ np.concatenate([W_z, W_r]).T + np.concatenate([b_z, b_r]))
    fast_gru.gru_reset(zr, p, c.d)
    assert_close(p, want.p_h, c.dt, "gru_reset: the candidate's input [r_g ⊙ s_prev; x]")
    S = C(c.S[STEP])
    before = S.copy()
    fast_gru.gru_update(S, c.off, zr, C(p @ W_h.T + b_h))
    assert_close(S[:, c.off:c.off + c.d], want.s_new, c.dt, "gru_update: s_new")
    S[:, c.off:c.off + c.d] = before[:, c.off:c.off + c.d]
    assert_equal(S, before, "gru_update: other tiers' columns untouched")


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), k=st.integers(0, 2),
       dims=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)), d_v=st.integers(1, 4))
def test_gru_reset_and_update_match_gru_forward(seed, B, k, dims, d_v):
    check_decode(gru_case(seed, B=B, k=k, dims=dims, d_v=d_v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 2])
def test_gru_reset_and_update_match_gru_forward_at_large_preactivations(k, dtype):
    """Pre-activations of ±40 and more: the sigmoid's two branches and a saturated tanh."""
    c = gru_case(3, dtype, k=k)
    c.W = [w * 30 for w in c.W]
    check_decode(c)


# ---------------------------------------------------------------------------------------------------
# Training: gru_forward / gru_backward
# ---------------------------------------------------------------------------------------------------
def extra_pre(c):
    """The pre-activations' part that is not in the per-step product: Tier 0's embedding part and the biases
    for every step of the sequence ([T, B, 3d], index ei = i), the biases alone for the others ([1, 1, 3d])."""
    if c.k == 0:
        return C(c.E.reshape(-1, c.E.shape[2]) @ c.F["W0_e"].T + c.F["bias"]).reshape(T_STEPS, c.B, 3 * c.d), STEP
    return C(c.F["bias"][None, None, :]), 0


def check_forward(c):
    want = plain(c)
    S = c.S.copy()
    P = np.zeros((N_SLOTS, c.B, c.F["W1T"].shape[0]), c.dt)
    Z, RG, ST = (np.zeros((N_SLOTS, c.B, c.d), c.dt) for _ in range(3))
    extra, ei = extra_pre(c)
    fast_gru.gru_forward(STEP, SLOT, S, c.off, c.d, c.off_lo, c.d_lo, c.ctx, extra, ei, c.F["W1T"], c.F["W2T"], P,
                         Z, RG, ST)
    assert_close(S[STEP + 1, :, c.off:c.off + c.d], want.s_new, c.dt, "gru_forward: s_new")
    assert_close(P[SLOT], want.p[:, c.F["cols"]], c.dt, "gru_forward: recorded input")
    assert_close(Z[SLOT], want.z, c.dt, "gru_forward: z")
    assert_close(RG[SLOT], want.r_g, c.dt, "gru_forward: r_g")
    assert_close(ST[SLOT], want.s_tilde, c.dt, "gru_forward: s̃")
    S[STEP + 1, :, c.off:c.off + c.d] = c.S[STEP + 1, :, c.off:c.off + c.d]
    assert_equal(S, c.S, "gru_forward: nothing else of S written")
    assert not (P[0].any() or Z[0].any()), "gru_forward wrote another slot"


tiers = st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5))


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), k=st.integers(0, 2), dims=tiers, d_v=st.integers(1, 4),
       use_loc=st.booleans())
def test_gru_forward_matches_gru_forward(seed, B, k, dims, d_v, use_loc):
    check_forward(gru_case(seed, B=B, k=k, dims=dims, d_v=d_v, use_loc=use_loc))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, use_loc", [(0, True), (0, False), (1, False), (2, False)])
def test_gru_forward_matches_gru_forward_each_tier(k, use_loc, dtype):
    check_forward(gru_case(4, dtype, B=3, k=k, use_loc=use_loc))


def check_backward(c):
    """gru_backward on the plain forward's record, against gru_backward: d s_prev in the tier's columns of DS,
    d lower into the tier below's, d ctx written out, the pre-activations' gradients in DPRE (checked through
    the weight gradients they give, and Tier 0's d e through W0_e)."""
    want = plain(c)
    rng = c.rng
    F = c.F
    P = np.zeros((N_SLOTS, c.B, F["W1T"].shape[0]), c.dt)
    Z, RG, ST = (np.zeros((N_SLOTS, c.B, c.d), c.dt) for _ in range(3))
    P[SLOT], Z[SLOT], RG[SLOT], ST[SLOT] = want.p[:, F["cols"]], want.z, want.r_g, want.s_tilde
    DS0 = rng.standard_normal((c.B, c.S.shape[2])).astype(c.dt)
    DS = DS0.copy()
    D_CTX = np.full((c.B, c.d_v), np.nan, c.dt)
    DPRE = np.zeros((N_SLOTS, c.B, 3 * c.d), c.dt)
    fast_gru.gru_backward(SLOT, DS, c.off, c.d, c.off_lo, c.d_lo, F["Wh_p"], F["Wzr_p"], P, Z, RG, ST, DPRE, D_CTX)
    d_s_new = DS0[:, c.off:c.off + c.d]
    W_z, _, W_r, _, W_h, _ = c.W
    d_s_prev, d_x, grads = gru_backward(d_s_new, want.cache, W_z, W_r, W_h)
    want_DS = DS0.astype(np.float64)
    want_DS[:, c.off:c.off + c.d] = d_s_prev
    if c.k:
        want_DS[:, c.off_lo:c.off_lo + c.d_lo] += d_x[:, :c.n_in]
    assert_close(DS, want_DS, c.dt, "gru_backward: d s_prev and d lower in the tier gradients")
    assert_close(D_CTX, d_x[:, c.n_in:], c.dt, "gru_backward: d ctx")
    # DPRE = [d pre_z, d pre_r, d pre_h]: the weight gradients as fast_backward forms them
    dp, d = DPRE[SLOT], c.d
    assert_close(dp[:, :d].T @ want.p, grads["W_z"], c.dt, "gru_backward: d pre_z (dW_z)")
    assert_close(dp[:, d:2 * d].T @ want.p, grads["W_r"], c.dt, "gru_backward: d pre_r (dW_r)")
    assert_close(dp[:, 2 * d:].T @ want.p_h, grads["W_h"], c.dt, "gru_backward: d pre_h (dW_h)")
    assert_close(dp.sum(axis=0), np.concatenate([grads["b_z"], grads["b_r"], grads["b_h"]]), c.dt,
                 "gru_backward: bias gradients")
    if c.k == 0:
        assert_close(dp @ F["W0_e"], d_x[:, :c.n_in], c.dt, "gru_backward: d e through W0_e (Tier 0)")
    assert not DPRE[0].any(), "gru_backward wrote another slot"


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), k=st.integers(0, 2), dims=tiers, d_v=st.integers(1, 4),
       use_loc=st.booleans())
def test_gru_backward_matches_gru_backward(seed, B, k, dims, d_v, use_loc):
    check_backward(gru_case(seed, B=B, k=k, dims=dims, d_v=d_v, use_loc=use_loc))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, use_loc", [(0, True), (0, False), (1, False), (2, False)])
def test_gru_backward_matches_gru_backward_each_tier(k, use_loc, dtype):
    check_backward(gru_case(5, dtype, B=3, k=k, use_loc=use_loc))
