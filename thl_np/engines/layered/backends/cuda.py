"""Device "cuda" (optional extra ``thl-np[cuda]``): CuPy arrays from a private memory pool.

Every engine allocation goes through a private ``cupy.cuda.MemoryPool`` whose limit is the budget, and a
memory hook records the pool's peak of used bytes, temporaries included. Host→device copies run on a
side stream through two pinned staging buffers. CuPy is imported here, lazily (``import_cupy``), and
nowhere else in the library: this module imports without it. Written against CuPy 12/13's documented
API; without a GPU the tests run it on a NumPy stand-in for CuPy.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading

import numpy as np

from ....errors import InputError
from .accounting import PROFILES, DeviceBudgetError


def import_cupy():
    """Import CuPy (the optional ``[cuda]`` extra), or raise InputError saying how to get it."""
    try:
        import cupy  # noqa: PLC0415 - the one place the library imports CuPy, lazily
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise InputError(
            f"device='cuda' needs CuPy with a working CUDA setup ({type(exc).__name__}: {exc}); install it "
            "with pip install 'thl-np[cuda]', or use device='cpu'") from None
    return cupy


def cuda_available() -> bool:
    """True if CuPy imports and sees at least one CUDA device."""
    try:
        cp = import_cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


class CupyBackend:
    """Device "cuda": CuPy arrays from a private memory pool limited to the budget (see the module docstring).

    Streaming: a worker thread copies each piece from (memory-mapped) host memory into one of two pinned
    staging buffers, then issues ``cudaMemcpyAsync`` on a side stream into the device slot; the compute
    stream waits on an event recorded after the last copy; the copy stream waits, before overwriting a
    slot, on an event the compute stream recorded after the slot's previous user.
    """

    device = "cuda"
    profile = PROFILES["cuda"]
    STAGE_BYTES = 64 << 20

    def __init__(self, budget=None, device_id: int = 0, overlap: bool = True):
        cp = self.cp = self.xp = import_cupy()
        try:
            self.cuda_device = cp.cuda.Device(device_id)
            with self.cuda_device:            # cudaSetDevice: fails here for a device that is not there
                pass
        except Exception as exc:
            raise InputError(f"CUDA device {device_id} is not usable ({type(exc).__name__}: {exc})") from None
        with self.cuda_device:
            if budget is None:
                free, _total = cp.cuda.runtime.memGetInfo()
                budget = int(free * 0.95)  # leave room for cuBLAS/CUB workspaces outside the pool
            self.budget = int(budget)
            self.pool = cp.cuda.MemoryPool()
            self.pool.set_limit(size=self.budget)
            self.compute_stream = cp.cuda.Stream(non_blocking=True)
            self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self._peak = 0
        self._hook = self._make_hook()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="thl-np-layered-h2d")
        self._overlap = overlap
        self._stages = None       # two pinned staging buffers and their "free again" events
        self._stage_next = 0
        self._slot_bytes = 0
        self._active = threading.local()

    def _make_hook(self):
        backend = self

        class _PeakHook(self.cp.cuda.MemoryHook):
            name = f"thl_np_layered_peak_{id(backend)}"

            def malloc_postprocess(self, **kwargs):
                backend._peak = max(backend._peak, backend.pool.used_bytes())

        return _PeakHook()

    # ----------------------------------------------------------------- memory
    @contextlib.contextmanager
    def activate(self):
        """Device, compute stream, this pool as allocator and the peak hook, for the block (re-entrant)."""
        cp = self.cp
        if getattr(self._active, "depth", 0):
            yield
            return
        with contextlib.ExitStack() as stack:
            self._active.depth = 1
            stack.callback(setattr, self._active, "depth", 0)
            stack.enter_context(self.cuda_device)
            stack.enter_context(self.compute_stream)
            stack.enter_context(cp.cuda.using_allocator(self.pool.malloc))
            stack.enter_context(self._hook)
            try:
                yield
            except cp.cuda.memory.OutOfMemoryError as exc:
                raise DeviceBudgetError(
                    f"device budget exceeded: the engine's memory pool hit its limit of {self.budget:,} "
                    f"bytes ({exc}); raise vram_budget", budget=self.budget) from None

    def begin_step(self) -> None:
        self._peak = max(self._peak, self.pool.used_bytes())

    def owns(self, arr) -> bool:
        return isinstance(arr, self.cp.ndarray) and arr.device.id == self.cuda_device.id

    def empty(self, shape, dtype, what="an array"):
        with self.activate():
            return self.cp.empty(shape, dtype)

    def asarray(self, host, dtype=None, what="an array"):
        cp = self.cp
        with self.activate():
            if isinstance(host, cp.ndarray):
                return host.astype(dtype or host.dtype, copy=True)
            host = np.ascontiguousarray(host, dtype=dtype)
            out = cp.empty(host.shape, host.dtype)
            out.set(host, stream=self.compute_stream)
            return out

    def adopt(self, *arrays) -> None:
        pass  # every allocation is already in the pool's count

    @contextlib.contextmanager
    def workspace(self, nbytes: int, what="a module's workspace"):
        yield  # temporaries are real pool allocations, measured by the hook

    def to_host(self, arr) -> np.ndarray:
        if isinstance(arr, self.cp.ndarray):
            return arr.get(stream=self.compute_stream)
        return np.array(arr, copy=True)

    def to_numpy(self, arr) -> np.ndarray:
        return self.to_host(arr)

    @property
    def current_bytes(self) -> int:
        return int(self.pool.used_bytes())

    @property
    def peak_bytes(self) -> int:
        return max(self._peak, self.current_bytes)

    def reset_peak(self) -> None:
        self._peak = self.current_bytes

    # ----------------------------------------------------------------- streaming
    def alloc_slot(self, nbytes: int):
        self._slot_bytes = max(self._slot_bytes, int(nbytes))
        return self.empty((int(nbytes),), np.uint8, what="a stream slot")

    def view(self, slot, offset: int, dtype, shape):
        return self.cp.ndarray(shape, dtype=dtype, memptr=slot.data + int(offset))

    def _ensure_stages(self, nbytes):
        """Two pinned buffers of min(largest slot, STAGE_BYTES): host memory, outside the device budget."""
        cp = self.cp
        size = int(max(1, min(max(nbytes, self._slot_bytes), self.STAGE_BYTES)))
        if self._stages is None or self._stages[0][0].nbytes < size:
            self.copy_stream.synchronize()   # nothing may still be reading the old buffers
            stages = []
            for _ in range(2):
                mem = cp.cuda.alloc_pinned_memory(size)
                stages.append((np.ndarray((size,), np.uint8, buffer=mem), mem, None))
            self._stages = stages

    def _upload(self, slot, parts, after):
        """Worker thread: host → pinned staging → device slot on the copy stream; returns the ready event."""
        cp = self.cp
        with self.cuda_device:
            if after is not None:
                self.copy_stream.wait_event(after)
            total = sum(src.nbytes for _, src in parts)
            self._ensure_stages(max(total, 1))
            for offset, src in parts:
                flat = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
                pos = 0
                while pos < flat.nbytes:
                    buf, mem, free_event = self._stages[self._stage_next]
                    if free_event is not None:
                        free_event.synchronize()       # the last copy out of this staging buffer is done
                    m = min(buf.nbytes, flat.nbytes - pos)
                    np.copyto(buf[:m], flat[pos:pos + m])
                    cp.cuda.runtime.memcpyAsync(slot.data.ptr + offset + pos, buf.ctypes.data, m,
                                                cp.cuda.runtime.memcpyHostToDevice, self.copy_stream.ptr)
                    ev = cp.cuda.Event(disable_timing=True)
                    ev.record(self.copy_stream)
                    self._stages[self._stage_next] = (buf, mem, ev)
                    self._stage_next ^= 1
                    pos += m
            ready = cp.cuda.Event(disable_timing=True)
            ready.record(self.copy_stream)
            if not self._overlap:
                ready.synchronize()
            return ready

    def copy_to_slot(self, slot, parts, after=None):
        return self._executor.submit(self._upload, slot, parts, after)

    def wait_copy(self, ticket) -> None:
        if ticket is not None:
            ready = ticket.result()
            self.compute_stream.wait_event(ready)

    def record_done(self):
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.compute_stream)
        return ev

    def synchronize(self) -> None:
        self.compute_stream.synchronize()
        self.copy_stream.synchronize()

    def measure_copy_bandwidth(self, nbytes: int = 256 << 20, repeats: int = 5, source=None) -> float:
        """Pinned host → device bandwidth on the copy stream, bytes/s (best of ``repeats``); the
        ``cudaMemcpyAsync`` leg of streaming (``source`` is ignored). The buffers come from CuPy's default
        pool, outside the engine's budget and peak."""
        cp = self.cp
        with self.cuda_device:
            mem = cp.cuda.alloc_pinned_memory(nbytes)
            host = np.ndarray((nbytes,), np.uint8, buffer=mem)
            host[:] = 1
            dev = cp.empty(nbytes, np.uint8)
            best = float("inf")
            for _ in range(repeats):
                start, stop = cp.cuda.Event(), cp.cuda.Event()
                start.record(self.copy_stream)
                cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, nbytes,
                                            cp.cuda.runtime.memcpyHostToDevice, self.copy_stream.ptr)
                stop.record(self.copy_stream)
                stop.synchronize()
                best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3)
            del dev, host, mem
            cp.get_default_memory_pool().free_all_blocks()
        return nbytes / best

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with contextlib.suppress(Exception):
            self.synchronize()
        self._stages = None

    def describe(self) -> str:
        name = "?"
        with contextlib.suppress(Exception):
            name = self.cp.cuda.runtime.getDeviceProperties(self.cuda_device.id)["name"].decode()
        return f"cuda:{self.cuda_device.id} ({name}; CuPy {self.cp.__version__})"
