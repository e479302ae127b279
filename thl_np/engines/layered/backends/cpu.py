"""Device "cpu": "device" arrays are NumPy arrays from a pool that counts bytes.

Streamed weights are copied from (memory-mapped) host arrays into two slot buffers by one worker thread,
so the next module's copy overlaps the current module's compute, as on a GPU. Temporaries that a
component function allocates are covered by a *workspace reservation* the engine takes around each
module (an upper bound derived from the shapes; the tests check it against ``tracemalloc``); the arrays
a module keeps are then *adopted* (counted until they are freed).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import time
import weakref

import numpy as np

from ..units import available_host_memory
from .accounting import PROFILES, Meter


class NumpyBackend:
    """Device "cpu": device arrays are NumPy arrays from a byte-counting pool (see the module docstring)."""

    device = "cpu"
    profile = PROFILES["cpu"]
    xp = np

    def __init__(self, budget=None, overlap: bool = True):
        self.budget = available_host_memory() if budget is None else int(budget)
        self.meter = Meter(self.budget)
        self._owned: dict[int, weakref.ref] = {}
        self._executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="thl-np-layered-copy")
                          if overlap else None)

    # ----------------------------------------------------------------- memory
    def _register(self, arr: np.ndarray) -> None:
        key, n = id(arr), arr.nbytes
        self._owned[key] = weakref.ref(arr)
        weakref.finalize(arr, self._release, key, n)

    def _release(self, key: int, n: int) -> None:
        self._owned.pop(key, None)
        self.meter.credit(n)

    @staticmethod
    def _root(arr):
        while isinstance(getattr(arr, "base", None), np.ndarray):
            arr = arr.base
        return arr

    def owns(self, arr) -> bool:
        """True if ``arr`` (or the array it views) was allocated from this pool."""
        if not isinstance(arr, np.ndarray):
            return False
        root = self._root(arr)
        ref = self._owned.get(id(root))
        return ref is not None and ref() is root

    def empty(self, shape, dtype, what="an array") -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.meter.charge(n, what)
        arr = np.empty(shape, dtype)
        self._register(arr)
        return arr

    def asarray(self, host, dtype=None, what="an array") -> np.ndarray:
        """A pool copy of a host array (always a copy: the caller's array is never aliased)."""
        host = np.asarray(host)
        out = self.empty(host.shape, dtype or host.dtype, what)
        np.copyto(out, host, casting="unsafe" if dtype is not None else "no")
        return out

    def adopt(self, *arrays) -> None:
        """Count arrays that a component function allocated (they outlive the module that made them)."""
        for a in arrays:
            if not isinstance(a, np.ndarray):
                continue
            root = self._root(a)
            if not isinstance(root, np.ndarray) or isinstance(root, np.memmap) or self.owns(root):
                continue
            self.meter.charge(root.nbytes, "a module's output")
            self._register(root)

    @contextlib.contextmanager
    def workspace(self, nbytes: int, what="a module's workspace"):
        """Reserve ``nbytes`` for the temporaries of the code inside the block."""
        self.meter.charge(int(nbytes), what)
        try:
            yield
        finally:
            self.meter.credit(int(nbytes))

    def to_host(self, arr) -> np.ndarray:
        return np.array(arr, copy=True)

    to_numpy = staticmethod(np.asarray)

    @contextlib.contextmanager
    def activate(self):
        yield

    def begin_step(self) -> None:
        pass

    @property
    def current_bytes(self) -> int:
        return self.meter.current

    @property
    def peak_bytes(self) -> int:
        return self.meter.peak

    def reset_peak(self) -> None:
        self.meter.peak = self.meter.current

    # ----------------------------------------------------------------- streaming
    def alloc_slot(self, nbytes: int) -> np.ndarray:
        return self.empty((int(nbytes),), np.uint8, what="a stream slot")

    @staticmethod
    def view(slot, offset: int, dtype, shape):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return slot[offset:offset + n].view(dtype).reshape(shape)

    def _copy_parts(self, slot, parts):
        for offset, src in parts:
            np.copyto(self.view(slot, offset, src.dtype, src.shape), src)

    def copy_to_slot(self, slot, parts, after=None):
        """Start copying ``parts`` [(offset, host array)] into ``slot``; returns a ticket for wait_copy.
        ``after`` is the event that marks the slot's previous user done (unused on the CPU: compute is
        synchronous, so the slot is free by the time the copy is issued)."""
        if self._executor is None:
            self._copy_parts(slot, parts)
            return None
        return self._executor.submit(self._copy_parts, slot, parts)

    @staticmethod
    def wait_copy(ticket) -> None:
        if ticket is not None:
            ticket.result()

    @staticmethod
    def record_done():
        return None

    def synchronize(self) -> None:
        pass

    def measure_copy_bandwidth(self, nbytes: int = 256 << 20, repeats: int = 3, source=None) -> float:
        """Host→"device" copy bandwidth in bytes/s, best of ``repeats``: a memcpy of ``nbytes`` from
        ``source`` (e.g. a memory-mapped weight, as streaming reads it) or from a RAM buffer. The
        destination is a scratch buffer outside the pool."""
        if source is None:
            src = np.ones(nbytes, np.uint8)
        else:
            flat = np.asarray(source).reshape(-1).view(np.uint8)
            src = flat[:min(nbytes, flat.size)]
            nbytes = src.size
        dst = np.empty(nbytes, np.uint8)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def describe(self) -> str:
        return "cpu (NumPy arrays from a counted pool)"
