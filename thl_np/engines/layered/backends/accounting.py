"""How device bytes are counted against the budget: the budget error, the per-device sizing profile the
planner uses (no device needed to make a plan), and the thread-safe meter the NumPy backend charges."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from ....errors import ConfigError
from ..units import align_up


class DeviceBudgetError(ConfigError):
    """The device budget is too small for the plan, or an allocation would take the device past it.

    ``minimum`` is the smallest budget (bytes) that works for this model and batch size, when known.
    """

    def __init__(self, message, budget=None, minimum=None):
        super().__init__(message)
        self.budget = budget
        self.minimum = minimum


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


class Meter:
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


def profile_for(device: str) -> Profile:
    dev = str(device).strip().lower()
    return PROFILES["cuda" if dev.startswith("cuda") else "cpu"]
