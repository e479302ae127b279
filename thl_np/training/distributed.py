"""Data-parallel training over MPI: ``mpirun -n N thl-np train ...`` trains as one process would.

How a step is shared (the trainer calls the hooks of a ``World``; ``SINGLE``'s are all the identity):

- **Lanes**: rank r of N takes the contiguous block ``[r·B//N, (r+1)·B//N)`` of the batch's B lanes.
  Every rank reads the whole byte stream and keeps its block of each batch; it draws its block of the
  batch's Gumbel uniforms [T, B, H, J] from the run's one seeded generator, advanced past the other
  blocks (``draw_lanes``): what a lane reads and the routing noise it gets do not depend on N.
- **Gradient**: ``value_and_grad`` on a rank's B_r lanes is the mean over its B_r·T positions; scaled by the
  rank's share B_r/B it becomes that rank's part of the mean over the global B·T. The parts of every
  parameter, the loss and the stop flag go into one flat buffer (parameter count + 2 elements, the
  gradients' dtype), and one ``Allreduce`` sums it. Every rank then holds the same gradient and takes the
  same clipping and AdamW step, so all ranks hold the same weights; a one-process run differs only in the
  summation order of the gradient (float64: weights equal to ~1e-15 after 10 steps).
- **Stop**: SIGINT or SIGUSR1 sets a rank's request (MPICH's ``mpirun`` passes Ctrl-C on to every rank;
  Open MPI's ends the ranks on Ctrl-C but passes SIGUSR1 on); the flag summed by the next step's Allreduce
  makes every rank finish that step, checkpoint and stop together. A signal never interrupts a step: the
  other ranks would wait for this one's gradient.
- **Evaluation**: the held-out lanes are split the same way; each rank's cross-entropy sum and byte count
  are summed by one Allreduce, giving one process's bits per byte.
- **Files**: rank 0 alone touches the output folder. It writes checkpoints (the carried state of every lane
  gathered from the ranks), logs and the plot; to resume, it reads the checkpoint and sends its files to
  the other ranks, so only rank 0 needs to see ``--out``. Every rank needs ``--data`` at the same path.
- **Cores**: the ranks on one machine split its cores between their Numba thread pools (the held-out
  evaluation's kernels are parallel; the training step is single-threaded), so one rank per core is the
  layout that uses a machine fully.
- **Failure**: a rank that leaves before its run finished (an error, an exit) calls ``MPI_Abort``, which
  ends every rank at once instead of leaving them waiting in a collective; a rank killed by a signal is
  reaped by the launcher, which ends the job. At start and at each checkpoint the ranks compare digests of
  their weights, data and settings and stop with an error naming what differs.

Outside ``mpirun``, or without mpi4py, ``detect_world`` returns ``SINGLE`` without importing mpi4py: one
process trains exactly as it always did.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np

from ..errors import ConfigError, InputError, StateError
from .data import eval_lanes, fingerprint

#: Environment variables that launchers set in every process they start, with the world's size.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
#: Set by PMIx launchers (Open MPI 5, Slurm with PMIx) to the process's rank.
RANK_VARIABLES = ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
ABORT_GRACE_S = 1.0
"""Seconds a failing rank waits, its output flushed, before MPI_Abort (``World._abort_if_unfinished``)."""
INSTALL_HINT = "pip install 'thl-np[mpi]' (mpi4py and an MPI)"


class World:
    """One process: rank 0 of 1. The trainer's hooks all leave the run as it is."""

    rank, size = 0, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def lanes(self, n: int) -> slice:
        """This rank's contiguous block of ``n`` lanes (the blocks of the ranks differ by at most one)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def start(self) -> None:
        """A run begins: from here until ``finish`` this rank's early exit ends the whole job."""

    def finish(self) -> None:
        """A run ended on this rank; under MPI, wait for the others (rank 0 may still be saving)."""

    def root_value(self, value):
        """Rank 0's ``value`` on every rank."""
        return value

    def restore(self, path: str, load, batch_size: int):
        """``load(path)`` of rank 0's checkpoint on every rank, keeping this rank's lanes of its state."""
        return load(path)

    def agree(self, run, tc, train_bytes, held_len: int) -> None:
        """Check that every rank starts from the same run (weights, optimiser, data, settings)."""

    def draw_uniforms(self, rng, shape):
        """``rng.random(shape)`` (the step's Gumbel uniforms [T, B, H, J]) at this rank's lanes."""
        return rng.random(shape)

    def take_batch(self, inputs, targets):
        """This rank's lanes of the step's inputs and targets [B, T]."""
        return inputs, targets

    def sum_gradients(self, grads: dict, loss: float, batch_size: int) -> float:
        """Replace ``grads`` (this rank's lanes) by the whole batch's gradient; return the batch's loss."""
        return loss

    @contextmanager
    def stop_together(self, stop):
        """The stop request the loop reads (``.requested``): under MPI, the ranks' request agreed at the
        last step's Allreduce, so every rank stops after the same step."""
        yield stop

    def save(self, run, write):
        """``write(run)`` on rank 0 with the whole batch's carried state; its checkpoint path everywhere."""
        return write(run)

    def evaluate(self, evaluate, model, data, seq_len: int, lanes: int, max_bytes):
        """``evaluate(model, data, seq_len, lanes, max_bytes)``, its lanes shared among the ranks."""
        return evaluate(model, data, seq_len, lanes, max_bytes)


SINGLE = World()
_WORLDS: list = []  # the MPI world of this process, once made (MPI is initialised once per process)


def launched_size() -> int | None:
    """The number of processes a launcher (mpirun, mpiexec, srun) started, when it says; else None."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def detect_world(required: bool = False) -> World:
    """The world this process trains in.

    Launched by an MPI launcher with more than one process: the MPI world (mpi4py). Otherwise ``SINGLE``,
    and mpi4py is not even imported. ``required`` (``thl-np train --distributed``): the MPI world even of
    one process, and an error when mpi4py is missing. Raises ConfigError when the launcher started several
    processes but mpi4py is not installed: each would train alone and all would write the same folder.
    """
    size = launched_size()
    rank = next((os.environ[n] for n in RANK_VARIABLES if os.environ.get(n, "").isdigit()), None)
    launched = size is not None or rank is not None
    if not (launched or required):
        return SINGLE
    try:
        from mpi4py import MPI
    except ImportError:
        if required:
            raise ConfigError(f"--distributed needs mpi4py, which is not installed: {INSTALL_HINT}") from None
        if (size or 1) > 1 or (rank is not None and rank != "0"):
            raise ConfigError(
                f"this process was started by an MPI launcher ({size or 'several'} processes) but mpi4py is "
                f"not installed, so each process would train alone into the same folder: {INSTALL_HINT}, "
                "or run without mpirun"
            ) from None
        return SINGLE
    if MPI.COMM_WORLD.Get_size() == 1 and not required:
        return SINGLE
    if not _WORLDS:
        _WORLDS.append(MPIWorld(MPI.COMM_WORLD))
    return _WORLDS[0]


# ---------------------------------------------------------------------- a rank's part of the batch
def draw_lanes(rng, shape, lanes: slice) -> np.ndarray:
    """``rng.random(shape)[:, lanes]`` for ``shape`` = (T, B, ...), drawing only those numbers.

    ``random`` takes one 64-bit draw per float64, in C order, so the generator is advanced past the other
    lanes' draws (``advance``: PCG64, the run's generator, does it in O(log n)) and ends where the whole
    draw would: each rank pays for its lanes only, yet gets one process's numbers. A generator without
    ``advance`` draws everything and keeps the slice.
    """
    T, B = shape[0], shape[1]
    per_lane = int(np.prod(shape[2:], dtype=np.int64))
    bitgen = rng.bit_generator
    if not hasattr(bitgen, "advance"):
        return rng.random(shape)[:, lanes]
    out = np.empty((T, lanes.stop - lanes.start, *shape[2:]))
    for t in range(T):
        bitgen.advance(lanes.start * per_lane)
        out[t] = rng.random(out.shape[1:])
        bitgen.advance((B - lanes.stop) * per_lane)
    return out


# ---------------------------------------------------------------------- the carried state, lane by lane
_LANE_FIELDS = ("memory", "read_ema", "write_ema", "last_read", "last_write", "local_buffer")


def take_lanes(state, lanes: slice):
    """The lanes ``lanes`` of an InferenceState (None stays None). ``timestep`` and ``local_valid`` are the
    same for every lane: the lanes step together."""
    if state is None:
        return None
    return dataclasses.replace(state, tiers=[s[lanes] for s in state.tiers],
                               **{k: getattr(state, k)[lanes] for k in _LANE_FIELDS})


def join_lanes(states: list):
    """The InferenceStates of consecutive lane blocks as one (rank order = lane order)."""
    if states[0] is None:
        return None
    first = states[0]
    return dataclasses.replace(
        first, tiers=[np.concatenate(parts) for parts in zip(*(s.tiers for s in states), strict=True)],
        **{k: np.concatenate([getattr(s, k) for s in states]) for k in _LANE_FIELDS})


def _digest(*parts) -> str:
    """A content hash of arrays, dicts of arrays and JSON-able values (the ranks compare these)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict) and part and all(isinstance(v, np.ndarray) for v in part.values()):
            for name, array in part.items():
                h.update(name.encode())
                h.update(np.ascontiguousarray(array).view(np.uint8).ravel())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class _AgreedStop:
    """The loop's view of a stop request under MPI: set from the last step's Allreduce."""

    requested = False


class MPIWorld(World):
    """The ranks of an MPI communicator (``MPI.COMM_WORLD``), through mpi4py."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._share_cores(comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size())
        self.unfinished = True  # until a run finishes, a rank leaving early must end the job
        self._own_stop, self._agreed = None, _AgreedStop()
        atexit.register(self._abort_if_unfinished)

    @staticmethod
    def _share_cores(ranks_here: int) -> None:
        """The ranks on one machine share its cores: each rank's Numba pool (the evaluation's kernels) and
        OpenBLAS (the gradient norm and the optimiser's products run outside the training step's one-thread
        block) get their part, unless THL_NP_THREADS, NUMBA_NUM_THREADS / OPENBLAS_NUM_THREADS say otherwise
        (the decoders then also use only the cores other processes leave idle, thl_np._threads). Threads that
        outnumber the cores spin against each other: on 2 cores, 2 ranks of 2 threads each made the held-out
        evaluation 10x slower and the gradient norm up to 100x."""
        if ranks_here <= 1:
            return
        from .._threads import cores, requested

        threads = requested() or max(1, cores() // ranks_here)  # THL_NP_THREADS (or --threads) decides if set
        if "NUMBA_NUM_THREADS" not in os.environ:
            import numba

            numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, threads))
        if not any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")):
            from .._blas import _openblas_controls

            for _, set_threads in _openblas_controls():
                set_threads(threads)

    # ------------------------------------------------------------------ failure: end the job, never hang
    def _abort_if_unfinished(self) -> None:
        if self.unfinished:
            sys.stdout.flush()
            sys.stderr.write(f"thl-np: rank {self.rank} of {self.size} stopped before the run finished (see "
                             "above); ending every rank (MPI_Abort)\n")
            sys.stderr.flush()
            # The launcher forwards a rank's output through its own proxy, and MPI_Abort ends that proxy too:
            # without a pause, what was written last (the traceback naming the cause) can be lost. Seen once
            # in CI with two test workers on 2 cores: the job's stderr held only the traceback's first line.
            time.sleep(ABORT_GRACE_S)
            self.comm.Abort(1)

    def start(self) -> None:
        self.unfinished = True

    def finish(self) -> None:
        self.comm.Barrier()
        self.unfinished = False

    # ------------------------------------------------------------------ set-up
    def root_value(self, value):
        return self.comm.bcast(value, root=0)

    def restore(self, path, load, batch_size):
        files = None
        if self.is_root:
            files = {}
            for folder, _, names in os.walk(path):
                for name in names:
                    full = os.path.join(folder, name)
                    with open(full, "rb") as f:
                        files[os.path.relpath(full, path)] = f.read()
        files = self.comm.bcast(files, root=0)
        if self.is_root:
            run = load(path)
        else:  # rank 0's checkpoint, written to a private folder (only rank 0 need see --out)
            with tempfile.TemporaryDirectory(prefix="thl-np-rank-") as tmp:
                copy = os.path.join(tmp, os.path.basename(path))
                for rel, content in files.items():
                    os.makedirs(os.path.dirname(os.path.join(copy, rel)), exist_ok=True)
                    with open(os.path.join(copy, rel), "wb") as f:
                        f.write(content)
                run = load(copy)
        run.state = take_lanes(run.state, self.lanes(batch_size))
        return run

    def agree(self, run, tc, train_bytes, held_len):
        if tc.batch_size < self.size:
            raise InputError(
                f"batch_size = {tc.batch_size} lanes cannot be shared by {self.size} ranks (each needs at "
                f"least one): use --batch-size >= {self.size} or fewer ranks"
            )
        mine = {
            "weights": _digest(run.model.params),
            "optimizer state": _digest(run.optimizer.state_dict()),
            "model config": _digest(run.model.config.to_dict()),
            "training data": f"{fingerprint(train_bytes)}+{held_len}",
            "training settings": _digest(tc.to_dict()),
            "position": _digest(run.step, run.batches.position, run.rng.bit_generator.state),
        }
        self._compare(self.comm.allgather(mine), "do not start from rank 0's run",
                      "every rank must run the same command on the same --data, with the same thl-np and NumPy")

    def _compare(self, digests: list, what: str, fix: str) -> None:
        differ = [k for k in digests[0] if any(d[k] != digests[0][k] for d in digests[1:])]
        if differ:
            ranks = [r for r, d in enumerate(digests) if d != digests[0]]
            raise StateError(f"rank(s) {ranks} of {self.size} {what}: their {', '.join(differ)} differ from "
                             f"rank 0's; {fix}")

    # ------------------------------------------------------------------ one step
    def draw_uniforms(self, rng, shape):
        return draw_lanes(rng, shape, self.lanes(shape[1]))

    def take_batch(self, inputs, targets):
        mine = self.lanes(inputs.shape[0])
        return inputs[mine], targets[mine]

    def sum_gradients(self, grads, loss, batch_size):
        mine = self.lanes(batch_size)
        share = (mine.stop - mine.start) / batch_size  # value_and_grad's mean over B_r·T → part of B·T's
        arrays = list(grads.values())
        buf = np.empty(sum(g.size for g in arrays) + 2, dtype=np.result_type(*arrays))
        offset = 0
        for g in arrays:
            np.multiply(g.ravel(), share, out=buf[offset : offset + g.size])
            offset += g.size
        buf[-2] = loss * share
        buf[-1] = 1.0 if self._own_stop is not None and self._own_stop.requested else 0.0
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        offset = 0
        for name, g in zip(list(grads), arrays, strict=True):
            grads[name] = buf[offset : offset + g.size].reshape(g.shape)
            offset += g.size
        self._agreed.requested = bool(buf[-1] > 0)
        return float(buf[-2])

    @contextmanager
    def stop_together(self, stop):
        """SIGINT and SIGUSR1 only set this rank's request (never raise mid-step: the other ranks would wait
        for this one's gradient); the loop reads the request agreed at the last step."""
        self._own_stop, self._agreed.requested = stop, False
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGUSR1):
                previous[sig] = signal.signal(sig, self._request_stop)
        try:
            yield self._agreed
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._own_stop = None

    def _request_stop(self, signum, frame):
        self._own_stop.requested = True

    # ------------------------------------------------------------------ checkpoints and evaluation
    def save(self, run, write):
        parts = self.comm.gather((run.state, _digest(run.model.params, run.optimizer.state_dict())), root=0)
        path = None
        if self.is_root:
            self._compare([{"weights and optimizer state": d} for _, d in parts], "no longer match rank 0",
                          "the ranks' Allreduce did not give every rank the same sum (report this)")
            path = write(dataclasses.replace(run, state=join_lanes([s for s, _ in parts])))
        return self.comm.bcast(path, root=0)

    def evaluate(self, evaluate, model, data, seq_len, lanes, max_bytes):
        t0 = time.perf_counter()
        ids = eval_lanes(data, lanes, max_bytes)  # the lanes of one process, then this rank's block of them
        block = ids[self.lanes(len(ids))]
        sums = np.zeros(2)  # cross-entropy (nats), bytes predicted
        if len(block):
            res = evaluate(model, block.ravel(), seq_len, len(block), None)
            sums[:] = res["nats_per_byte"] * res["bytes"], res["bytes"]
        self.comm.Allreduce(self.MPI.IN_PLACE, sums, op=self.MPI.SUM)
        nats = float(sums[0] / sums[1])
        return {"bits_per_byte": nats / math.log(2), "nats_per_byte": nats, "bytes": int(sums[1]),
                "lanes": len(ids), "seconds": time.perf_counter() - t0}
