"""Spec §4.2, Tier-0 sliding-window attention over the embeddings in the local buffer.

    q = e Wq^T,  k_i = E_i Wk^T,  a = softmax(k·q / √d_lq),  ℓ = Σ_i a_i (E_i Wv^T)

The buffer update (row n := e, or drop row 0 and append) is bookkeeping in the model's step; the
backward reaches the stored embeddings through ``d_buffer``.
"""
import math

import numpy as np


def local_attention_forward(e, buffer, Wq, Wk, Wv):
    """e [B, d_e], buffer [B, n, d_e] (n ≥ 1) → ℓ [B, d_v], cache."""
    scale = 1.0 / math.sqrt(Wq.shape[0])  # a Python float: keeps float32 inputs float32
    q = e @ Wq.T                                   # [B, d_lq]
    k = buffer @ Wk.T                              # [B, n, d_lq]
    v = buffer @ Wv.T                              # [B, n, d_v]
    s = np.einsum("bnq,bq->bn", k, q) * scale
    s = s - s.max(axis=1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(axis=1, keepdims=True)
    out = np.einsum("bn,bnv->bv", a, v)
    return out, (e, buffer, q, k, v, a, scale)


def local_attention_backward(d_out, cache, Wq, Wk, Wv):
    """d_out [B, d_v] → (d_e, d_buffer, dWq, dWk, dWv)."""
    e, buffer, q, k, v, a, scale = cache
    d_a = np.einsum("bv,bnv->bn", d_out, v)
    d_v = a[:, :, None] * d_out[:, None, :]
    d_s = a * (d_a - (a * d_a).sum(axis=1, keepdims=True)) * scale
    d_q = np.einsum("bn,bnq->bq", d_s, k)
    d_k = d_s[:, :, None] * q[:, None, :]
    d_e = d_q @ Wq
    d_buffer = d_k @ Wk + d_v @ Wv
    dWq = d_q.T @ e
    dWk = np.einsum("bnq,bnd->qd", d_k, buffer)
    dWv = np.einsum("bnv,bnd->vd", d_v, buffer)
    return d_e, d_buffer, dWq, dWk, dWv
