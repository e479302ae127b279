"""Reading and writing the safetensors format, memory-mapped, with no dependency beyond NumPy.

The format (little-endian throughout)::

    [8 bytes: N, unsigned]  [N bytes: UTF-8 JSON header]  [data buffer]

The header maps each tensor name to ``{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}``
(offsets relative to the start of the data buffer) and may carry a ``"__metadata__"`` object of
string → string. The tensors tile the data buffer exactly: no gaps, no overlaps, nothing after.

Why our own parser: loading a 700 MB model should cost a header parse and one ``mmap`` (pages are read
only when a weight is touched), and a damaged or hostile file must fail with a ``WeightsError`` that says
which file, which tensor and what is wrong, never with an ``IndexError`` from deep inside NumPy.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ..errors import WeightsError

# The file's dtype codes and the NumPy dtype each is read as. BF16 has no NumPy dtype: it is stored as
# uint16 bit patterns and widened to float32 on read (bfloat16 is the top half of a float32).
_CODE_TO_DTYPE = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items() if code != "BF16"}

# Storage precisions write_safetensors can convert floating tensors to.
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "float64")

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit; real headers are a few KB
_MAX_NDIM = 32


class TensorInfo(NamedTuple):
    """One tensor as the header describes it: ``dtype`` is the file's code ("F32", "BF16", ...)."""

    name: str
    dtype: str
    shape: tuple
    nbytes: int


class _Entry(NamedTuple):
    name: str
    code: str
    shape: tuple
    begin: int
    end: int


# ---------------------------------------------------------------------------------------------- reading
def read_safetensors(path, *, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load every tensor of a safetensors file, and its ``__metadata__``.

    With ``mmap=True`` (the default) the file is mapped once and each tensor is a read-only view into
    the mapping: nothing is read from disk until a value is touched, so opening a large model is fast
    and costs almost no memory. BF16 tensors are the exception: they are widened to float32 copies.
    With ``mmap=False`` every tensor is an ordinary, writable array read into memory.
    Tensors come back in file order. Raises WeightsError for any malformed file.
    """
    path = os.fspath(path)
    entries, metadata, data_start, file_size = _read_header(path)
    if mmap:
        tensors = _tensors_from_mmap(path, entries, data_start, file_size)
    else:
        tensors = _tensors_from_reads(path, entries, data_start)
    return tensors, metadata


def list_tensors(path) -> list[TensorInfo]:
    """Name, dtype code, shape and byte count of every tensor, from the header alone (no data read)."""
    entries, _, _, _ = _read_header(os.fspath(path))
    return [TensorInfo(e.name, e.code, e.shape, e.end - e.begin) for e in entries]


def read_metadata(path) -> dict[str, str]:
    """The file's ``__metadata__`` (empty if it has none), from the header alone."""
    _, metadata, _, _ = _read_header(os.fspath(path))
    return metadata


def _tensors_from_mmap(path, entries, data_start, file_size):
    if file_size == data_start:  # np.memmap cannot map zero bytes; every tensor is empty
        return {e.name: _empty_tensor(path, e) for e in entries}
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot memory-map {path} ({exc}): check the file, or pass mmap=False") from None
    tensors = {}
    for e in entries:
        raw = mapped[data_start + e.begin : data_start + e.end]
        # np.asarray drops the memmap subclass (whose methods return surprising types) but keeps the
        # mapping alive through .base; the view is read-only because the mapping is.
        tensors[e.name] = _decode(path, e, np.asarray(raw))
    return tensors


def _tensors_from_reads(path, entries, data_start):
    tensors = {}
    try:
        with open(path, "rb") as f:
            for e in entries:
                raw = np.empty(e.end - e.begin, dtype=np.uint8)
                f.seek(data_start + e.begin)
                if f.readinto(raw) != raw.size:
                    raise WeightsError(
                        f"{path}: tensor {e.name!r} is truncated: "
                        "the file changed while it was being read"
                    )
                tensors[e.name] = _decode(path, e, raw)
    except OSError as exc:
        raise WeightsError(f"cannot read {path} ({exc}): check the path and its permissions") from None
    return tensors


def _empty_tensor(path, e: _Entry) -> np.ndarray:
    return _decode(path, e, np.empty(0, dtype=np.uint8))


def _decode(path, e: _Entry, raw: np.ndarray) -> np.ndarray:
    """Reinterpret a tensor's bytes as its dtype and shape (a view), widening BF16 to float32 (a copy)."""
    try:
        array = raw.view(_CODE_TO_DTYPE[e.code]).reshape(e.shape)
    except ValueError as exc:  # e.g. a shape NumPy cannot represent; the header checks make this rare
        raise WeightsError(
            f"{path}: tensor {e.name!r} with shape {list(e.shape)} "
            f"cannot be built ({exc}): the header is corrupt"
        ) from None
    if e.code == "BF16":
        array = bf16_bits_to_float32(array)
    return array


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32: they are exactly a float32's top 16 bits."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------- header
def _read_header(path: str):
    """Parse and validate the header; return (entries in file order, metadata, data start, file size)."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(
                    f"{path} is {file_size} bytes long, shorter than the 8-byte safetensors prefix: "
                    "it is not a safetensors file (or it was truncated)"
                )
            n = int.from_bytes(prefix, "little")
            _check_header_length(path, n, file_size)
            header_bytes = f.read(n)
    except IsADirectoryError:
        raise WeightsError(
            f"{path} is a folder, not a safetensors file: "
            "pass the model.safetensors inside it"
        ) from None
    except FileNotFoundError:
        raise WeightsError(f"no such weights file: {path}") from None
    except OSError as exc:
        raise WeightsError(f"cannot read {path} ({exc}): check the path and its permissions") from None
    if len(header_bytes) != n:
        raise WeightsError(
            f"{path}: the header is truncated ({len(header_bytes)} of {n} bytes): "
            "the file changed while it was being read"
        )
    header = _parse_header_json(path, header_bytes)
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    entries = [_parse_entry(path, name, spec) for name, spec in header.items()]
    data_start = 8 + n
    _check_layout(path, entries, file_size - data_start)
    entries.sort(key=lambda e: (e.begin, e.end))
    return entries, metadata, data_start, file_size


def _check_header_length(path, n, file_size):
    if n > MAX_HEADER_BYTES:
        raise WeightsError(
            f"{path}: header length {n} is absurd (limit {MAX_HEADER_BYTES} bytes): "
            "the file is not safetensors or is corrupt"
        )
    if n > file_size - 8:
        raise WeightsError(
            f"{path}: header length {n} runs past the end of the file ({file_size} bytes): "
            "the file is truncated or not safetensors"
        )


def _reject_duplicates(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = Counter(k for k, _ in pairs)
        raise _DuplicateKeys(sorted(k for k, n in counts.items() if n > 1)[:5])
    return result


class _DuplicateKeys(Exception):
    pass


def _parse_header_json(path, header_bytes: bytes) -> dict:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsError(f"{path}: the header is not UTF-8 ({exc}): the file is corrupt") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKeys as exc:
        raise WeightsError(f"{path}: the header repeats key(s) {exc.args[0]}: the file is corrupt") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so is a 5000-digit int
        raise WeightsError(
            f"{path}: the header is not valid JSON ({_short(exc)}): "
            "the file is corrupt"
        ) from None
    if not isinstance(header, dict):
        raise WeightsError(
            f"{path}: the header must be a JSON object of tensors, got {type(header).__name__}: "
            "the file is corrupt or not safetensors"
        )
    return header


def _parse_metadata(path, metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise WeightsError(
            f"{path}: __metadata__ must be an object of strings, got {type(metadata).__name__}"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise WeightsError(
                f"{path}: __metadata__[{key!r}] must be a string, got {type(value).__name__}: "
                "the file is corrupt"
            )
    return metadata


def _parse_entry(path, name, spec) -> _Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise WeightsError(f"{where}: its header entry must be an object, got {type(spec).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in spec:
            raise WeightsError(f"{where}: its header entry has no {key!r}: the file is corrupt")
    code = spec["dtype"]
    if not isinstance(code, str) or code not in _CODE_TO_DTYPE:
        raise WeightsError(
            f"{where}: dtype {_short(code)} is not supported (known: {sorted(_CODE_TO_DTYPE)}); "
            "re-save it in one of those"
        )
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WeightsError(f"{where}: shape {_short(shape)} must be a list of non-negative integers")
    if len(shape) > _MAX_NDIM:
        raise WeightsError(f"{where}: shape has {len(shape)} dimensions, more than {_MAX_NDIM}")
    offsets = spec["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise WeightsError(
            f"{where}: data_offsets {_short(offsets)} must be a list of two integers "
            "[begin, end]: the header is corrupt"
        )
    begin, end = offsets
    if begin < 0 or end < begin:
        raise WeightsError(f"{where}: data_offsets {offsets} must satisfy 0 <= begin <= end")
    itemsize = _CODE_TO_DTYPE[code].itemsize
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise WeightsError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} of {code} "
            f"needs {expected}: the header is corrupt"
        )
    if math.prod(max(d, 1) for d in shape) * itemsize >= 2**62:
        raise WeightsError(f"{where}: shape {shape} is too large to represent")
    return _Entry(name, code, tuple(shape), begin, end)


def _check_layout(path, entries, data_size):
    """The tensors must tile the data buffer [0, data_size) exactly, as the format requires."""
    position, previous = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < position:
            raise WeightsError(
                f"{path}: tensor {e.name!r} (bytes {e.begin}..{e.end}) overlaps tensor {previous!r} "
                f"(which ends at {position}): the header is corrupt"
            )
        if e.begin > position:
            raise WeightsError(
                f"{path}: tensor {e.name!r} starts at byte {e.begin} but the previous tensor ends at "
                f"{position}: the data offsets are not contiguous (the header is corrupt)"
            )
        position, previous = e.end, e.name
    if position > data_size:
        raise WeightsError(
            f"{path} is truncated: tensor {previous!r} ends at data byte {position} but the file holds only "
            f"{data_size} data bytes; re-download or re-export it"
        )
    if position < data_size:
        raise WeightsError(
            f"{path}: {data_size - position} unaccounted bytes after the last tensor (data ends at "
            f"{position}, file data is {data_size} bytes): the file is corrupt"
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(value, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, Exception) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- writing
def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
                      dtype: str | None = None, keep_dtype=()) -> None:
    """Write tensors (and string metadata) as a safetensors file, atomically.

    ``dtype=None`` keeps each array's dtype; "float32" | "float16" | "bfloat16" | "float64" converts the
    floating tensors (integer and bool tensors are kept as they are, and so are the tensors named in
    ``keep_dtype``: a quantized model's scales stay float32). bfloat16 rounds to nearest even.
    Tensors are laid out widest-itemsize first so every tensor starts at a multiple of its itemsize
    (the header is padded to 8 bytes), which keeps memory-mapped views aligned.
    The file appears under its name only once complete: a temp file in the same folder is written,
    fsynced and renamed over it, so a crash or an exception never leaves a half-written model behind.
    """
    path = os.fspath(path)
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise WeightsError(f"storage dtype {dtype!r} is not supported: use one of {list(STORAGE_DTYPES)}")
    keep = set(keep_dtype)
    prepared = [_prepare(path, name, value, None if name in keep else dtype) for name, value in tensors.items()]
    header_bytes, ordered = _build_header(path, prepared, metadata)
    _atomic_write(path, header_bytes, ordered)


def _prepare(path, name, value, dtype):
    """(name, code, little-endian contiguous array) for one tensor, converted to the storage dtype."""
    if not isinstance(name, str) or name == "__metadata__":
        raise WeightsError(
            f"cannot write {path}: tensor name {name!r} must be a string "
            "other than '__metadata__': rename it"
        )
    array = np.asarray(value)
    if array.dtype.kind == "f" and dtype is not None:
        if dtype == "bfloat16":
            bits = float_to_bf16_bits(array)
            _check_no_overflow(path, name, array, bf16_bits_to_float32(bits), dtype)
            return name, "BF16", bits
        with np.errstate(over="ignore"):
            converted = array.astype(dtype)
        _check_no_overflow(path, name, array, converted, dtype)
        array = converted
    code = _KIND_SIZE_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise WeightsError(
            f"cannot write {path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot store; "
            f"convert it to one of {sorted(_CODE_TO_DTYPE)}"
        )
    return name, code, np.asarray(array, dtype=_CODE_TO_DTYPE[code], order="C")


def _check_no_overflow(path, name, original, converted, dtype):
    """A narrower storage must not silently turn large finite weights into infinities."""
    overflow = np.isinf(converted) & np.isfinite(original)
    if overflow.any():
        largest = float(np.max(np.abs(original[overflow])))
        raise WeightsError(
            f"cannot write {path}: tensor {name!r} holds {int(overflow.sum())} value(s) beyond {dtype}'s "
            f"range (largest magnitude {largest:.4g}): store it as float32 instead"
        )


def _build_header(path, prepared, metadata):
    header = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise WeightsError(
                f"cannot write {path}: metadata must map strings to strings, got {_short(bad)}: "
                "json.dumps other values first"
            )
        header["__metadata__"] = dict(metadata)
    ordered = sorted(prepared, key=lambda p: -p[2].dtype.itemsize)  # stable: keeps order within a width
    position = 0
    for name, code, array in ordered:
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [position, position + array.nbytes]}
        position += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # pad so the data buffer starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, ordered


def _atomic_write(path, header_bytes, ordered):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise WeightsError(f"cannot write {path}: it is a folder; give a file name such as model.safetensors")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise WeightsError(
            f"cannot write {path} ({exc}): "
            "check that its folder exists and is writable"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header_bytes)
            for _, _, array in ordered:
                if array.nbytes:
                    f.write(array.reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError):
            raise WeightsError(f"cannot write {path} ({exc}): check free space and permissions") from None
        raise
    _fsync_folder(folder)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_folder(folder):
    """Make the rename durable too (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def float_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round floats to bfloat16, to nearest with ties to even; return the uint16 bit patterns.

    float32 input is rounded on its bits: add 0x7FFF plus the lowest kept bit, keep the top half.
    float64 input is first narrowed to float32 with round-to-odd (truncate, then set the last bit if
    anything was lost), which makes the second rounding exact: rounding straight through float32 with
    round-to-nearest could round twice and land one bf16 step off. NaN stays NaN (quiet).
    """
    x = np.asarray(values)
    if x.dtype.itemsize > 4:
        bits = _float64_to_float32_round_to_odd(x.astype(np.float64, copy=False))
    else:
        bits = x.astype(np.float32).view(np.uint32)
    bits = np.ascontiguousarray(bits, dtype=np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(bits.view(np.float32))
    if nan.any():
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def _float64_to_float32_round_to_odd(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        near = x.astype(np.float32)
    bits = near.view(np.uint32).copy()
    finite = np.isfinite(x)
    inexact = finite & (near.astype(np.float64) != x)
    # Where rounding went away from zero (|near| > |x|), step one float32 ulp back towards zero; this
    # also turns an overflow to ±inf into ±FLT_MAX. Then mark the loss in the last bit (sticky).
    away = inexact & (np.abs(near.astype(np.float64)) > np.abs(x))
    bits[away] -= np.uint32(1)
    bits[inexact] |= np.uint32(1)
    return bits


# ---------------------------------------------------------------------------------------------- checks
def check_finite(tensors: Mapping[str, np.ndarray], source: str = "weights",
                 chunk_elements: int = 1 << 22) -> None:
    """Raise WeightsError naming the first floating tensor holding a NaN or an infinity.

    Fast path: a chunk's sum is finite only if every element is (a NaN or inf propagates), and a sum
    needs no temporary array; only a chunk whose sum is not finite (which can also be plain overflow)
    is checked element by element. Chunks bound memory when the tensors are memory-mapped.
    """
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype.kind not in "fc":
            continue
        flat = array.reshape(-1)
        accumulate = np.float32 if array.dtype.itemsize < 4 else None  # float16 sums overflow early
        for start in range(0, flat.size, chunk_elements):
            chunk = flat[start : start + chunk_elements]
            with np.errstate(over="ignore", invalid="ignore"):
                total = chunk.sum(dtype=accumulate)
            if np.isfinite(total):
                continue
            bad = np.flatnonzero(~np.isfinite(chunk))
            if bad.size:
                count = int(np.count_nonzero(~np.isfinite(flat)))
                index = np.unravel_index(start + int(bad[0]), array.shape)
                raise WeightsError(
                    f"{source}: tensor {name!r} holds {count} non-finite value(s) (first at index "
                    f"{tuple(int(i) for i in index)}: {flat[start + int(bad[0])]}); the weights are corrupt "
                    "or training diverged: use an earlier checkpoint"
                )
