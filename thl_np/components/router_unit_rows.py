"""Router variant ``unit_rows``: the spec's router (§4.3) reading the bank's unit rows, for its scores and its values.

    m̂_j = m_j / s_j,   s_j = √(‖m_j‖² + ε²)                                       (ε = UNIT_KEY_EPS)
    score_{h,j} = (m̂_j·q_mem_h)/√d_h − λ_load · read_ema_j          (``unit_keys``' score)
    v_j = m̂_j W_v^T,   r_h = Σ_rank α_{h,rank} v_{h, idx_{h,rank}}

Everything else is the spec's: top-κ with ties to the lower index, softmax over the picks, capacity, read
metadata; the bank itself, the writer and the write are unchanged (a slot still grows as it is refined).

Why: with values from the raw rows, what a read returns scales with the norms of the slots it mixes, and so
does its sensitivity to the query (∂r/∂q through the softmax carries the differences of the rows read). A
recall model's slots grow to norms near 100 under repeated refines at γ ≈ 1; on long repeated text the
tiers that read them turn chaotic and the training gradient overflows, even with the bank's own gradient
cut at every step (docs/MEMORY.md, round twelve). Here every value has norm below ‖W_v,h‖, whatever the slot.

Chosen by ``components = {"router": "unit_rows"}``. The fast path's kernels compute it (``thl_np.fast.router``,
key rule ``KEY_UNIT_ROWS``), tested against this definition in tests/fast/test_router_kernels.py.

Backward: the spec's router backward on the unit rows gives d m̂ at the rows read; then
    d m_j = d m̂_j / s_j − m_j (m_j · d m̂_j) / s_j³
"""
from __future__ import annotations

from dataclasses import dataclass

from .primitives import array_module
from .router import RouterCache, router_backward, router_forward
from .router_unit_keys import unit_key_norms

NAME = "unit_rows"


def unit_rows(memory):
    """m̂_j = m_j / √(‖m_j‖² + ε²) over the last axis (an empty row stays 0)."""
    return memory / unit_key_norms(memory)[..., None]


def unit_rows_backward(d_unit, rows):
    """d m from d m̂ at the given raw rows (any leading shape): d m̂/s − m (m·d m̂)/s³."""
    s = unit_key_norms(rows)[..., None]
    return d_unit / s - rows * ((rows * d_unit).sum(axis=-1, keepdims=True) / (s * s * s))


@dataclass
class UnitRowsCache:
    """The spec router's cache over the unit rows, and the raw rows read (for the normalisation's backward).
    Every other field is the inner cache's (``alpha``, ``cap_mask``, … read by the diagnostics and the reference
    margins; its ``m_sel`` are the unit rows)."""

    inner: RouterCache
    m_raw_sel: object      # [B, H, κ, d_m]

    def __getattr__(self, name):
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def unit_rows_forward(u, memory, read_ema, W_q, W_k, W_v, **kw):
    """``router_forward`` on the unit rows → (r, alpha, idx, UnitRowsCache)."""
    xp = array_module(memory)
    r, alpha, idx, inner = router_forward(u, unit_rows(memory), read_ema, W_q, W_k, W_v, **kw)
    m_raw_sel = memory[xp.arange(memory.shape[0])[:, None, None], idx]
    return r, alpha, idx, UnitRowsCache(inner, m_raw_sel)


def unit_rows_router_backward(d_r, d_alpha_extra, cache: UnitRowsCache, W_q, W_k, W_v, **kw):
    """``router_backward`` on the unit rows, its row gradient carried back through the normalisation."""
    d_u, d_unit_sel, d_ema_sel, dW_q, dW_k, dW_v = router_backward(d_r, d_alpha_extra, cache.inner, W_q, W_k, W_v,
                                                                   **kw)
    return d_u, unit_rows_backward(d_unit_sel, cache.m_raw_sel), d_ema_sel, dW_q, dW_k, dW_v
