"""Spec §4.5, one tier's GRU cell (active steps only; an inactive tier keeps its state).

    p = [s_prev; x],  z = σ(p W_z^T + b_z),  r_g = σ(p W_r^T + b_r)
    s̃ = tanh([r_g ⊙ s_prev; x] W_h^T + b_h),  s_new = (1 − z) ⊙ s_prev + z ⊙ s̃
"""
from __future__ import annotations

from dataclasses import dataclass

from .primitives import array_module, sigmoid


@dataclass
class GRUCache:
    """What ``gru_backward`` needs from ``gru_forward``."""

    s_prev: object    # [B, d]
    p: object         # [B, d + in + d_v]  [s_prev; x]
    z: object         # [B, d] update gate
    r_g: object       # [B, d] reset gate
    p_h: object       # [B, d + in + d_v]  [r_g ⊙ s_prev; x]
    s_tilde: object   # [B, d] candidate state


def gru_forward(s_prev, x, W_z, b_z, W_r, b_r, W_h, b_h):
    """s_prev [B, d], x [B, in + d_v] → s_new [B, d], GRUCache."""
    xp = array_module(s_prev)
    p = xp.concatenate([s_prev, x], axis=1)
    z = sigmoid(p @ W_z.T + b_z)
    r_g = sigmoid(p @ W_r.T + b_r)
    p_h = xp.concatenate([r_g * s_prev, x], axis=1)
    s_tilde = xp.tanh(p_h @ W_h.T + b_h)
    s_new = (1.0 - z) * s_prev + z * s_tilde
    return s_new, GRUCache(s_prev=s_prev, p=p, z=z, r_g=r_g, p_h=p_h, s_tilde=s_tilde)


def gru_backward(d_s_new, cache: GRUCache, W_z, W_r, W_h):
    """d_s_new [B, d] → (d_s_prev, d_x, grads dict with keys W_z, b_z, W_r, b_r, W_h, b_h)."""
    c = cache
    s_prev, z, r_g, s_tilde = c.s_prev, c.z, c.r_g, c.s_tilde
    d = s_prev.shape[1]
    d_pre_h = d_s_new * z * (1.0 - s_tilde**2)
    d_pre_z = d_s_new * (s_tilde - s_prev) * z * (1.0 - z)
    d_p_h = d_pre_h @ W_h
    d_pre_r = d_p_h[:, :d] * s_prev * r_g * (1.0 - r_g)
    d_p = d_pre_z @ W_z + d_pre_r @ W_r
    d_s_prev = d_s_new * (1.0 - z) + d_p_h[:, :d] * r_g + d_p[:, :d]
    d_x = d_p_h[:, d:] + d_p[:, d:]
    grads = {
        "W_z": d_pre_z.T @ c.p, "b_z": d_pre_z.sum(axis=0),
        "W_r": d_pre_r.T @ c.p, "b_r": d_pre_r.sum(axis=0),
        "W_h": d_pre_h.T @ c.p_h, "b_h": d_pre_h.sum(axis=0),
    }
    return d_s_prev, d_x, grads
