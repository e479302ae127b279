"""ONNX lowering of spec §4.8 (``thl_np.components.output``): h = LayerNorm([s^0; …; s^{K-1}]) (eps 1e-5,
affine, written out as the component computes it) and logits = h W_o^T + b_o."""
from __future__ import annotations

from ..components.output import LN_EPS
from .builder import GraphBuilder


def lower_layer_norm(g: GraphBuilder, x: str, gamma: str = "layer_norm.weight", beta: str = "layer_norm.bias",
                     eps: float = LN_EPS) -> str:
    """x [..., D] → LayerNorm(x) (biased variance)."""
    mu = g.op("ReduceMean", x, axes=[-1], keepdims=1)
    xc = g.op("Sub", x, mu)
    var = g.op("ReduceMean", g.op("Mul", xc, xc), axes=[-1], keepdims=1)
    inv_std = g.op("Div", g.f32(1.0), g.op("Sqrt", g.op("Add", var, g.f32(eps))))
    return g.op("Add", g.op("Mul", g.op("Mul", xc, inv_std), g.weight(gamma)), g.weight(beta))


def lower_output(g: GraphBuilder, tier_states: str) -> str:
    """tier states [B, Σ d_k] → logits [B, V]."""
    return g.linear(lower_layer_norm(g, tier_states), "output_head.weight", "output_head.bias")
