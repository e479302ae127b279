"""Spec §4.3 (router read) and §4.4 (read metadata) as Numba kernels, mirroring
``thl_np.components.router``: ``route`` for a decode step (``route_parallel`` splits the batch over the
cores), ``route_forward`` / ``route_backward`` for a training step. One sequence's read is written once, in
three helpers both paths call: ``pick_slots`` (scores, top-κ, softmax), ``capacity_walk`` (the slot
capacity) and ``read_meta`` (§4.4).

Both compute scores as m_j·q_mem_h with q_mem_h = W_k,h^T q_h (``slot_scores``) over a bank stored divided
by a running scalar (true memory = scale·memory), one code path per row, so identical rows tie exactly and
go to the lower index (``primitives.top_k_desc``). ``key_rule`` chooses the scores (KEY_RULES in
thl_np.components.registry): KEY_DOT the spec's; KEY_UNIT the router variant of
``thl_np.components.router_unit_keys`` (each content score divided by √(‖true row‖² + ε²)); KEY_EMPTY_LAST
that of ``router_empty_last`` (unit keys, less (ε²/s_j²)·‖q_mem_h‖/√d_h); KEY_UNIT_ROWS that of
``router_unit_rows`` (unit keys, and the values read from the unit rows too: each row's weight in the mix
is α/s_j). Tested kernel by kernel in tests/fast/test_router_kernels.py.
"""
import math

import numpy as np
from numba import njit, prange

from ..components.registry import KEY_RULES
from ..components.router_empty_last import NAME as EMPTY_LAST
from ..components.router_unit_keys import NAME as UNIT_KEYS
from ..components.router_unit_keys import UNIT_KEY_EPS
from ..components.router_unit_rows import NAME as UNIT_ROWS
from .primitives import axpy, dot, gather_ends, multi_row_dots, row_dots, scatter_add_ends, top_k_desc

KEY_DOT, KEY_UNIT, KEY_EMPTY_LAST = KEY_RULES["spec"], KEY_RULES[UNIT_KEYS], KEY_RULES[EMPTY_LAST]
KEY_UNIT_ROWS = KEY_RULES[UNIT_ROWS]


@njit(cache=True)
def key_scales(memory, scale, key_rule, out, empty_w):
    """out[j]: what slot j's stored dot product m_j·q_mem is multiplied by to give its content score before
    1/√d_h: ``scale`` (true row = scale·stored row) for the spec's scores (KEY_DOT), and
    scale/√(‖true row‖² + ε²) for KEY_UNIT, KEY_EMPTY_LAST and KEY_UNIT_ROWS (thl_np.components.router_unit_keys).
    empty_w[j]: ε²/(‖true row‖² + ε²) for KEY_EMPTY_LAST (router_empty_last.empty_weights), else 0."""
    for j in range(memory.shape[0]):
        out[j] = scale
        empty_w[j] = 0.0
        if key_rule != KEY_DOT:
            s2 = scale * scale * dot(memory[j], memory[j]) + UNIT_KEY_EPS * UNIT_KEY_EPS
            out[j] = scale / math.sqrt(s2)
            if key_rule == KEY_EMPTY_LAST:
                empty_w[j] = UNIT_KEY_EPS * UNIT_KEY_EPS / s2


@njit(cache=True)
def empty_penalty(key_rule, q_mem_h):
    """‖q_mem_h‖ for KEY_EMPTY_LAST (an empty slot's score is −empty_w·‖q_mem_h‖/√d_h), else 0."""
    if key_rule != KEY_EMPTY_LAST:
        return 0.0
    tot = 0.0
    for m in range(q_mem_h.shape[0]):
        tot += float(q_mem_h[m]) * float(q_mem_h[m])
    return math.sqrt(tot)


# ---------------------------------------------------------------------------------------------------
# One sequence's read, in three parts shared by the decode and the training kernels
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def pick_slots(dots, key_scale, empty_w, q_pen, inv_sqrt, load_penalty, read_ema, noise, use_noise, kappa, scores,
               idx, alpha):
    """Mirrors, for one sequence and head, thl_np.components.router.slot_scores and router_forward's top-κ and
    softmax: score_j = key_scale[j]·dots[j]/√d_h − empty_w[j]·q_pen/√d_h − λ·read_ema_j (dots[j] = stored
    m_j·q_mem_h, see ``key_scales``; q_pen from ``empty_penalty``, 0 but for KEY_EMPTY_LAST), plus noise[j]
    when ``use_noise`` (training's Gumbel term; noise is not read otherwise);
    idx = the κ largest scores, descending, ties to the lower index (``top_k_desc``); alpha = their softmax.
    scores [J] is float64 scratch; each exp is rounded to alpha's dtype before the sum."""
    for j in range(dots.shape[0]):
        s = (key_scale[j] * dots[j]) * inv_sqrt
        if q_pen != 0.0:
            s -= empty_w[j] * (q_pen * inv_sqrt)
        s -= load_penalty * read_ema[j]
        if use_noise:
            s += noise[j]
        scores[j] = s
    top_k_desc(scores, kappa, idx)
    top = scores[idx[0]]
    tot = 0.0
    for r in range(kappa):
        alpha[r] = np.exp(scores[idx[r]] - top)
        tot += alpha[r]
    for r in range(kappa):
        alpha[r] /= tot


@njit(cache=True)
def capacity_walk(idx, alpha_soft, capacity, served, alpha, mask, used):
    """Mirrors thl_np.components.router.apply_slot_capacity for one sequence: walk heads and ranks in order; a
    pick of a slot that already served ``capacity`` picks gets mask 0, every other pick 1; each head's kept
    weights are renormalised into alpha, and a head left with weight 0 (used[h] False) keeps alpha as it was
    (the caller's copy of alpha_soft; alpha may be alpha_soft itself). idx, alpha_soft, alpha, mask [H, κ],
    used [H]; served [J] is scratch."""
    served[:] = 0
    H, kappa = idx.shape
    for h in range(H):
        tot = 0.0
        for r in range(kappa):
            j = idx[h, r]
            if served[j] < capacity:
                served[j] += 1
                tot += alpha_soft[h, r]
                mask[h, r] = 1.0
            else:
                mask[h, r] = 0.0
        used[h] = tot > 0.0
        if tot > 0.0:
            for r in range(kappa):
                alpha[h, r] = alpha_soft[h, r] / tot if mask[h, r] > 0.0 else 0.0


@njit(cache=True)
def read_meta(idx, alpha, t, rho, A, read_ema, last_read):
    """Mirrors thl_np.components.router.read_meta_forward (spec §4.4) for one sequence: A_j = the sum of α over
    the picks of slot j, heads and ranks in order (as read_weights_per_slot), read_ema ← ρ·read_ema + (1−ρ)·A,
    last_read_j ← t at every pick. idx, alpha [H, κ]; A [J] is written."""
    A[:] = 0.0
    for h in range(idx.shape[0]):
        for r in range(idx.shape[1]):
            j = idx[h, r]
            A[j] += alpha[h, r]
            last_read[j] = t
    for j in range(A.shape[0]):
        read_ema[j] = rho * read_ema[j] + (1.0 - rho) * A[j]


# ---------------------------------------------------------------------------------------------------
# Decode: one step for a batch, in place on the decoder's state
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def route_one(q_mem, scale, read_ema, last_read, memory, t, load_penalty, inv_sqrt, kappa, capacity, rho,
              key_rule, mix, idx_out, alpha_out, dots, scores, A, served, key_scale, empty_w):
    """Mirrors thl_np.components.router.router_forward (spec §4.3, no Gumbel noise) and read_meta_forward
    (§4.4) for one sequence: scores m_j·q_mem_h (q_mem_h = W_k,h^T q_h, see slot_scores; true memory =
    scale·memory), top-κ per head (descending, ties to the lower index), softmax, optional slot capacity,
    the α-weighted mix of the picked memory rows (their unit rows for KEY_UNIT_ROWS) per head (the value
    projection is linear, so the caller applies it once to the mix), then read_ema and last_read in place.
    ``key_rule``: whose scores (see ``key_scales``). dots [H, J], scores [J], A [J], served [J], key_scale [J]
    and empty_w [J] are scratch."""
    H = q_mem.shape[0]
    multi_row_dots(memory, q_mem, dots)
    key_scales(memory, scale, key_rule, key_scale, empty_w)
    for h in range(H):
        pick_slots(dots[h], key_scale, empty_w, empty_penalty(key_rule, q_mem[h]), inv_sqrt, load_penalty, read_ema,
                   scores, False, kappa, scores, idx_out[h], alpha_out[h])
    if capacity > 0:
        capacity_walk(idx_out, alpha_out, capacity, served, alpha_out, np.empty((H, kappa), alpha_out.dtype),
                      np.empty(H, np.bool_))
    read_meta(idx_out, alpha_out, t, rho, A, read_ema, last_read)
    for h in range(H):
        mix[h, :] = 0.0
        for r in range(kappa):
            j = idx_out[h, r]
            # a true row is scale·stored; with unit rows its unit row is key_scale[j]·stored
            axpy(alpha_out[h, r] * (key_scale[j] if key_rule == KEY_UNIT_ROWS else scale), memory[j], mix[h])


@njit(cache=True)
def route(q_mem, scale, read_ema, last_read, memory, t, load_penalty, inv_sqrt, kappa, capacity, rho,
          key_rule, mix, idx_out, alpha_out):
    """Mirrors router_forward + read_meta_forward for a decode step: ``route_one`` for every sequence of the
    batch, in turn (``route_parallel`` splits them over the cores; it costs seconds more to compile, which
    one sequence never pays)."""
    B, J, _ = memory.shape
    dots = np.empty((q_mem.shape[1], J), dtype=memory.dtype)
    scores = np.empty(J, dtype=np.float64)
    A = np.empty(J, dtype=np.float64)
    served = np.empty(J, dtype=np.int64)
    key_scale = np.empty(J, dtype=np.float64)
    empty_w = np.empty(J, dtype=np.float64)
    for b in range(B):
        route_one(q_mem[b], scale, read_ema[b], last_read[b], memory[b], t, load_penalty, inv_sqrt, kappa,
                  capacity, rho, key_rule, mix[b], idx_out[b], alpha_out[b], dots, scores, A, served, key_scale,
                  empty_w)


@njit(cache=True, parallel=True)
def route_parallel(q_mem, scale, read_ema, last_read, memory, t, load_penalty, inv_sqrt, kappa, capacity, rho,
                   key_rule, mix, idx_out, alpha_out):
    """``route`` (router_forward + read_meta_forward), the sequences split over the cores."""
    B, J, _ = memory.shape
    for b in prange(B):
        dots = np.empty((q_mem.shape[1], J), dtype=memory.dtype)
        scores = np.empty(J, dtype=np.float64)
        A = np.empty(J, dtype=np.float64)
        served = np.empty(J, dtype=np.int64)
        key_scale = np.empty(J, dtype=np.float64)
        empty_w = np.empty(J, dtype=np.float64)
        route_one(q_mem[b], scale, read_ema[b], last_read[b], memory[b], t, load_penalty, inv_sqrt, kappa,
                  capacity, rho, key_rule, mix[b], idx_out[b], alpha_out[b], dots, scores, A, served, key_scale,
                  empty_w)


# ---------------------------------------------------------------------------------------------------
# Training: one step's forward with its record, and its backward
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def route_forward(i, t, QE, S, off0, d0, offK, dK, WqsT, scale, read_ema, last_read, mem, G, use_gumbel,
                  load_penalty, inv_sqrt, kappa, capacity, rho, key_rule, Wk_heads, WvT_heads, record_A,
                  QV, QK, IDX, ASOFT, ALPHA, CAPM, CAPU, MSEL, MIX, AW, R):
    """Mirrors thl_np.components.router.router_forward (spec §4.3, Gumbel noise optional) and
    read_meta_forward (§4.4) for step i of a training sequence. Records q (QV), q_mem (QK), the picks (IDX),
    both α (ASOFT before the capacity mask, ALPHA after), the mask (CAPM, CAPU), the true rows read (MSEL),
    the α-mix of rows per head (MIX; of unit rows for KEY_UNIT_ROWS) and A (AW, when record_A); writes r into
    R[i]; read_ema / last_read in place.

    q = u W_q^T, u = [e; s^0; s^{K-1}]: QE[i] is its e-part (one product over the whole sequence, made before
    the steps), the state part is [S[i, :, off0:off0+d0], S[i, :, offK:offK+dK]] WqsT (WqsT = W_q's state
    columns, transposed). q_mem_h = W_k,h^T q_h; true row = scale·mem. ``key_rule``: whose scores (see
    ``key_scales``).
    """
    B, J, Dm = mem.shape
    H, Dh = QV.shape[2], QV.shape[3]
    dvh = WvT_heads.shape[2]
    scores = np.empty(J, np.float64)
    dots = np.empty(J, mem.dtype)
    A = np.zeros(J, np.float64)
    ex = np.empty(kappa, np.float64)
    served = np.zeros(J, np.int64)
    qh = np.empty((B, Dh), mem.dtype)
    key_scale = np.empty(J, np.float64)
    empty_w = np.empty(J, np.float64)
    x = np.empty((B, d0 + dK), S.dtype)
    gather_ends(S[i], off0, d0, offK, dK, x)
    QS = np.dot(x, WqsT)                                # [B, Q]
    for h in range(H):
        for b in range(B):
            for a in range(Dh):
                v = QE[i, b, h * Dh + a] + QS[b, h * Dh + a]
                QV[i, b, h, a] = v
                qh[b, a] = v
        qm = np.dot(qh, Wk_heads[h])                    # [B, d_m]
        for b in range(B):
            QK[i, b, h] = qm[b]
    for b in range(B):
        key_scales(mem[b], scale, key_rule, key_scale, empty_w)
        for h in range(H):
            row_dots(mem[b], QK[i, b, h], dots)
            # without noise G is [1, 1, 1, 1] and G[0, 0, 0] is passed, never read
            noise = G[i, b, h] if use_gumbel else G[0, 0, 0]
            pick_slots(dots, key_scale, empty_w, empty_penalty(key_rule, QK[i, b, h]), inv_sqrt, load_penalty,
                       read_ema[b], noise, use_gumbel, kappa, scores, IDX[i, b, h], ex)
            for r in range(kappa):
                ASOFT[i, b, h, r] = ex[r]
                ALPHA[i, b, h, r] = ex[r]
                CAPM[i, b, h, r] = 1.0
            CAPU[i, b, h] = True
        if capacity > 0:
            capacity_walk(IDX[i, b], ASOFT[i, b], capacity, served, ALPHA[i, b], CAPM[i, b], CAPU[i, b])
        read_meta(IDX[i, b], ALPHA[i, b], t, rho, A, read_ema[b], last_read[b])
        if record_A:
            for j in range(J):
                AW[i, b, j] = A[j]
        for h in range(H):
            mix = MIX[i, h, b]
            mix[:] = 0.0
            for r in range(kappa):
                j = IDX[i, b, h, r]
                al = ALPHA[i, b, h, r]
                if key_rule == KEY_UNIT_ROWS:   # the unit row: true row / s_j, key_scale[j] = scale / s_j
                    al *= key_scale[j] / scale
                row = MSEL[i, b, h, r]
                for m in range(Dm):
                    v = scale * mem[b, j, m]
                    row[m] = v
                    mix[m] += al * v
    # value projection applied once to each head's mix: r_h = W_v,h (Σ_rank α m_idx)
    for h in range(H):
        rh = np.dot(MIX[i, h], WvT_heads[h])
        for b in range(B):
            for v in range(dvh):
                R[i, b, h * dvh + v] = rh[b, v]


@njit(cache=True)
def route_backward(i, DR, d_ema, DA, use_DA, rho, load_penalty, inv_sqrt, capacity, key_rule, Wv_heads, WkT_heads,
                   IDX, ASOFT, ALPHA, CAPM, CAPU, MSEL, QK, D, c, DQ, MK, Wq_s, DS, off0, d0, offK, dK):
    """Mirrors thl_np.components.router.router_backward and read_meta_backward for step i:
    d_r = DR[i] and the read_ema gradient after the step (d_ema, updated in place to the one before it)
    → d q_mem (MK[i], also the W_k term), d_q = W_k,h d q_mem (DQ[i]), the rows read (added into D = dM / c),
    and d_u's state part added into the tier gradients DS. QK[i] = q_mem (the score path of d m_sel)."""
    B = DR.shape[1]
    H, kappa = IDX.shape[2], IDX.shape[3]
    Dm = MSEL.shape[4]
    Dh = WkT_heads.shape[2]
    dvh = Wv_heads.shape[1]
    Gs = np.empty((H, B, Dm), DR.dtype)
    drh = np.empty((B, dvh), DR.dtype)
    for h in range(H):
        for b in range(B):
            for v in range(dvh):
                drh[b, v] = DR[i, b, h * dvh + v]
        Gs[h] = np.dot(drh, Wv_heads[h])
    inv_c = 1.0 / c
    dal = np.empty(kappa, np.float64)
    dpk = np.empty((H, kappa), np.float64)
    for b in range(B):
        for h in range(H):
            g = Gs[h, b]
            for r in range(kappa):
                j = IDX[i, b, h, r]
                extra = (1.0 - rho) * d_ema[b, j]
                if use_DA:
                    extra += DA[i, b, j]
                row = MSEL[i, b, h, r]
                gv = dot(g, row)
                if key_rule == KEY_UNIT_ROWS:   # v = W_v m/s: d α = (W_v^T d r)·m / s
                    gv /= math.sqrt(dot(row, row) + UNIT_KEY_EPS * UNIT_KEY_EPS)
                dal[r] = gv + extra
            if capacity > 0 and CAPU[i, b, h]:
                # α_cap = α·mask / Σ α·mask  →  dα = mask·(dα_cap − Σ dα_cap·α_cap) / Σ α·mask
                tot = 0.0
                sda = 0.0
                for r in range(kappa):
                    tot += ASOFT[i, b, h, r] * CAPM[i, b, h, r]
                    sda += dal[r] * ALPHA[i, b, h, r]
                for r in range(kappa):
                    dal[r] = CAPM[i, b, h, r] * (dal[r] - sda) / tot
            sa = 0.0
            for r in range(kappa):
                sa += ASOFT[i, b, h, r] * dal[r]
            for r in range(kappa):
                dpk[h, r] = ASOFT[i, b, h, r] * (dal[r] - sa)
            # score = m·q_mem·inv_sqrt − λ·read_ema (+ constant noise); with unit keys m·q_mem/s,
            # s = √(‖m‖² + ε²): d q_mem += (ck/s)·m, d m += (ck/s)·(q_mem − (m·q_mem/s²)·m); with empty_last
            # also − (ε²/s²)·‖q_mem‖: d q_mem −= ck·(ε²/s²)·q_mem/‖q_mem‖, d m += ck·‖q_mem‖·2ε²/s⁴·m
            mk = MK[i, h, b]
            mk[:] = 0.0
            qk = QK[i, b, h]
            q_pen = empty_penalty(key_rule, qk)
            for r in range(kappa):
                j = IDX[i, b, h, r]
                cv = ALPHA[i, b, h, r] * inv_c
                ck = dpk[h, r] * inv_sqrt
                row = MSEL[i, b, h, r]
                shrink = 0.0
                if key_rule != KEY_DOT:
                    s2 = dot(row, row) + UNIT_KEY_EPS * UNIT_KEY_EPS
                    if key_rule == KEY_UNIT_ROWS:
                        # the value path through m/s: d m = (α/s)·(g − (m·g/s²)·m); its first term is cv·g below
                        cv /= math.sqrt(s2)
                        cv_row = cv * dot(row, g) / s2
                        for m in range(Dm):
                            D[b, j, m] -= cv_row * row[m]
                    if q_pen > 0.0:
                        w = UNIT_KEY_EPS * UNIT_KEY_EPS / s2
                        pull = ck * w / q_pen
                        grow = ck * q_pen * 2.0 * w / s2 * inv_c
                        for m in range(Dm):
                            mk[m] -= pull * qk[m]
                            D[b, j, m] += grow * row[m]
                    ck /= math.sqrt(s2)
                    shrink = dot(row, qk) / s2
                for m in range(Dm):
                    mk[m] += ck * row[m]
                    D[b, j, m] += cv * g[m] + (ck * inv_c) * (qk[m] - shrink * row[m])
        # read_ema before the step: ρ·d_ema, plus −λ·d_picked at every pick (score = … − λ·read_ema_j)
        for j in range(d_ema.shape[1]):
            d_ema[b, j] *= rho
        for h in range(H):
            for r in range(kappa):
                d_ema[b, IDX[i, b, h, r]] -= load_penalty * dpk[h, r]
    # d q_h = W_k,h d q_mem_h, one product per head
    for h in range(H):
        dq = np.dot(MK[i, h], WkT_heads[h])             # [B, d_h]
        for b in range(B):
            for a in range(Dh):
                DQ[i, b, h * Dh + a] = dq[b, a]
    scatter_add_ends(DS, np.dot(DQ[i], Wq_s), off0, d0, offK, dK)
