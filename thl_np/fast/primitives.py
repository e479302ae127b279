"""Scalar and row helpers shared by every kernel of ``thl_np.fast``, each defined once: the per-row dot
product (one code path for every row, so identical rows of the bank give identical numbers and the spec's
tie rule holds exactly), the overflow-safe sigmoid, the top-κ with the lower-index tie rule, and the
training kernels' reading of [s^0; s^{K-1}] from the tier states (and its gradient's way back).

Numba caches a kernel by the file it is defined in and does not notice when a helper it calls from another
file changes: after editing this file, delete ``thl_np/fast/__pycache__`` (or set ``NUMBA_CACHE_DIR``).
"""
import numpy as np
from numba import njit

# Reassociation lets LLVM vectorise a dot product; every row still runs the same code, so identical rows
# of the bank give identical dot products (the spec's tie rule needs that). No "no NaN/inf" assumptions.
VECTORISE = {"reassoc", "contract", "nsz", "arcp"}
# The kernels are written as loops, not array expressions: Numba compiles each array expression (and its
# broadcasting error path) separately, which had made the first decode step take seconds more to compile.


@njit(cache=True, fastmath=VECTORISE)
def dot(a, b):
    """a·b in a's dtype."""
    acc = a[0] - a[0]
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, fastmath=VECTORISE)
def row_dots(rows, v, out):
    """out[j] = rows[j]·v, one code path for every row."""
    for j in range(rows.shape[0]):
        acc = rows[j, 0] - rows[j, 0]
        for i in range(rows.shape[1]):
            acc += rows[j, i] * v[i]
        out[j] = acc


@njit(cache=True, fastmath=VECTORISE)
def multi_row_dots(rows, vs, out):
    """out[h, j] = rows[j]·vs[h] for every head in one pass over the rows: each row is read once for four
    heads at a time, and every row runs the same code, so identical rows give identical dots."""
    H, n = vs.shape
    for j in range(rows.shape[0]):
        h = 0
        while h + 4 <= H:
            a0 = a1 = a2 = a3 = rows[j, 0] - rows[j, 0]
            for i in range(n):
                x = rows[j, i]
                a0 += x * vs[h, i]
                a1 += x * vs[h + 1, i]
                a2 += x * vs[h + 2, i]
                a3 += x * vs[h + 3, i]
            out[h, j] = a0
            out[h + 1, j] = a1
            out[h + 2, j] = a2
            out[h + 3, j] = a3
            h += 4
        for g in range(h, H):
            out[g, j] = dot(rows[j], vs[g])


@njit(cache=True)
def row_norms2(memory, out):
    """out[b, j] = memory[b, j]·memory[b, j]: the squared norms the writer's affinities divide by (spec §4.6),
    kept beside the bank by both fast paths and updated only where a step writes."""
    for b in range(memory.shape[0]):
        for j in range(memory.shape[1]):
            out[b, j] = dot(memory[b, j], memory[b, j])


@njit(cache=True)
def axpy(a, x, y):
    """y += a·x, element by element (a may be float64 while x, y are float32: rounded as NumPy would)."""
    for i in range(x.shape[0]):
        y[i] += a * x[i]


@njit(cache=True)
def sigmoid(x):
    """Mirrors thl_np.components.gru.sigmoid for one value: split by sign so neither branch overflows."""
    if x >= 0:
        return 1.0 / (1.0 + np.exp(-x))
    ex = np.exp(x)
    return ex / (1.0 + ex)


@njit(cache=True)
def gather_ends(S, off0, d0, offK, dK, x):
    """x[b] = [S[b, off0:off0+d0]; S[b, offK:offK+dK]]: [s^0; s^{K-1}], the router's (with e) and the writer's
    input, from the tier states kept side by side in S [B, Σd_k]."""
    for b in range(S.shape[0]):
        for a in range(d0):
            x[b, a] = S[b, off0 + a]
        for a in range(dK):
            x[b, d0 + a] = S[b, offK + a]


@njit(cache=True)
def scatter_add_ends(DS, dx, off0, d0, offK, dK):
    """The gradient of ``gather_ends``: DS[b, off0:off0+d0] += dx[b, :d0], DS[b, offK:offK+dK] += dx[b, d0:]
    (with one tier, both parts add into the same columns)."""
    for b in range(DS.shape[0]):
        for a in range(d0):
            DS[b, off0 + a] += dx[b, a]
        for a in range(dK):
            DS[b, offK + a] += dx[b, d0 + a]


@njit(cache=True)
def top_k_desc(values, k, out):
    """Mirrors thl_np.components.router.top_k_desc for one row: out[:k] = the indices of the k largest
    values, descending, ties to the lower index (insertion into a sorted list with a strict ``>``)."""
    count = 0
    for j in range(values.shape[0]):
        v = values[j]
        if count == k and not v > values[out[k - 1]]:
            continue
        p = count if count < k else k - 1
        while p > 0 and v > values[out[p - 1]]:
            out[p] = out[p - 1]
            p -= 1
        out[p] = j
        if count < k:
            count += 1
