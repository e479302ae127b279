"""Spec §4.6 (writer) and §4.7 (memory decay and write).

    w_raw = [s_new^0; s_new^{K-1}] W_w^T + b_w,   w = w_raw · min(1, Δ_max / (‖w_raw‖ + 1e-6))
    aff_j = (m_j·w) / ((‖w‖ + 1e-8)(‖m_j‖ + 1e-8)),  novelty = 1 − max_j aff_j
    novel (novelty > θ):  g = σ(β(novelty − θ)), targets = empty slots first, else the W_w most
                           stale-or-underused (λ_s·staleness + λ_u·underuse)
    refine:               g = 1, targets = the W_w largest aff_j
    M ← γ·M,  m_j += η·g·w for every target j

Every ranking breaks ties by the lower slot index. The backward holds the branch, the targets, the
arg-max slot j* and the clip branch fixed; gradient reaches the old memory only at row j* (through
the novelty gate) and through the decay.
"""
from __future__ import annotations

from dataclasses import dataclass

from .primitives import array_module, sigmoid, top_k_desc

EMPTY_NORM = 1e-6


def writer_input(tiers_new):
    """Spec §4.6's writer input x_w = [s_new^0; s_new^{K-1}] over any leading shape (``tiers_new``: the K
    states after this step's update, or any sequence whose first and last items are those two)."""
    return array_module(tiers_new[0]).concatenate([tiers_new[0], tiers_new[-1]], axis=-1)


@dataclass
class WriterCache:
    """What ``writer_backward`` needs from ``writer_forward`` (per sequence b of B)."""

    x_w: object        # [B, d_0 + d_{K-1}] writer input
    w_raw: object      # [B, d_m] before the clip
    n_raw: object      # [B] ‖w_raw‖
    clipped: object    # [B] bool: the clip scaled w_raw down
    scale: object      # [B] the clip factor (1 where not clipped)
    w: object          # [B, d_m] the write vector
    n_w: object        # [B] ‖w‖
    j_star: object     # [B] arg-max affinity slot (the row d_m_star belongs to)
    m_star: object     # [B, d_m] memory row j*
    n_m_star: object   # [B] ‖m_j*‖
    dot_star: object   # [B] m_j*·w
    novel: object      # [B] bool: the novel branch was taken
    g: object          # [B] write gate
    beta: float
    clip_max: float


def writer_forward(x_w, memory, read_ema, last_write, t, W_w, b_w, *, write_slots, clip_max, beta, theta,
                   stale_weight, underuse_weight):
    """x_w = [s_new^0; s_new^{K-1}] [B, d_0 + d_{K-1}], memory [B, J, d_m] (before this step's decay),
    read_ema [B, J] (after §4.4) → (w [B, d_m], g [B], targets [B, W_w], WriterCache).

    The three target rules are one ranking (``top_k_desc``) of a per-row key: "is empty" (novel with an
    empty slot: empty slots by index, then the rest by index), λ_s·staleness + λ_u·underuse in float64
    (novel, bank full), or the affinity (refine)."""
    xp = array_module(memory)
    B, J, _ = memory.shape
    w_raw = x_w @ W_w.T + b_w
    n_raw = xp.sqrt((w_raw * w_raw).sum(axis=1))
    ratio = clip_max / (n_raw + 1e-6)
    clipped = ratio < 1.0
    scale = xp.where(clipped, ratio, 1.0)
    w = w_raw * scale[:, None]
    aff, dots, n_w, n_m = affinities(memory, w)
    rows = xp.arange(B)
    j_star, novelty = novelty_of(aff)
    novel = novelty > theta
    g = xp.where(novel, sigmoid(beta * (novelty - theta)), 1.0).astype(w.dtype)   # σ > 0.5 where novel
    evict = eviction_scores(n_m, read_ema, last_write, t, stale_weight, underuse_weight)
    targets = top_k_desc(xp.where(novel[:, None], evict, aff.astype(xp.float64)), write_slots)
    cache = WriterCache(x_w=x_w, w_raw=w_raw, n_raw=n_raw, clipped=clipped, scale=scale, w=w, n_w=n_w,
                        j_star=j_star, m_star=memory[rows, j_star], n_m_star=n_m[rows, j_star],
                        dot_star=dots[rows, j_star], novel=novel, g=g, beta=beta, clip_max=clip_max)
    return w, g, targets, cache


def affinities(memory, w):
    """aff_j = (m_j·w) / ((‖w‖ + 1e-8)(‖m_j‖ + 1e-8)) for every slot of memory [B, J, d_m] and write vector
    w [B, d_m] → (aff [B, J], m_j·w [B, J], ‖w‖ [B], ‖m_j‖ [B, J])."""
    xp = array_module(memory)
    n_w = xp.sqrt((w * w).sum(axis=1))
    n_m = xp.sqrt((memory * memory).sum(axis=2))
    dots = xp.einsum("bjm,bm->bj", memory, w)
    return dots / ((n_w[:, None] + 1e-8) * (n_m + 1e-8)), dots, n_w, n_m


def novelty_of(aff):
    """j* = the arg-max affinity slot (the lower index on a tie) and novelty = 1 − aff_j* → (j* [B], novelty [B])."""
    xp = array_module(aff)
    j_star = xp.argmax(aff, axis=1)
    return j_star, 1.0 - aff[xp.arange(aff.shape[0]), j_star]


def eviction_scores(n_m, read_ema, last_write, t, stale_weight, underuse_weight):
    """The novel branch's ranking key [B, J], in float64, from the slot norms n_m [B, J]: where a row has an
    empty slot (‖m_j‖ ≤ EMPTY_NORM), 1 for its empty slots and 0 for the others; else
    λ_s·staleness + λ_u·underuse with staleness t − last_write and underuse 1 / (1e-8 + read_ema)."""
    xp = array_module(n_m)
    empty = n_m <= EMPTY_NORM
    staleness = (t - last_write).astype(xp.float64)
    underuse = 1.0 / (1e-8 + read_ema.astype(xp.float64))
    return xp.where(empty.any(axis=1)[:, None], empty.astype(xp.float64),
                    stale_weight * staleness + underuse_weight * underuse)


def writer_backward(d_w, d_g, cache: WriterCache, W_w):
    """d_w [B, d_m], d_g [B] → (d_x_w, d_m_star [B, d_m] at row cache.j_star, dW_w, db_w)."""
    c = cache
    xp = array_module(d_w)
    w, n_w, m_star, n_m_star = c.w, c.n_w, c.m_star, c.n_m_star
    d_w = d_w.copy()
    # novelty gate (novel branch only): g = σ(β(1 − aff* − θ))  →  d aff* = −β g (1 − g) d g
    d_aff = xp.where(c.novel, -c.beta * c.g * (1.0 - c.g) * d_g, 0.0)
    denom = (n_w + 1e-8) * (n_m_star + 1e-8)
    d_dot = d_aff / denom
    d_denom = -d_aff * c.dot_star / denom**2
    d_w += d_dot[:, None] * m_star
    d_m_star = d_dot[:, None] * w
    d_n_w = d_denom * (n_m_star + 1e-8)
    d_n_m = d_denom * (n_w + 1e-8)
    d_w += (d_n_w / xp.where(n_w > 0, n_w, 1.0))[:, None] * w
    d_m_star += (d_n_m / xp.where(n_m_star > 0, n_m_star, 1.0))[:, None] * m_star
    # clip: w = w_raw · Δ/(‖w_raw‖ + 1e-6) when clipped, else w = w_raw
    w_raw, n_raw = c.w_raw, c.n_raw
    proj = (d_w * w_raw).sum(axis=1)
    d_scale_factor = -c.clip_max / (n_raw + 1e-6) ** 2 * proj / xp.where(n_raw > 0, n_raw, 1.0)
    d_w_raw = xp.where(c.clipped[:, None], c.scale[:, None] * d_w + d_scale_factor[:, None] * w_raw, d_w)
    return d_w_raw @ W_w, d_m_star, d_w_raw.T @ c.x_w, d_w_raw.sum(axis=0)


def memory_write_forward(memory, write_ema, last_write, targets, g, w, t, *, decay, write_rate, ema_decay):
    """Spec §4.7: M ← γ·M, then m_j += η·g·w for each target; write_ema and last_write bookkeeping.
    A row's W_w targets are distinct, so the scatter has no repeated index."""
    xp = array_module(memory)
    rows = xp.arange(memory.shape[0])[:, None]
    new_memory = memory * decay
    new_memory[rows, targets] += (write_rate * g)[:, None, None] * w[:, None, :]
    return (new_memory, *write_bookkeeping(write_ema, last_write, targets, t, ema_decay=ema_decay))


def write_bookkeeping(write_ema, last_write, targets, t, *, ema_decay):
    """§4.7's bookkeeping of a write, whatever the memory does: write_ema ← ρ_w·write_ema + (1 − ρ_w)·[j is a
    target], last_write_j ← t for every target → (write_ema, last_write), new arrays."""
    xp = array_module(write_ema)
    rows = xp.arange(write_ema.shape[0])[:, None]
    is_target = xp.zeros(write_ema.shape, dtype=write_ema.dtype)
    is_target[rows, targets] = 1.0
    new_write_ema = ema_decay * write_ema + (1.0 - ema_decay) * is_target
    new_last_write = last_write.copy()
    new_last_write[rows, targets] = t
    return new_write_ema, new_last_write


def memory_write_backward(d_new_memory, targets, g, w, *, decay, write_rate, last_write=None, t=None):
    """→ (d_memory_before [B, J, d_m], d_w [B, d_m], d_g [B]). ``last_write`` (the state's, before the
    write) and the step ``t`` are the kind's arguments for a variant whose decay depends on them
    (``memory_write_on_write``); every slot decays by γ here, so they are not used."""
    xp = array_module(d_new_memory)
    rows = xp.arange(d_new_memory.shape[0])[:, None]
    d_rows = d_new_memory[rows, targets].sum(axis=1)                 # [B, d_m]
    d_w = (write_rate * g)[:, None] * d_rows
    d_g = write_rate * (d_rows * w).sum(axis=1)
    return decay * d_new_memory, d_w, d_g
