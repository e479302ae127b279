"""Import a PyTorch THL checkpoint (``save_pretrained`` folder) without torch and without running its pickle.

A ``pytorch_model.bin`` written by ``torch.save`` is a zip archive::

    <prefix>/data.pkl      the pickled state_dict: an OrderedDict of name -> tensor
    <prefix>/data/<key>    the raw little-endian bytes of each storage the tensors view
    <prefix>/byteorder     "little" (absent in old files, which are little-endian too)

Unpickling is code execution in general: a pickle can name any importable callable and call it. So
the pickle is read by ``_StateDictUnpickler``, which resolves only the few names a tensor state_dict
needs to local stand-ins (an OrderedDict, the tensor-rebuild functions, the storage types) and refuses
everything else with a WeightsError before anything is called. Tensors become NumPy arrays built from
the zip's storage bytes.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile
import zlib

import numpy as np

from ..checks import check_output_dir
from ..config import THLConfig
from ..errors import WeightsError
from ..params import check_params, param_shapes
from .folder import write_model_folder
from .safetensors import bf16_bits_to_float32, check_finite, read_safetensors

PYTORCH_WEIGHTS = "pytorch_model.bin"
SAFETENSORS_WEIGHTS = "model.safetensors"
FORMAT_METADATA = {"format": "thl-np", "format_version": "1"}

# What zipfile raises on damaged archives (bad headers, bad CRC, unknown compression, encryption, ...).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, struct.error, OSError, EOFError, NotImplementedError,
               ValueError, KeyError, RuntimeError, OverflowError, MemoryError)

_MAX_PICKLE_BYTES = 64 << 20  # a state_dict's pickle is a few KB; this only stops a zip bomb

# torch's legacy storage type names (still what torch.save writes) and the bytes' NumPy dtype.
# "BFloat16Storage" bytes are read as uint16 bit patterns and widened to float32.
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


# ---------------------------------------------------------------------------------------------- conversion
def convert_pytorch_checkpoint(src_dir, out_dir, dtype: str | None = None, *, log=None,
                               task: str | None = None) -> THLConfig:
    """Convert a PyTorch THL ``save_pretrained`` folder into a thl-np model folder; return its config.

    ``src_dir`` holds config.json and pytorch_model.bin (or model.safetensors). ``out_dir`` receives
    config.json and model.safetensors, the latter stored as ``dtype`` ("float32" | "float16" | "bfloat16"
    | "float64"; None keeps the checkpoint's precision, bf16 widened to float32). The PyTorch THL ignores
    write_rate (it behaves as write_rate = 1.0), so the converted config sets write_rate = 1.0 and the
    model keeps computing what it computed in PyTorch. ``log`` (a callable taking one line) hears what
    was read, changed and written. A task model's checkpoint (its body under ``thl.``, a ``classifier``)
    converts to a task-model folder (``thl_np.finetune.from_pytorch``); ``task`` names its task where the
    classifier's shape leaves it open.
    """
    say = log or (lambda line: None)
    src_dir, out_dir = os.fspath(src_dir), os.fspath(out_dir)
    if not os.path.isdir(src_dir):
        raise WeightsError(f"{src_dir} is not a folder: pass the folder PyTorch THL's save_pretrained wrote")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise WeightsError(f"the output path {out_dir} is a file: give a folder (it receives config.json and "
                           "model.safetensors)")
    if os.path.exists(out_dir) and os.path.samefile(src_dir, out_dir):
        raise WeightsError(f"the output folder {out_dir} is the PyTorch folder itself: choose a new folder")
    check_output_dir(out_dir, "the output folder")  # before reading the checkpoint, not after
    config = THLConfig.load(src_dir)
    weights_path, tensors, from_thl_np = _read_source_weights(src_dir)
    keep = ()
    head = {}
    if config.quantization:  # an int8 folder (thl_np.quant): its int8 values and float32 scales go as they are
        from ..quant.params import from_file_tensors

        names = list(from_file_tensors(config, tensors, source=weights_path).stored())
        keep = [n for n in names if tensors[n].dtype == np.int8 or n.endswith("_scale")]
    elif from_thl_np and config.task is not None:  # a thl-np task folder: body and head as they are stored
        check_finite(tensors, source=weights_path)
        names = list(tensors)
    else:
        from ..finetune.from_pytorch import split_head_checkpoint

        tensors, head, config = split_head_checkpoint(tensors, config, task, say)
        check_params(config, tensors, source=weights_path)
        check_finite({**tensors, **head}, source=weights_path)
        names = list(param_shapes(config))
    say(f"read  {weights_path}: {len(tensors)} tensors, {sum(t.size for t in tensors.values()):,} parameters")
    if from_thl_np:  # a thl-np folder already computes what thl-np computes: copy it unchanged
        say(f"note  {src_dir} is a thl-np model folder: copied unchanged (write_rate {config.write_rate} kept; "
            "the PyTorch THL's write_rate = 1.0 applies only to PyTorch checkpoints)")
    elif config.write_rate != 1.0:
        say(f"note  write_rate {config.write_rate} -> 1.0: the PyTorch THL ignores write_rate (it behaves as "
            "write_rate = 1.0), so the converted model does the same")
        config = config.replace(write_rate=1.0)
    else:
        say("note  write_rate is 1.0, matching the PyTorch THL (which ignores write_rate)")
    ordered = {name: tensors[name] for name in names}
    ordered.update(head)
    out_weights = os.path.join(out_dir, SAFETENSORS_WEIGHTS)
    metadata = dict(FORMAT_METADATA, config=config.to_json())
    write_model_folder(out_dir, ordered, config, metadata=metadata, dtype=dtype, keep_dtype=keep)
    stored = dtype or ", ".join(sorted({str(t.dtype) for t in ordered.values()}))
    say(f"wrote {out_weights} ({stored}, {os.path.getsize(out_weights):,} bytes) and "
        f"{os.path.join(out_dir, 'config.json')}")
    return config


def _read_source_weights(src_dir):
    """(path, tensors, from_thl_np): the last is True for a thl-np model folder (its safetensors
    metadata says format thl-np), which is copied unchanged rather than given the PyTorch THL's η = 1."""
    pt_path = os.path.join(src_dir, PYTORCH_WEIGHTS)
    if os.path.exists(pt_path):
        return pt_path, read_torch_state_dict(pt_path), False
    st_path = os.path.join(src_dir, SAFETENSORS_WEIGHTS)
    if os.path.exists(st_path):
        tensors, metadata = read_safetensors(st_path, mmap=False)
        return st_path, tensors, (metadata or {}).get("format") == FORMAT_METADATA["format"]
    raise WeightsError(f"{src_dir} holds neither {PYTORCH_WEIGHTS} nor {SAFETENSORS_WEIGHTS}: "
                       "pass the folder PyTorch THL's save_pretrained wrote")


# ---------------------------------------------------------------------------------------------- torch zip
def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save``d state_dict (zip format), as NumPy arrays; no torch, no code run."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"no such checkpoint file: {path}")
    if not zipfile.is_zipfile(path):
        raise WeightsError(
            f"{path} is not a zip-format torch checkpoint (the legacy format, or not a checkpoint at all): "
            "re-save it with torch.save(model.state_dict(), path) from torch >= 1.6"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            loaded = _unpickle_from_archive(path, archive)
    except WeightsError:  # a ValueError too: keep it from being wrapped again below
        raise
    except _ZIP_ERRORS as exc:  # a damaged zip fails in many ways; all of them mean "bad file"
        raise WeightsError(
            f"{path} could not be read as a torch checkpoint ({type(exc).__name__}: {exc}); "
            "the file is damaged"
        ) from None
    return _tensors_of(path, loaded)


def _unpickle_from_archive(path, archive: zipfile.ZipFile):
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightsError(
            f"{path} has {len(pickles)} '<name>/data.pkl' entries where a torch checkpoint has exactly "
            "one: it is not a torch.save file"
        )
    prefix = pickles[0][: -len("data.pkl")]
    order = _byte_order(path, archive, prefix)
    info = archive.getinfo(pickles[0])
    if info.file_size > _MAX_PICKLE_BYTES:
        raise WeightsError(
            f"{path}: {pickles[0]} is {info.file_size} bytes, too large for a state_dict pickle "
            f"(limit {_MAX_PICKLE_BYTES}): the file is not a THL checkpoint"
        )
    data = archive.read(info)
    try:
        _prescan(data)
        return _StateDictUnpickler(io.BytesIO(data), archive, prefix, order).load()
    except _BadCheckpoint as exc:
        raise WeightsError(f"{path}: {exc}") from None
    except Exception as exc:
        raise WeightsError(
            f"{path}: the state_dict pickle is malformed ({type(exc).__name__}: {exc}); "
            "re-save the checkpoint with torch.save(model.state_dict(), path)"
        ) from None


def _prescan(data: bytes) -> None:
    """Walk the pickle's opcodes (pickletools parses, it never executes) before unpickling, and refuse
    what could make the C unpickler allocate memory out of all proportion to the file: a memo index
    far beyond the number of opcodes (CPython sizes its memo table by the largest index it sees), or a
    length prefix that promises more bytes than the pickle holds."""
    count = 0
    try:
        for opcode, arg, _ in pickletools.genops(data):
            count += 1
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= count:
                raise _BadCheckpoint(f"the pickle stores memo slot {arg} after only {count} opcodes")
    except ValueError as exc:  # genops' word for truncated or unknown opcodes
        raise _BadCheckpoint(f"the state_dict pickle is malformed ({_short(str(exc))})") from None


def _byte_order(path, archive, prefix) -> str:
    name = prefix + "byteorder"
    if name not in archive.namelist():
        return "<"
    order = archive.read(name).strip()
    if order not in (b"little", b"big"):
        raise WeightsError(f"{path}: unknown byteorder {order[:20]!r} (expected 'little' or 'big')")
    return "<" if order == b"little" else ">"


def _tensors_of(path, loaded) -> dict[str, np.ndarray]:
    """The name -> array mapping from what the pickle held (a state_dict, possibly under 'state_dict')."""
    if isinstance(loaded, dict) and len(loaded) == 1:
        (key, inner), = loaded.items()
        if key in ("state_dict", "model") and isinstance(inner, dict):
            loaded = inner
    if not isinstance(loaded, dict):
        raise WeightsError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict (a dict of name -> tensor): "
            "save model.state_dict()"
        )
    tensors, problems = {}, []
    for name, value in loaded.items():
        if not isinstance(name, str):
            problems.append(f"key {name!r} is not a string")
        elif not isinstance(value, _Tensor):
            problems.append(f"{name!r} is a {type(value).__name__}, not a tensor")
        else:
            tensors[name] = value.array
    if problems:
        raise WeightsError(f"{path} is not a plain tensor state_dict: " + "; ".join(problems[:10]))
    return tensors


# ---------------------------------------------------------------------------------------------- stand-ins
class _BadCheckpoint(Exception):
    """Raised inside the unpickler; read_torch_state_dict turns it into a WeightsError naming the file."""


class _Frozen:
    """Base of the stand-ins: a pickle's BUILD opcode may not rewrite them (no __dict__, no setstate)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _BadCheckpoint(f"the pickle tries to set the state of a {type(self).__name__}: refusing")


class _Callable(_Frozen):
    """A fresh, frozen wrapper around an allowed callable, so that a pickle's BUILD cannot reach (and
    rewrite the attributes of) the real function or class behind it."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _StorageType(_Frozen):
    """Stands in for ``torch.FloatStorage`` and friends: only says how to read the storage's bytes."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage(_Frozen):
    """One storage's elements as a 1-D array (BF16 widened to float32)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _Tensor(_Frozen):
    """A rebuilt tensor: an array of its own (copied out of its storage), C-contiguous."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v2: a strided view of a storage (gradient bookkeeping is dropped)."""
    return _Tensor(_strided_copy(storage, storage_offset, size, stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    """torch._utils._rebuild_tensor (older files)."""
    return _Tensor(_strided_copy(storage, storage_offset, size, stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    if not isinstance(data, _Tensor):
        raise _BadCheckpoint(f"a pickled Parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _strided_copy(storage, offset, size, stride) -> np.ndarray:
    """Copy out the elements a (offset, size, stride) view selects, after proving they lie in the storage.

    The check matters: as_strided trusts its arguments, and a crafted pickle could otherwise make it
    read memory outside the storage.
    """
    if not isinstance(storage, _Storage):
        raise _BadCheckpoint(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if not (_is_count(offset) and _is_counts(size) and _is_counts(stride) and len(size) == len(stride)):
        raise _BadCheckpoint(
            f"a tensor has an invalid layout (offset {offset!r}, size {size!r}, stride {stride!r})"
        )
    numel = storage.array.size
    if any(n == 0 for n in size):
        return np.zeros(tuple(size), dtype=storage.array.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= numel:
        raise _BadCheckpoint(
            f"a tensor (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) reaches element {last} "
            f"of a storage of {numel}: the checkpoint is corrupt"
        )
    base = storage.array[offset:]
    itemsize = base.dtype.itemsize
    strides = tuple(s * itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(base, shape=tuple(size), strides=strides, writeable=False)
    return np.array(view, order="C")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**48


def _is_counts(v) -> bool:
    return isinstance(v, tuple) and len(v) <= 32 and all(_is_count(n) for n in v)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild a tensor state_dict and nothing else."""

    def __init__(self, file, archive, prefix, byte_order):
        super().__init__(file)
        self._archive, self._prefix, self._order = archive, prefix, byte_order
        self._storages = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _Callable(_ALLOWED_GLOBALS[(module, name)])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _BadCheckpoint(
            f"the pickle refers to {module}.{name}, which a tensor state_dict never needs; "
            "refusing to load it (the file may be malicious). Re-save the checkpoint with "
            "torch.save(model.state_dict(), path)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _BadCheckpoint(
                f"unexpected persistent id {_short(pid)} "
                "(a torch checkpoint only has ('storage', type, key, location, numel) records)"
            )
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_count(numel):
            raise _BadCheckpoint(f"malformed storage record {_short(pid)}")
        if key not in self._storages:
            self._storages[key] = self._load_storage(storage_type, key, numel)
        storage = self._storages[key]
        if storage.array.size != numel:
            raise _BadCheckpoint(
                f"storage {key!r} is declared with both {numel} and "
                f"{storage.array.size} elements: the checkpoint is corrupt"
            )
        return storage

    def _load_storage(self, storage_type: _StorageType, key: str, numel: int) -> _Storage:
        entry = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(entry)
        except KeyError:
            raise _BadCheckpoint(
                f"storage {key!r} has no {entry} entry: "
                "the checkpoint is incomplete"
            ) from None
        dtype = storage_type.dtype.newbyteorder(self._order)
        if info.file_size != numel * dtype.itemsize:
            raise _BadCheckpoint(
                f"{entry} holds {info.file_size} bytes, but its {numel} {storage_type.name} "
                f"elements need {numel * dtype.itemsize}: the checkpoint is corrupt"
            )
        array = np.frombuffer(self._archive.read(info), dtype=dtype).astype(dtype.newbyteorder("="))
        if storage_type.name == "BFloat16Storage":
            array = bf16_bits_to_float32(array)
        return _Storage(array)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
