"""Shared by the per-kernel tests of ``thl_np.fast``: tolerances, a comparison that names what differs, the
fast paths' rearranged layouts built from plain inputs.

Each kernel test feeds one kernel the layout ``FastDecoder`` / ``loss_and_grads`` give it (the bank
stored divided by a scale, its squared norms, ring buffers, per-head and transposed weights), built here
from the plain inputs, and compares what the kernel writes with the plain function of
``thl_np.components`` it mirrors.
"""
from __future__ import annotations

import numpy as np

from thl_np.fast.primitives import row_norms2

# float64: the kernels and the plain functions differ only in summation order; float32: the design's 1e-5
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5}
DTYPES = ["float64", "float32"]


def tol(dtype) -> float:
    return TOL[np.dtype(dtype)]


def assert_close(got, want, dtype, what: str, factor: float = 1.0) -> None:
    """max |got − want| ≤ tol(dtype)·factor·max(1, max |want|), with a message naming ``what``."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.size == 0:
        return
    err = float(np.abs(got - want).max())
    bound = tol(dtype) * factor * max(1.0, float(np.abs(want).max()))
    assert err <= bound, f"{what}: max |fast − plain| = {err:.3g} > {bound:.3g}"


def assert_equal(got, want, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and np.array_equal(got, want), f"{what}: {got.tolist()} != {want.tolist()}"


def memory_bank(rng, B, J, d_m, dtype, *, scale=1.0, empty=0, duplicates=0):
    """A stored bank [B, J, d_m] whose true memory is ``scale · stored``, with ``empty`` all-zero rows and
    ``duplicates`` extra copies of one row per sequence (exact ties). Returns (stored, true memory, norm2, the
    duplicated slots [B, ·] sorted)."""
    stored = rng.standard_normal((B, J, d_m))
    same = []
    for b in range(B):
        slots = rng.permutation(J)
        zero, dup = slots[:empty], slots[empty:empty + duplicates + (1 if duplicates else 0)]
        stored[b, zero] = 0.0
        if len(dup):
            stored[b, dup] = stored[b, dup[0]]
        same.append(np.sort(dup))
    stored = stored.astype(dtype)
    true = true_rows(stored, scale)
    norm2 = np.empty((B, J), dtype)
    row_norms2(stored, norm2)
    return stored, true, norm2, same


def true_rows(stored, scale):
    """scale · stored as the kernels compute it: each element in float64, rounded once to the bank's dtype."""
    return (stored.astype(np.float64) * scale).astype(stored.dtype)


def scatter_add(shape, idx, values, dtype=np.float64):
    """out[b, idx[b, …]] += values[b, …] for idx [B, …] of slots and values [B, …, (d)]."""
    out = np.zeros(shape, dtype)
    B = idx.shape[0]
    rows = np.repeat(np.arange(B), idx[0].size)
    np.add.at(out, (rows, idx.reshape(-1)), values.reshape((rows.size,) + tuple(shape[2:])))
    return out


# ---------------------------------------------------------------------------------------------------
# Tier layout: the fast paths keep every tier's state in one array, tiers side by side
# ---------------------------------------------------------------------------------------------------
def tier_offsets(dims):
    return np.cumsum([0] + list(dims)).tolist()


def gru_weights(rng, d, n_in, d_v, dtype):
    """W_z, b_z, W_r, b_r, W_h, b_h of one tier (input [s_prev; lower or e; ctx])."""
    width = d + n_in + d_v
    out = []
    for _ in range(3):
        out.append((rng.standard_normal((d, width)) / np.sqrt(width)).astype(dtype))
        out.append((0.2 * rng.standard_normal(d)).astype(dtype))
    return out


def fast_gru_weights(W_z, b_z, W_r, b_r, W_h, b_h, *, tier0: bool, n_in: int, d_v: int):
    """The training path's layout of one tier's weights (as ``fast_grad._Weights``): the columns P holds
    (Tier 0 without the embedding's, which are applied once per sequence through W0_e), W1T for the z, r and
    the candidate's x-part pre-activations, W2T for the candidate's (r_g ⊙ s_prev)-part, Wh_p and Wzr_p for
    the backward. Returns a dict."""
    C = np.ascontiguousarray
    d = W_z.shape[0]
    if tier0:
        cols = np.r_[0:d, d + n_in:d + n_in + d_v]
        W0_e = C(np.concatenate([W_z[:, d:d + n_in], W_r[:, d:d + n_in], W_h[:, d:d + n_in]]))
    else:
        cols = np.arange(d + n_in + d_v)
        W0_e = None
    Wh_p = W_h[:, cols]
    W1 = np.concatenate([W_z[:, cols], W_r[:, cols], Wh_p], axis=0)
    W1[2 * d:, :d] = 0.0
    return dict(cols=cols, W0_e=W0_e, W1T=C(W1.T), W2T=C(W_h[:, :d].T), Wh_p=C(Wh_p),
                Wzr_p=C(np.concatenate([W_z[:, cols], W_r[:, cols]], axis=0)),
                bias=np.concatenate([b_z, b_r, b_h]))
