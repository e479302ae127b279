"""Weights on disk: safetensors (memory-mapped) and conversion of PyTorch THL checkpoints."""
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
    "convert_pytorch_checkpoint",
    "list_tensors",
    "read_metadata",
    "read_safetensors",
    "write_safetensors",
]


def __getattr__(name):
    # convert pulls in zipfile/pickle machinery only a conversion needs; import it on first use.
    if name == "convert_pytorch_checkpoint":
        from .convert import convert_pytorch_checkpoint

        return convert_pytorch_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
