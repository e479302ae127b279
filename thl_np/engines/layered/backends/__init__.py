"""Array backends for the layered engine: where "device" arrays live, how they are counted against the
budget, and how weights get there. They implement array primitives only, never model math (the
components run on either array module). Two backends, one interface, one engine code path:

- ``cpu.NumpyBackend`` (device ``"cpu"``): NumPy arrays from a byte-counting pool, a worker thread for
  the copies;
- ``cuda.CupyBackend`` (device ``"cuda"``/``"cuda:N"``): CuPy arrays from a pool limited to the budget,
  pinned staging and a side stream for the copies. CuPy is imported only when this backend is made.

``accounting`` holds what both share: ``DeviceBudgetError``, the sizing ``Profile`` the planner uses,
and the byte ``Meter``.
"""
from __future__ import annotations

import re

from ....errors import InputError
from .accounting import PROFILES, DeviceBudgetError, Meter, Profile, profile_for
from .cpu import NumpyBackend
from .cuda import CupyBackend, cuda_available, import_cupy


def make_backend(device: str, budget, overlap: bool = True):
    """The backend for ``device`` ("cpu" or "cuda[:N]")."""
    if not isinstance(device, str):
        raise InputError(f"device = {device!r} must be 'cpu' or 'cuda' (or 'cuda:N')")
    dev = device.strip().lower()
    if dev == "cpu":
        return NumpyBackend(budget, overlap=overlap)
    m = re.fullmatch(r"cuda(?::(\d+))?", dev)
    if m:
        return CupyBackend(budget, device_id=int(m.group(1) or 0), overlap=overlap)
    raise InputError(f"device = {device!r} is not known: use 'cpu' or 'cuda' (or 'cuda:N')")


__all__ = ["DeviceBudgetError", "Profile", "PROFILES", "Meter", "profile_for", "make_backend", "NumpyBackend",
           "CupyBackend", "cuda_available", "import_cupy"]
