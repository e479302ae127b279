"""Int8 weights: a quarter of float32's bytes, for decoding that reads fewer bytes per token.

A quantized model is an ordinary THL model whose matrices are W = s·q (int8 q, float32 scales per row or
per block of 32 columns); LayerNorm, biases and the recurrent arithmetic stay float. The format, the
formula and the reasons for the default scheme: docs/QUANTIZATION.md.

    scheme.py   the schemes, the config value, quantize_matrix and dequantize (NumPy or CuPy)
    tensor.py   QuantizedTensor: one stored int8 matrix and its scales
    params.py   QuantizedParams: a model's parameters read as float, stored as int8; file tensors in/out
    model.py    quantize_model, dequantize_model, and the parameters THLModel gets for a quantized config

The fast path's int8 kernels are in ``thl_np.fast.int8``; the CLI is ``thl-np quantize``.
"""
from .model import dequantize_model, is_quantized, model_params, quantize_model, quantize_params
from .params import QuantizedParams, from_file_tensors
from .scheme import (
    DEFAULT_SCHEME,
    SCALE_SUFFIX,
    SCHEMES,
    check_quantization,
    dequantize,
    quantize_matrix,
    scheme_config,
    scheme_name,
)
from .tensor import QuantizedTensor

__all__ = ["DEFAULT_SCHEME", "SCALE_SUFFIX", "SCHEMES", "QuantizedParams", "QuantizedTensor", "check_quantization",
           "dequantize", "dequantize_model", "from_file_tensors", "is_quantized", "model_params", "quantize_matrix",
           "quantize_model", "quantize_params", "scheme_config", "scheme_name"]
