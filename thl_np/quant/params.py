"""QuantizedParams: a quantized model's parameters, read as the float weights they stand for.

A quantized model is an ordinary THL model whose weights happen to be W = s·q: ``model.params`` maps
every spec §2 name to a float array, so the plain path (``thl_np.step``), the gradients and every other
reader of a parameter dict compute the spec on the dequantized weights, unchanged.

Where dequantization happens (and what it costs). The model keeps only what the file stores: int8
values and float32 scales (memory-mapped by ``from_pretrained``) and the float tensors (LayerNorm,
biases) in the compute dtype. Reading ``params[name]`` of a quantized tensor dequantizes it into a new
array that nothing keeps: the caller's temporary. The plain step reads its weights through the provider
protocol (``module(name)``, as the layered engine does): inside a module block each tensor is
dequantized at most once and dropped when the block ends, and the embedding hands out only the rows a
step reads. So the plain path holds at most one module's float weights at a time (the largest is the
output head: V·Σd_k values, 463 MB in float32 for the default config) and never the whole model, at the
price of dequantizing each weight once per step. ``thl_np.model.dequantize_model`` materialises the
whole float model when asked. The fast path does not dequantize at all: its kernels read the int8
values (``thl_np.fast.int8``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np

from ..errors import InputError, WeightsError
from ..params import param_shapes
from .scheme import SCALE_SUFFIX, check_quantization, is_quantizable
from .tensor import QuantizedTensor, RowGatherer


class QuantizedParams(Mapping):
    """Spec §2 name → float array (dequantized on read) over the stored int8 tensors and float tensors.

    ``tensor(name)`` gives what is stored (a ``QuantizedTensor`` or a float array), ``stored()`` the
    file's tensors (``name`` int8 and ``name_scale`` float32 for a quantized one)."""

    def __init__(self, tensors: Mapping, quantization: dict, dtype):
        self.quantization = check_quantization(quantization)
        if self.quantization is None:
            raise InputError("QuantizedParams needs a quantization scheme, got none")
        self.dtype = np.dtype(dtype)
        self._tensors = {}
        for name, value in tensors.items():
            if isinstance(value, QuantizedTensor):
                if value.block_size != self.quantization["block_size"]:
                    raise WeightsError(f"tensor {name!r} has block_size {value.block_size}, the model "
                                       f"{self.quantization['block_size']}: quantize every tensor with one scheme")
                self._tensors[name] = value
            else:
                arr = np.asarray(value)
                self._tensors[name] = arr if arr.dtype == self.dtype else arr.astype(self.dtype)

    # ----------------------------------------------------------------- the mapping (float weights)
    def __getitem__(self, name):
        value = self._tensors[name]
        if isinstance(value, QuantizedTensor):
            return value.dense(self.dtype)
        return value

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def __setitem__(self, name, value):
        raise InputError(f"cannot replace {name!r}: a quantized model's weights are fixed. Train the float model "
                         "and quantize it afterwards (thl_np.model.dequantize_model gives a float copy to train)")

    # ----------------------------------------------------------------- what is stored
    def tensor(self, name):
        """The stored form of ``name``: a QuantizedTensor, or a float array in the compute dtype."""
        return self._tensors[name]

    def is_quantized(self, name) -> bool:
        return isinstance(self._tensors[name], QuantizedTensor)

    @property
    def block_size(self):
        return self.quantization["block_size"]

    def quantized_names(self) -> list:
        return [n for n, v in self._tensors.items() if isinstance(v, QuantizedTensor)]

    def stored(self) -> dict:
        """The file's tensors: a quantized ``name`` as int8 ``name`` and float32 ``name_scale``."""
        out = {}
        for name, value in self._tensors.items():
            if isinstance(value, QuantizedTensor):
                out[name] = value.q
                out[name + SCALE_SUFFIX] = value.scale
            else:
                out[name] = value
        return out

    @property
    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self._tensors.values()))

    def key(self) -> tuple:
        """Identifies the stored arrays (for THLModel.weights_key): they never change."""
        return tuple(id(v) for v in self._tensors.values())

    def with_dtype(self, dtype) -> QuantizedParams:
        """The same stored int8 tensors, the float tensors in ``dtype`` (the compute dtype)."""
        if np.dtype(dtype) == self.dtype:
            return self
        return QuantizedParams(self._tensors, self.quantization, dtype)

    # ----------------------------------------------------------------- weight provider (thl_np.step)
    @contextlib.contextmanager
    def module(self, name):
        """The weights one part of the step reads, each dequantized at most once and dropped afterwards."""
        yield _ModuleView(self)

    def keep(self, *arrays) -> None:
        pass

    def __repr__(self):
        return (f"QuantizedParams({len(self.quantized_names())} of {len(self)} tensors int8, "
                f"block_size={self.block_size}, {self.dtype})")


class _ModuleView:
    def __init__(self, params: QuantizedParams):
        self.params, self.cache = params, {}

    def __getitem__(self, key):
        value = self.params.tensor(key)
        if not isinstance(value, QuantizedTensor):
            return value
        if key == "embedding.weight":
            return RowGatherer(value, self.params.dtype)
        if key not in self.cache:
            self.cache[key] = value.dense(self.params.dtype)
        return self.cache[key]


# ---------------------------------------------------------------------------------------------------
# From and to the file's tensors
# ---------------------------------------------------------------------------------------------------
# the largest scale whose weights (|q| ≤ 127) stay finite in float32, the dtype they are computed in
_MAX_SCALE = float(np.finfo(np.float32).max) / 127


def _check_scale_range(value: QuantizedTensor, source: str) -> None:
    """Scales whose s·q would overflow float32 (a corrupt or hand-made file): WeightsError naming the tensor,
    at load rather than as NaN weights at first use."""
    big = np.abs(np.asarray(value.scale, dtype=np.float64)) > _MAX_SCALE
    if big.any():
        i = tuple(int(k) for k in np.argwhere(big)[0])
        raise WeightsError(f"{source}: tensor {value.name + '_scale'!r} holds {int(big.sum())} scale(s) too large "
                           f"for float32 weights (first at {i}: {float(value.scale[i]):.3g}; s·127 must stay below "
                           f"{float(np.finfo(np.float32).max):.3g}); the file is corrupt: re-quantize the float "
                           f"model")


def from_file_tensors(config, tensors: Mapping, source: str = "weights", dtype=None) -> QuantizedParams:
    """A quantized model's file tensors (memory-mapped views) → QuantizedParams, every problem at once.

    Each spec §2 tensor is present either as a float array, or (a matrix only) as int8 ``name`` with
    float32 ``name_scale``; nothing else may be there. Scales and float tensors are checked finite
    here, always: a quantized file's float data is small (scales, LayerNorm, biases), so this reads
    little, and the int8 values cannot be non-finite."""
    quantization = check_quantization(config.quantization)
    if quantization is None:
        raise WeightsError(f"{source}: config.json has no quantization entry: it is a float model")
    block = quantization["block_size"]
    expected = param_shapes(config)
    problems, out = [], {}
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
            continue
        arr = tensors[name]
        scale = tensors.get(name + SCALE_SUFFIX)
        if tuple(arr.shape) != shape:
            problems.append(f"tensor {name} has shape {list(arr.shape)}, expected {list(shape)}")
        elif arr.dtype == np.int8:
            if scale is None:
                problems.append(f"int8 tensor {name} has no scales {name + SCALE_SUFFIX}")
            elif not is_quantizable(name, shape):
                problems.append(f"tensor {name} is int8 but only matrices may be quantized")
            else:
                try:
                    out[name] = QuantizedTensor(arr, scale, block, name, source)
                except WeightsError as exc:
                    problems.append(str(exc).removeprefix(f"{source}: "))
        elif arr.dtype.kind != "f":
            problems.append(f"tensor {name} has dtype {arr.dtype}: a weight is float, or int8 with scales")
        elif scale is not None:
            problems.append(f"tensor {name} is {arr.dtype} but has scales {name + SCALE_SUFFIX}: a scaled "
                            "tensor must be int8")
        else:
            out[name] = arr
    scale_names = {n + SCALE_SUFFIX for n in expected}
    for name in tensors:
        if name not in expected and name not in scale_names:
            problems.append(f"unexpected tensor {name} (shape {list(tensors[name].shape)})")
    if problems:
        raise WeightsError(f"{source} does not match its config ({len(problems)} problem(s)): " + "; ".join(problems))
    for name, value in out.items():
        if isinstance(value, QuantizedTensor):
            value.check_finite(source)
            _check_scale_range(value, source)
        else:
            from ..io.safetensors import check_finite

            check_finite({name: value}, source=source)
    return QuantizedParams(out, quantization, dtype or config.dtype)
