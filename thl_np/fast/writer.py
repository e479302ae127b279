"""Spec §4.6 (writer) and §4.7 (memory decay and write) as Numba kernels, mirroring
``thl_np.components.writer``: ``write`` for a decode step (``write_parallel`` splits the batch over the
cores), ``write_forward`` / ``write_backward`` for a training step. One sequence's writer and write are
written once, in helpers both paths call: ``clip_write`` (the clip), ``choose_write`` (branch, gate,
targets; an empty slot is ``components.writer.EMPTY_NORM``'s, ``is_empty``) and ``decay_and_write`` (§4.7).

The bank is stored divided by a running scalar (true memory = scale·memory; the decay M ← γM is
scale ← γ·scale) with the squared norms of the stored rows kept beside it (``primitives.row_norms2``).
Tested kernel by kernel in tests/fast/test_writer_kernels.py.
"""
import math

import numpy as np
from numba import njit, prange

from ..components.writer import EMPTY_NORM
from .primitives import axpy, dot, gather_ends, row_dots, scatter_add_ends, top_k_desc

# The bank is stored divided by a running scale that the decay γ multiplies; below this γ (0 included) a
# write would divide by it, so the decay is applied to the rows eagerly (training's write kernels too).
MIN_DECAY = 1e-6


# ---------------------------------------------------------------------------------------------------
# One sequence's writer and write, in three parts shared by the decode and training kernels
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def clip_write(w_raw, clip_max, w):
    """Mirrors the clip of thl_np.components.writer.writer_forward (spec §4.6) for one sequence:
    w = w_raw · min(1, Δ_max / (‖w_raw‖ + 1e-6)). Returns (‖w_raw‖, whether it clipped, the factor applied
    (1 where it did not), ‖w‖)."""
    n_raw = math.sqrt(dot(w_raw, w_raw))
    ratio = clip_max / (n_raw + 1e-6)
    clipped = ratio < 1.0
    factor = ratio if clipped else 1.0
    for m in range(w.shape[0]):
        w[m] = w_raw[m] * factor
    return n_raw, clipped, factor, math.sqrt(dot(w, w))


@njit(cache=True)
def is_empty(scale, norm2_j):
    """Whether a slot is empty (thl_np.components.writer: ‖m_j‖ ≤ EMPTY_NORM) from its stored row's squared
    norm (true row = scale·stored row)."""
    return scale * np.sqrt(norm2_j) <= EMPTY_NORM


# ---------------------------------------------------------------------------------------------------
# The discrete choice (branch, gate, targets)
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def choose_write(memory_b, norm2_b, w, n_w, scale, read_ema_b, last_write_b, t, write_slots, beta, theta,
                 stale_weight, underuse_weight, aff, prio, dots, targets):
    """Mirrors the discrete part of thl_np.components.writer.writer_forward (spec §4.6) for one sequence,
    given the clipped write vector w and its norm: cosine affinities against the scaled bank (true memory =
    scale·memory_b), the arg-max slot j*, the branch and the W_w targets (novel: empty slots first, else
    λ_s·staleness + λ_u·underuse; refine: largest affinity; ties to the lower index). Fills aff and dots;
    returns (g, j*, novel)."""
    row_dots(memory_b, w, dots)
    j_star = 0
    any_empty = False
    for j in range(memory_b.shape[0]):
        n_m = scale * np.sqrt(norm2_b[j])
        if n_m <= EMPTY_NORM:
            any_empty = True
        aff[j] = (scale * dots[j]) / ((n_w + 1e-8) * (n_m + 1e-8))
        if aff[j] > aff[j_star]:
            j_star = j
    novelty = 1.0 - aff[j_star]
    novel = novelty > theta
    if not novel:
        top_k_desc(aff, write_slots, targets)
        return 1.0, j_star, novel
    g = 1.0 / (1.0 + np.exp(-beta * (novelty - theta)))
    if any_empty:
        count = 0
        for j in range(memory_b.shape[0]):  # empty slots first, in index order
            if count < write_slots and is_empty(scale, norm2_b[j]):
                targets[count] = j
                count += 1
        for j in range(memory_b.shape[0]):  # then the others, in index order
            if count < write_slots and not is_empty(scale, norm2_b[j]):
                targets[count] = j
                count += 1
    else:
        for j in range(memory_b.shape[0]):
            # as the plain path: λ_u times underuse = 1/(1e-8 + read_ema), so the priorities round alike
            prio[j] = stale_weight * (t - last_write_b[j]) + underuse_weight * (1.0 / (1e-8 + read_ema_b[j]))
        top_k_desc(prio, write_slots, targets)
    return g, j_star, novel


@njit(cache=True)
def decay_and_write(memory, norm2, write_ema, last_write, targets, g, w, t, eager, decay, new_scale, write_rate,
                    ema_decay):
    """Mirrors thl_np.components.writer.memory_write_forward (spec §4.7) for one sequence on the scaled bank:
    M ← γM, then m_j += η·g·w for every target j, with the squared norms of the written rows, write_ema and
    last_write. The decay is the caller's new_scale = γ·scale (true = new_scale·stored, so a write adds
    η·g·w / new_scale to the stored row), or, when ``eager`` (γ below MIN_DECAY: too small to divide by),
    applied to the rows and norms here (new_scale is then the old scale)."""
    if eager:
        for j in range(memory.shape[0]):
            for m in range(memory.shape[1]):
                memory[j, m] *= decay
            norm2[j] *= decay * decay
    step = write_rate * g / new_scale
    for s in range(targets.shape[0]):
        j = targets[s]
        axpy(step, w, memory[j])
        norm2[j] = dot(memory[j], memory[j])
        last_write[j] = t
    for j in range(memory.shape[0]):
        write_ema[j] *= ema_decay
    for s in range(targets.shape[0]):
        write_ema[targets[s]] += 1.0 - ema_decay


# ---------------------------------------------------------------------------------------------------
# Decode: one step for a batch, in place on the decoder's state
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def write_one(w_raw, memory, norm2, scale, read_ema, write_ema, last_write, t, write_slots, clip_max,
              beta, theta, stale_weight, underuse_weight, new_scale, write_rate, ema_decay, targets, w, aff,
              prio, dots, eager, decay):
    """Mirrors thl_np.components.writer.writer_forward (spec §4.6, from w_raw on) and memory_write_forward
    (§4.7) for one sequence on the scaled bank (true memory = scale·memory): the targets' rows and squared
    norms are updated in place; the decay itself is the caller's new_scale, or, when ``eager`` (γ below
    MIN_DECAY: too small to divide by), applied to the rows here after the writer's choice. w, aff, prio
    and dots are scratch. Returns (the gate g, whether the novel branch was taken)."""
    _, _, _, n_w = clip_write(w_raw, clip_max, w)
    g, _, novel = choose_write(memory, norm2, w, n_w, scale, read_ema, last_write, t, write_slots,
                               beta, theta, stale_weight, underuse_weight, aff, prio, dots, targets)
    decay_and_write(memory, norm2, write_ema, last_write, targets, g, w, t, eager, decay, new_scale, write_rate,
                    ema_decay)
    return g, novel


@njit(cache=True)
def write(w_raw, memory, norm2, scale, read_ema, write_ema, last_write, t, write_slots, clip_max,
          beta, theta, stale_weight, underuse_weight, decay, write_rate, ema_decay, targets_out, g_out, novel_out):
    """Mirrors writer_forward + memory_write_forward for a decode step: ``write_one`` for every sequence of
    the batch, in turn (``write_parallel`` splits them over the cores). Fills the targets, the gate and the
    branch (novel_out, for the memory diagnostics) of every sequence; returns the new scale γ·scale
    (unchanged for γ < MIN_DECAY, whose decay is applied eagerly)."""
    B, J, Dm = memory.shape
    eager = decay < MIN_DECAY
    new_scale = scale if eager else scale * decay
    w = np.empty(Dm, dtype=w_raw.dtype)
    aff = np.empty(J, dtype=np.float64)
    prio = np.empty(J, dtype=np.float64)
    dots = np.empty(J, dtype=memory.dtype)
    for b in range(B):
        g_out[b], novel_out[b] = write_one(w_raw[b], memory[b], norm2[b], scale, read_ema[b], write_ema[b],
                                           last_write[b], t, write_slots, clip_max, beta, theta, stale_weight,
                                           underuse_weight, new_scale, write_rate, ema_decay, targets_out[b], w,
                                           aff, prio, dots, eager, decay)
    return new_scale


@njit(cache=True, parallel=True)
def write_parallel(w_raw, memory, norm2, scale, read_ema, write_ema, last_write, t, write_slots, clip_max,
                   beta, theta, stale_weight, underuse_weight, decay, write_rate, ema_decay, targets_out, g_out,
                   novel_out):
    """``write`` (writer_forward + memory_write_forward), the sequences split over the cores."""
    B, J, Dm = memory.shape
    eager = decay < MIN_DECAY
    new_scale = scale if eager else scale * decay
    for b in prange(B):
        w = np.empty(Dm, dtype=w_raw.dtype)
        aff = np.empty(J, dtype=np.float64)
        prio = np.empty(J, dtype=np.float64)
        dots = np.empty(J, dtype=memory.dtype)
        g_out[b], novel_out[b] = write_one(w_raw[b], memory[b], norm2[b], scale, read_ema[b], write_ema[b],
                                           last_write[b], t, write_slots, clip_max, beta, theta, stale_weight,
                                           underuse_weight, new_scale, write_rate, ema_decay, targets_out[b], w,
                                           aff, prio, dots, eager, decay)
    return new_scale


# ---------------------------------------------------------------------------------------------------
# Training: one step's forward with its record, and its backward
# ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def write_forward(i, t, S, off0, d0, offK, dK, WwT, b_w, XW, mem, norm2, scale, read_ema, write_ema, last_write,
                  write_slots, clip_max, beta, theta, stale_weight, underuse_weight, decay, write_rate, ema_decay,
                  eager, TGT, GG, WRAW, WCL, NRAW, CLIP, SC, NW, JSTAR, MSTAR, NMSTAR, DOTSTAR, NOVEL):
    """Mirrors thl_np.components.writer.writer_forward (spec §4.6) and memory_write_forward (§4.7) for step
    i of a training sequence: x_w = [s_new^0; s_new^{K-1}] (the columns off0:off0+d0 and offK:offK+dK of
    S[i+1], recorded in XW[i]), w_raw = x_w W_w^T + b_w (WwT = W_w^T), the writer against the bank before
    this step's decay (true = scale·mem), then the lazy decay and the write. Records the writer's
    intermediates; returns the new scale γ·scale.

    ``eager`` (for γ too small to divide by, γ = 0 included): the bank and its norms are multiplied by γ
    here instead, and the scale is returned unchanged."""
    B, J, Dm = mem.shape
    gather_ends(S[i + 1], off0, d0, offK, dK, XW[i])
    out = np.dot(XW[i], WwT)
    new_scale = scale if eager else scale * decay
    aff = np.empty(J, np.float64)
    prio = np.empty(J, np.float64)
    tg = np.empty(write_slots, np.int64)
    dots = np.empty(J, mem.dtype)
    for b in range(B):
        w_raw = WRAW[i, b]
        for m in range(Dm):
            w_raw[m] = out[b, m] + b_w[m]
        w = WCL[i, b]
        n_raw, clipped, sc, n_w = clip_write(w_raw, clip_max, w)
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
        decay_and_write(mem[b], norm2[b], write_ema[b], last_write[b], tg, g, w, t, eager, decay, new_scale,
                        write_rate, ema_decay)
        for s in range(write_slots):
            TGT[i, b, s] = tg[s]
    return new_scale


@njit(cache=True)
def write_backward(i, DS, D, c_old, c_new, TGT, GG, WCL, WRAW, NRAW, CLIP, SC, NW, JSTAR, MSTAR, NMSTAR,
                   DOTSTAR, NOVEL, write_rate, beta, clip_max, W_w, DWR, off0, d0, offK, dK, eager, decay):
    """Mirrors thl_np.components.writer.memory_write_backward and writer_backward for step i (§4.7, then
    §4.6): the target rows of dM = c_old·D give d_w, d_g; the decay is c_new = γ·c_old (``eager``: D ← γ·D
    here, c_new = c_old); the novelty gate's path adds d m_{j*} into D; DWR[i] = d w_raw; d x_w = DWR[i] W_w
    is added into the tier gradients DS where write_forward read x_w (columns off0:off0+d0, offK:offK+dK)."""
    B, J, Dm = D.shape
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
    scatter_add_ends(DS, np.dot(DWR[i], W_w), off0, d0, offK, dK)
