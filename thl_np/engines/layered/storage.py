"""What the layered engine stores and streams for each spec §2 tensor, and int8 weights on the device.

A float model's tensors move as they are. A quantized model's matrices (thl_np.quant) move as their
int8 values and float32 scales, ``name`` and ``name_scale`` (a quarter of float32's bytes and a little
more), and are dequantized on the device where a module reads them: ``W = s·q`` once per module run and
dropped when the module ends (``DeviceWeights``), the output head a block of rows at a time
(``head_linear``) so that its float rows never take more than ``HEAD_DEQUANT_BYTES``. The planner counts
both: the stored bytes as resident or streamed weights, the float copies in each module's workspace.
"""
from __future__ import annotations

import numpy as np

from ...components.output import linear_forward
from ...quant.scheme import SCALE_SUFFIX, dequantize, scale_shape

HEAD_DEQUANT_BYTES = 1 << 20  # float rows of the output head dequantized at a time (a bound on its workspace)


def tensor_layout(config, dtype, params=None) -> dict:
    """{spec §2 name: [(stored name, shape, itemsize), ...]}: one float tensor, or int8 values and float32
    scales. From a model's parameters when given (a file may quantize only some matrices), else from the
    config (``thl_np.quant``'s rule: every matrix int8 when the config is quantized)."""
    from ...params import param_shapes
    from ...quant.params import QuantizedParams
    from ...quant.scheme import is_quantizable

    s = np.dtype(dtype).itemsize
    block = config.quantization["block_size"] if config.quantization else None
    out = {}
    for name, shape in param_shapes(config).items():
        if isinstance(params, QuantizedParams):
            quantized = params.is_quantized(name)
        else:
            quantized = params is None and bool(config.quantization) and is_quantizable(name, shape)
        if quantized:
            out[name] = [(name, shape, 1), (name + SCALE_SUFFIX, scale_shape(shape, block), 4)]
        else:
            out[name] = [(name, shape, s)]
    return out


def stored_tensors(params) -> dict:
    """The arrays the engine copies: a quantized model's ``stored()`` tensors, or the float parameters."""
    return params.stored() if hasattr(params, "stored") else params


def dequantize_bytes(layout: dict, names, s: int, rows: int | None = None) -> int:
    """Device bytes of dequantizing the quantized tensors among ``names`` (float rows and the scales cast to
    the compute dtype), all at once, or ``rows`` rows of each at a time."""
    total = 0
    for name in names:
        parts = layout[name]
        if len(parts) == 2:
            (_, (R, C), _), (_, (_, G), _) = parts
            r = R if rows is None else min(R, rows)
            total += r * (C + G) * s
    return total


def head_block_rows(D: int, s: int) -> int:
    """Rows of the output head dequantized at a time."""
    return max(1, HEAD_DEQUANT_BYTES // (D * s))


def dequantize_weight(fetched: dict, key: str, dtype, block_size):
    """The float weight ``key`` from a module's device arrays: itself, or s·q from ``key`` and ``key_scale``."""
    scale = fetched.get(key + SCALE_SUFFIX)
    if scale is None:
        return fetched[key]
    return dequantize(fetched[key], scale, block_size, dtype)


def head_linear(h, W: dict, dtype, block_size, out=None):
    """h @ W.T + b for the output head's device arrays (whole or a vocabulary chunk): float as it is, int8 a
    block of ``head_block_rows`` rows at a time (NumPy or CuPy)."""
    scale = W.get("output_head.weight" + SCALE_SUFFIX)
    q, b = W["output_head.weight"], W["output_head.bias"]
    if scale is None:
        if out is None:
            return linear_forward(h, q, b)
        out[...] = linear_forward(h, q, b)
        return out
    from ...components.primitives import array_module

    xp = array_module(h)
    if out is None:
        out = xp.empty((h.shape[0], q.shape[0]), dtype=h.dtype)
    step = head_block_rows(q.shape[1], np.dtype(dtype).itemsize)
    for r0 in range(0, q.shape[0], step):
        r1 = min(q.shape[0], r0 + step)
        out[:, r0:r1] = linear_forward(h, dequantize(q[r0:r1], scale[r0:r1], block_size, dtype), b[r0:r1])
    return out
