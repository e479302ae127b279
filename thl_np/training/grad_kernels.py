"""Numba kernels of the fast training path (``thl_np.training.fast_grad``): one forward and one backward
kernel per component of a spec §4 step, each the same math as its plain pair in ``thl_np.components``.

Conventions shared by every kernel:

- Tape arrays are time-major, ``X[i]`` is step i's record ([T, B, ...]); a kernel takes the whole array and
  the step index ``i``, so a step costs a few calls and no slicing in Python.
- The memory bank is stored divided by a running scalar: forward ``true = scale · mem`` (the decay
  ``M ← γM`` is ``scale ← γ·scale``); backward ``dM = c · D`` (``dM ← γ·dM`` is ``c ← γ·c``).
- Scores are ``m_j · q_mem_h`` with ``q_mem_h = W_k,h^T q_h`` (``thl_np.components.router.slot_scores``), and every
  per-slot dot product over the bank (scores, the writer's affinities, squared norms) runs the same code
  for every row (``row_dots`` / ``_dot``), so identical rows give identical numbers and the spec's tie rule
  (lower index first) holds exactly, as in ``thl_np.inference.kernels``.
- Other dense products run through ``np.dot`` on C-contiguous operands (BLAS), everything else is loops.
- Every ranking breaks ties by the lower slot index (strict ``>`` in an insertion into a sorted list).
"""
import math

import numpy as np
from numba import njit

# One definition of the per-row dot order and of the tie rule for both fast paths. (Numba caches by the
# calling module's file: after editing these in thl_np/inference/kernels.py, clear __pycache__ here too.)
from ..inference.kernels import _dot, _sigmoid, _top_desc, choose_write, row_dots, row_norms2  # noqa: F401


# ---------------------------------------------------------------------------------------------------
# Spec §4.2, local attention over precomputed keys/values of the embedding history
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def local_forward(i, h0, n, QL, KL, VL, inv_sqrt, LA, LOC):
    """LOC[i, b] = Σ_j a_j VL[b, h0+j], a = softmax(KL[b, h0+j]·QL[i, b] / √d_lq) over j < n; LA[i, b, :n] = a."""
    B = KL.shape[0]
    s = np.empty(n, np.float64)
    for b in range(B):
        dots = np.dot(KL[b, h0:h0 + n], QL[i, b])
        m = -np.inf
        for j in range(n):
            s[j] = dots[j] * inv_sqrt
            if s[j] > m:
                m = s[j]
        tot = 0.0
        for j in range(n):
            s[j] = math.exp(s[j] - m)
            tot += s[j]
        a = LA[i, b, :n]
        for j in range(n):
            a[j] = s[j] / tot
        LOC[i, b] = np.dot(a, VL[b, h0:h0 + n])


@njit(cache=True)
def local_backward(i, h0, n, QL, KL, VL, inv_sqrt, LA, DLOC, DQL, DKL, DVL):
    """d_loc = DLOC [B, d_v] → DQL[i] (query), and the keys/values of the rows read (DKL, DVL, accumulated)."""
    B = KL.shape[0]
    for b in range(B):
        dl = DLOC[b]
        da = np.dot(VL[b, h0:h0 + n], dl)
        a = LA[i, b, :n]
        sad = 0.0
        for j in range(n):
            sad += a[j] * da[j]
        ds = np.empty(n, KL.dtype)
        for j in range(n):
            ds[j] = a[j] * (da[j] - sad) * inv_sqrt
        DQL[i, b] = np.dot(ds, KL[b, h0:h0 + n])
        q = QL[i, b]
        for j in range(n):
            dk = DKL[b, h0 + j]
            dsj = ds[j]
            for m in range(q.shape[0]):
                dk[m] += dsj * q[m]
            dvr = DVL[b, h0 + j]
            aj = a[j]
            for m in range(dl.shape[0]):
                dvr[m] += aj * dl[m]


# ---------------------------------------------------------------------------------------------------
# Spec §4.3-4.4, router read and read metadata
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def route_forward(i, t, QE, QS, scale, read_ema, last_read, mem, G, use_gumbel, load_penalty, inv_sqrt, kappa,
                  capacity, rho, Wk_heads, WvT_heads, record_A,
                  QV, QK, IDX, ASOFT, ALPHA, CAPM, CAPU, MSEL, MIX, AW, R):
    """Router read for step i; records q (QV), q_mem (QK), the picks, both α, the capacity mask, the true rows
    read, the α-mix of rows per head, and writes r into R[i]; read_ema / last_read in place.

    q = QE[i] + QS (e-part and state-part of u W_q^T); q_mem_h = W_k,h^T q_h; true row = scale·mem.
    """
    B, J, Dm = mem.shape
    H, Dh = QV.shape[2], QV.shape[3]
    dvh = WvT_heads.shape[2]
    scores = np.empty(J, np.float64)
    dots = np.empty(J, mem.dtype)
    A = np.zeros(J, np.float64)
    idx = np.empty(kappa, np.int64)
    ex = np.empty(kappa, np.float64)
    served = np.zeros(J, np.int64)
    keep = np.zeros(kappa, np.bool_)
    qh = np.empty((B, Dh), mem.dtype)
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
        A[:] = 0.0
        for h in range(H):
            row_dots(mem[b], QK[i, b, h], dots)
            for j in range(J):
                s = (scale * dots[j]) * inv_sqrt - load_penalty * read_ema[b, j]
                if use_gumbel:
                    s += G[i, b, h, j]
                scores[j] = s
            _top_desc(scores, kappa, idx)
            top = scores[idx[0]]
            tot = 0.0
            for r in range(kappa):
                ex[r] = math.exp(scores[idx[r]] - top)
                tot += ex[r]
            for r in range(kappa):
                IDX[i, b, h, r] = idx[r]
                ASOFT[i, b, h, r] = ex[r] / tot
                ALPHA[i, b, h, r] = ASOFT[i, b, h, r]
                CAPM[i, b, h, r] = 1.0
            CAPU[i, b, h] = True
        if capacity > 0:
            # walk heads and ranks in order; a pick of a slot that already served `capacity` picks gets 0
            served[:] = 0
            for h in range(H):
                tot = 0.0
                for r in range(kappa):
                    j = IDX[i, b, h, r]
                    keep[r] = served[j] < capacity
                    if keep[r]:
                        served[j] += 1
                        tot += ASOFT[i, b, h, r]
                    else:
                        CAPM[i, b, h, r] = 0.0
                CAPU[i, b, h] = tot > 0.0
                if tot > 0.0:
                    for r in range(kappa):
                        ALPHA[i, b, h, r] = ASOFT[i, b, h, r] / tot if keep[r] else 0.0
        for h in range(H):
            mix = MIX[i, h, b]
            mix[:] = 0.0
            for r in range(kappa):
                j = IDX[i, b, h, r]
                al = ALPHA[i, b, h, r]
                A[j] += al
                row = MSEL[i, b, h, r]
                for m in range(Dm):
                    v = scale * mem[b, j, m]
                    row[m] = v
                    mix[m] += al * v
                last_read[b, j] = t
        for j in range(J):
            read_ema[b, j] = rho * read_ema[b, j] + (1.0 - rho) * A[j]
            if record_A:
                AW[i, b, j] = A[j]
    # value projection applied once to each head's mix: r_h = W_v,h (Σ_rank α m_idx)
    for h in range(H):
        rh = np.dot(MIX[i, h], WvT_heads[h])
        for b in range(B):
            for v in range(dvh):
                R[i, b, h * dvh + v] = rh[b, v]


@njit(cache=True)
def route_backward(i, DR, d_ema, DA, use_DA, rho, load_penalty, inv_sqrt, capacity, Wv_heads, WkT_heads,
                   IDX, ASOFT, ALPHA, CAPM, CAPU, MSEL, QK, D, c, DQ, MK, Wq_s, DS, off0, d0, offK, dK):
    """d_r = DR[i] and the read_ema gradient after the step (d_ema, updated in place to the one before it)
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
                dal[r] = _dot(g, MSEL[i, b, h, r]) + extra
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
            # score = m·q_mem·inv_sqrt − λ·read_ema (+ constant noise)
            mk = MK[i, h, b]
            mk[:] = 0.0
            qk = QK[i, b, h]
            for r in range(kappa):
                j = IDX[i, b, h, r]
                cv = ALPHA[i, b, h, r] * inv_c
                ck = dpk[h, r] * inv_sqrt
                row = MSEL[i, b, h, r]
                for m in range(Dm):
                    mk[m] += ck * row[m]
                    D[b, j, m] += cv * g[m] + (ck * inv_c) * qk[m]
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
    du = np.dot(DQ[i], Wq_s)
    for b in range(B):
        for a in range(d0):
            DS[b, off0 + a] += du[b, a]
        for a in range(dK):
            DS[b, offK + a] += du[b, d0 + a]


# ---------------------------------------------------------------------------------------------------
# Spec §4.5, one tier's GRU cell
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def gru_forward(i, slot, S, off, d, off_lo, d_lo, R, LOC, use_loc, extra, ei, W1T, W2T, P, Z, RG, ST):
    """Tier at columns off:off+d of S[i] → S[i+1]; input x = [lower; ctx] with lower = S[i+1, :, off_lo:…]
    (d_lo = 0 for Tier 0, whose e-part of the pre-activations is in ``extra``), ctx = R[i] (+ LOC[i]).

    P[slot] = [s_prev; lower; ctx] (the product's input), W1T [d + d_lo + d_v, 3d] gives the z, r
    pre-activations and the x-part of the candidate's, W2T [d, d] its (r_g ⊙ s_prev)-part;
    ``extra[ei, b or 0]`` [3d] adds the rest (biases, Tier 0's embedding part). Z, RG, ST record z, r_g, s̃.
    """
    B = S.shape[1]
    p = P[slot]
    dv = R.shape[2]
    for b in range(B):
        for a in range(d):
            p[b, a] = S[i, b, off + a]
        for a in range(d_lo):
            p[b, d + a] = S[i + 1, b, off_lo + a]
        for a in range(dv):
            v = R[i, b, a]
            if use_loc:
                v += LOC[i, b, a]
            p[b, d + d_lo + a] = v
    pre = np.dot(p, W1T)
    rs = np.empty((B, d), p.dtype)
    eb = extra.shape[1] > 1
    for b in range(B):
        ex = extra[ei, b if eb else 0]
        for a in range(d):
            z = _sigmoid(pre[b, a] + ex[a])
            rg = _sigmoid(pre[b, d + a] + ex[d + a])
            Z[slot, b, a] = z
            RG[slot, b, a] = rg
            rs[b, a] = rg * p[b, a]
    ph = np.dot(rs, W2T)
    for b in range(B):
        ex = extra[ei, b if eb else 0]
        for a in range(d):
            st = math.tanh(pre[b, 2 * d + a] + ex[2 * d + a] + ph[b, a])
            ST[slot, b, a] = st
            z = Z[slot, b, a]
            S[i + 1, b, off + a] = (1.0 - z) * p[b, a] + z * st


@njit(cache=True)
def gru_backward(i, slot, DS, off, d, off_lo, d_lo, Wh_p, Wzr_p, P, Z, RG, ST, DPRE, DR, DLOC, is_tier0):
    """DS[:, off:off+d] (gradient of s_new) → d_s_prev in its place, d_lower added at off_lo, d_ctx added to
    DR[i] (and written to DLOC for Tier 0); DPRE[slot] = gradients of the z, r, candidate pre-activations.
    Wh_p / Wzr_p are W_h and [W_z; W_r] restricted to the columns of P (Tier 0: without the embedding's)."""
    B = DS.shape[0]
    p = P[slot]
    dv = DR.shape[2]
    dh = np.empty((B, d), p.dtype)
    dzr = np.empty((B, 2 * d), p.dtype)
    for b in range(B):
        for a in range(d):
            ds = DS[b, off + a]
            z = Z[slot, b, a]
            st = ST[slot, b, a]
            dh[b, a] = ds * z * (1.0 - st * st)
            dzr[b, a] = ds * (st - p[b, a]) * z * (1.0 - z)
    dph = np.dot(dh, Wh_p)
    for b in range(B):
        for a in range(d):
            rg = RG[slot, b, a]
            dzr[b, d + a] = dph[b, a] * p[b, a] * rg * (1.0 - rg)
    dp = np.dot(dzr, Wzr_p)
    for b in range(B):
        for a in range(d):
            DS[b, off + a] = (DS[b, off + a] * (1.0 - Z[slot, b, a]) + dph[b, a] * RG[slot, b, a] + dp[b, a])
            DPRE[slot, b, a] = dzr[b, a]
            DPRE[slot, b, d + a] = dzr[b, d + a]
            DPRE[slot, b, 2 * d + a] = dh[b, a]
        for a in range(d_lo):
            DS[b, off_lo + a] += dph[b, d + a] + dp[b, d + a]
        for a in range(dv):
            v = dph[b, d + d_lo + a] + dp[b, d + d_lo + a]
            DR[i, b, a] += v
            if is_tier0:
                DLOC[b, a] = v


# ---------------------------------------------------------------------------------------------------
# Spec §4.6-4.7, writer and memory decay/write
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def write_forward(i, t, S, off0, d0, offK, dK, WwqT, b_w, XW, QS, mem, norm2, scale, read_ema,
                  write_ema, last_write, write_slots, clip_max, beta, theta, stale_weight, underuse_weight, decay,
                  write_rate, ema_decay, eager, TGT, GG, WRAW, WCL, NRAW, CLIP, SC, NW, JSTAR, MSTAR, NMSTAR,
                  DOTSTAR, NOVEL):
    """Writer for step i against the bank before this step's decay (true = scale·mem), then the lazy decay
    and the write. XW[i] = [s_new^0; s_new^{K-1}]; one product gives w_raw and the next step's router
    state-part QS. Records the writer's intermediates; returns the new scale γ·scale.

    ``eager`` (for γ too small to divide by, γ = 0 included): the bank and its norms are multiplied by γ
    here instead, and the scale is returned unchanged."""
    B, J, Dm = mem.shape
    xw = XW[i]
    for b in range(B):
        for a in range(d0):
            xw[b, a] = S[i + 1, b, off0 + a]
        for a in range(dK):
            xw[b, d0 + a] = S[i + 1, b, offK + a]
    out = np.dot(xw, WwqT)
    Q = QS.shape[1]
    for b in range(B):
        for a in range(Q):
            QS[b, a] = out[b, Dm + a]
    new_scale = scale if eager else scale * decay
    aff = np.empty(J, np.float64)
    prio = np.empty(J, np.float64)
    tg = np.empty(write_slots, np.int64)
    dots = np.empty(J, mem.dtype)
    for b in range(B):
        w_raw = WRAW[i, b]
        for m in range(Dm):
            w_raw[m] = out[b, m] + b_w[m]
        n_raw = math.sqrt(_dot(w_raw, w_raw))
        ratio = clip_max / (n_raw + 1e-6)
        clipped = ratio < 1.0
        sc = ratio if clipped else 1.0
        w = WCL[i, b]
        for m in range(Dm):
            w[m] = w_raw[m] * sc
        n_w = math.sqrt(_dot(w, w))
        g, j_star, novel = choose_write(mem[b], norm2[b], w, n_w, scale, read_ema[b], last_write[b], t,
                                        write_slots, beta, theta, stale_weight, underuse_weight, aff, prio, dots, tg)
        GG[i, b] = g
        NRAW[i, b] = n_raw
        CLIP[i, b] = clipped
        SC[i, b] = sc
        NW[i, b] = n_w
        JSTAR[i, b] = j_star
        NMSTAR[i, b] = scale * math.sqrt(norm2[b, j_star])
        DOTSTAR[i, b] = scale * dots[j_star]
        NOVEL[i, b] = novel
        for m in range(Dm):
            MSTAR[i, b, m] = scale * mem[b, j_star, m]
        # M ← γM (lazy: the scale) then m_j += η·g·w, i.e. stored_j += η·g·w / (γ·scale)
        if eager:
            mem[b] *= decay
            norm2[b] *= decay * decay
        step = write_rate * g / new_scale
        for s in range(write_slots):
            j = tg[s]
            TGT[i, b, s] = j
            row = mem[b, j]
            for m in range(Dm):
                row[m] += step * w[m]
            norm2[b, j] = _dot(row, row)
            last_write[b, j] = t
        for j in range(J):
            write_ema[b, j] *= ema_decay
        for s in range(write_slots):
            write_ema[b, tg[s]] += 1.0 - ema_decay
    return new_scale


@njit(cache=True)
def write_backward(i, dS_out, DS, D, c_old, c_new, TGT, GG, WCL, WRAW, NRAW, CLIP, SC, NW, JSTAR, MSTAR, NMSTAR,
                   DOTSTAR, NOVEL, write_rate, beta, clip_max, W_w, DWR, off0, d0, offK, dK, eager, decay):
    """Step i's output gradient joins DS; then §4.7 and §4.6 backward: the target rows of dM = c_old·D give
    d_w, d_g; the decay is c_new = γ·c_old (``eager``: D ← γ·D here, c_new = c_old); the novelty gate's path
    adds d m_{j*} into D; DWR[i] = d w_raw; d x_w = DWR[i] W_w is added into the tier gradients DS."""
    B, J, Dm = D.shape
    DS += dS_out[i]
    drows = np.empty(Dm, np.float64)
    dw = np.empty(Dm, np.float64)
    inv_new = 1.0 / c_new
    for b in range(B):
        drows[:] = 0.0
        for s in range(TGT.shape[2]):
            j = TGT[i, b, s]
            for m in range(Dm):
                drows[m] += c_old * D[b, j, m]
        g = GG[i, b]
        w = WCL[i, b]
        dg = 0.0
        for m in range(Dm):
            dw[m] = write_rate * g * drows[m]
            dg += drows[m] * w[m]
        dg *= write_rate
        if eager:
            D[b] *= decay
        # novelty gate (novel branch only): g = σ(β(1 − aff* − θ))  →  d aff* = −β g (1 − g) d g
        d_aff = -beta * g * (1.0 - g) * dg if NOVEL[i, b] else 0.0
        n_w = NW[i, b]
        nms = NMSTAR[i, b]
        denom = (n_w + 1e-8) * (nms + 1e-8)
        d_dot = d_aff / denom
        d_denom = -d_aff * DOTSTAR[i, b] / (denom * denom)
        cw = d_denom * (nms + 1e-8) / (n_w if n_w > 0 else 1.0)
        cm = d_denom * (n_w + 1e-8) / (nms if nms > 0 else 1.0)
        ms = MSTAR[i, b]
        for m in range(Dm):
            dw[m] += d_dot * ms[m] + cw * w[m]
        if d_aff != 0.0:
            j_star = JSTAR[i, b]
            for m in range(Dm):
                D[b, j_star, m] += (d_dot * w[m] + cm * ms[m]) * inv_new
        # clip: w = w_raw · Δ/(‖w_raw‖ + 1e-6) when clipped, else w = w_raw
        w_raw = WRAW[i, b]
        out = DWR[i, b]
        if CLIP[i, b]:
            n_raw = NRAW[i, b]
            proj = 0.0
            for m in range(Dm):
                proj += dw[m] * w_raw[m]
            dsf = -clip_max / (n_raw + 1e-6) ** 2 * proj / (n_raw if n_raw > 0 else 1.0)
            sc = SC[i, b]
            for m in range(Dm):
                out[m] = sc * dw[m] + dsf * w_raw[m]
        else:
            for m in range(Dm):
                out[m] = dw[m]
    dxw = np.dot(DWR[i], W_w)
    for b in range(B):
        for a in range(d0):
            DS[b, off0 + a] += dxw[b, a]
        for a in range(dK):
            DS[b, offK + a] += dxw[b, d0 + a]


@njit(cache=True)
def scatter_rows(dW, ids, rows):
    """dW[ids[n]] += rows[n] (repeated ids accumulate)."""
    for n in range(ids.shape[0]):
        dW[ids[n]] += rows[n]
