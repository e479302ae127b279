"""ONNX lowering of spec §4.5 (``thl_np.components.gru`` and ``thl_np.step.tiers_forward``): the GRU cell, and
the K tiers on their clocks.

A tier's clock (t mod τ_k = 0) depends on the ``state.timestep`` input, so every tier's cell is computed
at every step and ``Where(active, s_new, s_prev)`` keeps an inactive tier's state: one graph, no ``If``
subgraphs (which some runtimes and converters handle poorly), at the price of computing the inactive
tiers' cells.
"""
from __future__ import annotations

from .builder import GraphBuilder, sigmoid


def lower_gru(g: GraphBuilder, s_prev: str, x: str, prefix: str) -> str:
    """s_prev [B, d], x [B, in + d_v] → s_new [B, d] with the weights ``{prefix}W_z.weight`` etc."""
    p = g.op("Concat", s_prev, x, axis=1)
    z = sigmoid(g, g.linear(p, prefix + "W_z.weight", prefix + "W_z.bias"))
    r_g = sigmoid(g, g.linear(p, prefix + "W_r.weight", prefix + "W_r.bias"))
    p_h = g.op("Concat", g.op("Mul", r_g, s_prev), x, axis=1)
    s_tilde = g.op("Tanh", g.linear(p_h, prefix + "W_h.weight", prefix + "W_h.bias"))
    return g.op("Add", g.op("Mul", g.op("Sub", g.f32(1.0), z), s_prev), g.op("Mul", z, s_tilde))


def lower_tiers(g: GraphBuilder, t: str, e: str, r: str, loc: str, s_prev: list, timescales) -> list:
    """Spec §4.5 over the K tiers at step t (a scalar int64): tier k runs on [lower_k; r (+ ℓ for tier 0)]
    when t mod τ_k = 0, else keeps its state → the K new states."""
    s_new, lower = [], e
    for k, tau in enumerate(timescales):
        ctx = g.op("Add", r, loc) if k == 0 else r
        cell = lower_gru(g, s_prev[k], g.op("Concat", lower, ctx, axis=1), f"tiers.cells.{k}.")
        if tau == 1:
            s_k = cell
        else:
            active = g.op("Equal", g.op("Mod", t, g.i64(tau)), g.i64(0))
            s_k = g.op("Where", active, cell, s_prev[k])
        s_new.append(s_k)
        lower = s_k
    return s_new
