"""Int8 weights: a quarter of float32's bytes, for decoding that reads fewer bytes per token.

A quantized model is an ordinary THL model whose matrices are W = s·q (int8 q, float32 scales per row or
per block of 32 columns); LayerNorm, biases and the recurrent arithmetic stay float. The format, the
formula and the reasons for the default scheme: docs/QUANTIZATION.md.

    scheme.py   the schemes, the config value, quantize_matrix and dequantize (NumPy or CuPy)
    tensor.py   QuantizedTensor: one stored int8 matrix and its scales
    params.py   QuantizedParams: a model's parameters read as float, stored as int8; file tensors in/out
    quantize.py quantize_params, and the parameters THLModel gets for a quantized config

Turning a whole THLModel into its int8 form and back is the model's: ``thl_np.model.quantize_model`` and
``dequantize_model``.

The package's own names are the schemes and the stored matrix (they read no config, and the config
checks its ``quantization`` with them); a model's parameters are ``thl_np.quant.params`` and
``thl_np.quant.quantize``. The fast path's int8 kernels are in ``thl_np.fast.int8``; the CLI is ``thl-np quantize``.
"""
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

__all__ = ["DEFAULT_SCHEME", "SCALE_SUFFIX", "SCHEMES", "QuantizedTensor", "check_quantization", "dequantize",
           "quantize_matrix", "scheme_config", "scheme_name"]
