"""Router variant ``empty_last``: the ``unit_keys`` router (router_unit_keys.py) in which an empty slot ranks
below every written one.

    score_{h,j} = [(m_j·q_mem_h) / s_j − (ε² / s_j²) · ‖q_mem_h‖] / √d_h − λ_load · read_ema_j
    s_j = √(‖m_j‖² + ε²)                                                         (ε = UNIT_KEY_EPS)

The first term is ``unit_keys``' score. The second is 0 for a written slot (ε²/s_j² < 10⁻⁴ once ‖m_j‖ > 100 ε)
and ‖q_mem_h‖/√d_h for an empty one, so an empty slot scores −‖q_mem_h‖/√d_h: as low as a written slot
that points straight away from the question (a slot with ‖m_j‖ near ε can fall below that, by at most a
quarter of it). Everything else is the spec's: top-κ with ties to the lower index, softmax over the
picks, capacity, the values read from the raw rows, read metadata.

Why: with ``unit_keys`` an empty slot scores 0, the middle of a written slot's range. A model trained on
recall makes nearly every score negative except at a question it knows, so it reads empty slots (a read
of zeros) everywhere else, and a question worded in a way it never saw reads nothing (docs/MEMORY.md,
round five's traces). Here the read cannot opt out while one slot is written: the κ picks go to the
written slots that best face the question, whatever its wording.

Chosen by ``components = {"router": "empty_last"}``. The fast path's kernels compute it
(``thl_np.fast.router``, key rule ``KEY_EMPTY_LAST``), tested against this definition in
tests/fast/test_router_kernels.py.

Backward over the κ·H rows read (c = scale·d_score, n = ‖q_mem_h‖; the unit_keys terms plus):
    d q_mem_h −= Σ_rank c · (ε²/s_j²) · q_mem_h / n           (0 when n = 0)
    d m_j    += c · n · 2ε² · m_j / s_j⁴
"""
from __future__ import annotations

from functools import partial

from .primitives import array_module
from .router import ScoreRule, router_backward, router_forward
from .router_unit_keys import UNIT_KEY_EPS, unit_key_content, unit_key_content_backward, unit_key_norms

NAME = "empty_last"


def empty_weights(memory):
    """ε²/s_j² over the last axis: 1 for an empty slot, under 10⁻⁴ for a slot with ‖m_j‖ > 100 ε."""
    s = unit_key_norms(memory)
    return (UNIT_KEY_EPS * UNIT_KEY_EPS) / (s * s)


def empty_last_content(memory, q_mem, scale):
    """unit_keys' content minus (ε²/s_j²)·‖q_mem_h‖/√d_h for every slot → [B, H, J]."""
    xp = array_module(memory)
    q_norm = xp.sqrt((q_mem * q_mem).sum(axis=-1))                  # [B, H]
    return unit_key_content(memory, q_mem, scale) - (empty_weights(memory)[:, None, :]
                                                     * (q_norm * scale)[:, :, None])


def empty_last_content_backward(d_score, m_sel, q_mem, scale):
    """Backward of ``empty_last_content`` over the picked rows m_sel [B, H, κ, d_m]."""
    xp = array_module(m_sel)
    d_q_mem, d_m_sel = unit_key_content_backward(d_score, m_sel, q_mem, scale)
    q_norm = xp.sqrt((q_mem * q_mem).sum(axis=-1))                  # [B, H]
    s2 = (m_sel * m_sel).sum(axis=-1) + UNIT_KEY_EPS * UNIT_KEY_EPS  # [B, H, κ]
    c = d_score * scale
    w = (UNIT_KEY_EPS * UNIT_KEY_EPS) / s2
    unit_q = q_mem / xp.where(q_norm > 0, q_norm, 1.0)[..., None]  # q_mem/‖q_mem‖, 0 where q_mem = 0
    d_q_mem = d_q_mem - (c * w).sum(axis=-1)[..., None] * unit_q
    d_m_sel = d_m_sel + (c * q_norm[..., None] * 2.0 * w / s2)[..., None] * m_sel
    return d_q_mem, d_m_sel


EMPTY_LAST = ScoreRule(NAME, empty_last_content, empty_last_content_backward)

empty_last_forward = partial(router_forward, rule=EMPTY_LAST)
empty_last_backward = partial(router_backward, rule=EMPTY_LAST)
