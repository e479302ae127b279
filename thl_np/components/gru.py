"""Spec §4.5, one tier's GRU cell (active steps only; an inactive tier keeps its state).

    p = [s_prev; x],  z = σ(p W_z^T + b_z),  r_g = σ(p W_r^T + b_r)
    s̃ = tanh([r_g ⊙ s_prev; x] W_h^T + b_h),  s_new = (1 − z) ⊙ s_prev + z ⊙ s̃
"""
import numpy as np


def sigmoid(x):
    # split by sign so neither branch overflows
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def gru_forward(s_prev, x, W_z, b_z, W_r, b_r, W_h, b_h):
    """s_prev [B, d], x [B, in + d_v] → s_new [B, d], cache."""
    p = np.concatenate([s_prev, x], axis=1)
    z = sigmoid(p @ W_z.T + b_z)
    r_g = sigmoid(p @ W_r.T + b_r)
    p_h = np.concatenate([r_g * s_prev, x], axis=1)
    s_tilde = np.tanh(p_h @ W_h.T + b_h)
    s_new = (1.0 - z) * s_prev + z * s_tilde
    return s_new, (s_prev, p, z, r_g, p_h, s_tilde)


def gru_backward(d_s_new, cache, W_z, W_r, W_h):
    """d_s_new [B, d] → (d_s_prev, d_x, grads dict with keys W_z, b_z, W_r, b_r, W_h, b_h)."""
    s_prev, p, z, r_g, p_h, s_tilde = cache
    d = s_prev.shape[1]
    d_pre_h = d_s_new * z * (1.0 - s_tilde**2)
    d_pre_z = d_s_new * (s_tilde - s_prev) * z * (1.0 - z)
    d_p_h = d_pre_h @ W_h
    d_pre_r = d_p_h[:, :d] * s_prev * r_g * (1.0 - r_g)
    d_p = d_pre_z @ W_z + d_pre_r @ W_r
    d_s_prev = d_s_new * (1.0 - z) + d_p_h[:, :d] * r_g + d_p[:, :d]
    d_x = d_p_h[:, d:] + d_p[:, d:]
    grads = {
        "W_z": d_pre_z.T @ p, "b_z": d_pre_z.sum(axis=0),
        "W_r": d_pre_r.T @ p, "b_r": d_pre_r.sum(axis=0),
        "W_h": d_pre_h.T @ p_h, "b_h": d_pre_h.sum(axis=0),
    }
    return d_s_prev, d_x, grads
