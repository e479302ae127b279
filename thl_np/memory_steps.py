"""The memory choices of a run of steps (spec §4.3-4.7), as one value both paths produce.

``MemorySteps`` holds, time-major, the slots read ``idx`` and their weights ``α``, the write ``targets``,
the gate ``g``, the writer's branch, and whether the bank held an empty slot before the write. The plain
path's ``StepRecord`` list (``steps_from_records``), the fast gradient's tape (``steps_from_fast_tape``) and
a decoding session stepped by ``MemoryObserver`` all give one. What is computed from them (the
statistics, the plot) is ``thl_np.eval.diagnostics``.

A tape keeps no bank, so "held an empty slot" is followed from the state the chunk starts from: a slot
stops being empty when it is written (``track_empty``). That is the writer's test too unless a written row
is smaller than 1e-6 (a write adds η·g·w, |w| > 0, and γ^T of it stays far above 1e-6 for the chunk
lengths trained on).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .components.writer import EMPTY_NORM
from .errors import InputError

BRANCHES = ("refine", "novel_empty", "novel_evict")
REFINE, NOVEL_EMPTY, NOVEL_EVICT = range(3)


@dataclass
class MemorySteps:
    """The memory choices of T steps of B sequences (time-major), starting at timestep ``t0``."""

    t0: int
    idx: np.ndarray        # [T, B, H, κ] slots read
    alpha: np.ndarray      # [T, B, H, κ] their weights (after the capacity rule)
    targets: np.ndarray    # [T, B, W_w] slots written
    g: np.ndarray          # [T, B] write gate
    novel: np.ndarray      # [T, B] bool: the writer took the novel branch
    had_empty: np.ndarray  # [T, B] bool: the bank held an empty slot before the write

    @property
    def branch(self) -> np.ndarray:
        """[T, B] int: REFINE, NOVEL_EMPTY (novel, an empty slot took it) or NOVEL_EVICT."""
        return np.where(~self.novel, REFINE, np.where(self.had_empty, NOVEL_EMPTY, NOVEL_EVICT))


def empty_slots(memory) -> np.ndarray:
    """[B, J] bool: the writer's test of an empty slot (spec §4.6: ‖m_j‖ ≤ 1e-6)."""
    m = np.asarray(memory, dtype=np.float64)
    return np.sqrt((m * m).sum(axis=-1)) <= EMPTY_NORM


def track_empty(empty0, targets) -> np.ndarray:
    """Whether the bank held an empty slot before each step, followed from ``empty0`` [B, J] (the start's
    ``empty_slots``) and the write targets [T, B, W_w]: a written slot is no longer empty. → [T, B] bool."""
    empty = np.array(empty0, dtype=bool)
    T, B, _ = targets.shape
    out = np.empty((T, B), dtype=bool)
    rows = np.arange(B)[:, None]
    for t in range(T):
        out[t] = empty.any(axis=1)
        empty[rows, targets[t]] = False
    return out


def steps_from_fast_tape(tape, state0) -> MemorySteps:
    """The choices on ``thl_np.engines.gradient``'s tape, for a chunk that started from ``state0``."""
    a = tape.arrays
    return MemorySteps(t0=int(state0.timestep), idx=a["IDX"], alpha=a["ALPHA"], targets=a["TGT"], g=a["GG"],
                       novel=a["NOVEL"], had_empty=track_empty(empty_slots(state0.memory), a["TGT"]))


def steps_from_records(records, state0) -> MemorySteps:
    """The choices in the plain path's ``StepRecord`` list (``thl_np.step.run_sequence(record=True)``), for a
    chunk that started from ``state0``. The records' caches must carry ``alpha`` and ``novel`` (the spec's
    router and writer do)."""
    try:
        alpha = np.stack([np.asarray(r.router.alpha) for r in records])
        novel = np.stack([np.asarray(r.writer.novel) for r in records])
    except AttributeError as exc:
        raise InputError(f"the memory diagnostics read α and the writer's branch from the step's caches, and "
                         f"this router or writer variant's cache has no such field ({exc})") from None
    targets = np.stack([np.asarray(r.targets) for r in records])
    return MemorySteps(t0=int(state0.timestep), idx=np.stack([np.asarray(r.idx) for r in records]), alpha=alpha,
                       targets=targets, g=np.stack([np.asarray(r.g) for r in records]), novel=novel,
                       had_empty=track_empty(empty_slots(state0.memory), targets))


class MemoryObserver:
    """Steps a decoding session (``model.decoder()``, fast or plain) and returns each step's choices.

    >>> obs = MemoryObserver(model.decoder(batch_size=1))
    >>> tier_states, steps = obs.step([token])       # steps: a MemorySteps of T = 1
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self.fast = hasattr(decoder, "_novel")
        if not self.fast:
            decoder.keep_record = True

    def empty_before(self) -> np.ndarray:
        """[B, J] bool: the writer's empty test on the session's bank now (before its next step)."""
        d = self.decoder
        if self.fast:  # the fast writer's own form of the test: scale·‖stored row‖ ≤ 1e-6
            return d.scale * np.sqrt(d.norm2) <= EMPTY_NORM
        return empty_slots(d.state().memory)

    def step(self, token_ids):
        """Advance the session by one token per sequence → (tier states [B, Σ d_k], MemorySteps of T = 1)."""
        d = self.decoder
        had_empty = self.empty_before().any(axis=1)
        t = int(d.t) if self.fast else int(d.state().timestep)
        S = d.advance(token_ids)
        if self.fast:
            idx, alpha, targets, g, novel = d._idx, d._alpha, d._targets, d._g, d._novel
        else:
            rec = d.last_record
            idx, alpha, targets, g, novel = rec.idx, rec.router.alpha, rec.targets, rec.g, rec.writer.novel
        one = lambda x: np.array(x)[None]   # noqa: E731  (a copy: the fast session reuses its arrays)
        return S, MemorySteps(t0=t, idx=one(idx), alpha=one(alpha), targets=one(targets), g=one(g),
                              novel=one(np.asarray(novel, dtype=bool)), had_empty=had_empty[None])
