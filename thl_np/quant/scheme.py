"""Int8 weights: the schemes, the quantization and the dequantization formula (docs/QUANTIZATION.md).

A quantized matrix W [R, C] is stored as int8 values q [R, C] and float32 scales s [R, G], one scale per
*group* of ``b`` consecutive columns of a row (G = ⌈C / b⌉)::

    W[i, j] = s[i, j // b] · q[i, j]

``b`` is the scheme's block size: ``int8-row`` has one scale per row (b = C, s is [R, 1]), ``int8-block32``
one per 32 columns (llama.cpp's Q8_0 layout, with float32 scales). The product is exact in float64 and,
in float32, rounded once (a float32 times an int8 is exactly representable in 32 significant bits, so
``float32(s) * float32(q)`` is the correctly rounded product): the plain path computes exactly that.

Everything here runs on NumPy or CuPy arrays (the array module comes from the inputs), so the layered
engine dequantizes on the device with the same function.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, WeightsError

#: The scheme names ``thl-np quantize --scheme`` accepts, and the block size each means (None: a row).
SCHEMES = {"int8-row": None, "int8-block32": 32}
#: What ``--scheme int8`` means: per-row scales (see docs/QUANTIZATION.md, "Choosing the scheme").
DEFAULT_SCHEME = "int8-row"
#: The suffix of a quantized tensor's scales in model.safetensors: ``output_head.weight_scale``.
SCALE_SUFFIX = "_scale"
QMAX = 127  # symmetric: writers use [-127, 127]; readers accept all of int8


def scheme_config(name: str) -> dict:
    """The config.json value of a scheme name: ``{"method": "int8", "block_size": None | b}``."""
    if name == "int8":
        name = DEFAULT_SCHEME
    if name not in SCHEMES:
        raise ConfigError(f"quantization scheme {name!r} is not known: use one of {['int8', *SCHEMES]}")
    return {"method": "int8", "block_size": SCHEMES[name]}


def scheme_name(quantization: dict | None) -> str | None:
    """``int8-row``, ``int8-block32`` or ``int8-block<b>`` for a config value; None for a float model."""
    if not quantization:
        return None
    b = quantization["block_size"]
    return "int8-row" if b is None else f"int8-block{b}"


def check_quantization(value) -> dict | None:
    """THLConfig.quantization, validated and normalised: None (a float model) or
    ``{"method": "int8", "block_size": None | positive int}``."""
    if value is None or value == {}:
        return None
    hint = 'use {"method": "int8", "block_size": null} (one scale per row) or a positive block size such as 32'
    if not isinstance(value, dict):
        raise ConfigError(f"quantization = {value!r} must be an object: {hint}")
    unknown = sorted(set(value) - {"method", "block_size"})
    if unknown:
        raise ConfigError(f"quantization has unknown key(s) {unknown}: {hint}")
    if value.get("method") != "int8":
        raise ConfigError(f"quantization method {value.get('method')!r} is not supported: {hint}")
    b = value.get("block_size")
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1):
        raise ConfigError(f"quantization block_size = {b!r} must be null or a positive integer: {hint}")
    return {"method": "int8", "block_size": None if b is None else int(b)}


def is_quantizable(name: str, shape) -> bool:
    """Which spec §2 tensors the quantizer turns into int8: every matrix (the embedding, the local-attention,
    router, writer, tier and output-head weights). LayerNorm, biases (1-D) stay float, and the recurrent
    arithmetic (state, gates, norms, memory bank) is untouched: only weights are quantized."""
    return name.endswith(".weight") and len(shape) == 2


def group_size(block_size: int | None, columns: int) -> int:
    """b: the columns one scale covers (a whole row for per-row scales)."""
    return columns if block_size is None else int(block_size)


def scale_shape(shape, block_size: int | None) -> tuple:
    """[R, ⌈C / b⌉]: the scales' shape for a matrix of ``shape``."""
    R, C = shape
    b = group_size(block_size, C)
    return (int(R), -(-int(C) // b) if C else 0)


# ---------------------------------------------------------------------------------------------------
# The two directions
# ---------------------------------------------------------------------------------------------------
def quantize_matrix(W, block_size: int | None):
    """Float W [R, C] → (q int8 [R, C], s float32 [R, G]) with W ≈ s[i, j // b] · q[i, j].

    Symmetric round to nearest: s = max |W| over the group / 127 (rounded to float32), q = round(W / s)
    (half to even) clipped to [-127, 127], computed in float64 against the stored float32 scale so that
    s · q is the nearest grid point. An all-zero group gets s = 0 (and q = 0), and so does a group whose
    largest magnitude is below float32's range (under 127 x 1.4e-45). Non-finite W is refused."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise WeightsError(f"only matrices are quantized, got shape {list(W.shape)}")
    if not np.all(np.isfinite(W)):
        raise WeightsError("cannot quantize a matrix holding NaN or infinity: the weights are corrupt")
    R, C = W.shape
    b = group_size(block_size, C)
    G = scale_shape(W.shape, block_size)[1]
    pad = G * b - C
    W64 = np.pad(W.astype(np.float64), ((0, 0), (0, pad))).reshape(R, G, b)
    with np.errstate(over="ignore"):
        scale = (np.abs(W64).max(axis=2) / QMAX).astype(np.float32)                  # [R, G]
    if not np.all(np.isfinite(scale)):
        raise WeightsError(f"a weight of magnitude {float(np.abs(W64).max()):.3g} is too large for a float32 scale "
                           "(the limit is 127 x 3.4e38): such a model cannot be stored as int8")
    s64 = scale.astype(np.float64)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s64 > 0, np.rint(W64 / np.where(s64 > 0, s64, 1.0)), 0.0)
    q = np.clip(q, -QMAX, QMAX).astype(np.int8).reshape(R, G * b)[:, :C]
    return np.ascontiguousarray(q), scale


def dequantize(q, scale, block_size: int | None, dtype):
    """W = s[i, j // b] · q[i, j] in ``dtype`` (float32: the correctly rounded product; float64: exact).
    ``q`` [R, C] int8 and ``scale`` [R, G] on NumPy or CuPy; rows of a matrix dequantize alone."""
    dt = np.dtype(dtype)
    R, C = q.shape
    G = scale.shape[1]
    b = group_size(block_size, C)
    w = q.astype(dt)
    if G == 1:
        w *= scale.astype(dt, copy=False)  # in place: one [R, C] float array in all
        return w
    s = scale.astype(dt, copy=False)
    if G * b == C:  # whole groups: scale each group in place, no [R, C] array of scales
        w.reshape(R, G, b)[...] *= s[:, :, None]
    else:           # a partial last group: group by group, still in place
        for g in range(G):
            w[:, g * b:(g + 1) * b] *= s[:, g:g + 1]
    return w
