"""Memory diagnostics: what the router reads and what the writer writes, from the choices a step already makes.

Every statistic is defined once, in ``MemoryStats``, over ``MemorySteps``: the per-step choices of spec
§4.3-4.7 (slots read ``idx`` and their weights ``α``, write ``targets``, gate ``g``, the writer's branch, and
whether the bank held an empty slot before the write). Both paths produce them:

- a decoding session, fast or plain: ``MemoryObserver(decoder).step(ids)`` reads them from ``FastDecoder``
  (which holds idx, α, targets, g and the branch after each step) or from ``PlainDecoder``'s ``StepRecord``;
  "held an empty slot" is read off the bank before the step, with the writer's own test (‖m_j‖ ≤ 1e-6);
- a training step: ``value_and_grad(..., observe=f)`` calls ``f`` with the forward's choices, from the fast
  path's tape (``steps_from_fast_tape``) or the plain path's ``StepRecord`` list (``steps_from_records``). A
  tape keeps no bank, so "held an empty slot" is followed from the state the chunk starts from: a slot stops
  being empty when it is written (``track_empty``). That is the writer's test too unless a written row is
  smaller than 1e-6 (a write adds η·g·w, |w| > 0, and γ^T of it stays far above 1e-6 for the chunk lengths
  trained on).

Read side (per window: a decoding run, or one training chunk):

- ``read_entropy``: the entropy of α over a head's κ picks, nats (0: one slot takes it all; log κ: even),
  mean over steps, sequences and heads; ``read_entropy_per_head`` the same per head;
- ``top1_mass``: the largest α of a head, mean over steps, sequences and heads;
- ``slots_read``: distinct slots among a step's H·κ picks, mean over steps and sequences;
- ``effective_slots``: exp of the entropy of a sequence's read distribution over the window
  (p_j ∝ Σ_t A_j(t), A as spec §4.4), mean over sequences: how many slots the reads spread over;
- ``read_count_hist``: share of slots by the number of picks they got in the window (0, 1, 2-9, 10-99, 100+).

Write side:

- ``share_refine`` / ``share_novel_empty`` / ``share_novel_evict``: share of steps (× sequences) whose write
  refined the most similar slot, put a novel write into an empty slot, or evicted a slot (novel, bank
  full: the λ_s·staleness + λ_u·underuse rule);
- ``mean_gate``: mean write gate g over every write (``mean_gate_novel``: novel writes only; refine has g = 1);
- ``overwrites``: evictions in the window per sequence; ``overwrites_max``: the most any one slot was evicted;
  ``slots_written``: distinct slots written, mean over sequences;
- from the state at the window's end (``summary(state)``): slot norms (``slot_norm_mean``, ``_p10``,
  ``_p50``, ``_p90``, ``_max``), ``empty_slots``, slot age t − last_write over the non-empty slots
  (``slot_age_mean``, ``_p50``, ``_max``).

``MemoryStats(keep_series=True)`` also keeps, for sequence 0, every step's read weight per slot and its
write, which ``plot_diagnostics`` draws (slot use over time as a heat map, the writer's branch over time).
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..checks import require_matplotlib
from ..components.router import read_weights_per_slot
from ..components.writer import EMPTY_NORM
from ..errors import InputError
from ..memory_steps import BRANCHES, NOVEL_EMPTY, NOVEL_EVICT, REFINE, MemoryObserver, MemorySteps

#: Bins of ``read_count_hist``: picks of a slot in the window (lower bounds; the last is open).
READ_COUNT_BINS = (0, 1, 2, 10, 100)
READ_COUNT_LABELS = ("0", "1", "2-9", "10-99", "100+")
#: The figures written as training log columns (``thl-np train``'s log.csv) and their short names.
LOG_COLUMNS = {"read_entropy": "H", "top1_mass": "top1", "effective_slots": "eff", "share_refine": "refine",
               "share_novel_empty": "fill", "share_novel_evict": "evict", "mean_gate": "g",
               "slot_norm_max": "|m|max", "empty_slots": "empty"}


def observe_decoder(decoder, input_ids, stats: MemoryStats | None = None) -> MemoryStats:
    """Run ``input_ids`` [B, T] through ``decoder`` one token at a time, every step into ``stats`` (a new
    ``MemoryStats`` if None); returns it. ``stats.summary(decoder.state())`` then gives the figures."""
    ids = np.asarray(input_ids, dtype=np.int64)
    obs = MemoryObserver(decoder)
    if stats is None:
        stats = MemoryStats(decoder.config.memory_slots)
    for t in range(ids.shape[1]):
        stats.add(obs.step(ids[:, t])[1])
    return stats


def _entropy(p, axis=-1):
    """−Σ p log p along ``axis`` (0·log 0 = 0), in float64."""
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=axis)


class MemoryStats:
    """Accumulates ``MemorySteps`` over a window; ``summary(state)`` gives the figures (module docstring)."""

    def __init__(self, num_slots: int, keep_series: bool = False):
        self.J = int(num_slots)
        self.keep_series = keep_series
        self.n = 0                      # steps × sequences
        self.B = None
        self.t_last = None
        self.series = {"t": [], "A": [], "targets": [], "branch": []}

    def _start(self, B, H):
        self.B, self.H = B, H
        self.entropy = np.zeros(H)
        self.top1 = 0.0
        self.distinct = 0.0
        self.read_mass = np.zeros((B, self.J))
        self.read_count = np.zeros((B, self.J), np.int64)
        self.branches = np.zeros(3, np.int64)
        self.gate = 0.0
        self.gate_novel = 0.0
        self.writes = np.zeros((B, self.J), np.int64)
        self.evictions = np.zeros((B, self.J), np.int64)

    def add(self, steps: MemorySteps) -> None:
        """Take T more steps of the same B sequences."""
        T, B, H, kappa = steps.idx.shape
        if self.B is None:
            self._start(B, H)
        elif (B, H) != (self.B, self.H):
            raise InputError(f"memory steps of {B} sequences x {H} heads added to statistics of "
                             f"{self.B} x {self.H}: use one MemoryStats per run")
        idx = np.asarray(steps.idx, dtype=np.int64)
        alpha = np.asarray(steps.alpha, dtype=np.float64)
        self.n += T * B
        self.entropy += _entropy(alpha).sum(axis=(0, 1))
        self.top1 += float(alpha.max(axis=-1).mean(axis=2).sum())
        picks = np.sort(idx.reshape(T, B, H * kappa), axis=-1)
        self.distinct += float((1 + (np.diff(picks, axis=-1) != 0).sum(axis=-1)).sum())
        A = read_weights_per_slot(alpha.reshape(T * B, H, kappa), idx.reshape(T * B, H, kappa), self.J)
        A = A.reshape(T, B, self.J)
        self.read_mass += A.sum(axis=0)
        for b in range(B):
            self.read_count[b] += np.bincount(idx[:, b].reshape(-1), minlength=self.J)
        branch = steps.branch
        self.branches += np.bincount(branch.reshape(-1), minlength=3)
        g = np.asarray(steps.g, dtype=np.float64)
        self.gate += float(g.sum())
        self.gate_novel += float(g[np.asarray(steps.novel)].sum())
        targets = np.asarray(steps.targets, dtype=np.int64)
        for b in range(B):
            self.writes[b] += np.bincount(targets[:, b].reshape(-1), minlength=self.J)
            evicted = targets[:, b][branch[:, b] == NOVEL_EVICT]
            self.evictions[b] += np.bincount(evicted.reshape(-1), minlength=self.J)
        self.t_last = steps.t0 + T - 1
        if self.keep_series:
            s = self.series
            s["t"].append(steps.t0 + np.arange(T))
            s["A"].append(A[:, 0].astype(np.float32))
            s["targets"].append(targets[:, 0])
            s["branch"].append(branch[:, 0].astype(np.int8))

    def summary(self, state=None) -> dict:
        """The figures of the window (module docstring); with ``state`` (the state at the window's end,
        an ``InferenceState``) also slot norms, empty slots and slot ages."""
        if self.n == 0:
            raise InputError("no memory steps were observed: nothing to summarise")
        n, B = self.n, self.B
        steps = n / B
        p = self.read_mass / np.maximum(self.read_mass.sum(axis=1, keepdims=True), 1e-300)
        counts = self.read_count.reshape(-1)
        edges = list(READ_COUNT_BINS) + [np.iinfo(np.int64).max]
        hist = [float(((counts >= lo) & (counts < hi)).mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        novel_writes = int(self.branches[NOVEL_EMPTY] + self.branches[NOVEL_EVICT])
        out = {
            "steps": int(steps), "sequences": int(B),
            "read_entropy": float(self.entropy.sum() / (n * self.H)),
            "read_entropy_per_head": [float(e / n) for e in self.entropy],
            "top1_mass": self.top1 / n,
            "slots_read": self.distinct / n,
            "effective_slots": float(np.exp(_entropy(p, axis=1)).mean()),
            "read_count_hist": dict(zip(READ_COUNT_LABELS, hist, strict=True)),
            "share_refine": float(self.branches[REFINE] / n),
            "share_novel_empty": float(self.branches[NOVEL_EMPTY] / n),
            "share_novel_evict": float(self.branches[NOVEL_EVICT] / n),
            "mean_gate": self.gate / n,
            "mean_gate_novel": self.gate_novel / novel_writes if novel_writes else None,
            "overwrites": float(self.evictions.sum() / B),
            "overwrites_max": int(self.evictions.max()),
            "slots_written": float((self.writes > 0).sum() / B),
        }
        if state is not None:
            out.update(state_figures(state))
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"memory diagnostic {key} is {value}: the run's numbers are not finite")
        return out

    def series_arrays(self) -> dict:
        """Sequence 0's steps: ``t`` [T], ``A`` [T, J] read weight per slot, ``targets`` [T, W_w], ``branch`` [T]."""
        if not self.series["t"]:
            raise InputError("no series kept: make MemoryStats(keep_series=True) and add steps to it")
        return {k: np.concatenate(v) for k, v in self.series.items()}


def state_figures(state) -> dict:
    """Slot norms, empty slots and slot ages (t − last_write over non-empty slots) of a state, all sequences."""
    m = np.asarray(state.memory, dtype=np.float64)
    norms = np.sqrt((m * m).sum(axis=-1))
    empty = norms <= EMPTY_NORM
    age = (int(state.timestep) - 1 - np.asarray(state.last_write))[~empty]
    q = np.quantile(norms, [0.1, 0.5, 0.9])
    return {"slot_norm_mean": float(norms.mean()), "slot_norm_p10": float(q[0]), "slot_norm_p50": float(q[1]),
            "slot_norm_p90": float(q[2]), "slot_norm_max": float(norms.max()),
            "empty_slots": float(empty.sum() / norms.shape[0]),
            "slot_age_mean": float(age.mean()) if age.size else None,
            "slot_age_p50": float(np.median(age)) if age.size else None,
            "slot_age_max": int(age.max()) if age.size else None}


def log_row(summary: dict) -> dict:
    """The training log's memory columns (``LOG_COLUMNS``) from a summary."""
    return {f"mem_{k}": float(summary[k]) for k in LOG_COLUMNS}


def summary_lines(s: dict) -> list[str]:
    """A summary as a few lines of text."""
    heads = " ".join(f"{e:.2f}" for e in s["read_entropy_per_head"])
    hist = ", ".join(f"{k}: {v:.0%}" for k, v in s["read_count_hist"].items())
    gate_novel = "n/a" if s["mean_gate_novel"] is None else f"{s['mean_gate_novel']:.3f}"
    out = [f"memory over {s['steps']} steps x {s['sequences']} sequence(s)",
           f"  reads: entropy {s['read_entropy']:.3f} nats (per head {heads}), top-1 mass {s['top1_mass']:.3f}, "
           f"{s['slots_read']:.2f} distinct slots a step, effective slots over the window {s['effective_slots']:.2f}",
           f"  slots by picks in the window: {hist}",
           f"  writes: refine {s['share_refine']:.1%}, novel into an empty slot {s['share_novel_empty']:.1%}, "
           f"novel evicting a slot {s['share_novel_evict']:.1%}; mean gate {s['mean_gate']:.3f} (novel "
           f"{gate_novel}); {s['slots_written']:.1f} slots written, {s['overwrites']:.0f} evictions "
           f"(most of one slot: {s['overwrites_max']})"]
    if "slot_norm_max" in s:
        age = ("n/a" if s["slot_age_mean"] is None else
               f"mean {s['slot_age_mean']:.0f}, median {s['slot_age_p50']:.0f}, max {s['slot_age_max']}")
        out.append(f"  bank at the end: slot norms p10 {s['slot_norm_p10']:.4f}, median {s['slot_norm_p50']:.4f}, "
                   f"p90 {s['slot_norm_p90']:.4f}, max {s['slot_norm_max']:.4f}; {s['empty_slots']:.0f} empty; "
                   f"slot age (steps since written) {age}")
    return out


def plot_diagnostics(series: dict, path: str | os.PathLike, num_slots: int, title: str | None = None) -> str:
    """Draw ``MemoryStats.series_arrays()`` into a PNG: slot use over time (read weight per slot and step, a
    heat map, with the written slot marked) above the writer's branch over time. Needs matplotlib (the
    ``[plot]`` extra): an InputError naming it otherwise. Returns the path."""
    require_matplotlib("the diagnostics plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    t, A, targets, branch = series["t"], series["A"], series["targets"], series["branch"]
    fig = Figure(figsize=(10, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.36, 0.8, 0.54))
    extent = (t[0] - 0.5, t[-1] + 0.5, num_slots - 0.5, -0.5)
    im = ax.imshow(A.T, aspect="auto", interpolation="nearest", cmap="Blues", extent=extent)
    colours = ("tab:green", "tab:orange", "tab:red")
    for k, name in enumerate(BRANCHES):
        sel = branch == k
        ax.scatter(np.repeat(t[sel], targets.shape[1]), targets[sel].reshape(-1), s=2, c=colours[k],
                   label=f"written ({name})", marker="s", linewidths=0)
    ax.set_ylabel("slot")
    ax.set_title(title or "slot use over time (sequence 0): read weight per slot (blue), slot written (dots)",
                 fontsize=10)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    cax = fig.add_axes((0.9, 0.36, 0.015, 0.54))
    fig.colorbar(im, cax=cax, label="read weight A_j")
    ax2 = fig.add_axes((0.08, 0.08, 0.8, 0.2), sharex=ax)
    ax2.imshow(branch[None, :], aspect="auto", interpolation="nearest", cmap=ListedColormap(colours),
               vmin=-0.5, vmax=2.5, extent=(t[0] - 0.5, t[-1] + 0.5, 0, 1))
    win = max(1, len(t) // 50)
    kernel = np.ones(win) / win
    for k, name in enumerate(BRANCHES):
        ax2.plot(t, np.convolve(branch == k, kernel, mode="same"), color="k", lw=0.8,
                 ls=("-", "--", ":")[k], label=f"share {name} (moving mean, {win} steps)")
    ax2.set_yticks([0, 0.5, 1])
    ax2.set_xlabel("step t")
    ax2.set_ylabel("writer branch")
    ax2.legend(loc="upper right", fontsize=7)
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
