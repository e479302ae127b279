"""Spec §4.3 (router read) and §4.4 (read metadata).

    u = [e; s^0; s^{K-1}],  q = u W_q^T  (H heads of d_h),  k_{h,j} = m_j W_k^T (split likewise)
    score_{h,j} = (k_{h,j}·q_h)/√d_h − λ_load · read_ema_j          (+ Gumbel noise in training)
                computed as m_j·(W_k,h^T q_h) (see slot_scores)
    idx_h = the κ largest scores of head h, descending, equal scores ranked by lower slot index
    α_h = softmax(score_{h, idx_h})  →  optional per-sequence slot capacity mask, renormalised
    v_j = m_j W_v^T (H heads of d_v/H),  r_h = Σ_rank α_{h,rank} v_{h, idx_{h,rank}},  r = [r_0; …]

The backward holds every discrete choice (idx, capacity mask) at its forward value, so gradient
reaches the memory only through the κ·H rows that were read; the cache stores those rows alone.
Arrays may be NumPy or CuPy (``primitives.array_module``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .primitives import array_module, to_host, top_k_desc

GUMBEL_EPS = 1e-9


def router_input(e, tiers):
    """Spec §4.3's router input u = [e; s^0; s^{K-1}] over any leading shape: the token's embedding and the
    first and last tier states *before* this step's update (``tiers``: the K states, or any sequence whose
    first and last items are those two). With K = 1, s^0 appears twice."""
    return array_module(e).concatenate([e, tiers[0], tiers[-1]], axis=-1)


@dataclass
class RouterCache:
    """What ``router_backward`` needs from ``router_forward`` (shapes for B sequences, H heads, κ picks)."""

    u: object              # [B, d_u] router input
    q: object              # [B, H, d_h] queries
    q_mem: object          # [B, H, d_m] W_k,h^T q_h
    idx: object            # [B, H, κ] slots read
    m_sel: object          # [B, H, κ, d_m] the rows read
    v_sel: object          # [B, H, κ, d_v/H] their values
    alpha_soft: object     # [B, H, κ] softmax weights before the capacity mask
    alpha: object          # [B, H, κ] weights used (after the capacity mask)
    cap_mask: object       # [B, H, κ] 1 kept / 0 dropped by the capacity rule, or None without capacity
    cap_used: object       # [B, H] bool: the head's masked weights were renormalised, or None
    scale: float           # 1/√d_h


def gumbel_noise(uniform, dtype):
    """−log(−log(U + 1e-9) + 1e-9), computed in float64 and cast once."""
    U = np.asarray(uniform, dtype=np.float64)
    return (-np.log(-np.log(U + GUMBEL_EPS) + GUMBEL_EPS)).astype(dtype)


def capacity_mask(idx, capacity) -> np.ndarray:
    """Walk heads 0..H-1 and ranks 0..κ-1 in order per sequence; a pick whose slot already served
    ``capacity`` picks gets 0, every other pick 1. A short host loop over the picks (idx [B, H, κ])."""
    idx = to_host(idx)
    B, H, kappa = idx.shape
    mask = np.ones(idx.shape)
    for b in range(B):
        served = {}
        for h in range(H):
            for rank in range(kappa):
                j = int(idx[b, h, rank])
                if served.get(j, 0) >= capacity:
                    mask[b, h, rank] = 0.0
                else:
                    served[j] = served.get(j, 0) + 1
    return mask


def apply_slot_capacity(alpha, idx, capacity):
    """α with ``capacity_mask`` applied and each head renormalised by its sum (a head left with sum 0
    keeps its uncapped weights). Returns (alpha_capped, mask, used_mask [B, H] bool)."""
    xp = array_module(alpha)
    mask = xp.asarray(capacity_mask(idx, capacity), dtype=alpha.dtype)
    masked = alpha * mask
    total = masked.sum(axis=-1, keepdims=True)
    used = total[..., 0] > 0
    out = xp.where(used[..., None], masked / xp.where(total > 0, total, 1.0), alpha)
    return out, mask, used


@dataclass(frozen=True)
class ScoreRule:
    """How a slot's content score is formed from its row m_j and the head's q_mem_h = W_k,h^T q_h.

    ``content(memory [B, J, d_m], q_mem [B, H, d_m], scale) → [B, H, J]`` and its backward
    ``content_backward(d_score [B, H, κ], m_sel [B, H, κ, d_m], q_mem, scale) → (d_q_mem [B, H, d_m],
    d_m_sel [B, H, κ, d_m])`` over the rows read. The spec's rule is ``DOT``; a router variant that only
    changes the scores (``router_unit_keys``) passes its own rule to ``router_forward``/``router_backward``."""

    name: str
    content: object
    content_backward: object


def dot_content(memory, q_mem, scale):
    """Spec §4.3: m_j·q_mem_h/√d_h, i.e. (k_{h,j}·q_h)/√d_h with k_{h,j} = m_j W_k,h^T."""
    xp = array_module(memory)
    return xp.einsum("bjm,bhm->bhj", memory, q_mem) * scale


def dot_content_backward(d_score, m_sel, q_mem, scale):
    """Backward of ``dot_content`` over the picked rows."""
    xp = array_module(m_sel)
    d_q_mem = xp.einsum("bhr,bhrm->bhm", d_score, m_sel) * scale
    d_m_sel = d_score[..., None] * q_mem[:, :, None, :] * scale
    return d_q_mem, d_m_sel


DOT = ScoreRule("spec", dot_content, dot_content_backward)


def slot_scores(memory, q, W_k, read_ema, load_penalty, rule: ScoreRule | None = None):
    """score_{h,j} = (k_{h,j}·q_h)/√d_h − λ_load·read_ema_j for every slot, computed as m_j·(W_k,h^T q_h):
    the same number (k_{h,j} = m_j W_k,h^T), but every slot's score is one dot product of its own row
    with one shared vector, so identical rows get identical scores and the tie rule (lower index first)
    holds exactly; it is also J·d_m work per head instead of J·d_m·d_h. Returns (q_mem [B, H, d_m], scores).
    ``rule`` forms the content term (None: ``DOT``, the spec's)."""
    xp = array_module(memory)
    rule = rule or DOT
    B, H, d_h = q.shape
    q_mem = xp.einsum("bhd,hdm->bhm", q, W_k.reshape(H, d_h, memory.shape[2]))
    scale = 1.0 / math.sqrt(d_h)  # a Python float: keeps float32 inputs float32
    scores = rule.content(memory, q_mem, scale) - load_penalty * read_ema[:, None, :]
    return q_mem, scores


def router_forward(u, memory, read_ema, W_q, W_k, W_v, *, num_heads, head_dim, topk, load_penalty,
                   capacity=None, gumbel=None, rule: ScoreRule | None = None):
    """u [B, d_u], memory [B, J, d_m], read_ema [B, J] → (r [B, d_v], alpha [B, H, κ], idx [B, H, κ], RouterCache).

    ``gumbel`` is the noise term [B, H, J] already transformed by ``gumbel_noise`` (training mode) or None.
    """
    xp = array_module(memory)
    B, J, d_m = memory.shape
    H, d_h = num_heads, head_dim
    q = (u @ W_q.T).reshape(B, H, d_h)
    q_mem, scores = slot_scores(memory, q, W_k, read_ema, load_penalty, rule or DOT)
    if gumbel is not None:
        scores = scores + xp.asarray(gumbel)
    idx = top_k_desc(scores, topk)                                     # [B, H, κ]
    picked = xp.take_along_axis(scores, idx, axis=-1)
    ex = xp.exp(picked - picked[..., :1])                              # picked[..., 0] is the max
    alpha_soft = ex / ex.sum(axis=-1, keepdims=True)
    if capacity is not None:
        alpha, cap_mask, cap_used = apply_slot_capacity(alpha_soft, idx, capacity)
    else:
        alpha, cap_mask, cap_used = alpha_soft, None, None
    b_ix = xp.arange(B)[:, None, None]
    m_sel = memory[b_ix, idx]                                          # [B, H, κ, d_m]
    W_v_heads = W_v.reshape(H, -1, d_m)                                # [H, d_v/H, d_m]
    v_sel = xp.einsum("bhrm,hvm->bhrv", m_sel, W_v_heads)
    r = xp.einsum("bhr,bhrv->bhv", alpha, v_sel).reshape(B, -1)
    cache = RouterCache(u=u, q=q, q_mem=q_mem, idx=idx, m_sel=m_sel, v_sel=v_sel, alpha_soft=alpha_soft,
                        alpha=alpha, cap_mask=cap_mask, cap_used=cap_used, scale=1.0 / math.sqrt(d_h))
    return r, alpha, idx, cache


def router_backward(d_r, d_alpha_extra, cache: RouterCache, W_q, W_k, W_v, *, num_heads, head_dim, load_penalty,
                    rule: ScoreRule | None = None):
    """d_r [B, d_v] and d_alpha_extra [B, H, κ] (from read_ema / the load-balance term) →
    (d_u, d_m_sel [B, H, κ, d_m] to scatter at idx, d_read_ema_sel [B, H, κ] to scatter at idx,
     dW_q, dW_k, dW_v)."""
    c = cache
    xp = array_module(c.m_sel)
    B, H, kappa, d_m = c.m_sel.shape
    d_h, scale, alpha, alpha_soft = head_dim, c.scale, c.alpha, c.alpha_soft
    d_r = d_r.reshape(B, H, -1)
    d_alpha = xp.einsum("bhv,bhrv->bhr", d_r, c.v_sel) + d_alpha_extra
    d_v_sel = alpha[..., None] * d_r[:, :, None, :]
    W_v_heads = W_v.reshape(H, -1, d_m)
    dW_v = xp.einsum("bhrv,bhrm->hvm", d_v_sel, c.m_sel).reshape(W_v.shape)
    d_m_sel = xp.einsum("bhrv,hvm->bhrm", d_v_sel, W_v_heads)
    if c.cap_mask is not None:
        # α_cap = α·mask / Σ α·mask  →  dα = mask·(dα_cap − Σ dα_cap·α_cap) / Σ α·mask
        total = (alpha_soft * c.cap_mask).sum(axis=-1, keepdims=True)
        d_capped = c.cap_mask * (d_alpha - (d_alpha * alpha).sum(axis=-1, keepdims=True)) / xp.where(
            total > 0, total, 1.0)
        d_alpha = xp.where(c.cap_used[..., None], d_capped, d_alpha)
    d_picked = alpha_soft * (d_alpha - (alpha_soft * d_alpha).sum(axis=-1, keepdims=True))
    # score = content(m, q_mem) − λ·read_ema (+ constant noise), q_mem_h = W_k,h^T q_h
    d_q_mem, d_m_score = (rule or DOT).content_backward(d_picked, c.m_sel, c.q_mem, scale)
    d_m_sel = d_m_sel + d_m_score
    W_k_heads = W_k.reshape(H, d_h, d_m)
    d_q = xp.einsum("bhm,hdm->bhd", d_q_mem, W_k_heads)
    dW_k = xp.einsum("bhd,bhm->hdm", c.q, d_q_mem).reshape(W_k.shape)
    d_read_ema_sel = -load_penalty * d_picked
    d_q = d_q.reshape(B, H * d_h)
    d_u = d_q @ W_q
    dW_q = d_q.T @ c.u
    return d_u, d_m_sel, d_read_ema_sel, dW_q, dW_k, dW_v


def read_weights_per_slot(alpha, idx, num_slots):
    """A_j = Σ of α over every (head, rank) pick of slot j  →  [B, J].

    One pick at a time, in (head, rank) order: within a pick every sequence adds to its own row, so no
    scatter has a repeated index (nothing depends on atomics) and the sums are the same bits on every
    back-end (the order ``np.add.at`` would use)."""
    xp = array_module(alpha)
    B, H, kappa = idx.shape
    A = xp.zeros((B, num_slots), dtype=alpha.dtype)
    rows = xp.arange(B)
    flat_idx, flat_alpha = idx.reshape(B, H * kappa), alpha.reshape(B, H * kappa)
    for p in range(H * kappa):
        A[rows, flat_idx[:, p]] += flat_alpha[:, p]
    return A


def read_meta_forward(read_ema, last_read, alpha, idx, t, decay):
    """Spec §4.4: read_ema ← ρ_r·read_ema + (1−ρ_r)·A;  last_read_j ← t for every picked slot."""
    xp = array_module(read_ema)
    A = read_weights_per_slot(alpha, idx, read_ema.shape[1])
    new_ema = decay * read_ema + (1.0 - decay) * A
    new_last = last_read.copy()
    new_last[xp.arange(idx.shape[0])[:, None, None], idx] = t
    return new_ema, new_last, A


def read_meta_backward(d_new_ema, d_A_extra, idx, decay):
    """→ (d_read_ema_prev [B, J], d_alpha [B, H, κ]). ``d_A_extra`` [B, J] is the load-balance term's."""
    xp = array_module(d_new_ema)
    d_A = (1.0 - decay) * d_new_ema
    if d_A_extra is not None:
        d_A = d_A + d_A_extra
    d_alpha = d_A[xp.arange(idx.shape[0])[:, None, None], idx]
    return decay * d_new_ema, d_alpha
