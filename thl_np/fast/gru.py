"""Spec §4.5, one tier's GRU cell, as Numba kernels mirroring ``thl_np.components.gru``: ``gru_reset`` and
``gru_update`` around the decoder's two products (``thl_np.fast.linalg.linear``), ``gru_forward`` /
``gru_backward`` for a training step. Tested kernel by kernel in tests/fast/test_gru_kernels.py.
"""
import math

import numpy as np
from numba import njit

from .primitives import sigmoid


# ---------------------------------------------------------------------------------------------------
# Decode: the gates around the decoder's products
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def gru_reset(zr, p, d):
    """The reset gate of thl_np.components.gru.gru_forward (spec §4.5), in place: p[:, :d] *= σ(zr[:, d:2d])
    (zr holds the z and r pre-activations), so p becomes the candidate's input [r_g ⊙ s_prev; x]."""
    for b in range(p.shape[0]):
        for i in range(d):
            p[b, i] *= sigmoid(zr[b, d + i])


@njit(cache=True)
def gru_update(S, offset, zr, pre):
    """The state update of thl_np.components.gru.gru_forward (spec §4.5), in place: s = (1 − z)·s + z·tanh(pre),
    z = σ(zr[:, :d]), s = S[:, offset:offset+d]."""
    d = pre.shape[1]
    for b in range(S.shape[0]):
        for i in range(d):
            z = sigmoid(zr[b, i])
            S[b, offset + i] = (1.0 - z) * S[b, offset + i] + z * np.tanh(pre[b, i])


# ---------------------------------------------------------------------------------------------------
# Training: one tier's step with its record, and its backward
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def gru_forward(i, slot, S, off, d, off_lo, d_lo, ctx, extra, ei, W1T, W2T, P, Z, RG, ST):
    """Mirrors thl_np.components.gru.gru_forward (spec §4.5) for one tier at step i of a training sequence:
    the tier at columns off:off+d of S[i] → S[i+1]; input x = [lower; ctx] with lower = S[i+1, :, off_lo:…]
    (d_lo = 0 for Tier 0, whose e-part of the pre-activations is in ``extra``) and ctx [B, d_v] the caller's
    (the step's wiring: r, plus the local attention's output for Tier 0).

    P[slot] = [s_prev; lower; ctx] (the product's input), W1T [d + d_lo + d_v, 3d] gives the z, r
    pre-activations and the x-part of the candidate's, W2T [d, d] its (r_g ⊙ s_prev)-part;
    ``extra[ei, b or 0]`` [3d] adds the rest (biases, Tier 0's embedding part). Z, RG, ST record z, r_g, s̃.
    """
    B = S.shape[1]
    p = P[slot]
    dv = ctx.shape[1]
    for b in range(B):
        for a in range(d):
            p[b, a] = S[i, b, off + a]
        for a in range(d_lo):
            p[b, d + a] = S[i + 1, b, off_lo + a]
        for a in range(dv):
            p[b, d + d_lo + a] = ctx[b, a]
    pre = np.dot(p, W1T)
    rs = np.empty((B, d), p.dtype)
    eb = extra.shape[1] > 1
    for b in range(B):
        ex = extra[ei, b if eb else 0]
        for a in range(d):
            z = sigmoid(pre[b, a] + ex[a])
            rg = sigmoid(pre[b, d + a] + ex[d + a])
            Z[slot, b, a] = z
            RG[slot, b, a] = rg
            rs[b, a] = rg * p[b, a]
    ph = np.dot(rs, W2T)
    for b in range(B):
        ex = extra[ei, b if eb else 0]
        for a in range(d):
            st = math.tanh(pre[b, 2 * d + a] + ex[2 * d + a] + ph[b, a])
            ST[slot, b, a] = st
            z = Z[slot, b, a]
            S[i + 1, b, off + a] = (1.0 - z) * p[b, a] + z * st


@njit(cache=True)
def gru_backward(slot, DS, off, d, off_lo, d_lo, Wh_p, Wzr_p, P, Z, RG, ST, DPRE, d_ctx):
    """Mirrors thl_np.components.gru.gru_backward for one tier (the weight gradients come later, one product
    over every step's DPRE): DS[:, off:off+d] (gradient of s_new) → d_s_prev in its place, d_lower added at
    off_lo, d_ctx [B, d_v] written (the caller hands it to r and, for Tier 0, to the local attention);
    DPRE[slot] = gradients of the z, r, candidate pre-activations.
    Wh_p / Wzr_p are W_h and [W_z; W_r] restricted to the columns of P (Tier 0: without the embedding's)."""
    B = DS.shape[0]
    p = P[slot]
    dv = d_ctx.shape[1]
    dh = np.empty((B, d), p.dtype)
    dzr = np.empty((B, 2 * d), p.dtype)
    for b in range(B):
        for a in range(d):
            ds = DS[b, off + a]
            z = Z[slot, b, a]
            st = ST[slot, b, a]
            dh[b, a] = ds * z * (1.0 - st * st)
            dzr[b, a] = ds * (st - p[b, a]) * z * (1.0 - z)
    dph = np.dot(dh, Wh_p)
    for b in range(B):
        for a in range(d):
            rg = RG[slot, b, a]
            dzr[b, d + a] = dph[b, a] * p[b, a] * rg * (1.0 - rg)
    dp = np.dot(dzr, Wzr_p)
    for b in range(B):
        for a in range(d):
            DS[b, off + a] = (DS[b, off + a] * (1.0 - Z[slot, b, a]) + dph[b, a] * RG[slot, b, a] + dp[b, a])
            DPRE[slot, b, a] = dzr[b, a]
            DPRE[slot, b, d + a] = dzr[b, d + a]
            DPRE[slot, b, 2 * d + a] = dh[b, a]
        for a in range(d_lo):
            DS[b, off_lo + a] += dph[b, d + a] + dp[b, d + a]
        for a in range(dv):
            d_ctx[b, a] = dph[b, d + d_lo + a] + dp[b, d + d_lo + a]
