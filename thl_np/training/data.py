"""Byte-level training data: load, split, and cut into lanes for truncated BPTT.

The model reads raw bytes (ids 0..255; a model for it needs vocab_size >= 256, the project's byte
tokenizer uses 259 with its specials). A folder is read recursively in sorted order so the byte stream,
and with it every run, is reproducible.

Truncated BPTT wants each row of a batch to be a *continuation* of the same row of the previous batch,
so the recurrent state can be carried across chunks. ``LaneBatches`` therefore cuts the stream into B
contiguous lanes and walks all lanes forward together, T bytes at a time.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..checks import check
from ..errors import InputError

#: How much of a file's head is looked at to decide it is binary (the heuristic git uses: a NUL byte).
_SNIFF_BYTES = 8192


def _is_text_like(path: str) -> bool:
    """Text-like = no NUL byte in the first 8 KiB (binary files, images, .npz, .pyc are skipped)."""
    with open(path, "rb") as f:
        return b"\x00" not in f.read(_SNIFF_BYTES)


def _matches(rel: str, patterns, folders: bool) -> bool:
    """Whether the path ``rel`` (relative to the data root, ``/``-separated) matches one of ``patterns``.

    A pattern holding a ``/`` is matched (``fnmatch``, where ``*`` also crosses ``/``) against the whole
    relative path; one without is matched against the file name and, when ``folders``, against the name of
    every folder on the way (so ``--exclude test`` drops every ``test/`` folder at any depth).
    """
    parts = rel.split("/")
    for pat in patterns:
        if "/" in pat:
            if fnmatch.fnmatchcase(rel, pat.strip("/")):
                return True
        elif any(fnmatch.fnmatchcase(name, pat) for name in (parts if folders else parts[-1:])):
            return True
    return False


def list_text_files(path: str, include=None, exclude=None) -> list[str]:
    """The text-like files under ``path`` (itself if a file), recursively, sorted; hidden names skipped.

    ``include`` (glob patterns): keep only files whose name (or relative path, for a pattern with a
    ``/``) matches one of them. ``exclude``: drop files whose name, any of whose folders' names, or whose
    relative path matches one of them. Both only filter the files of a folder; a single file named
    directly is read as is.
    """
    if os.path.isfile(path):
        return [path]
    include, exclude = list(include or ()), list(exclude or ())
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if include and not _matches(rel, include, folders=False):
                continue
            if exclude and _matches(rel, exclude, folders=True):
                continue
            if not name.startswith(".") and os.path.isfile(full) and _is_text_like(full):
                found.append(full)
    return found


def load_bytes(path: str | os.PathLike, include=None, exclude=None) -> np.ndarray:
    """A text file, or every text-like file of a folder concatenated, as a uint8 array of byte ids.

    A single file is read as is (even if it looks binary: the caller named it). ``include`` / ``exclude``
    are glob patterns that select a folder's files (see :func:`list_text_files`). Raises InputError for a
    missing path, a folder without (matching) text files, or no bytes at all.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"data path {path!r} does not exist: give a text file or a folder of text files")
    files = list_text_files(path, include, exclude)
    if not files:
        filters = ""
        if include or exclude:
            filters = f" matching include {list(include or [])} / exclude {list(exclude or [])}"
        raise InputError(f"data folder {path!r} holds no text files{filters} "
                         "(hidden and binary files are skipped)")
    chunks = []
    for name in files:
        with open(name, "rb") as f:
            chunks.append(f.read())
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    if data.size == 0:
        raise InputError(
            f"data path {path!r} is empty ({len(files)} file(s), 0 bytes): nothing to train on"
        )
    return data


def as_byte_array(data) -> np.ndarray:
    """Accept bytes, a str (UTF-8 encoded), or an integer array of byte ids; return uint8."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    arr = np.asarray(data)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"byte data must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InputError(f"byte ids must lie in 0..255, got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint8, copy=False)


def split_bytes(data: np.ndarray, held_out_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """First ``1 − f`` of the byte stream for training, the last ``f`` held out.

    The split is on the concatenated stream (not per file), so held-out text is text the model has never
    seen a byte of, and the held-out part of a folder is its last files.
    """
    check("held_out_fraction", held_out_fraction)
    n_held = int(round(len(data) * held_out_fraction))
    n_train = len(data) - n_held
    return data[:n_train], data[n_train:]


def fingerprint(data: np.ndarray) -> str:
    """A short content hash: a resumed run checks it is still reading the same bytes."""
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()[:16]


@dataclass
class Batch:
    """One chunk: ``inputs`` and ``targets`` [B, T] int64; ``reset`` when every lane starts over;
    ``weights`` [B, T], the targets' loss weights, or None (all 1); ``sources`` and ``asks`` [B, T] int, the
    input positions that read a task's value byte k and the one that writes it, both marked k (the read-target
    term's ids; 0 elsewhere), or None."""

    inputs: np.ndarray
    targets: np.ndarray
    reset: bool
    weights: np.ndarray | None = None
    sources: np.ndarray | None = None
    asks: np.ndarray | None = None


class LaneBatches:
    """B parallel lanes over a byte stream, read T bytes at a time, forever (wrapping around).

    Lane b is ``data[b·L : (b+1)·L]`` with ``L = len(data) // B`` (the last ``len(data) mod B`` bytes are
    unused). Chunk c of a lane is ``inputs = lane[cT : cT+T]``, ``targets = lane[cT+1 : cT+T+1]``: the
    next chunk starts where this one's inputs ended, so a state carried over continues the same text.
    When the next chunk would run past the lane's end, every lane wraps to its start together
    (``reset=True``: the caller resets the carried state) and ``epoch`` grows by one.

    ``position`` (``{"offset": int, "epoch": int}``) is all that is needed to resume exactly.
    """

    def __init__(self, data, batch_size: int, seq_len: int, position: dict | None = None):
        self.data = as_byte_array(data)
        if batch_size < 1 or seq_len < 1:
            raise InputError(f"batch_size = {batch_size} and seq_len = {seq_len} must both be >= 1")
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.lane_len = len(self.data) // self.batch_size
        if self.lane_len < self.seq_len + 1:
            need = self.batch_size * (self.seq_len + 1)
            raise InputError(
                f"training data has {len(self.data)} bytes: too few for {self.batch_size} lanes of "
                f"seq_len {self.seq_len} (needs at least batch_size·(seq_len+1) = {need}); "
                "use more data or lower --batch-size / --seq-len"
            )
        self.lanes = self.data[: self.lane_len * self.batch_size].reshape(self.batch_size, self.lane_len)
        self.offset, self.epoch = 0, 0
        if position is not None:
            self.position = position

    @property
    def chunks_per_epoch(self) -> int:
        return (self.lane_len - 1) // self.seq_len

    @property
    def position(self) -> dict:
        return {"offset": int(self.offset), "epoch": int(self.epoch)}

    @position.setter
    def position(self, value: dict) -> None:
        try:
            offset, epoch = int(value["offset"]), int(value["epoch"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"data position {value!r} must be {{'offset': int, 'epoch': int}}") from None
        if not 0 <= offset < self.lane_len or epoch < 0:
            raise InputError(f"data position {value!r} is outside lanes of {self.lane_len} bytes")
        self.offset, self.epoch = offset, epoch

    def next_batch(self) -> Batch:
        """The next chunk of every lane (wrapping, with ``reset=True``, when a lane is used up)."""
        if self.offset + self.seq_len + 1 > self.lane_len:
            self.offset, self.epoch = 0, self.epoch + 1
        start = self.offset
        window = self.lanes[:, start : start + self.seq_len + 1].astype(np.int64)
        self.offset = start + self.seq_len
        return Batch(inputs=window[:, :-1], targets=window[:, 1:], reset=start == 0)

    def __iter__(self):
        while True:
            yield self.next_batch()


def eval_lanes(data, lanes: int, max_bytes: int | None = None) -> np.ndarray:
    """The evaluation stream as [L, n] contiguous lanes (L ≤ lanes, each lane at least 2 bytes).

    Used by bits-per-byte evaluation: lanes run in parallel with their own carried state; the
    ``len mod L`` tail bytes are dropped. ``max_bytes`` keeps only the head of the stream.
    """
    data = as_byte_array(data)
    if max_bytes is not None:
        data = data[:check("max_bytes", max_bytes, fix="one byte of context, one to predict")]
    check("eval_lanes", lanes, name="lanes")
    if len(data) < 2:
        raise InputError(f"evaluation data has {len(data)} byte(s): need at least 2")
    n_lanes = max(1, min(int(lanes), len(data) // 2))
    lane_len = len(data) // n_lanes
    return data[: n_lanes * lane_len].reshape(n_lanes, lane_len).astype(np.int64)
