"""Linear algebra for the decode step, apart from THL's math: products with few rows (a decode step's batch),
which BLAS handles poorly, and the ``linear`` dispatcher that picks a kernel by the number of rows. Every
kernel here computes ``x @ W.T + b`` (thl_np.components.output.linear_forward) or a per-head form of it.

The small-batch tile (``small_batch_linear``), the packing into k-major tiles (``pack_rows``) and the LLVM-IR
generator of packed tiles (``make_packed_tiles``) are written once, for float weights and for int8 values
with their scales; ``thl_np.fast.int8`` holds what only int8 needs. Two kernels run the packed tiles:
``packed_linear`` (threaded, PACK_ROWS rows: the decoder's batched head and step matrices) and
``packed_rows_linear`` (one thread, any rows, each row's bits independent of the others: a small model's
compiled step, thl_np.engines.compiled_steps).

The decoder runs on one thread pool, Numba's: OpenBLAS's workers spin after each call, and on a machine
with few cores they then take the cores Numba's threads need (measured: 2× slower steps); see
``thl_np._blas`` for holding OpenBLAS to one thread where BLAS is used.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .primitives import VECTORISE, dot

# Products with up to this many rows run in the Numba kernels, larger ones in BLAS GEMM (measured on the
# default head: BLAS takes 86 ms for 17 rows and 134 ms for 64, packed_linear ~15 ms per 8 rows).
SMALL_BATCH = 64


def linear(x, W, b, out=None):
    """out = x @ W.T + b for x [n, d_in] C-contiguous (thl_np.components.output.linear_forward). A few rows
    (a decode step's batch) run in Numba kernels that read W once for all rows; many rows (a prompt's
    positions) in BLAS."""
    if not isinstance(W, np.ndarray):  # int8 weights: thl_np.fast.int8.Q8Matrix picks its own kernel
        return W.linear(x, b, out)
    n = x.shape[0]
    if out is None:
        out = np.empty((n, W.shape[0]), x.dtype)
    if n > SMALL_BATCH or not W.flags.c_contiguous:
        np.matmul(x, W.T, out=out)
        out += b
    elif n == 1:
        gemv(W, b, x[0], out[0])
    else:
        small_batch_linear(W, b, x, out)
    return out


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def gemv(W, b_o, x, out):
    """out[i] = W[i]·x + b_o[i]: linear_forward for one sequence, the rows split over the cores. One row per
    iteration keeps each core's reads one sequential stream, which the hardware prefetches best (measured on
    the default head: 0.65-0.85× the time of four rows per iteration, and faster than OpenBLAS's GEMV)."""
    for i in prange(W.shape[0]):
        out[i] = dot(W[i], x) + b_o[i]


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def per_head_linear(X, W, out):
    """out[h, b, i] = W[h, i]·X[h, b] for every head h at once: the router's per-head products (q_mem_h =
    W_k,h^T q_h of thl_np.components.router.slot_scores, and r_h = W_v,h mix_h), one call instead of one per
    head."""
    H, R, _ = W.shape
    for hi in prange(H * R):
        h = hi // R
        i = hi - h * R
        for b in range(X.shape[1]):
            out[h, b, i] = dot(W[h, i], X[h, b])


# ---------------------------------------------------------------------------------------------------
# Products with a few rows, for float weights and int8 weights alike
# ---------------------------------------------------------------------------------------------------
# An int8 matrix (thl_np.fast.int8) is given as its int8 values W and float32 scales S [R, G], one per group
# of ``group`` columns (thl_np.quant.scheme.dequantize: the true weight is S[i, k // group]·W[i, k]); a float
# matrix passes S = None, which Numba resolves when it compiles (one group of every column, no scale). A
# group's sum runs in the activations' dtype (int8 → float conversion and a fused multiply-add, which LLVM
# vectorises) and is scaled once.
@njit(cache=True, fastmath=VECTORISE)
def qdot(q, x):
    """q·x in x's dtype (q int8). Callers pass a group's slices: an index counted from 0 is known to be
    non-negative, so the loop needs no wraparound select and vectorises into contiguous loads."""
    acc = x[0] - x[0]
    for k in range(q.shape[0]):
        acc += np.float32(q[k]) * x[k]
    return acc


@njit(cache=True, fastmath=VECTORISE)
def row_dot(W, S, group, i, x):
    """W[i]·x for a float W (S None), or Σ_g S[i, g]·Σ_{k ∈ g} W[i, k]·x[k] for int8 values W."""
    if S is None:
        return dot(W[i], x)
    acc = x[0] - x[0]
    for g in range(S.shape[1]):
        k0 = g * group
        acc += S[i, g] * qdot(W[i, k0:k0 + group], x[k0:k0 + group])
    return acc


@njit(cache=True, fastmath=VECTORISE, inline="always")
def _fma4(w, x0, x1, x2, x3, a0, a1, a2, a3):
    """One row of a tile: a_b += w·x_b for four sequences."""
    return a0 + w * x0, a1 + w * x1, a2 + w * x2, a3 + w * x3


@njit(cache=True, fastmath=VECTORISE, inline="always")
def _scale4(s, a0, a1, a2, a3, t0, t1, t2, t3):
    """One row of a tile at the end of a group: t_b += s·a_b."""
    return t0 + s * a0, t1 + s * a1, t2 + s * a2, t3 + s * a3


@njit(cache=True)
def store4(out, b0, i, a0, a1, a2, a3, bias):
    """out[b0 + b, i] = a_b + bias for four sequences: one row of a tile."""
    out[b0, i] = a0 + bias
    out[b0 + 1, i] = a1 + bias
    out[b0 + 2, i] = a2 + bias
    out[b0 + 3, i] = a3 + bias


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def small_batch_linear(W, b_o, h, out, S=None, group=0):
    """out[b, i] = W[i]·h[b] + b_o[i] (linear_forward) for a few sequences, W float (S None) or int8 values
    with scales S (see above). Tiles of R rows of W × 4 sequences keep 4·R accumulators in registers: each
    weight loaded (and converted) is used 4 times and each hidden value R times, so the multiply-adds (not
    the loads) set the pace, and a tile's rows are streamed from memory once for the whole batch (BLAS's GEMM
    handles this thin shape poorly). R = 6 for float weights, 4 for int8 (the conversions take registers).
    Per group the partial sums are scaled into running totals (a float W is one group, scale 1: exact)."""
    V, D = W.shape
    B = h.shape[0]
    R, G, width = 6, 1, D
    if S is not None:
        R, G, width = 4, S.shape[1], group
    zero = h[0, 0] - h[0, 0]
    one = h.dtype.type(1.0)
    for blk in prange((V + R - 1) // R):
        i0 = blk * R
        if i0 + R > V:
            for i in range(i0, V):
                for b in range(B):
                    out[b, i] = row_dot(W, S, group, i, h[b]) + b_o[i]
            continue
        # rows 4 and 5 of a float tile (an int8 tile has four: every ``if S is None`` is settled when Numba
        # compiles, so neither form tests it in its loops)
        i4 = i0 + 4 if S is None else i0
        i5 = i0 + 5 if S is None else i0
        b0 = 0
        while b0 + 4 <= B:
            t00 = t01 = t02 = t03 = t10 = t11 = t12 = t13 = t20 = t21 = t22 = t23 = zero
            t30 = t31 = t32 = t33 = t40 = t41 = t42 = t43 = t50 = t51 = t52 = t53 = zero
            for g in range(G):
                k0 = g * width
                k1 = k0 + width
                # slices indexed from 0: contiguous vector loads (see qdot)
                w0, w1, w2, w3 = W[i0, k0:k1], W[i0 + 1, k0:k1], W[i0 + 2, k0:k1], W[i0 + 3, k0:k1]
                w4, w5 = W[i4, k0:k1], W[i5, k0:k1]
                h0, h1, h2, h3 = h[b0, k0:k1], h[b0 + 1, k0:k1], h[b0 + 2, k0:k1], h[b0 + 3, k0:k1]
                a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = zero
                a30 = a31 = a32 = a33 = a40 = a41 = a42 = a43 = a50 = a51 = a52 = a53 = zero
                for k in range(w0.shape[0]):
                    x0, x1, x2, x3 = h0[k], h1[k], h2[k], h3[k]
                    a00, a01, a02, a03 = _fma4(h.dtype.type(w0[k]), x0, x1, x2, x3, a00, a01, a02, a03)
                    a10, a11, a12, a13 = _fma4(h.dtype.type(w1[k]), x0, x1, x2, x3, a10, a11, a12, a13)
                    a20, a21, a22, a23 = _fma4(h.dtype.type(w2[k]), x0, x1, x2, x3, a20, a21, a22, a23)
                    a30, a31, a32, a33 = _fma4(h.dtype.type(w3[k]), x0, x1, x2, x3, a30, a31, a32, a33)
                    if S is None:
                        a40, a41, a42, a43 = _fma4(h.dtype.type(w4[k]), x0, x1, x2, x3, a40, a41, a42, a43)
                        a50, a51, a52, a53 = _fma4(h.dtype.type(w5[k]), x0, x1, x2, x3, a50, a51, a52, a53)
                s0 = one if S is None else S[i0, g]
                s1 = one if S is None else S[i0 + 1, g]
                s2 = one if S is None else S[i0 + 2, g]
                s3 = one if S is None else S[i0 + 3, g]
                t00, t01, t02, t03 = _scale4(s0, a00, a01, a02, a03, t00, t01, t02, t03)
                t10, t11, t12, t13 = _scale4(s1, a10, a11, a12, a13, t10, t11, t12, t13)
                t20, t21, t22, t23 = _scale4(s2, a20, a21, a22, a23, t20, t21, t22, t23)
                t30, t31, t32, t33 = _scale4(s3, a30, a31, a32, a33, t30, t31, t32, t33)
                if S is None:
                    t40, t41, t42, t43 = _scale4(one, a40, a41, a42, a43, t40, t41, t42, t43)
                    t50, t51, t52, t53 = _scale4(one, a50, a51, a52, a53, t50, t51, t52, t53)
            store4(out, b0, i0, t00, t01, t02, t03, b_o[i0])
            store4(out, b0, i0 + 1, t10, t11, t12, t13, b_o[i0 + 1])
            store4(out, b0, i0 + 2, t20, t21, t22, t23, b_o[i0 + 2])
            store4(out, b0, i0 + 3, t30, t31, t32, t33, b_o[i0 + 3])
            if S is None:
                store4(out, b0, i4, t40, t41, t42, t43, b_o[i4])
                store4(out, b0, i5, t50, t51, t52, t53, b_o[i5])
            b0 += 4
        for b in range(b0, B):  # the last 1-3 sequences
            for i in range(i0, i0 + R):
                out[b, i] = row_dot(W, S, group, i, h[b]) + b_o[i]


# ---------------------------------------------------------------------------------------------------
# The output head for a batch of sequences, on a packed copy of its weights
# ---------------------------------------------------------------------------------------------------
# A decode step at batch > 1 is dominated by the head: B × V × d multiply-adds over V × d weights read
# once. With W stored row by row, every dot product ends in a horizontal sum and each tile of rows is
# several streams at once; the hardware then neither overlaps the arithmetic with the memory stream nor
# keeps the stream full (measured: 23 ms for batch 8 on the default config, against 15 ms to read W).
# Packed in tiles of LANES rows stored k-major (``pack_rows``), one vector load gives the k-th weight of
# LANES rows, each sequence's h[b, k] is broadcast, and the LANES dot products of a tile accumulate in one
# register per sequence: no horizontal sums, one sequential stream (measured: 16.6 ms). Numba does not
# generate this loop from Python code, so ``_packed_tiles`` writes it in LLVM IR.
# Int8 weights (thl_np.fast.int8.packed_linear_q8) are packed the same way, tiles of L rows of int8 values
# (L from the activations' dtype) and their scales beside them (Sp[t, g, l]); one load gives the k-th value
# of L rows, sign-extended and converted to L floats once for PACK_ROWS sequences.
PACK_ROWS = 8  # sequences per call of packed_linear (fewer are padded with zeros)


def lanes(dtype) -> int:
    """Rows per packed tile: one 64-byte vector of the (activations') dtype."""
    return 64 // np.dtype(dtype).itemsize


@njit(cache=True, parallel=True)
def pack_rows(W, lanes, Wp):
    """Wp[t, k, l] = W[t·lanes + l, k] (rows past the end of W are zeros): float weights, int8 values, or an
    int8 matrix's scales [R, G]."""
    V, D = W.shape
    for t in prange(Wp.shape[0]):
        for l in range(lanes):
            i = t * lanes + l
            if i < V:
                for k in range(D):
                    Wp[t, k, l] = W[i, k]
            else:
                for k in range(D):
                    Wp[t, k, l] = 0


def make_packed_tiles(n_tiles: int, rows: int = PACK_ROWS, int8: bool = False, grouped: bool = False):
    """An intrinsic that computes ``n_tiles`` packed tiles from tile t on for ``rows`` sequences, in LLVM IR:
    per k one vector load of L weights per tile (int8: L values, sign-extended and converted), ``rows``
    broadcasts of h[b, k] and fused multiply-adds into rows × n_tiles vector accumulators, plain vector stores:

    float ``(Wp, h, out, t)``: out[b, (t+j)·L : (t+j+1)·L] = Σ_k Wp[t+j, k, :]·h[b, k];
    int8 ``(Qp, Sp, h, out, t, group)``: the same sums of Qp's values, scaled by Sp: one scale per row
    (Sp[t+j, 0, :]) applied at the store, or, ``grouped``, each group's partial sums scaled into running
    totals (Sp[t+j, g, :] for the group of columns g·group … (g+1)·group)."""

    def codegen(context, builder, sig, args):
        if int8:
            W_ty, S_ty, h_ty, out_ty, t_ty, g_ty = sig.args
            W_val, S_val, h_val, out_val, t_val, g_val = args
        else:
            W_ty, h_ty, out_ty, t_ty = sig.args
            W_val, h_val, out_val, t_val = args
        W_arr = context.make_array(W_ty)(context, builder, W_val)
        h_arr = context.make_array(h_ty)(context, builder, h_val)
        out_arr = context.make_array(out_ty)(context, builder, out_val)
        intp = context.get_value_type(types.intp)
        tile = context.cast(builder, t_val, t_ty, types.intp)
        dtype = h_ty.dtype
        elem = context.get_value_type(dtype)
        lanes = 64 // (dtype.bitwidth // 8)
        vec = ir.VectorType(elem, lanes)
        i32 = ir.IntType(32)

        def const(v):
            return ir.Constant(intp, v)

        def item_ptr(arr, ty, idx):
            return cgutils.get_item_pointer2(context, builder, arr.data, cgutils.unpack_tuple(builder, arr.shape),
                                             cgutils.unpack_tuple(builder, arr.strides), ty.layout, idx,
                                             wraparound=False, boundscheck=False)

        depth = builder.extract_value(W_arr.shape, 1)
        tiles = [builder.add(tile, const(j)) for j in range(n_tiles)]
        w_ptrs = [item_ptr(W_arr, W_ty, [t, const(0), const(0)]) for t in tiles]
        h_ptrs = [item_ptr(h_arr, h_ty, [const(b), const(0)]) for b in range(rows)]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                             f"llvm.fma.v{lanes}f{dtype.bitwidth}")
        zero = ir.Constant(vec, [ir.Constant(elem, 0.0)] * lanes)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(rows)] for _ in range(n_tiles)]
        undef = ir.Constant(vec, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)

        def weights(p, k):
            """The k-th weight of a tile's L rows, as a vector of the activations' dtype."""
            at = builder.gep(p, [builder.mul(k, const(lanes))])
            if not int8:
                return builder.load(builder.bitcast(at, vec.as_pointer()), align=dtype.bitwidth // 8)
            raw = builder.load(builder.bitcast(at, ir.VectorType(ir.IntType(8), lanes).as_pointer()), align=1)
            return builder.sitofp(builder.sext(raw, ir.VectorType(i32, lanes)), vec)

        def k_loop(k0, k1):
            with cgutils.for_range(builder, k1, start=k0, intp=intp) as loop:
                k = loop.index
                w = [weights(p, k) for p in w_ptrs]
                for b in range(rows):
                    x = builder.load(builder.gep(h_ptrs[b], [k]))
                    x = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat)
                    for j in range(n_tiles):
                        builder.store(builder.call(fma, [w[j], x, builder.load(acc[j][b])]), acc[j][b])

        result = acc
        if int8:
            S_arr = context.make_array(S_ty)(context, builder, S_val)
            group = context.cast(builder, g_val, g_ty, types.intp)
            s_ptrs = [item_ptr(S_arr, S_ty, [t, const(0), const(0)]) for t in tiles]
            svec = ir.VectorType(ir.FloatType(), lanes)
            tot = [[cgutils.alloca_once_value(builder, zero) for _ in range(rows)] for _ in range(n_tiles)]

            def scales(j, g):
                s = builder.load(builder.bitcast(builder.gep(s_ptrs[j], [builder.mul(g, const(lanes))]),
                                                 svec.as_pointer()), align=4)
                return s if dtype.bitwidth == 32 else builder.fpext(s, vec)

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
            else:
                k_loop(const(0), depth)
                for j in range(n_tiles):
                    s = scales(j, const(0))
                    for b in range(rows):
                        builder.store(builder.fmul(builder.load(acc[j][b]), s), tot[j][b])
            result = tot
        else:
            k_loop(const(0), depth)
        for j in range(n_tiles):
            col = builder.mul(tiles[j], const(lanes))
            for b in range(rows):
                dst = builder.bitcast(item_ptr(out_arr, out_ty, [const(b), col]), vec.as_pointer())
                builder.store(builder.load(result[j][b]), dst, align=dtype.bitwidth // 8)
        return context.get_dummy_value()

    if int8:
        @intrinsic
        def packed_tiles_q8(typingctx, Qp, Sp, h, out, t, group):
            return types.void(Qp, Sp, h, out, t, group), codegen

        return packed_tiles_q8

    @intrinsic
    def packed_tiles(typingctx, Wp, h, out, t):
        return types.void(Wp, h, out, t), codegen

    return packed_tiles


_packed_tiles_2 = make_packed_tiles(2)
_packed_tiles_1 = make_packed_tiles(1)


@njit(cache=True, parallel=True)
def packed_linear(Wp, h, out):
    """out[b, i] = W[i]·h[b] (linear_forward without the bias) for b < PACK_ROWS, W packed by ``pack_rows``
    (out has Wp.shape[0]·lanes columns, h exactly PACK_ROWS C-contiguous rows). Two tiles per iteration:
    2·PACK_ROWS independent accumulators keep both fused multiply-add units busy."""
    T = Wp.shape[0]
    for p in prange(T // 2):
        _packed_tiles_2(Wp, h, out, 2 * p)
    if T % 2:
        _packed_tiles_1(Wp, h, out, T - 1)


# One thread, any number of rows, the same bits whatever the batch: the compiled step of a small model
# (thl_np.engines.compiled_steps). Tiles of rows × tiles accumulators per call of the generated loop, chosen
# so that a few FMA chains are in flight for any row count (8 × 2, 4 × 4, 2 × 4, 1 × 4; one tile at a time
# for the last tiles). Each output is one fused multiply-add chain over k from zero, in every form, so a
# sequence's result does not depend on how many others share the call or where it sits among them.
_tiles_8x2, _tiles_8x1 = make_packed_tiles(2, 8), make_packed_tiles(1, 8)
_tiles_4x4, _tiles_4x1 = make_packed_tiles(4, 4), make_packed_tiles(1, 4)
_tiles_2x4, _tiles_2x1 = make_packed_tiles(4, 2), make_packed_tiles(1, 2)
_tiles_1x4, _tiles_1x1 = make_packed_tiles(4, 1), make_packed_tiles(1, 1)


@njit(cache=True, nogil=True)
def packed_rows_linear(Wp, bias, h, scratch, out):
    """out[b, i] = W[i]·h[b] + bias[i] (linear_forward) for any number of rows h [B, ≥D] on one thread, W
    packed by ``pack_rows`` (Wp [T, D, L]); ``scratch`` [≥B, ≥T·L] takes the tiles' sums. Rows run 8, 4, 2 or
    1 at a time (see above); each sum is Σ_k in order, one fused multiply-add each, so every row gets the
    bits it gets alone (tested), and the kernel reads each weight once per group of rows."""
    T = Wp.shape[0]
    B = h.shape[0]
    b0 = 0
    while b0 < B:
        r = B - b0
        t = 0
        if r >= 8:
            n = 8
            x, acc = h[b0:b0 + n], scratch[b0:b0 + n]
            while t + 2 <= T:
                _tiles_8x2(Wp, x, acc, t)
                t += 2
            while t < T:
                _tiles_8x1(Wp, x, acc, t)
                t += 1
        elif r >= 4:
            n = 4
            x, acc = h[b0:b0 + n], scratch[b0:b0 + n]
            while t + 4 <= T:
                _tiles_4x4(Wp, x, acc, t)
                t += 4
            while t < T:
                _tiles_4x1(Wp, x, acc, t)
                t += 1
        elif r >= 2:
            n = 2
            x, acc = h[b0:b0 + n], scratch[b0:b0 + n]
            while t + 4 <= T:
                _tiles_2x4(Wp, x, acc, t)
                t += 4
            while t < T:
                _tiles_2x1(Wp, x, acc, t)
                t += 1
        else:
            n = 1
            x, acc = h[b0:b0 + n], scratch[b0:b0 + n]
            while t + 4 <= T:
                _tiles_1x4(Wp, x, acc, t)
                t += 4
            while t < T:
                _tiles_1x1(Wp, x, acc, t)
                t += 1
        for b in range(b0, b0 + n):
            for i in range(out.shape[1]):
                out[b, i] = scratch[b, i] + bias[i]
        b0 += n


def packed(W: np.ndarray) -> np.ndarray:
    """W [R, D] packed by ``pack_rows`` into tiles of ``lanes(W.dtype)`` rows: Wp [⌈R/L⌉, D, L]."""
    W = np.ascontiguousarray(W)
    L = lanes(W.dtype)
    Wp = np.empty((-(-W.shape[0] // L), W.shape[1], L), W.dtype)
    pack_rows(W, L, Wp)
    return Wp


class PackedMatrix:
    """A weight matrix W [R, D] packed for ``packed_linear`` (``pack_rows``), behind the same ``linear(x, b)``
    as a quantized matrix, so ``linear`` dispatches to it: x @ W.T + b for any number of rows, PACK_ROWS at a
    time (fewer are padded with zeros). The decoder uses it for 2..PACK_ROWS sequences, where row-major
    kernels end every dot product in a horizontal sum and read several streams at once (measured on the
    default tier-0 gates, 1,536 × 2,304 at batch 8: 0.48 ms against 0.67 ms for ``small_batch_linear``).
    The padding buffers live on the object: one decoding session (and its clones) at a time."""

    def __init__(self, W: np.ndarray):
        W = np.ascontiguousarray(W)
        R, D = W.shape
        L = lanes(W.dtype)
        self.shape, self.dtype = W.shape, W.dtype
        self.Wp = np.empty((-(-R // L), D, L), W.dtype)
        pack_rows(W, L, self.Wp)
        self._in = np.zeros((PACK_ROWS, D), W.dtype)
        self._out = np.empty((PACK_ROWS, self.Wp.shape[0] * L), W.dtype)

    @property
    def nbytes(self) -> int:
        return self.Wp.nbytes

    def linear(self, x, b, out=None) -> np.ndarray:
        if out is None:
            out = np.empty((x.shape[0], self.shape[0]), self.dtype)
        return by_pack_rows(lambda h, res: packed_linear(self.Wp, h, res), x, b, out, self._in, self._out)


def by_pack_rows(product, x, b, out, h_in, res) -> np.ndarray:
    """out = x @ W.T + b for any number of rows, through ``product(h_in, res)`` (res = the products of h_in's
    PACK_ROWS rows with a packed W): x copied into h_in PACK_ROWS rows at a time, the rest padded with zeros."""
    for r0 in range(0, x.shape[0], PACK_ROWS):
        m = min(PACK_ROWS, x.shape[0] - r0)
        h_in[:m] = x[r0:r0 + m]
        h_in[m:] = 0
        product(h_in, res)
        np.add(res[:m, :out.shape[1]], b, out=out[r0:r0 + m])
    return out
