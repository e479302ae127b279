"""Byte sizes for the layered engine: reading a budget ("64MB", "512MiB"), printing one, aligning
offsets inside a stream slot, and how much RAM the host has free (the CPU device's default budget)."""
from __future__ import annotations

import math
import re

import numpy as np

from ...errors import InputError

ALIGN = 256  # byte alignment of each tensor inside a stream slot

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
    from ...checks import available_memory

    free = available_memory()
    return (1 << 60) if free is None else int(free)
