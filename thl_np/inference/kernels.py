"""Numba kernels of the fast path: the loops NumPy cannot express without waste (top-κ over J, the
scatter into a few rows, the writer's scan of the bank), and the products of a decode step, whose few
rows BLAS handles poorly (``gemv``, ``small_batch_linear``). Each mirrors a plain-path function in
``thl_np.components`` and is tested equal to it.

The decoder runs on one thread pool, Numba's: OpenBLAS's workers spin after each call, and on a
machine with few cores they then take the cores Numba's threads need (measured: 2× slower steps).
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# The bank is stored divided by a running scale that the decay γ multiplies; below this γ (0 included) a
# write would divide by it, so the decay is applied to the rows eagerly (fast_grad does the same).
MIN_DECAY = 1e-6
# Reassociation lets LLVM vectorise a dot product; every row still runs the same code, so identical rows
# of the bank give identical dot products (the spec's tie rule needs that). No "no NaN/inf" assumptions.
_VECTORISE = {"reassoc", "contract", "nsz", "arcp"}
# The kernels are written as loops, not array expressions: Numba compiles each array expression (and its
# broadcasting error path) separately, which had made the first decode step take seconds more to compile.


@njit(cache=True, fastmath=_VECTORISE)
def _dot(a, b):
    acc = a[0] - a[0]
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, fastmath=_VECTORISE)
def row_dots(rows, v, out):
    """out[j] = rows[j]·v, one code path for every row."""
    for j in range(rows.shape[0]):
        acc = rows[j, 0] - rows[j, 0]
        for i in range(rows.shape[1]):
            acc += rows[j, i] * v[i]
        out[j] = acc


@njit(cache=True)
def row_norms2(memory, out):
    """out[b, j] = memory[b, j]·memory[b, j]."""
    for b in range(memory.shape[0]):
        for j in range(memory.shape[1]):
            out[b, j] = _dot(memory[b, j], memory[b, j])


@njit(cache=True)
def local_attend(q, ring_k, ring_v, start, n, inv_sqrt, out):
    """Spec §4.2 over cached keys/values: out[b] = Σ_i softmax(k_i·q/√d)_i v_i, i in logical buffer order."""
    B, W, _ = ring_k.shape
    s = np.empty(n, dtype=q.dtype)
    for b in range(B):
        m = -np.inf
        for i in range(n):
            s[i] = _dot(ring_k[b, (start + i) % W], q[b]) * inv_sqrt
            if s[i] > m:
                m = s[i]
        tot = 0.0
        for i in range(n):
            s[i] = np.exp(s[i] - m)
            tot += s[i]
        out[b, :] = 0.0
        for i in range(n):
            _axpy(s[i] / tot, ring_v[b, (start + i) % W], out[b])


@njit(cache=True)
def _axpy(a, x, y):
    """y += a·x, element by element (a may be float64 while x, y are float32: rounded as NumPy would)."""
    for i in range(x.shape[0]):
        y[i] += a * x[i]


@njit(cache=True, fastmath=_VECTORISE)
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
            out[g, j] = _dot(rows[j], vs[g])


@njit(cache=True)
def route_one(q_mem, scale, read_ema, last_read, memory, t, load_penalty, inv_sqrt, kappa, capacity, rho,
              mix, idx_out, alpha_out, dots, scores, A, served):
    """Spec §4.3-4.4 for one sequence: scores m_j·q_mem_h (q_mem_h = W_k,h^T q_h, see
    thl_np.components.router.slot_scores; true memory = scale·memory), top-κ per head (descending, ties to the
    lower index), softmax, optional slot capacity, the α-weighted mix of the picked memory rows per head
    (the value projection is linear, so it is applied once to the mix), then read_ema and last_read in
    place. dots [H, J], scores [J], A [J] and served [J] are scratch."""
    J = memory.shape[0]
    H = q_mem.shape[0]
    multi_row_dots(memory, q_mem, dots)
    for h in range(H):
        for j in range(J):
            scores[j] = (scale * dots[h, j]) * inv_sqrt - load_penalty * read_ema[j]
        _top_desc(scores, kappa, idx_out[h])
        top = scores[idx_out[h, 0]]
        tot = 0.0
        for r in range(kappa):
            alpha_out[h, r] = np.exp(scores[idx_out[h, r]] - top)
            tot += alpha_out[h, r]
        for r in range(kappa):
            alpha_out[h, r] /= tot
    if capacity > 0:
        # walk heads and ranks in order; a pick of a slot that already served `capacity` picks gets 0, and
        # a head left with weight 0 keeps its uncapped weights (as thl_np.components.router.apply_slot_capacity)
        served[:] = 0
        keep = np.empty(kappa, dtype=np.bool_)
        for h in range(H):
            tot = 0.0
            for r in range(kappa):
                j = idx_out[h, r]
                keep[r] = served[j] < capacity
                if keep[r]:
                    served[j] += 1
                    tot += alpha_out[h, r]
            if tot > 0:
                for r in range(kappa):
                    alpha_out[h, r] = alpha_out[h, r] / tot if keep[r] else 0.0
    A[:] = 0.0
    for h in range(H):
        mix[h, :] = 0.0
        for r in range(kappa):
            j = idx_out[h, r]
            a = alpha_out[h, r]
            A[j] += a
            _axpy(a * scale, memory[j], mix[h])
            last_read[j] = t
    for j in range(J):
        read_ema[j] = rho * read_ema[j] + (1.0 - rho) * A[j]


@njit(cache=True)
def route(q_mem, scale, read_ema, last_read, memory, t, load_penalty, inv_sqrt, kappa, capacity, rho,
          mix, idx_out, alpha_out):
    """``route_one`` for every sequence of the batch, in turn (``route_parallel`` splits them over the
    cores; it costs seconds more to compile, which one sequence never pays)."""
    B, J, _ = memory.shape
    dots = np.empty((q_mem.shape[1], J), dtype=memory.dtype)
    scores = np.empty(J, dtype=np.float64)
    A = np.empty(J, dtype=np.float64)
    served = np.empty(J, dtype=np.int64)
    for b in range(B):
        route_one(q_mem[b], scale, read_ema[b], last_read[b], memory[b], t, load_penalty, inv_sqrt, kappa,
                  capacity, rho, mix[b], idx_out[b], alpha_out[b], dots, scores, A, served)


@njit(cache=True, parallel=True)
def route_parallel(q_mem, scale, read_ema, last_read, memory, t, load_penalty, inv_sqrt, kappa, capacity, rho,
                   mix, idx_out, alpha_out):
    """``route``, the sequences split over the cores."""
    B, J, _ = memory.shape
    for b in prange(B):
        dots = np.empty((q_mem.shape[1], J), dtype=memory.dtype)
        scores = np.empty(J, dtype=np.float64)
        A = np.empty(J, dtype=np.float64)
        served = np.empty(J, dtype=np.int64)
        route_one(q_mem[b], scale, read_ema[b], last_read[b], memory[b], t, load_penalty, inv_sqrt, kappa,
                  capacity, rho, mix[b], idx_out[b], alpha_out[b], dots, scores, A, served)


@njit(cache=True)
def write_one(w_raw, memory, norm2, scale, read_ema, write_ema, last_write, t, write_slots, clip_max,
              beta, theta, stale_weight, underuse_weight, new_scale, write_rate, ema_decay, targets, w, aff,
              prio, dots, eager, decay):
    """Spec §4.6-4.7 for one sequence on the scaled bank (true memory = scale·memory): the targets' rows
    and squared norms are updated in place; the decay itself is the caller's new_scale, or, when ``eager``
    (γ below MIN_DECAY: too small to divide by), applied to the rows here after the writer's choice. w, aff,
    prio and dots are scratch. Returns the gate g."""
    n_raw = np.sqrt(_dot(w_raw, w_raw))
    ratio = clip_max / (n_raw + 1e-6)
    for i in range(w.shape[0]):
        w[i] = w_raw[i] * ratio if ratio < 1.0 else w_raw[i]
    n_w = np.sqrt(_dot(w, w))
    g, _, _ = choose_write(memory, norm2, w, n_w, scale, read_ema, last_write, t, write_slots,
                           beta, theta, stale_weight, underuse_weight, aff, prio, dots, targets)
    if eager:
        for j in range(memory.shape[0]):
            for m in range(memory.shape[1]):
                memory[j, m] *= decay
            norm2[j] *= decay * decay
    # M ← γM (lazy: scale) then m_j += η·g·w, i.e. stored_j += η·g·w / (γ·scale)
    step = write_rate * g / new_scale
    for s in range(write_slots):
        j = targets[s]
        _axpy(step, w, memory[j])
        norm2[j] = _dot(memory[j], memory[j])
        last_write[j] = t
    for j in range(memory.shape[0]):
        write_ema[j] *= ema_decay
    for s in range(write_slots):
        write_ema[targets[s]] += 1.0 - ema_decay
    return g


@njit(cache=True)
def write(w_raw, memory, norm2, scale, read_ema, write_ema, last_write, t, write_slots, clip_max,
          beta, theta, stale_weight, underuse_weight, decay, write_rate, ema_decay, targets_out, g_out):
    """``write_one`` for every sequence of the batch, in turn (``write_parallel`` splits them over the
    cores). Returns the new scale γ·scale (unchanged for γ < MIN_DECAY, whose decay is applied eagerly)."""
    B, J, Dm = memory.shape
    eager = decay < MIN_DECAY
    new_scale = scale if eager else scale * decay
    w = np.empty(Dm, dtype=w_raw.dtype)
    aff = np.empty(J, dtype=np.float64)
    prio = np.empty(J, dtype=np.float64)
    dots = np.empty(J, dtype=memory.dtype)
    for b in range(B):
        g_out[b] = write_one(w_raw[b], memory[b], norm2[b], scale, read_ema[b], write_ema[b], last_write[b], t,
                             write_slots, clip_max, beta, theta, stale_weight, underuse_weight, new_scale,
                             write_rate, ema_decay, targets_out[b], w, aff, prio, dots, eager, decay)
    return new_scale


@njit(cache=True, parallel=True)
def write_parallel(w_raw, memory, norm2, scale, read_ema, write_ema, last_write, t, write_slots, clip_max,
                   beta, theta, stale_weight, underuse_weight, decay, write_rate, ema_decay, targets_out, g_out):
    """``write``, the sequences split over the cores."""
    B, J, Dm = memory.shape
    eager = decay < MIN_DECAY
    new_scale = scale if eager else scale * decay
    for b in prange(B):
        w = np.empty(Dm, dtype=w_raw.dtype)
        aff = np.empty(J, dtype=np.float64)
        prio = np.empty(J, dtype=np.float64)
        dots = np.empty(J, dtype=memory.dtype)
        g_out[b] = write_one(w_raw[b], memory[b], norm2[b], scale, read_ema[b], write_ema[b], last_write[b], t,
                             write_slots, clip_max, beta, theta, stale_weight, underuse_weight, new_scale,
                             write_rate, ema_decay, targets_out[b], w, aff, prio, dots, eager, decay)
    return new_scale


@njit(cache=True)
def choose_write(memory_b, norm2_b, w, n_w, scale, read_ema_b, last_write_b, t, write_slots, beta, theta,
                 stale_weight, underuse_weight, aff, prio, dots, targets):
    """Spec §4.6's discrete part for one sequence, shared by the decode and training kernels: cosine
    affinities against the scaled bank (true memory = scale·memory_b), the arg-max slot j*, the branch
    and the W_w targets (novel: empty slots first, else λ_s·staleness + λ_u·underuse; refine: largest
    affinity; ties to the lower index). Fills aff and dots; returns (g, j*, novel)."""
    row_dots(memory_b, w, dots)
    j_star = 0
    any_empty = False
    for j in range(memory_b.shape[0]):
        n_m = scale * np.sqrt(norm2_b[j])
        if n_m <= 1e-6:
            any_empty = True
        aff[j] = (scale * dots[j]) / ((n_w + 1e-8) * (n_m + 1e-8))
        if aff[j] > aff[j_star]:
            j_star = j
    novelty = 1.0 - aff[j_star]
    novel = novelty > theta
    if not novel:
        _top_desc(aff, write_slots, targets)
        return 1.0, j_star, novel
    g = 1.0 / (1.0 + np.exp(-beta * (novelty - theta)))
    if any_empty:
        count = 0
        for j in range(memory_b.shape[0]):  # empty slots first, in index order
            if count < write_slots and scale * np.sqrt(norm2_b[j]) <= 1e-6:
                targets[count] = j
                count += 1
        for j in range(memory_b.shape[0]):  # then the others, in index order
            if count < write_slots and not scale * np.sqrt(norm2_b[j]) <= 1e-6:
                targets[count] = j
                count += 1
    else:
        for j in range(memory_b.shape[0]):
            # as the plain path: λ_u times underuse = 1/(1e-8 + read_ema), so the priorities round alike
            prio[j] = stale_weight * (t - last_write_b[j]) + underuse_weight * (1.0 / (1e-8 + read_ema_b[j]))
        _top_desc(prio, write_slots, targets)
    return g, j_star, novel


@njit(cache=True)
def _top_desc(values, k, out):
    """The k largest entries, descending, ties to the lower index (insertion into a sorted list)."""
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


@njit(parallel=True, fastmath=_VECTORISE, cache=True)
def gemv(W, b_o, x, out):
    """out[i] = W[i]·x + b_o[i] (one sequence), the rows split over the cores. One row per iteration keeps
    each core's reads one sequential stream, which the hardware prefetches best (measured on the default
    head: 0.65-0.85× the time of four rows per iteration, and faster than OpenBLAS's GEMV)."""
    for i in prange(W.shape[0]):
        out[i] = _dot(W[i], x) + b_o[i]


@njit(parallel=True, fastmath=_VECTORISE, cache=True)
def per_head_linear(X, W, out):
    """out[h, b, i] = W[h, i]·X[h, b] for every head h at once (the router's per-head query and value
    products: one call instead of one per head)."""
    H, R, _ = W.shape
    for hi in prange(H * R):
        h = hi // R
        i = hi - h * R
        for b in range(X.shape[1]):
            out[h, b, i] = _dot(W[h, i], X[h, b])


@njit(parallel=True, fastmath=_VECTORISE, cache=True)
def small_batch_linear(W, b_o, h, out):
    """out[b, i] = W[i]·h[b] + b_o[i] for a few sequences. Tiles of 6 rows of W × 4 sequences keep 24
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
                    out[b, i] = _dot(W[i], h[b]) + b_o[i]
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
                out[b, i] = _dot(W[i], h[b]) + b_o[i]


@njit(cache=True)
def _store4(out, b0, i, a0, a1, a2, a3, bias):
    out[b0, i] = a0 + bias
    out[b0 + 1, i] = a1 + bias
    out[b0 + 2, i] = a2 + bias
    out[b0 + 3, i] = a3 + bias


@njit(cache=True)
def gru_reset(zr, p, d):
    """Spec §4.5 reset gate, in place: p[:, :d] *= σ(zr[:, d:2d]) (zr holds the z and r pre-activations)."""
    for b in range(p.shape[0]):
        for i in range(d):
            p[b, i] *= _sigmoid(zr[b, d + i])


@njit(cache=True)
def gru_update(S, offset, zr, pre):
    """Spec §4.5 state update, in place: s = (1 − z)·s + z·tanh(pre), z = σ(zr[:, :d]), s = S[:, offset:offset+d]."""
    d = pre.shape[1]
    for b in range(S.shape[0]):
        for i in range(d):
            z = _sigmoid(zr[b, i])
            S[b, offset + i] = (1.0 - z) * S[b, offset + i] + z * np.tanh(pre[b, i])


@njit(cache=True)
def _sigmoid(x):
    # split by sign so neither branch overflows (as thl_np.components.gru.sigmoid)
    if x >= 0:
        return 1.0 / (1.0 + np.exp(-x))
    ex = np.exp(x)
    return ex / (1.0 + ex)


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
    """out[b, i] = W[i]·h[b] for b < PACK_ROWS, W packed by ``pack_rows`` (out has Wp.shape[0]·lanes columns,
    h exactly PACK_ROWS C-contiguous rows). Two tiles per iteration: 2·PACK_ROWS independent accumulators
    keep both fused multiply-add units busy."""
    T = Wp.shape[0]
    for p in prange(T // 2):
        _packed_tiles_2(Wp, h, out, 2 * p)
    if T % 2:
        _packed_tiles_1(Wp, h, out, T - 1)
