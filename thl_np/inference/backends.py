"""Array backends for the layered engine (``thl_np.inference.layered``): where "device" arrays live, how
they are counted against the budget, how weights get there, and the few math ops the engine runs there.

Two backends, one interface, one engine code path:

- ``NumpyBackend`` (device ``"cpu"``): "device" arrays are ordinary NumPy arrays drawn from a pool that
  counts bytes. Streamed weights are copied from (memory-mapped) host arrays into two slot buffers by
  one worker thread, so the next module's copy overlaps the current module's compute, as on a GPU.
  Temporaries that a component function allocates are covered by a *workspace reservation* the engine
  takes around each module (an upper bound derived from the shapes; the tests check it against
  ``tracemalloc``); the arrays a module keeps are then *adopted* (counted until they are freed).
- ``CupyBackend`` (device ``"cuda"``, optional extra ``thl-np[cuda]``): every engine allocation goes
  through a private ``cupy.cuda.MemoryPool`` whose limit is the budget, and a memory hook records the
  pool's peak of used bytes, temporaries included. Host→device copies run on a side stream through two
  pinned staging buffers. CuPy is imported here, lazily, and nowhere else in the library.

Math: on the NumPy backend the engine calls the ``thl_np.components`` component functions themselves. On
CuPy, the components whose NumPy calls CuPy dispatches correctly (``__array_function__`` /
``__array_ufunc__``: local attention, the GRU cell, LayerNorm, linear) are called as they are; the
router, read metadata, writer and memory write use NumPy constructs CuPy does not take (``np.add.at``,
``np.argsort(kind="stable")``, arrays created with ``np.zeros``/``np.arange`` mixed with device arrays, a
per-sequence Python loop), so they have backend-generic variants below, written against an array module
``xp``. With ``xp = numpy`` each variant returns bit-for-bit what its ``thl_np.components`` original returns
(``tests/test_layered.py`` checks this), so the CuPy path's logic is tested on machines without a GPU.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..components.gru import gru_forward
from ..components.local_attention import local_attention_forward
from ..components.output import layer_norm_forward, linear_forward
from ..components.router import apply_slot_capacity, read_meta_forward, router_forward
from ..components.writer import EMPTY_NORM, memory_write_forward, writer_forward
from ..errors import ConfigError, InputError

ALIGN = 256  # byte alignment of each tensor inside a stream slot


class DeviceBudgetError(ConfigError):
    """The device budget is too small for the plan, or an allocation would take the device past it.

    ``minimum`` is the smallest budget (bytes) that works for this model and batch size, when known.
    """

    def __init__(self, message, budget=None, minimum=None):
        super().__init__(message)
        self.budget = budget
        self.minimum = minimum


# ---------------------------------------------------------------------------------------------------
# Byte sizes
# ---------------------------------------------------------------------------------------------------
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")


def parse_bytes(value, name: str = "vram_budget") -> int:
    """A byte count from an int (bytes) or a string such as "64MB", "1.5 GB", "512MiB", "4gb".

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (units are case-insensitive).
    Raises InputError for anything else, or for a size below one byte.
    """
    hint = "give bytes as an int or a string such as '64MB', '1.5GB' or '512MiB'"
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} = {value!r} is not a size: {hint}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise InputError(f"{name} = {value!r} is not a size: {hint}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(3).lower() if m else None
        if m is None or unit not in _UNITS:
            raise InputError(f"{name} = {value!r} is not a size: {hint} (units: B, KB, MB, GB, TB, KiB, MiB, "
                             "GiB, TiB)")
        number = float(m.group(1)) * (10.0 ** int(m.group(2)) if m.group(2) else 1.0)
        if not math.isfinite(number):
            raise InputError(f"{name} = {value!r} is not a size: {hint}")
        n = int(number * _UNITS[unit])
    else:
        raise InputError(f"{name} = {value!r} ({type(value).__name__}) is not a size: {hint}")
    if n < 1:
        raise InputError(f"{name} = {value!r} is {n} bytes: a budget must be at least 1 byte; {hint}")
    return n


def format_bytes(n: int) -> str:
    """1234567 → '1.2 MB' (powers of 1000, as parse_bytes reads them)."""
    n = int(n)
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-int(n) // a) * a


def available_host_memory() -> int:
    """Available RAM in bytes (MemAvailable), for a CPU engine with no budget; a large number if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 60


# ---------------------------------------------------------------------------------------------------
# Backend-generic variants of spec §4.3, §4.4, §4.6, §4.7 (xp is numpy or cupy)
# ---------------------------------------------------------------------------------------------------
def argsort_stable(xp, a):
    """Indices sorting ``a`` along its last axis; equal keys keep index order (stable).

    NumPy needs kind="stable"; CuPy's sort is always stable and older versions reject ``kind``.
    """
    if xp is np:
        return np.argsort(a, axis=-1, kind="stable")
    return xp.argsort(a, axis=-1)


def router_forward_xp(xp, u, memory, read_ema, W_q, W_k, W_v, *, num_heads, head_dim, topk, load_penalty,
                      capacity=None, to_numpy=np.asarray):
    """Spec §4.3 as ``thl_np.components.router.router_forward`` computes it (eval mode) → (r, alpha, idx).

    Top-κ is a stable argsort of the negated scores (ties to the lower slot); ``+ 0.0`` turns −0.0 into
    +0.0 so a radix sort (CuPy) cannot order the two zeros apart. The capacity walk is a short loop
    over picks: it runs on host copies through ``apply_slot_capacity`` itself.
    """
    B, J, d_m = memory.shape
    H, d_h = num_heads, head_dim
    q = (u @ W_q.T).reshape(B, H, d_h)
    # as thl_np.components.router.slot_scores: m_j·(W_k,h^T q_h), so identical rows get identical scores
    q_mem = xp.einsum("bhd,hdm->bhm", q, W_k.reshape(H, d_h, d_m))
    scale = 1.0 / math.sqrt(d_h)
    scores = xp.einsum("bjm,bhm->bhj", memory, q_mem) * scale - load_penalty * read_ema[:, None, :]
    idx = argsort_stable(xp, -scores + 0.0)[..., :topk]
    picked = xp.take_along_axis(scores, idx, axis=-1)
    ex = xp.exp(picked - picked[..., :1])
    alpha = ex / ex.sum(axis=-1, keepdims=True)
    if capacity is not None:
        capped, _, _ = apply_slot_capacity(to_numpy(alpha), to_numpy(idx), capacity)
        alpha = xp.asarray(capped)
    b_ix = xp.arange(B)[:, None, None]
    m_sel = memory[b_ix, idx]                                          # [B, H, κ, d_m]
    v_sel = xp.einsum("bhrm,hvm->bhrv", m_sel, W_v.reshape(H, -1, d_m))
    r = xp.einsum("bhr,bhrv->bhv", alpha, v_sel).reshape(B, -1)
    return r, alpha, idx


def read_meta_forward_xp(xp, read_ema, last_read, alpha, idx, t, decay):
    """Spec §4.4 → (read_ema, last_read). ``A`` is accumulated one pick at a time, in the (head, rank)
    order ``np.add.at`` uses, so the sums are the same bits; within one pick every row adds to its own
    slot, so no scatter has duplicate indices (and nothing depends on atomics)."""
    B, H, kappa = idx.shape
    A = xp.zeros(read_ema.shape, dtype=alpha.dtype)
    rows = xp.arange(B)
    flat_idx = idx.reshape(B, H * kappa)
    flat_alpha = alpha.reshape(B, H * kappa)
    for p in range(H * kappa):
        A[rows, flat_idx[:, p]] += flat_alpha[:, p]
    new_ema = decay * read_ema + (1.0 - decay) * A
    new_last = last_read.copy()
    new_last[rows[:, None, None], idx] = t
    return new_ema, new_last


def writer_forward_xp(xp, x_w, memory, read_ema, last_write, t, W_w, b_w, *, write_slots, clip_max, beta,
                      theta, stale_weight, underuse_weight):
    """Spec §4.6 as ``thl_np.components.writer.writer_forward`` computes it → (w, g, targets), with the
    per-sequence target choice vectorised: one stable argsort of a key per row, where the key is
    0/1 "not empty" (novel with an empty slot: empty slots by index, then the rest by index), or
    −(λ_s·staleness + λ_u·underuse) in float64 (novel, bank full), or −aff (refine)."""
    B, J, _ = memory.shape
    w_raw = x_w @ W_w.T + b_w
    n_raw = xp.sqrt((w_raw * w_raw).sum(axis=1))
    ratio = clip_max / (n_raw + 1e-6)
    clipped = ratio < 1.0
    scale = xp.where(clipped, ratio, 1.0)
    w = w_raw * scale[:, None]
    n_w = xp.sqrt((w * w).sum(axis=1))
    n_m = xp.sqrt((memory * memory).sum(axis=2))                  # [B, J]
    dots = xp.einsum("bjm,bm->bj", memory, w)
    aff = dots / ((n_w[:, None] + 1e-8) * (n_m + 1e-8))
    j_star = xp.argmax(aff, axis=1)                                # first maximum: the lower index
    novelty = 1.0 - aff[xp.arange(B), j_star]
    novel = novelty > theta
    g = xp.where(novel, 1.0 / (1.0 + xp.exp(-beta * (novelty - theta))), 1.0).astype(w.dtype)
    empty = n_m <= EMPTY_NORM
    any_empty = empty.any(axis=1)
    staleness = (t - last_write).astype(xp.float64)
    underuse = 1.0 / (1e-8 + read_ema.astype(xp.float64))
    stale_score = stale_weight * staleness + underuse_weight * underuse
    key = xp.where(any_empty[:, None], (~empty).astype(xp.float64), -stale_score)
    key = xp.where(novel[:, None], key, -aff.astype(xp.float64)) + 0.0
    targets = argsort_stable(xp, key)[:, :write_slots]
    return w, g, targets


def memory_write_forward_xp(xp, memory, write_ema, last_write, targets, g, w, t, *, decay, write_rate,
                            ema_decay):
    """Spec §4.7 as ``thl_np.components.writer.memory_write_forward`` computes it (arrays made with ``xp``)."""
    B = memory.shape[0]
    rows = xp.arange(B)[:, None]
    new_memory = memory * decay
    new_memory[rows, targets] += (write_rate * g)[:, None, None] * w[:, None, :]
    is_target = xp.zeros(write_ema.shape, dtype=write_ema.dtype)
    is_target[rows, targets] = 1.0
    new_write_ema = ema_decay * write_ema + (1.0 - ema_decay) * is_target
    new_last_write = last_write.copy()
    new_last_write[rows, targets] = t
    return new_memory, new_write_ema, new_last_write


@dataclass(frozen=True)
class Ops:
    """The math the engine runs on device arrays, one function per spec §4 component (eval mode)."""

    name: str
    local_attention: Callable   # (e, buffer, Wq, Wk, Wv) → ℓ
    router: Callable            # (u, memory, read_ema, W_q, W_k, W_v, **kw) → (r, alpha, idx)
    read_meta: Callable         # (read_ema, last_read, alpha, idx, t, decay) → (read_ema, last_read)
    gru: Callable               # (s_prev, x, W_z, b_z, W_r, b_r, W_h, b_h) → s_new
    writer: Callable            # (x_w, memory, read_ema, last_write, t, W_w, b_w, **kw) → (w, g, targets)
    memory_write: Callable      # (memory, write_ema, last_write, targets, g, w, t, **kw) → new M, EMA, last
    layer_norm: Callable        # (x, gamma, beta) → h
    linear: Callable            # (x, W, b) → x W^T + b


def nn_ops() -> Ops:
    """The ``thl_np.components`` component functions themselves (the NumPy backend's default)."""
    return Ops(
        name="thl_np.components",
        local_attention=lambda *a: local_attention_forward(*a)[0],
        router=lambda *a, **k: router_forward(*a, **k)[:3],
        read_meta=lambda *a: read_meta_forward(*a)[:2],
        gru=lambda *a: gru_forward(*a)[0],
        writer=lambda *a, **k: writer_forward(*a, **k)[:3],
        memory_write=memory_write_forward,
        layer_norm=lambda x, g, b: layer_norm_forward(x, g, b)[0],
        linear=linear_forward,
    )


def generic_ops(xp, to_numpy=np.asarray) -> Ops:
    """Backend-generic ops over the array module ``xp``: the ``thl_np.components`` functions where CuPy's NumPy
    dispatch covers every call they make, the ``*_xp`` variants above where it does not."""
    return Ops(
        name=f"generic[{xp.__name__}]",
        local_attention=lambda *a: local_attention_forward(*a)[0],
        router=lambda *a, **k: router_forward_xp(xp, *a, to_numpy=to_numpy, **k),
        read_meta=lambda *a: read_meta_forward_xp(xp, *a),
        gru=lambda *a: gru_forward(*a)[0],
        writer=lambda *a, **k: writer_forward_xp(xp, *a, **k),
        memory_write=lambda *a, **k: memory_write_forward_xp(xp, *a, **k),
        layer_norm=lambda x, g, b: layer_norm_forward(x, g, b)[0],
        linear=linear_forward,
    )


# ---------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """How a backend's allocations are sized, for planning (no device needed to compute a plan).

    granularity: every allocation is rounded up to this many bytes. workspace_factor / overhead: slack
    on the planned temporaries, for allocators whose temporaries the NumPy-derived bounds may not cover.
    """

    device: str
    granularity: int = 1
    workspace_factor: float = 1.0
    overhead: int = 0

    def round(self, n: int) -> int:
        return align_up(n, self.granularity) if self.granularity > 1 else int(n)


# CuPy: the pool rounds to 512 bytes; cuBLAS/CUB temporaries and cupy.einsum's transposed copies are not
# modelled by the NumPy-derived bounds, hence the factor and the fixed slack (not measured: no GPU here).
PROFILES = {
    "cpu": Profile("cpu"),
    "cuda": Profile("cuda", granularity=512, workspace_factor=1.5, overhead=8 << 20),
}


class _Meter:
    """Current and peak bytes against a budget (thread-safe: finalizers may run on any thread)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.current = 0
        self.peak = 0
        self._lock = threading.Lock()

    def charge(self, n: int, what: str) -> None:
        with self._lock:
            if self.current + n > self.budget:
                raise DeviceBudgetError(
                    f"device budget exceeded: {what} needs {n:,} bytes with {self.current:,} of "
                    f"{self.budget:,} in use. Device arrays held outside the engine count too (for example "
                    "earlier states: keep only the latest, or move others off with engine.state_to_host); "
                    "otherwise raise vram_budget", budget=self.budget)
            self.current += n
            self.peak = max(self.peak, self.current)

    def credit(self, n: int) -> None:
        with self._lock:
            self.current -= n


# ---------------------------------------------------------------------------------------------------
# NumPy backend
# ---------------------------------------------------------------------------------------------------
class NumpyBackend:
    """Device "cpu": device arrays are NumPy arrays from a byte-counting pool (see the module docstring)."""

    device = "cpu"
    profile = PROFILES["cpu"]
    xp = np

    def __init__(self, budget=None, ops: str = "nn", overlap: bool = True):
        self.budget = available_host_memory() if budget is None else int(budget)
        self.meter = _Meter(self.budget)
        if ops not in ("nn", "generic"):
            raise InputError(f"ops = {ops!r}: use 'nn' (the thl_np.components functions) or 'generic' (the CuPy "
                             "path's ops)")
        self.ops = nn_ops() if ops == "nn" else generic_ops(np)
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
        return f"cpu (NumPy arrays from a counted pool; ops: {self.ops.name})"


# ---------------------------------------------------------------------------------------------------
# CuPy backend (untested here: written against CuPy 12/13's documented API)
# ---------------------------------------------------------------------------------------------------
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

    def __init__(self, budget=None, device_id: int = 0, ops: str = "generic", overlap: bool = True):
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
        if ops not in ("generic",):
            raise InputError(f"ops = {ops!r}: the CuPy backend runs the backend-generic ops ('generic')")
        self.ops = generic_ops(cp, to_numpy=cp.asnumpy)
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
        return f"cuda:{self.cuda_device.id} ({name}; CuPy {self.cp.__version__}; ops: {self.ops.name})"


def make_backend(device: str, budget, ops: str = "auto", overlap: bool = True):
    """The backend for ``device`` ("cpu" or "cuda[:N]")."""
    if not isinstance(device, str):
        raise InputError(f"device = {device!r} must be 'cpu' or 'cuda' (or 'cuda:N')")
    dev = device.strip().lower()
    if dev == "cpu":
        return NumpyBackend(budget, ops="nn" if ops == "auto" else ops, overlap=overlap)
    m = re.fullmatch(r"cuda(?::(\d+))?", dev)
    if m:
        return CupyBackend(budget, device_id=int(m.group(1) or 0), ops="generic" if ops == "auto" else ops,
                           overlap=overlap)
    raise InputError(f"device = {device!r} is not known: use 'cpu' or 'cuda' (or 'cuda:N')")


def profile_for(device: str) -> Profile:
    dev = str(device).strip().lower()
    return PROFILES["cuda" if dev.startswith("cuda") else "cpu"]
