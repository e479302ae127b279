"""Int8 products for the decode step: ``x @ W.T + b`` (thl_np.components.output.linear_forward) with
W = s·q given as int8 values q [R, C] and float32 scales s [R, G], one per group of ``group`` columns
(thl_np.quant.scheme.dequantize, the parameters' quantization). Linear algebra only, no THL math: what
only int8 needs, beside ``thl_np.fast.linalg``'s small-batch tile, packing and packed-tile generator, which
serve int8 and float weights alike.

Every kernel reads q as it is stored and never builds W: a group's dot product Σ_k q[i, k]·x[k] runs in
the activations' dtype (int8 → int32 → float conversion and a fused multiply-add, which LLVM vectorises)
and is scaled once, ``s[i, g]·Σ`` (``linalg.row_dot``); with per-row scales there is one group per row. The
results equal ``x @ (s·q).T`` up to the rounding of a sum (the plain path rounds each s·q first): float32
tolerance, tested per kernel in tests/fast/test_int8_kernels.py.

``Q8Matrix`` wraps a ``thl_np.quant.QuantizedTensor`` for the decoder: ``linear`` picks the kernel by the
number of rows (one: ``gemv_q8``; up to SMALL_BATCH: ``linalg.small_batch_linear`` with the scales, or for a
matrix marked ``packed``, the output head, ``packed_linear_q8`` on a k-major copy; more, a prompt's
positions: the matrix dequantized a block of rows at a time into BLAS). ``Q8Heads`` and ``Q8HeadsT`` are
the router's per-head products. ``thl_np.fast.linalg.linear`` hands any weight that is not a NumPy array to
its ``linear``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .linalg import (
    PACK_ROWS,
    SMALL_BATCH,
    by_pack_rows,
    lanes,
    make_packed_tiles,
    pack_rows,
    per_head_linear,
    row_dot,
    small_batch_linear,
)
from .primitives import VECTORISE

DENSE_BLOCK_BYTES = 32 << 20  # many rows: dequantize W this many bytes at a time, then BLAS


# ---------------------------------------------------------------------------------------------------
# Row-major kernels: one row, per head (a few rows: linalg.small_batch_linear with the scales)
# ---------------------------------------------------------------------------------------------------
@njit(parallel=True, fastmath=VECTORISE, cache=True)
def gemv_q8(Q, S, group, b_o, x, out):
    """out[i] = Σ_g S[i, g]·Σ_{k ∈ g} Q[i, k]·x[k] + b_o[i]: linear_forward of one sequence with W = s·q. The
    rows split over the cores, each row one sequential stream of int8 values (a quarter of float32's bytes)."""
    for i in prange(Q.shape[0]):
        out[i] = row_dot(Q, S, group, i, x) + b_o[i]


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def per_head_q8(X, Q, S, group, out):
    """out[h, b, i] = W[h, i]·X[h, b] for every head, W[h, i, k] = S[h, i, k // group]·Q[h, i, k]: the
    router's r_h = W_v,h mix_h (thl_np.fast.linalg.per_head_linear) on int8 values."""
    H, R, C = Q.shape
    for hi in prange(H * R):
        h = hi // R
        i = hi - h * R
        for b in range(X.shape[1]):
            out[h, b, i] = row_dot(Q[h], S[h], group, i, X[h, b])


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def per_head_transposed_q8(X, Q, S, group, out):
    """out[h, b, i] = Σ_j W[h, j, i]·X[h, b, j], W[h, j, i] = S[h, j, i // group]·Q[h, j, i]: the router's
    q_mem_h = W_k,h^T q_h (thl_np.components.router.slot_scores) read from W_k's own rows, so its scales
    stay with the rows they belong to (the float path keeps a transposed copy instead). Each row j adds
    X[h, b, j]·S[h, j, g] times its int8 values to the output (an axpy per row and sequence); a task is one
    head and one group of columns."""
    H, Dh, C = Q.shape
    B = X.shape[1]
    G = S.shape[2]
    for hg in prange(H * G):
        h = hg // G
        g = hg - h * G
        i0 = g * group
        i1 = min(i0 + group, C)
        for b in range(B):
            o = out[h, b, i0:i1]
            for i in range(o.shape[0]):
                o[i] = 0.0
        for j in range(Dh):
            s = S[h, j, g]
            row = Q[h, j, i0:i1]  # indexed from 0: contiguous vector loads (see linalg.qdot)
            for b in range(B):
                c = X[h, b, j] * s
                o = out[h, b, i0:i1]
                for i in range(row.shape[0]):
                    o[i] += c * np.float32(row[i])


@njit(cache=True)
def gather_rows_q8(Q, S, group, ids, out):
    """out[n] = W[ids[n]] (the embedding's rows, dequantized: s·q rounded once in out's dtype). A batch's few
    rows: one thread (a parallel launch would cost more than the work)."""
    for n in range(ids.shape[0]):
        _dequantize_row(Q[ids[n]], S[ids[n]], group, out[n])


@njit(cache=True)
def dequantize_rows_q8(Q, S, group, r0, out):
    """out[r] = W[r0 + r] = s·q for the rows out holds (a block of a matrix, for a prompt's GEMM), in out's
    dtype: exact in float64, rounded once in float32 (as thl_np.quant.scheme.dequantize). On the calling
    thread: it alternates with BLAS calls, whose spinning workers would take the cores of Numba's pool
    (thl_np._blas), and it costs little beside the GEMM."""
    for r in range(out.shape[0]):
        _dequantize_row(Q[r0 + r], S[r0 + r], group, out[r])


@njit(cache=True, fastmath=VECTORISE)
def _dequantize_row(q, s, group, out):
    """out[k] = s[k // group]·q[k] with the scale converted to out's dtype first, so the product is out's
    (exact in float64, rounded once in float32); each group's scale is hoisted out of its loop, so the loop
    vectorises (int8 → float conversion and one multiply)."""
    for g in range(s.shape[0]):
        sg = out.dtype.type(s[g])
        o = out[g * group:(g + 1) * group]
        v = q[g * group:(g + 1) * group]
        for k in range(o.shape[0]):
            o[k] = sg * np.float32(v[k])


# ---------------------------------------------------------------------------------------------------
# The output head for a batch of sequences, on a packed copy of its int8 values
# ---------------------------------------------------------------------------------------------------
# As thl_np.fast.linalg.packed_linear, on int8 values and their scales packed by ``linalg.pack_rows`` (tiles
# of L rows, L from the activations' dtype; see ``linalg.make_packed_tiles``).
_rows_tiles_2 = make_packed_tiles(2, int8=True)
_rows_tiles_1 = make_packed_tiles(1, int8=True)
_group_tiles_1 = make_packed_tiles(1, int8=True, grouped=True)
_one_row_tiles_4 = make_packed_tiles(4, rows=1, int8=True)
_one_row_tiles_1 = make_packed_tiles(1, rows=1, int8=True)


@njit(cache=True, parallel=True)
def packed_linear_q8(Qp, Sp, group, h, out):
    """out[b, i] = W[i]·h[b] (linear_forward without the bias) for b < PACK_ROWS, W = s·q (q and s each packed
    by ``linalg.pack_rows``; out has Qp.shape[0]·lanes columns, h exactly PACK_ROWS C-contiguous rows). Per-row
    scales: two tiles per iteration, 2·PACK_ROWS independent accumulators, the scale applied at the store
    (as thl_np.fast.linalg.packed_linear); block scales: one tile, partial sums scaled into totals per group."""
    T = Qp.shape[0]
    if Sp.shape[1] == 1:
        for p in prange(T // 2):
            _rows_tiles_2(Qp, Sp, h, out, 2 * p, group)
        if T % 2:
            _rows_tiles_1(Qp, Sp, h, out, T - 1, group)
    else:
        for t in prange(T):
            _group_tiles_1(Qp, Sp, h, out, t, group)


@njit(cache=True, parallel=True)
def packed_gemv_q8(Qp, Sp, h, out):
    """out[0, i] = W[i]·h[0] for one sequence, W = s·q packed by ``linalg.pack_rows`` with per-row scales: four
    tiles per iteration (four independent accumulators of L lanes, one broadcast of h[0, k] for 4·L weights),
    no horizontal sums (gemv_q8 ends every row with one)."""
    T = Qp.shape[0]
    for p in prange(T // 4):
        _one_row_tiles_4(Qp, Sp, h, out, 4 * p, 1)
    for t in range(T - T % 4, T):
        _one_row_tiles_1(Qp, Sp, h, out, t, 1)


# ---------------------------------------------------------------------------------------------------
# The decoder's view of a quantized matrix
# ---------------------------------------------------------------------------------------------------
class Q8Matrix:
    """A quantized matrix W = s·q [R, C] for ``thl_np.fast.linalg.linear`` (module docstring). ``packed``: keep
    a k-major copy of the int8 values for 2..SMALL_BATCH rows (the output head: V·Σd_k bytes, 116 MB for the
    default config), built on first use and kept on the QuantizedTensor, so every decoder of the model
    shares it."""

    def __init__(self, q, scale, group: int, packed: bool = False, source=None):
        self.q = np.ascontiguousarray(q)
        self.scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.group = int(group)
        self.packed = packed
        self.source = source  # the QuantizedTensor whose ``derived`` keeps the packed copy

    @classmethod
    def of(cls, tensor, packed: bool = False) -> Q8Matrix:
        return cls(tensor.q, tensor.scale, tensor.group, packed, tensor)

    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)

    def dense(self, dtype, start: int = 0, stop: int | None = None) -> np.ndarray:
        """W[start:stop] = s·q in ``dtype``."""
        from ..quant.scheme import dequantize

        stop = self.q.shape[0] if stop is None else stop
        return dequantize(self.q[start:stop], self.scale[start:stop], self.group, dtype)

    def rows(self, ids, dtype) -> np.ndarray:
        """W[ids] for ids [n] (the embedding)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.q.shape[1]), dtype)
        gather_rows_q8(self.q, self.scale, self.group, ids, out)
        return out

    def linear(self, x, b, out=None) -> np.ndarray:
        """out = x @ W.T + b for x [n, C]."""
        n = x.shape[0]
        if out is None:
            out = np.empty((n, self.q.shape[0]), x.dtype)
        if n == 1 and self.packed and self.scale.shape[1] == 1:
            self._packed_one(x, b, out)
        elif n == 1:
            gemv_q8(self.q, self.scale, self.group, b, x[0], out[0])
        elif n <= SMALL_BATCH and self.packed:
            self._packed(x, b, out)
        elif n <= SMALL_BATCH:
            small_batch_linear(self.q, b, np.ascontiguousarray(x), out, self.scale, self.group)
        else:
            self._dense_blocks(x, b, out)
        return out

    def _dense_blocks(self, x, b, out):
        """Many rows (a prompt's positions): W a block of rows at a time, dequantized (dequantize_rows_q8) into
        one reused buffer, then one BLAS product per block into a contiguous result. Each int8 value is read
        and converted once per call, whatever the number of rows."""
        R, C = self.q.shape
        step = min(R, max(1, DENSE_BLOCK_BYTES // (C * x.dtype.itemsize)))
        buf = np.empty((step, C), x.dtype)
        res = np.empty((x.shape[0], step), x.dtype)
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            dequantize_rows_q8(self.q, self.scale, self.group, r0, buf[:r1 - r0])
            np.matmul(x, buf[:r1 - r0].T, out=res[:, :r1 - r0])
            np.add(res[:, :r1 - r0], b[r0:r1], out=out[:, r0:r1])

    def _packed_copy(self, dt):
        """(Qp, Sp): the k-major copy for activations of dtype ``dt``, built once per model."""
        L = lanes(dt)
        cache = self.source.derived if self.source is not None else self.__dict__.setdefault("_derived", {})
        key = ("packed_q8", L)
        if key not in cache:
            R, C = self.q.shape
            T = -(-R // L)
            Qp = np.empty((T, C, L), np.int8)
            Sp = np.empty((T, self.scale.shape[1], L), np.float32)
            pack_rows(self.q, L, Qp)
            pack_rows(self.scale, L, Sp)
            cache[key] = (Qp, Sp)
        return cache[key]

    def _packed_one(self, x, b, out):
        """One sequence of a packed per-row matrix (the output head at batch 1): packed_gemv_q8."""
        Qp, Sp = self._packed_copy(x.dtype)
        res = np.empty((1, Qp.shape[0] * Qp.shape[2]), x.dtype)
        packed_gemv_q8(Qp, Sp, np.ascontiguousarray(x), res)
        np.add(res[:, :self.q.shape[0]], b, out=out)

    def _packed(self, x, b, out):
        dt = x.dtype
        Qp, Sp = self._packed_copy(dt)
        h_in = np.zeros((PACK_ROWS, x.shape[1]), dt)
        res = np.empty((PACK_ROWS, Qp.shape[0] * Qp.shape[2]), dt)
        by_pack_rows(lambda h, r: packed_linear_q8(Qp, Sp, self.group, h, r), x, b, out, h_in, res)


class Q8Heads:
    """W [H·R, C] seen as H heads [H, R, C] (the router's W_v): ``per_head(X, out)`` is per_head_q8."""

    def __init__(self, W: Q8Matrix, num_heads: int):
        R, C = W.shape
        self.q = W.q.reshape(num_heads, R // num_heads, C)
        self.scale = W.scale.reshape(num_heads, R // num_heads, -1)
        self.group = W.group

    def per_head(self, X, out):
        per_head_q8(X, self.q, self.scale, self.group, out)


class Q8HeadsT(Q8Heads):
    """W [H·d_h, C] used transposed per head (the router's W_k: q_mem_h = W_k,h^T q_h):
    ``per_head(X, out)`` is per_head_transposed_q8."""

    def per_head(self, X, out):
        per_head_transposed_q8(X, self.q, self.scale, self.group, out)


# ---------------------------------------------------------------------------------------------------
# The decoder's weights: float arrays, or int8 matrices where the model is quantized
# ---------------------------------------------------------------------------------------------------
def decoder_weight(params, name: str, packed: bool = False):
    """``params[name]`` for the decoder: a Q8Matrix over the stored int8 values where the model holds
    ``name`` quantized (``thl_np.quant.QuantizedParams``), the float array otherwise."""
    if hasattr(params, "is_quantized") and params.is_quantized(name):
        return Q8Matrix.of(params.tensor(name), packed)
    return params[name]


def concat_rows(weights, dtype):
    """The rows of several matrices in one (one product instead of several). Int8 matrices stay int8 when
    all are int8 with one group size; a mix is made float (W = s·q, a file may quantize only some)."""
    if all(isinstance(w, Q8Matrix) for w in weights) and len({w.group for w in weights}) == 1:
        return Q8Matrix(np.concatenate([w.q for w in weights]), np.concatenate([w.scale for w in weights]),
                        weights[0].group)
    return np.concatenate([w if isinstance(w, np.ndarray) else w.dense(dtype) for w in weights])


def heads(W, num_heads: int):
    """W [H·R, C] as [H, R, C] for per_head (the router's W_v,h)."""
    if isinstance(W, np.ndarray):
        return np.ascontiguousarray(W.reshape(num_heads, -1, W.shape[1]))
    return Q8Heads(W, num_heads)


def heads_transposed(W, num_heads: int):
    """W [H·d_h, C] for per_head products with W_h^T (the router's W_k,h): float, a transposed copy
    [H, C, d_h]; int8, the rows as they are (Q8HeadsT)."""
    if isinstance(W, np.ndarray):
        return np.ascontiguousarray(W.reshape(num_heads, -1, W.shape[1]).transpose(0, 2, 1))
    return Q8HeadsT(W, num_heads)


def per_head(X, W, out):
    """out[h, b, :] = W_h X[h, b] for a ``heads`` or ``heads_transposed`` weight."""
    if isinstance(W, np.ndarray):
        per_head_linear(X, W, out)
    else:
        W.per_head(X, out)


def rows(W, ids, dtype):
    """W[ids] for ids [n] (the embedding), dequantized for an int8 table."""
    return W[ids] if isinstance(W, np.ndarray) else W.rows(ids, dtype)


def times_transposed(x, W, dtype):
    """x @ W.T for x of any leading shape (rebuilding the local ring's keys and values on load)."""
    return x @ (W if isinstance(W, np.ndarray) else W.dense(dtype)).T
