"""ONNX lowering of spec §4.2 (``thl_np.components.local_attention``): the Tier-0 sliding-window attention over
the first n rows of the local buffer, and the buffer push.

The buffer has a fixed W_loc rows and n (``local_valid``) is a graph input, so the lowering attends over all
W_loc rows with the rows at or past n masked to −∞ before the softmax (their weight is exactly 0, the sum
is the sum over the n valid rows), and ``Where(n > 0, ℓ, 0)`` gives ℓ = 0 over an empty buffer.
"""
from __future__ import annotations

import math

import numpy as np

from .builder import GraphBuilder, sum_last


def batch_zeros(g: GraphBuilder, like: str, width: int) -> str:
    """A float32 zero array [B, width], B taken from ``like`` [B, ...]."""
    batch = g.op("Slice", g.op("Shape", like), g.i64([0]), g.i64([1]))
    return g.op("ConstantOfShape", g.op("Concat", batch, g.i64([width]), axis=0),
                value=_tensor_value(np.zeros(1, np.float32)))


def _tensor_value(arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(arr)


def lower_local_attention(g: GraphBuilder, e: str, buffer: str, n: str, window: int, value_dim: int,
                          query_dim: int, Wq: str = "local_attn.q.weight", Wk: str = "local_attn.k.weight",
                          Wv: str = "local_attn.v.weight") -> str:
    """e [B, d_e], buffer [B, W_loc, d_e], n scalar int64 → ℓ [B, d_v] (0 when n = 0 or W_loc = 0)."""
    if window == 0:
        return batch_zeros(g, e, value_dim)
    scale = 1.0 / math.sqrt(query_dim)
    # k_i·q = E_i·(Wk^T q) and Σ a_i (E_i Wv^T) = (Σ a_i E_i) Wv^T: the same numbers to rounding, without
    # projecting all W_loc rows every step (the fast path caches them instead; one graph step cannot)
    q = g.linear(e, Wq)                                                   # [B, d_lq]
    qk = g.op("MatMul", q, g.weight(Wk))                                  # [B, d_e]
    s = g.op("Squeeze", g.op("MatMul", buffer, g.op("Unsqueeze", qk, g.i64([2]))), g.i64([2]))
    s = g.op("Mul", s, g.f32(scale))                                      # [B, W]
    valid = g.op("Less", g.i64(np.arange(window)), n)                     # [W]
    s = g.op("Where", valid, s, g.f32(-np.inf))
    s = g.op("Sub", s, g.op("ReduceMax", s, axes=[1], keepdims=1))
    a = g.op("Exp", s)
    a = g.op("Div", a, sum_last(g, a, keepdims=1))
    mixed = g.op("Squeeze", g.op("MatMul", g.op("Unsqueeze", a, g.i64([1])), buffer), g.i64([1]))   # [B, d_e]
    out = g.linear(mixed, Wv)                                             # [B, d_v]
    return g.op("Where", g.op("Greater", n, g.i64(0)), out, g.f32(0.0))


def lower_buffer_push(g: GraphBuilder, buffer: str, n: str, e: str, window: int) -> tuple[str, str]:
    """``buffer_push``: row n := e while n < W_loc, else drop row 0 and append e → (buffer, n')."""
    if window == 0:
        return g.op("Identity", buffer), g.op("Identity", n)
    row = g.op("Unsqueeze", e, g.i64([1]))                                # [B, 1, d_e]
    at_n = g.op("Unsqueeze", g.op("Equal", g.i64(np.arange(window)), n), g.i64([0, 2]))   # [1, W, 1]
    filled = g.op("Where", at_n, row, buffer)
    shifted = g.op("Concat", g.op("Slice", buffer, g.i64([1]), g.i64([window]), g.i64([1])), row, axis=1)
    full = g.op("GreaterOrEqual", n, g.i64(window))
    return g.op("Where", full, shifted, filled), g.op("Where", full, n, g.op("Add", n, g.i64(1)))
