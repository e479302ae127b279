"""ONNX lowering of spec §4.6 (the novelty writer, ``thl_np.components.writer.writer_forward``) and §4.7 (the
memory decay and write, ``memory_write_forward``).

The three target rules are one ranking, as in the component: a per-slot key in float64 (is-empty, or
λ_s·staleness + λ_u·underuse, or the affinity) and ``TopK(sorted=1)``, which ranks equal keys by the lower
slot index. The write is no scatter: a slot is a target when it equals one of the W_w targets (distinct
per sequence), and ``Where`` adds η·g·w to exactly those rows of the decayed bank.
"""
from __future__ import annotations

import numpy as np

from ..components.writer import EMPTY_NORM
from .builder import BOOL, DOUBLE, FLOAT, GraphBuilder, bank_transposed, norm_last, slot_dots, slot_sq_norms


def lower_writer(g: GraphBuilder, x_w: str, memory: str, read_ema: str, last_write: str, t: str, *,
                 num_slots: int, memory_dim: int, write_slots: int, clip_max: float, beta: float, theta: float,
                 stale_weight: float, underuse_weight: float, W_w: str = "writer.W_w.weight",
                 b_w: str = "writer.W_w.bias"):
    """x_w [B, d_0 + d_{K-1}], memory [B, J, d_m] (before the decay), read_ema [B, J] (after §4.4),
    last_write [B, J], t → (w [B, d_m], g [B], targets [B, W_w] int64, novel [B] bool, clipped [B] bool)."""
    w_raw = g.linear(x_w, W_w, b_w)
    n_raw = norm_last(g, w_raw)
    ratio = g.op("Div", g.f32(clip_max), g.op("Add", n_raw, g.f32(1e-6)))
    clipped = g.op("Less", ratio, g.f32(1.0))
    scale = g.op("Where", clipped, ratio, g.f32(1.0))
    w = g.op("Mul", w_raw, g.op("Unsqueeze", scale, g.i64([1])))
    # affinities (``affinities``): m_j·w / ((‖w‖ + 1e-8)(‖m_j‖ + 1e-8))
    n_w = norm_last(g, w)
    memory_t = bank_transposed(g, memory, num_slots, memory_dim)                          # [B, d_m, J]
    n_m = g.op("Sqrt", slot_sq_norms(g, memory_t))                                        # [B, J]
    dots = g.op("Squeeze", slot_dots(g, memory_t, g.op("Unsqueeze", w, g.i64([1]))), g.i64([1]))
    denom = g.op("Mul", g.op("Unsqueeze", g.op("Add", n_w, g.f32(1e-8)), g.i64([1])),
                 g.op("Add", n_m, g.f32(1e-8)))
    aff = g.op("Div", dots, denom)
    novelty = g.op("Sub", g.f32(1.0), g.op("ReduceMax", aff, axes=[1], keepdims=0))
    novel = g.op("Greater", novelty, g.f32(theta))
    excess = g.op("Mul", g.f32(-beta), g.op("Sub", novelty, g.f32(theta)))
    gate = g.op("Div", g.f32(1.0), g.op("Add", g.f32(1.0), g.op("Exp", excess)))
    gate = g.op("Where", novel, gate, g.f32(1.0))
    # eviction key (``eviction_scores``), float64
    empty = g.op("LessOrEqual", n_m, g.f32(EMPTY_NORM))
    any_empty = g.op("Unsqueeze", g.op("Cast", g.op("ReduceMax", g.op("Cast", empty, to=FLOAT), axes=[1],
                                                     keepdims=0), to=BOOL), g.i64([1]))     # [B, 1] bool
    staleness = g.op("Cast", g.op("Sub", t, last_write), to=DOUBLE)
    underuse = g.op("Div", g.const(1.0, np.float64),
                    g.op("Add", g.const(1e-8, np.float64), g.op("Cast", read_ema, to=DOUBLE)))
    lru = g.op("Add", g.op("Mul", g.const(stale_weight, np.float64), staleness),
               g.op("Mul", g.const(underuse_weight, np.float64), underuse))
    evict = g.op("Where", any_empty, g.op("Cast", empty, to=DOUBLE), lru)
    key = g.op("Where", g.op("Unsqueeze", novel, g.i64([1])), evict, g.op("Cast", aff, to=DOUBLE))
    _, targets = g.op("TopK", key, g.i64([write_slots]), outputs=2, axis=-1, largest=1, sorted=1)
    return w, gate, targets, novel, clipped


def lower_memory_write(g: GraphBuilder, memory: str, write_ema: str, last_write: str, targets: str, gate: str,
                       w: str, t: str, *, num_slots: int, decay: float, write_rate: float, ema_decay: float):
    """Spec §4.7: M ← γ·M, m_j += η·g·w for each target, write_ema and last_write → (memory, write_ema,
    last_write)."""
    is_target = g.op("Equal", g.op("Unsqueeze", targets, g.i64([2])), g.i64(np.arange(num_slots)))  # [B, W_w, J]
    is_target = g.op("Cast", g.op("ReduceMax", g.op("Cast", is_target, to=FLOAT), axes=[1], keepdims=0), to=BOOL)
    decayed = g.op("Mul", memory, g.f32(decay))
    add = g.op("Mul", g.op("Unsqueeze", g.op("Mul", g.f32(write_rate), gate), g.i64([1, 2])),
               g.op("Unsqueeze", w, g.i64([1])))                                          # [B, 1, d_m]
    memory = g.op("Where", g.op("Unsqueeze", is_target, g.i64([2])), g.op("Add", decayed, add), decayed)
    hit = g.op("Cast", is_target, to=FLOAT)
    write_ema = g.op("Add", g.op("Mul", g.f32(ema_decay), write_ema), g.op("Mul", g.f32(1.0 - ema_decay), hit))
    return memory, write_ema, g.op("Where", is_target, t, last_write)

