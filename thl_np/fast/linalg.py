"""Linear algebra for the decode step, apart from THL's math: products with few rows (a decode step's batch),
which BLAS handles poorly, and the ``linear`` dispatcher that picks a kernel by the number of rows. Every
kernel here computes ``x @ W.T + b`` (thl_np.components.output.linear_forward) or a per-head form of it.

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
    if not isinstance(W, np.ndarray):  # int8 weights: thl_np.fast.quant.Q8Matrix picks its own kernel
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


@njit(parallel=True, fastmath=VECTORISE, cache=True)
def small_batch_linear(W, b_o, h, out):
    """out[b, i] = W[i]·h[b] + b_o[i] (linear_forward) for a few sequences. Tiles of 6 rows of W × 4 sequences keep 24
    accumulators in registers: each weight loaded is used 4 times and each hidden value 6 times, so the
    multiply-adds (not the loads) set the pace, and a tile's rows are streamed from memory once for the
    whole batch (BLAS's GEMM handles this thin shape poorly). Reassociation lets the dots be vectorised."""
    V, D = W.shape
    B = h.shape[0]
    zero = W[0, 0] - W[0, 0]
    for blk in prange((V + 5) // 6):
        i0 = blk * 6
        if i0 + 6 > V:
            for i in range(i0, V):
                for b in range(B):
                    out[b, i] = dot(W[i], h[b]) + b_o[i]
            continue
        b0 = 0
        while b0 + 4 <= B:
            a00 = a01 = a02 = a03 = zero
            a10 = a11 = a12 = a13 = zero
            a20 = a21 = a22 = a23 = zero
            a30 = a31 = a32 = a33 = zero
            a40 = a41 = a42 = a43 = zero
            a50 = a51 = a52 = a53 = zero
            for k in range(D):
                x0 = h[b0, k]
                x1 = h[b0 + 1, k]
                x2 = h[b0 + 2, k]
                x3 = h[b0 + 3, k]
                w = W[i0, k]
                a00 += w * x0
                a01 += w * x1
                a02 += w * x2
                a03 += w * x3
                w = W[i0 + 1, k]
                a10 += w * x0
                a11 += w * x1
                a12 += w * x2
                a13 += w * x3
                w = W[i0 + 2, k]
                a20 += w * x0
                a21 += w * x1
                a22 += w * x2
                a23 += w * x3
                w = W[i0 + 3, k]
                a30 += w * x0
                a31 += w * x1
                a32 += w * x2
                a33 += w * x3
                w = W[i0 + 4, k]
                a40 += w * x0
                a41 += w * x1
                a42 += w * x2
                a43 += w * x3
                w = W[i0 + 5, k]
                a50 += w * x0
                a51 += w * x1
                a52 += w * x2
                a53 += w * x3
            _store4(out, b0, i0, a00, a01, a02, a03, b_o[i0])
            _store4(out, b0, i0 + 1, a10, a11, a12, a13, b_o[i0 + 1])
            _store4(out, b0, i0 + 2, a20, a21, a22, a23, b_o[i0 + 2])
            _store4(out, b0, i0 + 3, a30, a31, a32, a33, b_o[i0 + 3])
            _store4(out, b0, i0 + 4, a40, a41, a42, a43, b_o[i0 + 4])
            _store4(out, b0, i0 + 5, a50, a51, a52, a53, b_o[i0 + 5])
            b0 += 4
        for b in range(b0, B):  # the last 1-3 sequences
            for i in range(i0, i0 + 6):
                out[b, i] = dot(W[i], h[b]) + b_o[i]


@njit(cache=True)
def _store4(out, b0, i, a0, a1, a2, a3, bias):
    out[b0, i] = a0 + bias
    out[b0 + 1, i] = a1 + bias
    out[b0 + 2, i] = a2 + bias
    out[b0 + 3, i] = a3 + bias


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
PACK_ROWS = 8  # sequences per call of packed_linear (fewer are padded with zeros)


def lanes(dtype) -> int:
    """Rows per packed tile: one 64-byte vector of the dtype."""
    return 64 // np.dtype(dtype).itemsize


@njit(cache=True, parallel=True)
def pack_rows(W, lanes, Wp):
    """Wp[t, k, l] = W[t·lanes + l, k] (rows past the end of W are zeros)."""
    V, D = W.shape
    for t in prange(Wp.shape[0]):
        for l in range(lanes):
            i = t * lanes + l
            if i < V:
                for k in range(D):
                    Wp[t, k, l] = W[i, k]
            else:
                for k in range(D):
                    Wp[t, k, l] = 0.0


def _make_packed_tiles(n_tiles):
    @intrinsic
    def packed_tiles(typingctx, Wp, h, out, t):
        """out[b, (t+j)·L : (t+j+1)·L] = Σ_k Wp[t+j, k, :] h[b, k] for j < n_tiles, b < PACK_ROWS: the tile
        loop of ``packed_linear`` in LLVM IR (vector loads of the tile, broadcasts of h, fused multiply-adds
        into PACK_ROWS × n_tiles vector accumulators, plain vector stores)."""
        dtype = Wp.dtype

        def codegen(context, builder, sig, args):
            W_ty, h_ty, out_ty = sig.args[:3]
            W_arr = context.make_array(W_ty)(context, builder, args[0])
            h_arr = context.make_array(h_ty)(context, builder, args[1])
            out_arr = context.make_array(out_ty)(context, builder, args[2])
            intp = context.get_value_type(types.intp)
            tile = context.cast(builder, args[3], sig.args[3], types.intp)
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
            w_ptrs = [item_ptr(W_arr, W_ty, [builder.add(tile, const(j)), const(0), const(0)]) for j in range(n_tiles)]
            h_ptrs = [item_ptr(h_arr, h_ty, [const(b), const(0)]) for b in range(PACK_ROWS)]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{lanes}f{dtype.bitwidth}")
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec, [ir.Constant(elem, 0.0)] * lanes))
                    for _ in range(PACK_ROWS)] for _ in range(n_tiles)]
            undef = ir.Constant(vec, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
            with cgutils.for_range(builder, depth, intp=intp) as loop:
                k = loop.index
                w = [builder.load(builder.bitcast(builder.gep(p, [builder.mul(k, const(lanes))]), vec.as_pointer()),
                                  align=dtype.bitwidth // 8) for p in w_ptrs]
                for b in range(PACK_ROWS):
                    x = builder.load(builder.gep(h_ptrs[b], [k]))
                    x = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat)
                    for j in range(n_tiles):
                        builder.store(builder.call(fma, [w[j], x, builder.load(acc[j][b])]), acc[j][b])
            for j in range(n_tiles):
                col = builder.mul(builder.add(tile, const(j)), const(lanes))
                for b in range(PACK_ROWS):
                    dst = builder.bitcast(item_ptr(out_arr, out_ty, [const(b), col]), vec.as_pointer())
                    builder.store(builder.load(acc[j][b]), dst, align=dtype.bitwidth // 8)
            return context.get_dummy_value()

        return types.void(Wp, h, out, t), codegen

    return packed_tiles


_packed_tiles_2 = _make_packed_tiles(2)
_packed_tiles_1 = _make_packed_tiles(1)


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
        R = self.shape[0]
        n = x.shape[0]
        if out is None:
            out = np.empty((n, R), self.dtype)
        for r0 in range(0, n, PACK_ROWS):
            m = min(PACK_ROWS, n - r0)
            self._in[:m] = x[r0:r0 + m]
            self._in[m:] = 0
            packed_linear(self.Wp, self._in, self._out)
            np.add(self._out[:m, :R], b, out=out[r0:r0 + m])
        return out
