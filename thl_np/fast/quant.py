"""Int8 products for the decode step: ``x @ W.T + b`` (thl_np.components.output.linear_forward) with
W = s·q given as int8 values q [R, C] and float32 scales s [R, G], one per group of ``group`` columns
(thl_np.quant.scheme.dequantize). Linear algebra only, no THL math: the int8 forms of ``thl_np.fast.linalg``.

Every kernel reads q as it is stored and never builds W: a group's dot product Σ_k q[i, k]·x[k] runs in
the activations' dtype (int8 → int32 → float conversion and a fused multiply-add, which LLVM vectorises)
and is scaled once, ``s[i, g]·Σ``; with per-row scales there is one group per row. The results equal
``x @ (s·q).T`` up to the rounding of a sum (the plain path rounds each s·q first): float32 tolerance,
tested per kernel in tests/fast/test_quant_kernels.py.

``Q8Matrix`` wraps a ``thl_np.quant.QuantizedTensor`` for the decoder: ``linear`` picks the kernel by the
number of rows (one: ``gemv_q8``; up to SMALL_BATCH: ``small_batch_q8``, or for a matrix marked ``packed``,
the output head, ``packed_linear_q8`` on a k-major copy; more, a prompt's positions: the matrix
dequantized a block of rows at a time into BLAS). ``Q8Heads`` and ``Q8HeadsT`` are the router's per-head
products. ``thl_np.fast.linalg.linear`` hands any weight that is not a NumPy array to its ``linear``.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .primitives import VECTORISE

SMALL_BATCH = 64          # as thl_np.fast.linalg.SMALL_BATCH (not imported: linalg dispatches here)
DENSE_BLOCK_BYTES = 32 << 20  # many rows: dequantize W this many bytes at a time, then BLAS
PACK_ROWS = 8             # sequences per call of packed_linear_q8 (fewer are padded with zeros)


# ---------------------------------------------------------------------------------------------------
# Row-major kernels: one row, a few rows, per head
# ---------------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=VECTORISE)
def qdot(q, x):
    """q·x in x's dtype (q int8). Callers pass a group's slices: an index counted from 0 is known to be
    non-negative, so the loop needs no wraparound select and vectorises into contiguous loads."""
    acc = x[0] - x[0]
    for k in range(q.shape[0]):
        acc += np.float32(q[k]) * x[k]
    return acc


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def gemv_q8(Q, S, group, b_o, x, out):
    """out[i] = Σ_g S[i, g]·Σ_{k ∈ g} Q[i, k]·x[k] + b_o[i]: linear_forward of one sequence with W = s·q. The
    rows split over the cores, each row one sequential stream of int8 values (a quarter of float32's bytes)."""
    G = S.shape[1]
    for i in prange(Q.shape[0]):
        acc = x[0] - x[0]
        for g in range(G):
            k0 = g * group
            acc += S[i, g] * qdot(Q[i, k0:k0 + group], x[k0:k0 + group])
        out[i] = acc + b_o[i]


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def small_batch_q8(Q, S, group, b_o, h, out):
    """out[b, i] = W[i]·h[b] + b_o[i] for a few sequences, W = s·q: tiles of 4 rows × 4 sequences, so each
    int8 value loaded and converted serves 4 sequences and each hidden value 4 rows; a tile's rows are read
    once for the whole batch. Per group: 16 partial sums, scaled into 16 totals."""
    V, C = Q.shape
    B = h.shape[0]
    G = S.shape[1]
    zero = h[0, 0] - h[0, 0]
    for blk in prange((V + 3) // 4):
        i0 = blk * 4
        if i0 + 4 > V:
            for i in range(i0, V):
                for b in range(B):
                    acc = zero
                    for g in range(G):
                        k0 = g * group
                        acc += S[i, g] * qdot(Q[i, k0:k0 + group], h[b, k0:k0 + group])
                    out[b, i] = acc + b_o[i]
            continue
        b0 = 0
        while b0 + 4 <= B:
            t00 = t01 = t02 = t03 = t10 = t11 = t12 = t13 = zero
            t20 = t21 = t22 = t23 = t30 = t31 = t32 = t33 = zero
            for g in range(G):
                a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = zero
                a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = zero
                k0 = g * group
                q0 = Q[i0, k0:k0 + group]  # slices indexed from 0: contiguous vector loads (see qdot)
                q1 = Q[i0 + 1, k0:k0 + group]
                q2 = Q[i0 + 2, k0:k0 + group]
                q3 = Q[i0 + 3, k0:k0 + group]
                h0 = h[b0, k0:k0 + group]
                h1 = h[b0 + 1, k0:k0 + group]
                h2 = h[b0 + 2, k0:k0 + group]
                h3 = h[b0 + 3, k0:k0 + group]
                for k in range(q0.shape[0]):
                    x0 = h0[k]
                    x1 = h1[k]
                    x2 = h2[k]
                    x3 = h3[k]
                    w = np.float32(q0[k])
                    a00 += w * x0
                    a01 += w * x1
                    a02 += w * x2
                    a03 += w * x3
                    w = np.float32(q1[k])
                    a10 += w * x0
                    a11 += w * x1
                    a12 += w * x2
                    a13 += w * x3
                    w = np.float32(q2[k])
                    a20 += w * x0
                    a21 += w * x1
                    a22 += w * x2
                    a23 += w * x3
                    w = np.float32(q3[k])
                    a30 += w * x0
                    a31 += w * x1
                    a32 += w * x2
                    a33 += w * x3
                s = S[i0, g]
                t00 += s * a00
                t01 += s * a01
                t02 += s * a02
                t03 += s * a03
                s = S[i0 + 1, g]
                t10 += s * a10
                t11 += s * a11
                t12 += s * a12
                t13 += s * a13
                s = S[i0 + 2, g]
                t20 += s * a20
                t21 += s * a21
                t22 += s * a22
                t23 += s * a23
                s = S[i0 + 3, g]
                t30 += s * a30
                t31 += s * a31
                t32 += s * a32
                t33 += s * a33
            _store4(out, b0, i0, t00, t01, t02, t03, b_o[i0])
            _store4(out, b0, i0 + 1, t10, t11, t12, t13, b_o[i0 + 1])
            _store4(out, b0, i0 + 2, t20, t21, t22, t23, b_o[i0 + 2])
            _store4(out, b0, i0 + 3, t30, t31, t32, t33, b_o[i0 + 3])
            b0 += 4
        for b in range(b0, B):  # the last 1-3 sequences
            for i in range(i0, i0 + 4):
                acc = zero
                for g in range(G):
                    k0 = g * group
                    acc += S[i, g] * qdot(Q[i, k0:k0 + group], h[b, k0:k0 + group])
                out[b, i] = acc + b_o[i]


@njit(cache=True)
def _store4(out, b0, i, a0, a1, a2, a3, bias):
    out[b0, i] = a0 + bias
    out[b0 + 1, i] = a1 + bias
    out[b0 + 2, i] = a2 + bias
    out[b0 + 3, i] = a3 + bias


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def per_head_q8(X, Q, S, group, out):
    """out[h, b, i] = W[h, i]·X[h, b] for every head, W[h, i, k] = S[h, i, k // group]·Q[h, i, k]: the
    router's r_h = W_v,h mix_h (thl_np.fast.linalg.per_head_linear) on int8 values."""
    H, R, C = Q.shape
    G = S.shape[2]
    for hi in prange(H * R):
        h = hi // R
        i = hi - h * R
        for b in range(X.shape[1]):
            acc = X[h, b, 0] - X[h, b, 0]
            for g in range(G):
                k0 = g * group
                acc += S[h, i, g] * qdot(Q[h, i, k0:k0 + group], X[h, b, k0:k0 + group])
            out[h, b, i] = acc


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
            row = Q[h, j, i0:i1]  # indexed from 0: contiguous vector loads (see qdot)
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
# As thl_np.fast.linalg.packed_linear: tiles of L rows (one 64-byte vector of the activations' dtype) stored
# k-major, so one load gives the k-th value of L rows, sign-extended and converted to L floats once, and
# each sequence's h[b, k] is broadcast into a fused multiply-add: no horizontal sums, one sequential stream
# of int8 (a quarter of float32's bytes), each value converted once for PACK_ROWS sequences. Scales are
# packed the same way (Sp[t, g, l]); each group's sums are scaled into running totals.
def lanes(dtype) -> int:
    """Rows per packed tile: one 64-byte vector of the activations' dtype."""
    return 64 // np.dtype(dtype).itemsize


@njit(cache=True, parallel=True)
def pack_rows_q8(Q, S, lanes, Qp, Sp):
    """Qp[t, k, l] = Q[t·lanes + l, k], Sp[t, g, l] = S[t·lanes + l, g] (rows past the end: zeros)."""
    V, C = Q.shape
    G = S.shape[1]
    for t in prange(Qp.shape[0]):
        for l in range(lanes):
            i = t * lanes + l
            if i < V:
                for k in range(C):
                    Qp[t, k, l] = Q[i, k]
                for g in range(G):
                    Sp[t, g, l] = S[i, g]
            else:
                for k in range(C):
                    Qp[t, k, l] = 0
                for g in range(G):
                    Sp[t, g, l] = 0.0


def _make_packed_tiles_q8(n_tiles: int, grouped: bool, rows: int = PACK_ROWS):
    @intrinsic
    def packed_tiles_q8(typingctx, Qp, Sp, h, out, t, group):
        """out[b, (t+j)·L : (t+j+1)·L] = Σ_g Sp[t+j, g, :] ⊙ Σ_{k ∈ g} float(Qp[t+j, k, :])·h[b, k] for j < n_tiles
        and b < rows, in LLVM IR: per k one vector load of L int8 per tile, sign extension, conversion,
        then ``rows`` fused multiply-adds with broadcasts of h. ``grouped``: each group's partial sums are
        scaled into running totals (block scales); otherwise one scale per row, applied at the store."""
        dtype = h.dtype

        def codegen(context, builder, sig, args):
            Q_ty, S_ty, h_ty, out_ty = sig.args[:4]
            Q_arr = context.make_array(Q_ty)(context, builder, args[0])
            S_arr = context.make_array(S_ty)(context, builder, args[1])
            h_arr = context.make_array(h_ty)(context, builder, args[2])
            out_arr = context.make_array(out_ty)(context, builder, args[3])
            intp = context.get_value_type(types.intp)
            tile = context.cast(builder, args[4], sig.args[4], types.intp)
            group = context.cast(builder, args[5], sig.args[5], types.intp)
            elem = context.get_value_type(dtype)
            lanes = 64 // (dtype.bitwidth // 8)
            vec = ir.VectorType(elem, lanes)
            ivec = ir.VectorType(ir.IntType(32), lanes)
            qvec = ir.VectorType(ir.IntType(8), lanes)
            svec = ir.VectorType(ir.FloatType(), lanes)
            i32 = ir.IntType(32)

            def const(v):
                return ir.Constant(intp, v)

            def item_ptr(arr, ty, idx):
                return cgutils.get_item_pointer2(context, builder, arr.data, cgutils.unpack_tuple(builder, arr.shape),
                                                 cgutils.unpack_tuple(builder, arr.strides), ty.layout, idx,
                                                 wraparound=False, boundscheck=False)

            depth = builder.extract_value(Q_arr.shape, 1)
            tiles = [builder.add(tile, const(j)) for j in range(n_tiles)]
            q_ptrs = [item_ptr(Q_arr, Q_ty, [t, const(0), const(0)]) for t in tiles]
            s_ptrs = [item_ptr(S_arr, S_ty, [t, const(0), const(0)]) for t in tiles]
            h_ptrs = [item_ptr(h_arr, h_ty, [const(b), const(0)]) for b in range(rows)]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{lanes}f{dtype.bitwidth}")
            zero = ir.Constant(vec, [ir.Constant(elem, 0.0)] * lanes)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(rows)] for _ in range(n_tiles)]
            tot = [[cgutils.alloca_once_value(builder, zero) for _ in range(rows)] for _ in range(n_tiles)]
            undef = ir.Constant(vec, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)

            def scales(j, g):
                s = builder.load(builder.bitcast(builder.gep(s_ptrs[j], [builder.mul(g, const(lanes))]),
                                                 svec.as_pointer()), align=4)
                return s if dtype.bitwidth == 32 else builder.fpext(s, vec)

            def k_loop(k0, k1):
                with cgutils.for_range_slice(builder, k0, k1, const(1), intp=intp) as (k, _):
                    w = []
                    for j in range(n_tiles):
                        raw = builder.load(builder.bitcast(builder.gep(q_ptrs[j], [builder.mul(k, const(lanes))]),
                                                           qvec.as_pointer()), align=1)
                        w.append(builder.sitofp(builder.sext(raw, ivec), vec))
                    for b in range(rows):
                        x = builder.load(builder.gep(h_ptrs[b], [k]))
                        x = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat)
                        for j in range(n_tiles):
                            builder.store(builder.call(fma, [w[j], x, builder.load(acc[j][b])]), acc[j][b])

            if grouped:
                n_groups = builder.extract_value(S_arr.shape, 1)
                with cgutils.for_range(builder, n_groups, intp=intp) as gloop:
                    g = gloop.index
                    k0 = builder.mul(g, group)
                    k1 = builder.add(k0, group)
                    k1 = builder.select(builder.icmp_signed("<", k1, depth), k1, depth)
                    for j in range(n_tiles):
                        for b in range(rows):
                            builder.store(zero, acc[j][b])
                    k_loop(k0, k1)
                    for j in range(n_tiles):
                        s = scales(j, g)
                        for b in range(rows):
                            builder.store(builder.call(fma, [builder.load(acc[j][b]), s, builder.load(tot[j][b])]),
                                          tot[j][b])
                result = tot
            else:
                k_loop(const(0), depth)
                for j in range(n_tiles):
                    s = scales(j, const(0))
                    for b in range(rows):
                        builder.store(builder.fmul(builder.load(acc[j][b]), s), tot[j][b])
                result = tot
            for j in range(n_tiles):
                col = builder.mul(tiles[j], const(lanes))
                for b in range(rows):
                    dst = builder.bitcast(item_ptr(out_arr, out_ty, [const(b), col]), vec.as_pointer())
                    builder.store(builder.load(result[j][b]), dst, align=dtype.bitwidth // 8)
            return context.get_dummy_value()

        return types.void(Qp, Sp, h, out, t, group), codegen

    return packed_tiles_q8


_rows_tiles_2 = _make_packed_tiles_q8(2, grouped=False)
_rows_tiles_1 = _make_packed_tiles_q8(1, grouped=False)
_group_tiles_1 = _make_packed_tiles_q8(1, grouped=True)
_one_row_tiles_4 = _make_packed_tiles_q8(4, grouped=False, rows=1)
_one_row_tiles_1 = _make_packed_tiles_q8(1, grouped=False, rows=1)


@njit(cache=True, parallel=True)
def packed_linear_q8(Qp, Sp, group, h, out):
    """out[b, i] = W[i]·h[b] (linear_forward without the bias) for b < PACK_ROWS, W = s·q packed by
    ``pack_rows_q8`` (out has Qp.shape[0]·lanes columns, h exactly PACK_ROWS C-contiguous rows). Per-row
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
    """out[0, i] = W[i]·h[0] for one sequence, W = s·q packed by ``pack_rows_q8`` with per-row scales: four
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
            small_batch_q8(self.q, self.scale, self.group, b, np.ascontiguousarray(x), out)
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
            pack_rows_q8(self.q, self.scale, L, Qp, Sp)
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
        R = self.q.shape[0]
        h_in = np.zeros((PACK_ROWS, x.shape[1]), dt)
        res = np.empty((PACK_ROWS, Qp.shape[0] * Qp.shape[2]), dt)
        for r0 in range(0, x.shape[0], PACK_ROWS):
            m = min(PACK_ROWS, x.shape[0] - r0)
            h_in[:m] = x[r0:r0 + m]
            h_in[m:] = 0
            packed_linear_q8(Qp, Sp, self.group, h_in, res)
            np.add(res[:m, :R], b, out=out[r0:r0 + m])


class Q8Heads:
    """W [H·R, C] seen as H heads [H, R, C] (the router's W_v): ``per_head(X, out)`` is per_head_q8."""

    def __init__(self, W: Q8Matrix, num_heads: int):
        R, C = W.shape
        self.q = W.q.reshape(num_heads, R // num_heads, C)
        self.scale = W.scale.reshape(num_heads, R // num_heads, -1)
        self.group = W.group

    def per_head(self, X, out):
        per_head_q8(X, self.q, self.scale, self.group, out)


class Q8HeadsT:
    """W [H·d_h, C] used transposed per head (the router's W_k: q_mem_h = W_k,h^T q_h):
    ``per_head(X, out)`` is per_head_transposed_q8."""

    def __init__(self, W: Q8Matrix, num_heads: int):
        R, C = W.shape
        self.q = W.q.reshape(num_heads, R // num_heads, C)
        self.scale = W.scale.reshape(num_heads, R // num_heads, -1)
        self.group = W.group

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
        from .linalg import per_head_linear

        per_head_linear(X, W, out)
    else:
        W.per_head(X, out)


def rows(W, ids, dtype):
    """W[ids] for ids [n] (the embedding), dequantized for an int8 table."""
    return W[ids] if isinstance(W, np.ndarray) else W.rows(ids, dtype)


def times_transposed(x, W, dtype):
    """x @ W.T for x of any leading shape (rebuilding the local ring's keys and values on load)."""
    return x @ (W if isinstance(W, np.ndarray) else W.dense(dtype)).T
