"""Array primitives the components share, on NumPy or CuPy arrays alike.

Every component function finds its array module from its inputs (``array_module``), so the same
definition runs on host arrays (the plain path, the NumPy layered backend, the reference generator)
and on device arrays (the CuPy layered backend). A device back-end supplies these primitives and
never re-implements model math.

``top_k_desc`` is the spec's one ranking rule (§4.3, §4.6): the k largest values, in descending order,
equal values ranked by the lower slot index.
"""
import numpy as np


def array_module(x):
    """numpy, or cupy for a CuPy array (without importing cupy for NumPy inputs)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    return x.get() if array_module(x) is not np else np.asarray(x)


def argsort_stable(a):
    """Indices sorting ``a`` along its last axis, equal keys in index order. NumPy needs kind="stable";
    CuPy's sort is always stable (and older versions reject ``kind``)."""
    xp = array_module(a)
    if xp is np:
        return np.argsort(a, axis=-1, kind="stable")
    return xp.argsort(a, axis=-1)


def top_k_desc(values, k):
    """Indices of the k largest entries along the last axis, descending; ties go to the lower index.
    ``+ 0.0`` turns −0.0 into +0.0, so a radix sort (CuPy) cannot order the two zeros apart."""
    return argsort_stable(-values + 0.0)[..., :k]


def scatter_add(target, index, values) -> None:
    """``target[index] += values`` where ``index`` may repeat (repeats accumulate), in place."""
    if array_module(target) is np:
        np.add.at(target, index, values)
    else:  # pragma: no cover - needs a GPU
        import cupyx

        cupyx.scatter_add(target, index, values)


def sigmoid(x):
    """σ(x), split by sign so neither branch overflows."""
    xp = array_module(x)
    out = xp.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + xp.exp(-x[pos]))
    ex = xp.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out
