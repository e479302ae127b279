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
    k = _rows_times(buffer, Wk)                    # [B, n, d_lq]
    v = _rows_times(buffer, Wv)                    # [B, n, d_v]
    s = np.matmul(k, q[:, :, None])[:, :, 0] * scale
    s = s - s.max(axis=1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(axis=1, keepdims=True)
    out = np.matmul(a[:, None, :], v)[:, 0, :]
    return out, (e, buffer, q, k, v, a, scale)


def local_attention_backward(d_out, cache, Wq, Wk, Wv):
    """d_out [B, d_v] → (d_e, d_buffer, dWq, dWk, dWv)."""
    e, buffer, q, k, v, a, scale = cache
    d_a = np.matmul(v, d_out[:, :, None])[:, :, 0]
    d_v = a[:, :, None] * d_out[:, None, :]
    d_s = a * (d_a - (a * d_a).sum(axis=1, keepdims=True)) * scale
    d_q = np.matmul(d_s[:, None, :], k)[:, 0, :]
    d_k = d_s[:, :, None] * q[:, None, :]
    d_e = d_q @ Wq
    flat = buffer.reshape(-1, buffer.shape[-1])
    d_k2, d_v2 = d_k.reshape(-1, d_k.shape[-1]), d_v.reshape(-1, d_v.shape[-1])
    d_buffer = (d_k2 @ Wk + d_v2 @ Wv).reshape(buffer.shape)
    dWq = d_q.T @ e
    dWk = d_k2.T @ flat
    dWv = d_v2.T @ flat
    return d_e, d_buffer, dWq, dWk, dWv


def _rows_times(x, W):
    """x [B, n, d] → x W^T as one 2-D product (a 3-D matmul on a strided view takes a slow path)."""
    B, n, d = x.shape
    return (np.ascontiguousarray(x).reshape(B * n, d) @ W.T).reshape(B, n, W.shape[0])
