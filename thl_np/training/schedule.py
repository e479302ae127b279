"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``.

A pure function of the step index, so a resumed run needs nothing but the step to get the same rate
back (no scheduler object to checkpoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError


def lr_at(step: int, peak_lr: float, warmup: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """The learning rate of update number ``step`` (0-based).

    - ``step < warmup``: ``peak · (step + 1) / warmup``, so the first update is not wasted at lr 0 and
      update ``warmup − 1`` runs at the peak;
    - then cosine from ``peak`` (at ``step = warmup``) down to ``min_lr = min_lr_ratio · peak`` at the
      last update ``step = total_steps − 1``;
    - after ``total_steps`` it stays at ``min_lr`` (a single post-warm-up step runs at the peak).
    """
    if step < 0 or warmup < 0 or total_steps < 1:
        raise InputError(
            f"lr_at needs step >= 0, warmup >= 0, total_steps >= 1, got {step}, {warmup}, {total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise InputError(f"min_lr_ratio = {min_lr_ratio} must lie in [0, 1]")
    peak = float(peak_lr)
    if step < warmup:
        return peak * (step + 1) / warmup
    min_lr = peak * min_lr_ratio
    if step >= total_steps:
        return min_lr
    span = total_steps - 1 - warmup
    progress = 0.0 if span <= 0 else (step - warmup) / span  # no room to decay: stay at the peak
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineSchedule:
    """``lr_at`` with its constants bound: ``schedule(step) -> lr``."""

    peak_lr: float
    warmup: int
    total_steps: int
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup, self.total_steps, self.min_lr_ratio)
