"""Streaming for the layered engine: two slots, the step's pieces in order, the next copy in flight while
the current piece computes.

Each step's schedule (``LayeredPlan.needed`` and ``pieces``) is handed to ``begin``; ``acquire`` waits for
the module's piece and returns views of its weights in the slot, ``release`` frees the slot and starts the
copy of the piece after next into it. ``end_step`` prefetches the first piece of the next step's
predicted schedule while the caller samples; ``begin`` keeps it if the prediction holds and counts it as
wasted otherwise. The copies themselves are the backend's (``copy_to_slot``, ``wait_copy``,
``record_done``): a worker thread on the CPU, pinned staging and a side stream on CUDA.
"""
from __future__ import annotations

import time

from .plan import Piece


class Streamer:
    def __init__(self, backend, params, slot_bytes: int):
        self.be = backend
        self.params = params
        self.slots = [backend.alloc_slot(slot_bytes) for _ in range(2)]
        self.slot_index = [None, None]   # queue index of the piece in each slot (None: free)
        self.ticket = [None, None]
        self.done = [None, None]         # compute-done event of each slot's last user
        self.queue: list = []
        self.next_issue = 0
        self.next_use = 0
        self.prefetched = None           # (slot, piece) issued at the end of the previous step
        self.bytes_copied = 0
        self.bytes_wasted = 0
        self.wait_seconds = 0.0

    def _parts(self, piece: Piece):
        out = []
        for name, rows, offset, _shape in piece.parts:
            src = self.params[name]
            if rows is not None:
                src = src[rows[0]:rows[1]]
            out.append((offset, src))
        return out

    def _issue(self, slot: int, piece: Piece):
        self.ticket[slot] = self.be.copy_to_slot(self.slots[slot], self._parts(piece), after=self.done[slot])
        self.bytes_copied += piece.nbytes

    def _pump(self):
        while self.next_issue < len(self.queue):
            free = [s for s in (0, 1) if self.slot_index[s] is None]
            if not free:
                return
            s = free[0]
            self.slot_index[s] = self.next_issue
            self._issue(s, self.queue[self.next_issue])
            self.next_issue += 1

    def begin(self, queue: list):
        self.queue, self.next_issue, self.next_use = list(queue), 0, 0
        if self.prefetched is not None:
            s, piece = self.prefetched
            self.prefetched = None
            if self.queue and self.queue[0].name == piece.name:
                self.slot_index[s] = 0
                self.next_issue = 1
            else:
                self.be.wait_copy(self.ticket[s])
                self.done[s] = self.be.record_done()
                self.slot_index[s] = None
                self.bytes_copied -= piece.nbytes
                self.bytes_wasted += piece.nbytes
        self._pump()

    def acquire(self, module: str) -> dict:
        i = self.next_use
        if i >= len(self.queue) or self.queue[i].module != module:
            got = self.queue[i].name if i < len(self.queue) else "nothing"
            raise RuntimeError(f"layered engine: expected to stream {module}, the schedule has {got}")
        self._pump()
        s = self.slot_index.index(i)
        t0 = time.perf_counter()
        self.be.wait_copy(self.ticket[s])
        self.wait_seconds += time.perf_counter() - t0
        self.ticket[s] = None
        piece = self.queue[i]
        views = {}
        for name, _rows, offset, shape in piece.parts:
            views[name] = self.be.view(self.slots[s], offset, self.params[name].dtype, shape)
        return views

    def release(self):
        s = self.slot_index.index(self.next_use)
        self.done[s] = self.be.record_done()
        self.slot_index[s] = None
        self.next_use += 1
        self._pump()

    def end_step(self, next_queue: list):
        """Prefetch the first piece of the next step's (predicted) schedule while the caller samples."""
        self.queue, self.next_issue, self.next_use = [], 0, 0
        if next_queue:
            s = 0 if self.slot_index[0] is None else 1
            self._issue(s, next_queue[0])
            self.prefetched = (s, next_queue[0])
            self.slot_index[s] = -1

    def abort(self):
        """After an error mid-step: let copies in flight finish and free both slots."""
        for s in (0, 1):
            if self.ticket[s] is not None:
                try:
                    self.be.wait_copy(self.ticket[s])
                except Exception:  # the step's own error is the one to report
                    pass
            self.ticket[s] = None
            self.slot_index[s] = None
        self.prefetched = None
        self.queue, self.next_issue, self.next_use = [], 0, 0
