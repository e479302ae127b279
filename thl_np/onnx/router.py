"""ONNX lowering of spec §4.3 (``thl_np.components.router``; the ``unit_keys``, ``empty_last`` and ``unit_rows``
variants of ``thl_np.components.router_unit_keys``, ``router_empty_last`` and ``router_unit_rows`` too) and §4.4
(read metadata). ``unit_rows`` scores as ``unit_keys`` does and projects the values of the unit rows.

- Scores as the component forms them: m_j·(W_k,h^T q_h)/√d_h − λ_load·read_ema_j (unit keys: the content
  term divided by √(‖m_j‖² + ε²); empty_last: that, less (ε²/(‖m_j‖² + ε²))·‖W_k,h^T q_h‖/√d_h), so
  identical rows (the empty slots of every first step) tie exactly.
- The top-κ is ONNX ``TopK`` with ``largest=1, sorted=1``, which ranks equal values by the lower index:
  the spec's tie rule.
- The slot capacity rule, a walk over heads then ranks, in closed form: a pick is dropped when at least c
  earlier picks (in that order) chose its slot, since a slot serves every pick until it has served c.
- A_j (the read weight per slot) and the picked-slot mask come from a one-hot of the picks: no scatter.
- Every per-slot sum is a ReduceSum over a leading axis (``builder.slot_dots``), so equal rows score equal.
"""
from __future__ import annotations

import math

import numpy as np

from ..components.router_unit_keys import UNIT_KEY_EPS
from .builder import BOOL, FLOAT, INT64, GraphBuilder, bank_transposed, slot_dots, slot_sq_norms, sum_last


def lower_router(g: GraphBuilder, u: str, memory: str, read_ema: str, *, num_heads: int, head_dim: int,
                 num_slots: int, memory_dim: int, value_dim: int, topk: int, load_penalty: float, capacity=None,
                 unit_keys: bool = False, empty_last: bool = False, unit_rows: bool = False,
                 W_q: str = "router.W_q.weight",
                 W_k: str = "router.W_k.weight", W_v: str = "router.W_v.weight"):
    """u [B, d_u], memory [B, J, d_m], read_ema [B, J] → (r [B, d_v], alpha [B, H, κ], idx [B, H, κ] int64)."""
    H, d_h, d_m, kappa = num_heads, head_dim, memory_dim, topk
    dvh = value_dim // H
    scale = 1.0 / math.sqrt(d_h)
    q = g.op("Reshape", g.op("MatMul", u, g.weight_t(W_q)), g.i64([0, H, d_h]))          # [B, H, d_h]
    W_k_heads = g.op("Reshape", g.weight(W_k), g.i64([H, d_h, d_m]))
    q_mem = g.op("Transpose", g.op("MatMul", g.op("Transpose", q, perm=[1, 0, 2]), W_k_heads),
                 perm=[1, 0, 2])                                                          # [B, H, d_m]
    memory_t = bank_transposed(g, memory, num_slots, d_m)                                 # [B, d_m, J]
    content = g.op("Mul", slot_dots(g, memory_t, q_mem), g.f32(scale))                    # [B, H, J]
    if unit_keys or empty_last or unit_rows:
        norms2 = g.op("Add", slot_sq_norms(g, memory_t), g.f32(UNIT_KEY_EPS * UNIT_KEY_EPS))          # [B, J]
        content = g.op("Div", content, g.op("Unsqueeze", g.op("Sqrt", norms2), g.i64([1])))
    if empty_last:
        empty_w = g.op("Unsqueeze", g.op("Div", g.f32(UNIT_KEY_EPS * UNIT_KEY_EPS), norms2), g.i64([1]))  # [B, 1, J]
        q_norm = g.op("Sqrt", sum_last(g, g.op("Mul", q_mem, q_mem), keepdims=1))                        # [B, H, 1]
        content = g.op("Sub", content, g.op("Mul", empty_w, g.op("Mul", q_norm, g.f32(scale))))
    scores = g.op("Sub", content, g.op("Mul", g.f32(load_penalty), g.op("Unsqueeze", read_ema, g.i64([1]))))
    picked, idx = g.op("TopK", scores, g.i64([kappa]), outputs=2, axis=-1, largest=1, sorted=1)
    ex = g.op("Exp", g.op("Sub", picked, g.op("Slice", picked, g.i64([0]), g.i64([1]), g.i64([-1]))))
    alpha = g.op("Div", ex, sum_last(g, ex, keepdims=1))                                  # [B, H, κ]
    flat = g.op("Reshape", idx, g.i64([0, H * kappa]))                                    # [B, P] in (h, rank) order
    if capacity is not None:
        alpha = _capacity(g, alpha, flat, H, kappa, capacity)
    m_sel = g.op("GatherND", memory, g.op("Unsqueeze", flat, g.i64([2])), batch_dims=1)   # [B, P, d_m]
    m_sel = g.op("Transpose", g.op("Reshape", m_sel, g.i64([0, H, kappa, d_m])), perm=[1, 0, 2, 3])
    if unit_rows:   # values from the unit rows m_j / √(‖m_j‖² + ε²)
        s = g.op("Sqrt", g.op("Add", sum_last(g, g.op("Mul", m_sel, m_sel), keepdims=1),
                               g.f32(UNIT_KEY_EPS * UNIT_KEY_EPS)))
        m_sel = g.op("Div", m_sel, s)
    W_v_heads = g.op("Transpose", g.op("Reshape", g.weight(W_v), g.i64([H, dvh, d_m])), perm=[0, 2, 1])
    v_sel = g.op("MatMul", g.op("Reshape", m_sel, g.i64([H, -1, d_m])), W_v_heads)       # [H, B·κ, d_v/H]
    v_sel = g.op("Transpose", g.op("Reshape", v_sel, g.i64([H, -1, kappa, dvh])), perm=[1, 0, 2, 3])
    r = g.op("MatMul", g.op("Unsqueeze", alpha, g.i64([2])), v_sel)                      # [B, H, 1, d_v/H]
    return g.op("Reshape", r, g.i64([0, value_dim])), alpha, idx


def _capacity(g: GraphBuilder, alpha: str, flat: str, H: int, kappa: int, capacity: int) -> str:
    """``apply_slot_capacity``: picks past a slot's capacity get weight 0, each head renormalised (a head
    left with sum 0 keeps its uncapped weights)."""
    P = H * kappa
    same = g.op("Equal", g.op("Unsqueeze", flat, g.i64([2])), g.op("Unsqueeze", flat, g.i64([1])))  # [B, P, P]
    earlier = g.const(np.tril(np.ones((P, P), bool), -1), np.bool_)                       # p' < p
    count = sum_last(g, g.op("Cast", g.op("And", same, earlier), to=INT64))               # [B, P]
    keep = g.op("Cast", g.op("Less", count, g.i64(capacity)), to=FLOAT)
    masked = g.op("Mul", alpha, g.op("Reshape", keep, g.i64([0, H, kappa])))
    total = sum_last(g, masked, keepdims=1)
    positive = g.op("Greater", total, g.f32(0.0))
    renorm = g.op("Div", masked, g.op("Where", positive, total, g.f32(1.0)))
    return g.op("Where", positive, renorm, alpha)


def lower_read_meta(g: GraphBuilder, read_ema: str, last_read: str, alpha: str, idx: str, t: str, *,
                    num_slots: int, decay: float):
    """Spec §4.4: read_ema ← ρ_r·read_ema + (1−ρ_r)·A, last_read_j ← t for every picked slot
    → (read_ema, last_read, A)."""
    flat = g.op("Reshape", idx, g.i64([0, -1]))                                          # [B, P]
    onehot = g.op("Equal", g.op("Unsqueeze", flat, g.i64([2])), g.i64(np.arange(num_slots)))   # [B, P, J]
    alpha_flat = g.op("Unsqueeze", g.op("Reshape", alpha, g.i64([0, -1])), g.i64([2]))   # [B, P, 1]
    # summed over the picks (a leading axis): in pick order for every slot, as read_weights_per_slot adds
    A = g.op("ReduceSum", g.op("Mul", alpha_flat, g.op("Cast", onehot, to=FLOAT)), g.i64([1]), keepdims=0)
    new_ema = g.op("Add", g.op("Mul", g.f32(decay), read_ema), g.op("Mul", g.f32(1.0 - decay), A))
    picked = g.op("Cast", g.op("ReduceMax", g.op("Cast", onehot, to=INT64), axes=[1], keepdims=0),
                  to=BOOL)
    return new_ema, g.op("Where", picked, t, last_read), A

