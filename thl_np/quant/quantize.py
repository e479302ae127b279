"""Quantizing parameters, and the parameters a model with a quantized config gets (``THLModel`` calls
``model_params``; ``thl_np.model.quantize_model`` / ``dequantize_model`` turn one model into the other)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import WeightsError
from ..params import check_params, init_params
from .params import QuantizedParams
from .scheme import (
    check_quantization,
    is_quantizable,
    quantize_matrix,
    scale_shape,
    scheme_name,
)
from .tensor import QuantizedTensor


def quantize_params(params: Mapping, quantization: dict, dtype) -> QuantizedParams:
    """Float parameters (spec §2 names) → QuantizedParams: every matrix int8 (``is_quantizable``), the
    rest kept as float. Rows are quantized in chunks, so a large matrix costs little extra memory."""
    quantization = check_quantization(quantization)
    block = quantization["block_size"]
    out = {}
    for name, W in params.items():
        W = np.asarray(W)
        if is_quantizable(name, W.shape):
            q = np.empty(W.shape, np.int8)
            scale_parts = []
            step = max(1, (1 << 22) // max(1, W.shape[1]))
            for r in range(0, W.shape[0], step):
                q[r:r + step], s = quantize_matrix(W[r:r + step], block)
                scale_parts.append(s)
            scale = np.concatenate(scale_parts) if scale_parts else np.empty(scale_shape(W.shape, block), np.float32)
            out[name] = QuantizedTensor(q, scale, block, name)
        else:
            out[name] = W
    return QuantizedParams(out, quantization, dtype)


def model_params(config, params, dtype, seed=None):
    """The parameters of a THLModel whose config is quantized or whose params are: QuantizedParams in the
    compute dtype. Float parameters (given, or drawn with ``seed``) are quantized with the config's scheme."""
    if isinstance(params, QuantizedParams):
        if params.quantization != check_quantization(config.quantization):
            raise WeightsError(f"the parameters are quantized as {scheme_name(params.quantization)} but the config "
                               f"says {scheme_name(config.quantization) or 'float'}: make them agree "
                               f"(config.replace(quantization={params.quantization}))")
        return params.with_dtype(dtype)
    if params is None:
        params = init_params(config, seed=seed, dtype=dtype)
    else:
        check_params(config, params)
    return quantize_params(params, config.quantization, dtype)


def is_quantized(model_or_params) -> bool:
    params = getattr(model_or_params, "params", model_or_params)
    return isinstance(params, QuantizedParams)


__all__ = ["quantize_params", "model_params", "is_quantized", "QuantizedTensor"]
