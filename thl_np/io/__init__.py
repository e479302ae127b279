"""Weights on disk: safetensors (memory-mapped, ``safetensors``), model folders (``folder``), and conversion of
PyTorch THL checkpoints (``thl_np.io.convert``, an application: import it by its own name)."""
from .safetensors import (
    STORAGE_DTYPES,
    TensorInfo,
    check_finite,
    list_tensors,
    read_metadata,
    read_safetensors,
    write_safetensors,
)

__all__ = [
    "STORAGE_DTYPES",
    "TensorInfo",
    "check_finite",
    "list_tensors",
    "read_metadata",
    "read_safetensors",
    "write_safetensors",
]

