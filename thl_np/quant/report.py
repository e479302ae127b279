"""What a quantized file holds, and how far its weights are from the float ones (for `info` and
`thl-np quantize`)."""
from __future__ import annotations

import numpy as np

from .scheme import SCALE_SUFFIX, scheme_name


def file_summary(config, tensors) -> dict | None:
    """From the header's tensor list (``thl_np.io.list_tensors``): the scheme and the bytes of each kind
    of tensor, against the same model in float32. None for a float model."""
    if not config.quantization:
        return None
    int8 = [t for t in tensors if t.dtype == "I8"]
    scales = [t for t in tensors if t.name.endswith(SCALE_SUFFIX)]
    other = [t for t in tensors if t not in int8 and t not in scales]
    n_float = sum(int(np.prod(t.shape)) for t in other)
    float32_bytes = 4 * (sum(int(np.prod(t.shape)) for t in int8) + n_float)
    stored = sum(t.nbytes for t in tensors)
    return {"scheme": scheme_name(config.quantization), "block_size": config.quantization["block_size"],
            "int8_tensors": len(int8), "float_tensors": len(other), "int8_bytes": sum(t.nbytes for t in int8),
            "scale_bytes": sum(t.nbytes for t in scales), "float_bytes": sum(t.nbytes for t in other),
            "stored_bytes": stored, "float32_bytes": float32_bytes,
            "ratio_to_float32": stored / float32_bytes if float32_bytes else 0.0}


def weight_errors(float_params, qparams) -> dict:
    """Per quantized tensor: max |W_q − W| / max |W| and the relative Frobenius error ‖W_q − W‖ / ‖W‖."""
    out = {}
    for name in qparams.quantized_names():
        W = np.asarray(float_params[name], dtype=np.float64)
        err = qparams.tensor(name).dense(np.float64) - W
        scale = float(np.abs(W).max()) or 1.0
        norm = float(np.linalg.norm(W)) or 1.0
        out[name] = {"max_rel": float(np.abs(err).max()) / scale, "frobenius_rel": float(np.linalg.norm(err)) / norm}
    return out
