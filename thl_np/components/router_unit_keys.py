"""Router variant ``unit_keys``: the spec's router (§4.3-4.4) with scores that do not grow with a slot's norm.

    score_{h,j} = (m_j·q_mem_h) / √(‖m_j‖² + ε²) / √d_h − λ_load · read_ema_j          (ε = UNIT_KEY_EPS)

i.e. the spec's score with the slot's row replaced by its unit row (the smooth form, so an empty slot
scores 0 and the gradient stays finite). Everything else is the spec's: top-κ with ties to the lower
index, softmax over the picks, capacity, the values read from the raw rows, read metadata.

Why: with the spec's scores a slot's score is its norm times a cosine. A model trained on this repository's
data learns to read the *weakest* slots (98-100 % of its scores are negative at a passkey's question, see
docs/MEMORY.md), so a slot that holds a key, written strongly, scores tens below the read threshold, is
never picked, and, since the spec's gradient holds the picks fixed (§5), never learns to be picked. Unit
keys make the router choose by direction alone: every slot's score lies in ±‖q_mem_h‖/√d_h.

Chosen by the config field ``components = {"router": "unit_keys"}`` (the default stays the spec's, so the
conformance figures do not move). The fast path's kernels compute it (``thl_np.fast.router``, argument
``unit_keys``), tested against this definition in tests/fast/test_router_kernels.py.

Backward over the κ·H rows read (s_j = √(‖m_j‖² + ε²), c = scale·d_score):
    d q_mem_h = Σ_rank c · m_j / s_j
    d m_j    += c · (q_mem_h / s_j − (m_j·q_mem_h) · m_j / s_j³)
"""
from __future__ import annotations

from functools import partial

from .primitives import array_module
from .router import ScoreRule, router_backward, router_forward

UNIT_KEY_EPS = 1e-3   # the norm below which a slot's score fades to 0 (an empty slot scores exactly 0)
NAME = "unit_keys"


def unit_key_norms(memory):
    """s_j = √(‖m_j‖² + ε²) over the last axis."""
    xp = array_module(memory)
    return xp.sqrt((memory * memory).sum(axis=-1) + UNIT_KEY_EPS * UNIT_KEY_EPS)


def unit_key_content(memory, q_mem, scale):
    """(m_j·q_mem_h)/s_j/√d_h for every slot → [B, H, J]."""
    xp = array_module(memory)
    return xp.einsum("bjm,bhm->bhj", memory, q_mem) * scale / unit_key_norms(memory)[:, None, :]


def unit_key_content_backward(d_score, m_sel, q_mem, scale):
    """Backward of ``unit_key_content`` over the picked rows m_sel [B, H, κ, d_m]."""
    xp = array_module(m_sel)
    s = unit_key_norms(m_sel)                                       # [B, H, κ]
    c = d_score * scale / s                                         # d_score·scale/s
    d_q_mem = xp.einsum("bhr,bhrm->bhm", c, m_sel)
    dots = xp.einsum("bhrm,bhm->bhr", m_sel, q_mem)
    d_m_sel = c[..., None] * (q_mem[:, :, None, :] - (dots / (s * s))[..., None] * m_sel)
    return d_q_mem, d_m_sel


UNIT_KEYS = ScoreRule(NAME, unit_key_content, unit_key_content_backward)

unit_keys_forward = partial(router_forward, rule=UNIT_KEYS)
unit_keys_backward = partial(router_backward, rule=UNIT_KEYS)

