"""OpenBLAS's thread count, set for the duration of a block.

The fast paths run their own loops on Numba's thread pool. OpenBLAS's workers spin for a while after
each call, and on a machine with few cores they then hold the cores Numba's threads (or the next small
product) need: the decoder and the training fast path hold OpenBLAS to one thread while they run.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager


@contextmanager
def blas_threads(n, scipy: bool = True):
    """Limit every loaded OpenBLAS (NumPy's, and SciPy's that Numba's ``np.dot`` calls) to ``n`` threads inside
    the block, restoring each library's count afterwards. A no-op for ``n=None``, on systems without
    ``/proc/self/maps``, and for other BLAS libraries. ``scipy=False``: the OpenBLAS libraries already
    loaded only (NumPy's), without importing SciPy's BLAS (~0.2 s) for code that never calls it."""
    if n is None:
        yield
        return
    changed = []
    for get, set_ in _openblas_controls(scipy):
        old = int(get())
        if old != n:
            set_(int(n))
            changed.append((set_, old))
    try:
        yield
    finally:
        for set_, old in changed:
            set_(old)


_CONTROLS: dict = {}
_FOUND: dict = {}


def _openblas_controls(scipy: bool = True):
    """(get, set) thread-count functions of every OpenBLAS mapped into this process (scanned once; with
    ``scipy``, after loading SciPy's, the one Numba's np.dot calls)."""
    if scipy in _FOUND:
        return _FOUND[scipy]
    if scipy:
        import scipy.linalg.cython_blas  # noqa: F401  (the OpenBLAS that Numba's np.dot calls: mapped before the scan)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        _FOUND[scipy] = []
        return []
    out = []
    for path in sorted(paths):
        if path not in _CONTROLS:
            _CONTROLS[path] = None
            try:
                lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
            except OSError:
                continue
            for pre in ("scipy_openblas", "openblas"):
                for suf in ("64_", "_64", ""):
                    get = getattr(lib, f"{pre}_get_num_threads{suf}", None)
                    set_ = getattr(lib, f"{pre}_set_num_threads{suf}", None)
                    if get is not None and set_ is not None and _CONTROLS[path] is None:
                        get.restype, set_.argtypes, set_.restype = ctypes.c_int, [ctypes.c_int], None
                        _CONTROLS[path] = (get, set_)
        if _CONTROLS[path] is not None:
            out.append(_CONTROLS[path])
    _FOUND[scipy] = out
    return out
