"""Spec §4.2, Tier-0 local attention, as Numba kernels mirroring ``thl_np.components.local_attention``:
``local_attend`` over the decoder's ring buffers of keys and values, ``local_forward`` / ``local_backward``
over the keys and values of a training sequence's whole embedding history. Tested kernel by kernel in
tests/fast/test_local_attention_kernels.py.
"""

import numpy as np
from numba import njit

from .primitives import axpy, dot


@njit(cache=True)
def softmax_terms(s, n):
    """The softmax of spec §4.2 over scores s[:n], up to its division: s[:n] ← exp(s[:n] − max), and returns
    their sum (each term rounded to s's dtype before it is added)."""
    m = -np.inf
    for i in range(n):
        if s[i] > m:
            m = s[i]
    tot = 0.0
    for i in range(n):
        s[i] = np.exp(s[i] - m)
        tot += s[i]
    return tot


# ---------------------------------------------------------------------------------------------------
# Decode: attention over the ring buffers
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def local_attend(q, ring_k, ring_v, start, n, inv_sqrt, out):
    """Mirrors thl_np.components.local_attention.local_attention_forward (spec §4.2) over cached keys and
    values: out[b] = Σ_i softmax(k_i·q/√d)_i v_i over the n rows of ring buffers [B, W, ·] whose logical
    row i is at (start + i) % W."""
    B, W, _ = ring_k.shape
    s = np.empty(n, dtype=q.dtype)
    for b in range(B):
        for i in range(n):
            s[i] = dot(ring_k[b, (start + i) % W], q[b]) * inv_sqrt
        tot = softmax_terms(s, n)
        out[b, :] = 0.0
        for i in range(n):
            axpy(s[i] / tot, ring_v[b, (start + i) % W], out[b])


# ---------------------------------------------------------------------------------------------------
# Training: one step's forward with its record, and its backward
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def local_forward(i, h0, n, QL, KL, VL, inv_sqrt, LA, LOC):
    """Mirrors thl_np.components.local_attention.local_attention_forward (spec §4.2) for step i over the
    keys KL and values VL of the whole embedding history (the window is rows h0..h0+n):
    LOC[i, b] = Σ_j a_j VL[b, h0+j], a = softmax(KL[b, h0+j]·QL[i, b] / √d_lq) over j < n; LA[i, b, :n] = a."""
    B = KL.shape[0]
    s = np.empty(n, np.float64)
    for b in range(B):
        dots = np.dot(KL[b, h0:h0 + n], QL[i, b])
        for j in range(n):
            s[j] = dots[j] * inv_sqrt
        tot = softmax_terms(s, n)
        a = LA[i, b, :n]
        for j in range(n):
            a[j] = s[j] / tot
        LOC[i, b] = np.dot(a, VL[b, h0:h0 + n])


@njit(cache=True)
def local_backward(i, h0, n, QL, KL, VL, inv_sqrt, LA, DLOC, DQL, DKL, DVL):
    """Mirrors thl_np.components.local_attention.local_attention_backward for step i, up to the products
    with the weights (done later, once over all steps): d_loc = DLOC [B, d_v] → DQL[i] (d query), and
    d keys / d values of the window's rows (DKL, DVL, accumulated)."""
    B = KL.shape[0]
    for b in range(B):
        dl = DLOC[b]
        da = np.dot(VL[b, h0:h0 + n], dl)
        a = LA[i, b, :n]
        sad = 0.0
        for j in range(n):
            sad += a[j] * da[j]
        ds = np.empty(n, KL.dtype)
        for j in range(n):
            ds[j] = a[j] * (da[j] - sad) * inv_sqrt
        DQL[i, b] = np.dot(ds, KL[b, h0:h0 + n])
        q = QL[i, b]
        for j in range(n):
            dk = DKL[b, h0 + j]
            dsj = ds[j]
            for m in range(q.shape[0]):
                dk[m] += dsj * q[m]
            dvr = DVL[b, h0 + j]
            aj = a[j]
            for m in range(dl.shape[0]):
                dvr[m] += aj * dl[m]
