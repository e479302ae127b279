"""QuantizedTensor: one int8 matrix and its scales, as stored (docs/QUANTIZATION.md).

It is a value the model carries instead of a float array: ``q`` and ``scale`` are the file's arrays
(memory-mapped when loaded with ``from_pretrained``), ``dense(dtype)`` is W = s·q in a compute dtype, and
``rows(ids, dtype)`` dequantizes only the rows asked for (the embedding reads B rows a step). The fast
path wraps it in its own kernels' layouts (``thl_np.fast.int8``); ``derived`` keeps those, built once per
tensor (their memory cost is documented where they are built).
"""
from __future__ import annotations

import numpy as np

from ..errors import WeightsError
from .scheme import dequantize, group_size, scale_shape


class QuantizedTensor:
    """q int8 [R, C] and scale float32 [R, G] with W[i, j] = scale[i, j // b] · q[i, j]."""

    def __init__(self, q, scale, block_size: int | None, name: str = "a tensor", source: str = "weights"):
        q, scale = np.asarray(q), np.asarray(scale)
        where = f"{source}: tensor {name!r}"
        if q.dtype != np.int8 or q.ndim != 2:
            raise WeightsError(f"{where} must be an int8 matrix, got {q.dtype} with shape {list(q.shape)}")
        want = scale_shape(q.shape, block_size)
        if scale.dtype != np.float32 or tuple(scale.shape) != want:
            raise WeightsError(
                f"{where}: its scales must be float32 with shape {list(want)} for block_size "
                f"{block_size} (one scale per {'row' if block_size is None else f'{block_size} columns'}), "
                f"got {scale.dtype} {list(scale.shape)}: re-quantize the model with `thl-np quantize`")
        self.q, self.scale, self.block_size, self.name = q, scale, block_size, name
        self.derived: dict = {}

    # ----------------------------------------------------------------- facts
    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        """b: the columns one scale covers."""
        return group_size(self.block_size, self.q.shape[1])

    @property
    def nbytes(self) -> int:
        """Stored bytes: the int8 values and the float32 scales."""
        return int(self.q.nbytes + self.scale.nbytes)

    def check_finite(self, source: str = "weights") -> None:
        """Scales must be finite (int8 values always are): WeightsError otherwise."""
        bad = ~np.isfinite(self.scale)
        if bad.any():
            i = tuple(int(k) for k in np.argwhere(bad)[0])
            raise WeightsError(f"{source}: tensor {self.name + '_scale'!r} holds {int(bad.sum())} non-finite "
                               f"scale(s) (first at {i}: {self.scale[i]}); the file is corrupt: re-quantize "
                               "the float model")

    # ----------------------------------------------------------------- values
    def dense(self, dtype) -> np.ndarray:
        """W = s·q [R, C] in ``dtype`` (a new array)."""
        return dequantize(self.q, self.scale, self.block_size, dtype)

    def rows(self, ids, dtype) -> np.ndarray:
        """W[ids] in ``dtype``, dequantizing only those rows (ids of any shape → [..., C])."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        out = dequantize(self.q[flat], self.scale[flat], self.block_size, dtype)
        return out.reshape(ids.shape + (self.q.shape[1],))

    def row_block(self, start: int, stop: int, dtype) -> np.ndarray:
        """W[start:stop] in ``dtype``."""
        return dequantize(self.q[start:stop], self.scale[start:stop], self.block_size, dtype)

    def __repr__(self):
        return (f"QuantizedTensor({self.name}, int8 {list(self.q.shape)}, scales {list(self.scale.shape)}, "
                f"block_size={self.block_size})")


class RowGatherer:
    """``table[ids]`` of a quantized embedding: the rows asked for, dequantized (the plain step reads the
    embedding through this, so a step never dequantizes the whole table)."""

    def __init__(self, tensor: QuantizedTensor, dtype):
        self.tensor, self.dtype = tensor, np.dtype(dtype)

    @property
    def shape(self):
        return self.tensor.shape

    def __getitem__(self, ids):
        return self.tensor.rows(ids, self.dtype)
