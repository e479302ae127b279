"""Spec §4.8, output: ``h = LayerNorm([s^0; …; s^{K-1}])`` (eps 1e-5, affine), ``logits = h W_o^T + b_o``;
and spec §5's losses: mean cross-entropy and the optional router load-balance term."""
from __future__ import annotations

from dataclasses import dataclass

from .primitives import array_module

LN_EPS = 1e-5


@dataclass
class LayerNormCache:
    """What ``layer_norm_backward`` needs from ``layer_norm_forward``."""

    x_hat: object    # [..., D] normalised input
    inv_std: object  # [..., 1] 1/√(var + eps)


def layer_norm_forward(x, gamma, beta, eps=LN_EPS):
    """x [..., D] → y, cache (biased variance, as LayerNorm defines it)."""
    xp = array_module(x)
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    inv_std = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    x_hat = xc * inv_std
    return x_hat * gamma + beta, LayerNormCache(x_hat=x_hat, inv_std=inv_std)


def layer_norm_backward(d_y, cache: LayerNormCache, gamma):
    """d_y [..., D] → (d_x, d_gamma, d_beta)."""
    x_hat, inv_std = cache.x_hat, cache.inv_std
    flat = d_y.reshape(-1, d_y.shape[-1])
    d_gamma = (flat * x_hat.reshape(flat.shape)).sum(axis=0)
    d_beta = flat.sum(axis=0)
    d_xh = d_y * gamma
    d_x = inv_std * (d_xh - d_xh.mean(axis=-1, keepdims=True)
                     - x_hat * (d_xh * x_hat).mean(axis=-1, keepdims=True))
    return d_x, d_gamma, d_beta


def linear_forward(x, W, b):
    """x [..., in] → x W^T + b."""
    return x @ W.T + b


def linear_backward(d_y, x, W):
    """→ (d_x, d_W, d_b), summing over every leading axis."""
    d_x = d_y @ W
    d_W = d_y.reshape(-1, d_y.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return d_x, d_W, d_y.reshape(-1, d_y.shape[-1]).sum(axis=0)


def log_softmax(logits):
    xp = array_module(logits)
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy_forward(logits, targets, weights=None):
    """Mean over every position of −log softmax(logits)[target]; returns (loss, d_logits).
    With ``weights`` (the targets' shape, >= 0): the weighted mean Σ w·(−log p) / Σ w."""
    xp = array_module(logits)
    logp = log_softmax(logits)
    n = targets.size
    picked = xp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    d_logits = xp.exp(logp)
    xp.put_along_axis(d_logits, targets[..., None],
                      xp.take_along_axis(d_logits, targets[..., None], axis=-1) - 1.0, axis=-1)
    if weights is None:
        return -picked.mean(), d_logits / n
    w = xp.asarray(weights, dtype=logits.dtype) / float(weights.sum())
    return -(w * picked).sum(), d_logits * w[..., None]


def load_balance_forward(A):
    """KL(p ‖ uniform) with p_j = A_j / Σ A over the J slots of each row of A [B, J]; returns
    (kl [B], d_kl/d_A [B, J]). Slots never picked have A_j = 0 and contribute 0 (0·log 0 = 0)."""
    xp = array_module(A)
    J = A.shape[-1]
    S = A.sum(axis=-1, keepdims=True)
    p = A / S
    picked = p > 0
    logpJ = xp.where(picked, xp.log(xp.where(picked, p, 1.0) * J), 0.0)
    kl = (p * logpJ).sum(axis=-1)
    d_p = xp.where(picked, logpJ + 1.0, 0.0)
    d_A = (d_p - (d_p * p).sum(axis=-1, keepdims=True)) / S
    return kl, d_A
