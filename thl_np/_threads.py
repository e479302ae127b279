"""How many threads the Numba kernels run on, and how their idle workers wait.

Measured on a 2-core machine with one other CPU-bound process: Numba's OpenMP workers spin while they
wait for the next parallel kernel (about 8 ms each time), so on a busy machine each kernel waited for a
worker that the scheduler had given to the other process (a 4,096-byte prompt: 56 s with the default
threads, 1.8 s on one thread; ``eval``: 55 bytes/s, 3,300 with ``OMP_WAIT_POLICY=passive``). Three rules:

- **Idle workers sleep soon** (``configure_runtime``, run by ``thl_np/__init__`` before anything imports
  Numba): GNU OpenMP's workers spin briefly after a kernel, then sleep (``GOMP_SPINCOUNT=20000``, against
  libgomp's default of 300,000, which spins for milliseconds); Intel's and LLVM's sleep at once
  (``KMP_BLOCKTIME=0``); and the OpenMP layer first (``omp tbb workqueue``): its launch costs ~10-50 µs,
  the work-queue layer's ~80. A value the user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``,
  ``KMP_BLOCKTIME``) is never changed. Why a short spin rather than none: a decode step is ~20 kernels a
  few microseconds apart, and a worker that has just gone to sleep must be woken for each. Measured on
  the 2-core VM, default config, ``thl-np bench`` batch 8, same hour: passive 0.82-0.84 of the bandwidth
  bound, the short spin 0.85-0.89; ``benchmarks/bench_busy.py`` beside one busy process gave the same
  busy throughputs either way (the automatic count gives a busy machine's step one thread, rule 3, so no
  worker spins against the other process). With two threads forced (``THL_NP_THREADS=2``) beside a busy
  process the short spin was 1.6-5x slower than passive (default config and a 100 MB model): there,
  set ``OMP_WAIT_POLICY=PASSIVE``.
- **Kernels too small to gain from threads run on one**: a decode step whose weights and bank scan come
  to less than ``BYTES_PER_THREAD`` per thread gets fewer threads (the shipped model, and any model
  under ~100 MB: one); a second thread pays only where each kernel's half of the work outlasts waking a
  worker, about a dozen times a step.
- **A busy machine costs at most its share**: the step uses only the cores that other processes leave
  idle (the runnable threads of other processes, read from /proc/loadavg at once, not the lagging load
  average), re-read every ``RECHECK_S`` seconds. A kernel split over a core that another process holds
  waits for that core's time slice; on the cores left it does not.

``THL_NP_THREADS`` (a positive integer, or ``auto``) or ``set_threads(n)`` (the CLI's ``--threads``)
fixes the count instead. The training step runs its kernels on one thread (``training.fast_grad``) and
so is unaffected; the decoders (generation, evaluation, prompts) use ``StepThreads``, and so does the
plain path for OpenBLAS (its workers spin too: ``thl-np generate`` of 100 bytes on the shipped model, one
other process running, took 2.6-2.9 s with OpenBLAS's default threads, 0.6 s on one).
"""
from __future__ import annotations

import glob
import os
import sys
import time
from contextlib import contextmanager

ENV = "THL_NP_THREADS"
# A step whose work (FastDecoder._step_bytes: its weights, twice for a batch of 2 or more, which does more
# arithmetic per byte, and the bank it scans) comes to less than this per thread gets fewer threads.
# Measured on the 2-core VM of the README (medians of alternating steps, 1 vs 2 passive threads): 2 threads
# were slower below ~90 MB at batch 1 (0.35-0.88x for 10-87 MB models) and ~40 MB at batch 8 (0.5-0.8x for
# 12-45 MB, 1.2-1.4x at 102 MB), faster for the default config (505 MB: 1.06-1.6x).
BYTES_PER_THREAD = 96 << 20
GNU_SPIN_COUNT = "20000"  # iterations a GNU OpenMP worker spins before it sleeps (see the docstring)
RECHECK_S = 1.0             # how often a decoder re-reads how busy the machine is
_override: int | None = None


def configure_runtime() -> None:
    """Before Numba's first import: OpenMP workers that sleep when idle, the OpenMP layer first, and a
    pool large enough for a THL_NP_THREADS above the core count. Values the user set are kept. When Numba
    is already imported and has not started its threads, its settings are changed instead."""
    env = os.environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = GNU_SPIN_COUNT
    env.setdefault("KMP_BLOCKTIME", "0")
    layer_set = "NUMBA_THREADING_LAYER" in env or "NUMBA_THREADING_LAYER_PRIORITY" in env
    if not layer_set:
        env["NUMBA_THREADING_LAYER_PRIORITY"] = "omp tbb workqueue"
    try:
        n = _from_env()
    except ValueError:
        n = None  # reported when a count is first needed, not at import
    if n is not None and n > cores() and "NUMBA_NUM_THREADS" not in env:
        env["NUMBA_NUM_THREADS"] = str(n)
    if "numba" in sys.modules and not layer_set:  # imported before thl_np: too late for the environment
        try:
            from numba.core import config
            from numba.np.ufunc import parallel

            if not parallel._is_initialized:
                config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
        except (ImportError, AttributeError):  # another Numba version: leave it as it is
            pass


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _from_env() -> int | None:
    text = os.environ.get(ENV, "").strip().lower()
    if text in ("", "auto", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"{ENV} = {os.environ[ENV]!r}: use a positive number of threads, or 'auto'")
    return n


def requested() -> int | None:
    """The thread count the user fixed (``set_threads`` or ``THL_NP_THREADS``), or None for automatic."""
    if _override is not None:
        return _override
    try:
        return _from_env()
    except ValueError as exc:
        from .errors import InputError

        raise InputError(str(exc)) from None


def set_threads(n: int | None) -> None:
    """Fix the kernels' thread count (None: automatic again). Also sets ``THL_NP_THREADS`` so that
    processes started from this one (MPI ranks, benchmarks) follow it."""
    global _override
    if n is not None:
        from .errors import InputError

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"threads = {n!r}: use a positive number of threads (or None for automatic)")
        os.environ[ENV] = str(n)
    else:
        os.environ.pop(ENV, None)
    _override = n


def others_running() -> int:
    """Runnable threads of other processes right now (Linux: /proc/loadavg's running count less this
    process's running threads, the smallest of three reads 0.5 ms apart so that a passing process does
    not count); elsewhere the one-minute load average, rounded down."""
    try:
        seen = []
        for i in range(3):
            if i:
                time.sleep(0.0005)
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            seen.append(running - _own_running())
        return max(0, min(seen))
    except (OSError, ValueError, IndexError):
        try:
            return int(os.getloadavg()[0])
        except (OSError, AttributeError):
            return 0


def _own_running() -> int:
    n = 0
    for path in glob.glob("/proc/self/task/*/stat"):
        try:
            with open(path) as f:
                text = f.read()
            n += text[text.rindex(")") + 2] == "R"
        except (OSError, ValueError, IndexError):
            pass
    return max(n, 1)


def pool_size() -> int:
    """The most threads Numba can run a kernel on (NUMBA_NUM_THREADS, the cores by default; the cores
    where Numba is not installed, for the plain path's BLAS)."""
    try:
        from numba.core import config
    except ImportError:
        return cores()
    return int(config.NUMBA_NUM_THREADS)


def _numba_threads() -> int:
    try:
        import numba
    except ImportError:
        return cores()
    return numba.get_num_threads()


def choose(work_bytes: float, busy: int | None = None) -> int:
    """The thread count for a step that streams ``work_bytes``: the user's count if fixed, else the
    smallest of the cores, the work cap (one thread per BYTES_PER_THREAD) and the cores other processes
    leave idle (``busy``: their runnable threads, read now if None)."""
    n = requested()
    if n is not None:
        return min(n, pool_size())
    cap = max(1, int(work_bytes // BYTES_PER_THREAD))
    # numba.get_num_threads(): the count the caller set (numba.set_num_threads, or the MPI ranks' share in
    # thl_np.training.distributed), the pool's size by default
    here = min(cores(), _numba_threads(), cap)
    if here == 1:
        return 1
    if busy is None:
        busy = others_running()
    return max(1, min(here, cores() - busy))


class StepThreads:
    """The thread count of one decoder's steps (``choose`` for its work), re-chosen every RECHECK_S
    seconds; ``with threads.applied():`` runs the block's Numba kernels on it."""

    def __init__(self, work_bytes: float):
        self.work_bytes = float(work_bytes)
        self._n = 1
        self._until = -1.0

    @property
    def count(self) -> int:
        now = time.monotonic()
        if now >= self._until:
            self._n = choose(self.work_bytes)
            self._until = now + RECHECK_S
        return self._n

    @contextmanager
    def applied(self):
        import numba

        n = self.count
        old = numba.get_num_threads()
        if n == old:
            yield n
            return
        numba.set_num_threads(n)
        try:
            yield n
        finally:
            numba.set_num_threads(old)


configure_runtime()  # on import: thl_np/__init__ imports this module before anything imports Numba
