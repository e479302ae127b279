"""Numba kernels of the fast path: the loops NumPy cannot express without waste (top-κ over J, the
scatter into a few rows, the writer's scan of the bank). Each mirrors a plain-path function in
``thl_np.nn`` and is tested equal to it; dense products stay in BLAS, outside these kernels.
"""
import numpy as np
from numba import njit, prange

# Reassociation lets LLVM vectorise a dot product; every row still runs the same code, so identical rows
# of the bank give identical dot products (the spec's tie rule needs that). No "no NaN/inf" assumptions.
_VECTORISE = {"reassoc", "contract", "nsz", "arcp"}


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


# Loops, not array expressions, below: Numba compiles each array expression (and its broadcasting error
# path) separately, which made the first decode step of a fresh install take seconds.
@njit(cache=True)
def _axpy(a, x, y):
    """y += a·x, element by element (a may be float64 while x, y are float32: rounded as NumPy would)."""
    for i in range(x.shape[0]):
        y[i] += a * x[i]


@njit(cache=True, fastmath=_VECTORISE)
def multi_row_dots(rows, vs, out):
    """out[h, j] = rows[j]·vs[h] for every head in one pass over the rows (each row is read once, and
    every row runs the same code, so identical rows give identical dots)."""
    H = vs.shape[0]
    for j in range(rows.shape[0]):
        for h in range(H):
            acc = rows[j, 0] - rows[j, 0]
            for i in range(rows.shape[1]):
                acc += rows[j, i] * vs[h, i]
            out[h, j] = acc


@njit(cache=True)
def route_one(q_mem, scale, read_ema, last_read, memory, t, load_penalty, inv_sqrt, kappa, capacity, rho,
              mix, idx_out, alpha_out, dots, scores, A, served):
    """Spec §4.3-4.4 for one sequence: scores m_j·q_mem_h (q_mem_h = W_k,h^T q_h, see
    thl_np.nn.router.slot_scores; true memory = scale·memory), top-κ per head (descending, ties to the
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
        # a head left with weight 0 keeps its uncapped weights (as thl_np.nn.router.apply_slot_capacity)
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
    """``route_one`` for every sequence of the batch, in turn."""
    B, J, _ = memory.shape
    dots = np.empty((q_mem.shape[1], J), dtype=memory.dtype)
    scores = np.empty(J, dtype=np.float64)
    A = np.empty(J, dtype=np.float64)
    served = np.empty(J, dtype=np.int64)
    for b in range(B):
        route_one(q_mem[b], scale, read_ema[b], last_read[b], memory[b], t, load_penalty, inv_sqrt, kappa,
                  capacity, rho, mix[b], idx_out[b], alpha_out[b], dots, scores, A, served)


@njit(cache=True)
def write_one(w_raw, memory, norm2, scale, read_ema, write_ema, last_write, t, write_slots, clip_max,
              beta, theta, stale_weight, underuse_weight, new_scale, write_rate, ema_decay, targets, w, aff,
              prio, dots):
    """Spec §4.6-4.7 for one sequence on the scaled bank (true memory = scale·memory): the targets' rows
    and squared norms are updated in place; the decay itself is the caller's new_scale. w, aff, prio and
    dots are scratch. Returns the gate g."""
    n_raw = np.sqrt(_dot(w_raw, w_raw))
    ratio = clip_max / (n_raw + 1e-6)
    for i in range(w.shape[0]):
        w[i] = w_raw[i] * ratio if ratio < 1.0 else w_raw[i]
    n_w = np.sqrt(_dot(w, w))
    g, _, _ = choose_write(memory, norm2, w, n_w, scale, read_ema, last_write, t, write_slots,
                           beta, theta, stale_weight, underuse_weight, aff, prio, dots, targets)
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
    """``write_one`` for every sequence of the batch, in turn. Returns the new scale γ·scale."""
    B, J, Dm = memory.shape
    new_scale = scale * decay
    w = np.empty(Dm, dtype=w_raw.dtype)
    aff = np.empty(J, dtype=np.float64)
    prio = np.empty(J, dtype=np.float64)
    dots = np.empty(J, dtype=memory.dtype)
    for b in range(B):
        g_out[b] = write_one(w_raw[b], memory[b], norm2[b], scale, read_ema[b], write_ema[b], last_write[b], t,
                             write_slots, clip_max, beta, theta, stale_weight, underuse_weight, new_scale,
                             write_rate, ema_decay, targets_out[b], w, aff, prio, dots)
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


@njit(parallel=True, fastmath=True, cache=True)
def head_small_batch(W, b_o, h, out):
    """out[b, i] = W[i]·h[b] + b_o[i] for a handful of sequences: four vocabulary rows at a time, so each
    row of the head is streamed from memory once for the whole batch (BLAS's GEMM handles this thin
    shape poorly). fastmath lets the dot products be vectorised; it reorders sums only."""
    V, D = W.shape
    B = h.shape[0]
    zero = np.zeros(1, dtype=W.dtype)[0]  # accumulate in the weights' dtype (float32 stays 16 lanes wide)
    blocks = (V + 3) // 4
    for blk in prange(blocks):
        i0 = blk * 4
        if i0 + 4 <= V:
            for b in range(B):
                a0 = zero
                a1 = zero
                a2 = zero
                a3 = zero
                for k in range(D):
                    x = h[b, k]
                    a0 += W[i0, k] * x
                    a1 += W[i0 + 1, k] * x
                    a2 += W[i0 + 2, k] * x
                    a3 += W[i0 + 3, k] * x
                out[b, i0] = a0 + b_o[i0]
                out[b, i0 + 1] = a1 + b_o[i0 + 1]
                out[b, i0 + 2] = a2 + b_o[i0 + 2]
                out[b, i0 + 3] = a3 + b_o[i0 + 3]
        else:
            for i in range(i0, V):
                for b in range(B):
                    acc = zero
                    for k in range(D):
                        acc += W[i, k] * h[b, k]
                    out[b, i] = acc + b_o[i]
