"""Spec §4.2, Tier-0 sliding-window attention over the embeddings in the local buffer.

    q = e Wq^T,  k_i = E_i Wk^T,  a = softmax(k·q / √d_lq),  ℓ = Σ_i a_i (E_i Wv^T)

The buffer update (row n := e, or drop row 0 and append) is ``buffer_push``; the backward reaches the
stored embeddings through ``d_buffer``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .primitives import array_module


@dataclass
class LocalAttentionCache:
    """What ``local_attention_backward`` needs from ``local_attention_forward``."""

    e: object          # [B, d_e] this step's embedding
    buffer: object     # [B, n, d_e] the rows attended over
    q: object          # [B, d_lq]
    k: object          # [B, n, d_lq]
    v: object          # [B, n, d_v]
    attention: object  # [B, n] softmax weights
    scale: float       # 1/√d_lq


def local_attention_forward(e, buffer, Wq, Wk, Wv):
    """e [B, d_e], buffer [B, n, d_e] (n ≥ 1) → ℓ [B, d_v], LocalAttentionCache."""
    xp = array_module(e)
    scale = 1.0 / math.sqrt(Wq.shape[0])  # a Python float: keeps float32 inputs float32
    q = e @ Wq.T                                   # [B, d_lq]
    k = _rows_times(buffer, Wk)                    # [B, n, d_lq]
    v = _rows_times(buffer, Wv)                    # [B, n, d_v]
    s = xp.matmul(k, q[:, :, None])[:, :, 0] * scale
    s = s - s.max(axis=1, keepdims=True)
    a = xp.exp(s)
    a /= a.sum(axis=1, keepdims=True)
    out = xp.matmul(a[:, None, :], v)[:, 0, :]
    return out, LocalAttentionCache(e=e, buffer=buffer, q=q, k=k, v=v, attention=a, scale=scale)


def local_attention_backward(d_out, cache: LocalAttentionCache, Wq, Wk, Wv):
    """d_out [B, d_v] → (d_e, d_buffer, dWq, dWk, dWv)."""
    c = cache
    xp = array_module(d_out)
    a, k, v, q = c.attention, c.k, c.v, c.q
    d_a = xp.matmul(v, d_out[:, :, None])[:, :, 0]
    d_v = a[:, :, None] * d_out[:, None, :]
    d_s = a * (d_a - (a * d_a).sum(axis=1, keepdims=True)) * c.scale
    d_q = xp.matmul(d_s[:, None, :], k)[:, 0, :]
    d_k = d_s[:, :, None] * q[:, None, :]
    d_e = d_q @ Wq
    flat = c.buffer.reshape(-1, c.buffer.shape[-1])
    d_k2, d_v2 = d_k.reshape(-1, d_k.shape[-1]), d_v.reshape(-1, d_v.shape[-1])
    d_buffer = (d_k2 @ Wk + d_v2 @ Wv).reshape(c.buffer.shape)
    dWq = d_q.T @ c.e
    dWk = d_k2.T @ flat
    dWv = d_v2.T @ flat
    return d_e, d_buffer, dWq, dWk, dWv


def buffer_push(buffer, n, e):
    """The buffer after this step (a new array): row n takes e while the buffer fills (n < W), then
    the oldest row drops and e is appended. Returns (buffer, rows filled). W = 0 keeps no buffer."""
    W = buffer.shape[1]
    if W == 0:
        return buffer.copy(), 0
    out = buffer.copy()
    if n < W:
        out[:, n] = e
        return out, n + 1
    out[:, :-1] = buffer[:, 1:]
    out[:, -1] = e
    return out, n


def _rows_times(x, W):
    """x [B, n, d] → x W^T as one 2-D product (a 3-D matmul on a strided view takes a slow path)."""
    xp = array_module(x)
    B, n, d = x.shape
    return (xp.ascontiguousarray(x).reshape(B * n, d) @ W.T).reshape(B, n, W.shape[0])
