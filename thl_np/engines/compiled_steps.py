"""The spec §4 step composed in one compiled function, for the fast decoding session of a small model.

A small model's step is cheap (the shipped model's: about 0.4 M multiply-adds, weights in cache, tens of
microseconds), so ``FastDecoder._advance`` spends most of its time in Python between its ~15 kernel calls.
``run_steps`` is the same composition (the wiring of ``FastDecoder._advance``, step by step) as one
``@njit`` function over a whole prompt [B, T]: no Python per byte. It calls the component kernels of
``thl_np.fast`` (``local_attention.local_attend``, ``router.route_one``, ``gru.gru_reset`` /
``gru.gru_update``, ``writer.write_one``), each mirroring one component; what is written here is the
wiring between them (the router input u = [e; s⁰; s^{K−1}], the tier clocks, the writer input, the ring
buffer, the lazily applied decay and its renormalisation) and the products, one thread:

- Every product is ``thl_np.fast.linalg.packed_rows_linear`` on a packed copy of its weights (tiles of L
  rows stored k-major, made once per session by ``prepare``): each output is one fused multiply-add chain
  over k, so a sequence's step gives the same bits whatever the batch it is stepped in (a server's
  neighbours, ``generate_text``'s other prompts; tested), and at batch 8 each weight is read once for
  eight sequences without horizontal sums (measured on the shipped model: the batch-8 step 1.4x faster
  than with row-major dot products, batch 1 about even). Against ``FastDecoder._advance`` (gemv's
  vectorised sums) the sums differ in rounding only: float64 within 1e-12, float32 logits within 1e-5.
- It runs on the session's own arrays, in place (``FastDecoder``'s ring, scaled bank, norm cache, EMAs,
  last read/write, tiers, and the per-step choices the memory diagnostics read); it returns the scalars
  (scale, t, ring start, ring fill).

It applies (``prepare``) to float32/float64 models whose step weights are small (``MAX_STEP_PARAMETERS``):
there one thread computing the step beats the threaded kernels plus a Python round trip per kernel. A
larger model, or a quantized one, keeps ``FastDecoder._advance`` (threaded kernels, packed tiles, int8).

Numba's cache is keyed by the source file it is defined in and does not notice when a kernel it calls
changes (see ``thl_np.fast``): ``run_steps`` is built in a closure over a digest of ``thl_np/fast/*.py``, and
Numba's cache key includes a closure's values, so an edited kernel recompiles it instead of running stale
code. ``is_warm`` says whether a call would load compiled code instead of compiling (``generation``'s path
choice reads it).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit

from ..components.registry import key_rule
from ..fast import gru, linalg, local_attention, primitives, router, writer

# Above this many parameters in the step's products (the output head and the embedding table excluded),
# FastDecoder keeps its threaded kernels: one thread's step then costs more than the Python between
# kernels. The shipped model has 0.66 M; the default config 19 M. Measured roughly (a shared 2-core machine,
# float32, default threads): width 256 (2.3 M), the compiled step faster at batch 1 and 8 (86 against 117
# µs a step at batch 1); width 512 (8.7 M), about even at batch 1 but 2.7x slower at batch 8 than the
# threaded packed kernels.
MAX_STEP_PARAMETERS = 4_000_000
# Steps per call of run_steps: a long prompt is a few calls (Ctrl-C is seen between two; the shipped model
# runs ~8,000 steps in well under a second), each writing its tier states to a contiguous buffer.
CHUNK = 8192


class StepWeights(NamedTuple):
    """The session's weights as ``run_steps`` reads them (float arrays, C-contiguous)."""

    emb: np.ndarray          # [V, d_e]
    # every matrix packed (linalg.packed: W [R, C] as [⌈R/L⌉, C, L]); its shape [R, C] in the comment
    W_qkv: np.ndarray        # [2·d_q + d_v, d_e]: local attention's q, k, v in one product
    zeros: np.ndarray        # the bias of the bias-free products
    W_q: np.ndarray          # [H·d_h, d_e + d_0 + d_{K-1}]
    W_k_heads_T: np.ndarray  # per head [d_m, d_h], stacked [H, ...]: q_mem_h = W_k,h^T q_h
    W_v_heads: np.ndarray    # per head [d_v/H, d_m], stacked [H, ...]: r_h = W_v,h mix_h
    # the tiers' matrices, each tier's (packed) raveled after the one below (``tier_weights`` views them):
    # one argument type for every number of tiers, so Numba compiles run_steps once per dtype
    W_zr: np.ndarray         # tier k: [2·d_k, d_k + d_in,k + d_v], update and reset gates in one product
    b_zr: np.ndarray         # tier k: [2·d_k]
    W_h: np.ndarray          # tier k: [d_k, d_k + d_in,k + d_v]
    b_h: np.ndarray          # tier k: [d_k]
    W_w: np.ndarray          # [d_m, d_0 + d_{K-1}]
    b_w: np.ndarray
    W_o: np.ndarray          # [V, Σd_k]: the output head, for ``head`` (run_steps does not read it)
    b_o: np.ndarray


class StepConfig(NamedTuple):
    """The config's numbers ``run_steps`` reads, typed as ``FastDecoder._advance`` passes them."""

    local_window: int
    query_dim: int
    num_heads: int
    head_dim: int
    read_topk: int
    read_slot_capacity: int       # 0: none
    key_rule: int                 # thl_np.fast.router's score rule (registry.KEY_RULES)
    load_penalty: float
    read_ema_decay: float
    write_slots: int
    write_clip_max: float
    novelty_beta: float
    novelty_theta: float
    stale_weight: float
    underuse_weight: float
    memory_decay: float
    write_rate: float
    write_ema_decay: float
    offsets: np.ndarray           # int64 [K + 1]: tier k is S[:, offsets[k]:offsets[k+1]]
    timescales: np.ndarray        # int64 [K]


@njit(cache=True)
def tier_weights(w, o, d_e, d_v, k):
    """(W_zr, b_zr, W_h, b_h) of tier k, the matrices packed: views of StepWeights' raveled tiers. o: the tier
    offsets; tier k's input is [s_k; lower; ctx] with lower e (d_e) for tier 0, else tier k−1."""
    L = w.W_q.shape[2]
    a_zr = a_h = b = 0
    for i in range(k):  # the tiers below k
        d = o[i + 1] - o[i]
        width = d + (d_e if i == 0 else o[i] - o[i - 1]) + d_v
        a_zr += (-(-2 * d // L)) * width * L
        a_h += (-(-d // L)) * width * L
        b += d
    d = o[k + 1] - o[k]
    width = d + (d_e if k == 0 else o[k] - o[k - 1]) + d_v
    n_zr, n_h = -(-2 * d // L), -(-d // L)
    return (w.W_zr[a_zr:a_zr + n_zr * width * L].reshape((n_zr, width, L)), w.b_zr[2 * b:2 * (b + d)],
            w.W_h[a_h:a_h + n_h * width * L].reshape((n_h, width, L)), w.b_h[b:b + d])


def _kernel_digest() -> int:
    """A digest of the kernels' sources (thl_np/fast/*.py), part of run_steps's cache key."""
    h = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parent.parent / "fast").glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return int(h.hexdigest()[:15], 16)


def _build(kernel_digest: int):
    # nogil: a server's HTTP thread writes the last step's tokens while the next step runs
    @njit(cache=True, nogil=True)
    def run_steps(ids, w, c, S, memory, norm2, read_ema, write_ema, last_read, last_write, ring_e, ring_k, ring_v,
                  loc, mix, idx, alpha, targets, g, novel, t, scale, ring_start, ring_n, renorm_below, hidden):
        """Spec §4 steps 1-7 and 9 for ids [B, T], in place on a FastDecoder's state (the wiring of
        FastDecoder._advance). ``hidden`` [B, T, Σd_k] receives every step's tier states, or is [B, 0, ·].
        Returns (scale, t, ring_start, ring_n) after the T steps."""
        if kernel_digest < 0:   # never: the digest is here so that Numba's cache key includes it
            raise AssertionError
        B, T = ids.shape
        dt = S.dtype
        K = c.timescales.shape[0]
        o = c.offsets
        d_e = w.emb.shape[1]
        d0, dK = o[1], o[K] - o[K - 1]
        H, d_h, d_m = c.num_heads, c.head_dim, memory.shape[2]
        J = memory.shape[1]
        d_v = loc.shape[1]
        dvh = d_v // H
        W, d_q = c.local_window, c.query_dim
        inv_sqrt_q = 1.0 / math.sqrt(d_q) if d_q > 0 else 0.0
        inv_sqrt_h = 1.0 / math.sqrt(d_h)
        keep_hidden = hidden.shape[1] == T
        # scratch, allocated once per call
        e = np.empty((B, d_e), dt)
        qkv = np.empty((B, 2 * d_q + d_v if W > 0 else 0), dt)
        q_loc = np.empty((B, max(d_q, 1)), dt)
        u = np.empty((B, d_e + d0 + dK), dt)
        q = np.empty((B, H * d_h), dt)
        q_heads = np.empty((H, B, d_h), dt)
        q_mem = np.empty((B, H, d_m), dt)
        head_out = np.empty((B, max(d_m, dvh)), dt)
        mix_h = np.empty((B, d_m), dt)
        r = np.empty((B, d_v), dt)
        width = 0
        d_max = 0
        for k in range(K):
            d_max = max(d_max, o[k + 1] - o[k])
            width = max(width, tier_weights(w, o, d_e, d_v, k)[2].shape[1])
        L = w.W_q.shape[2]
        tiles = max(w.W_qkv.shape[0], w.W_q.shape[0], w.W_k_heads_T.shape[1], w.W_v_heads.shape[1],
                    w.W_w.shape[0], -(-2 * d_max // L))
        acc = np.empty((B, tiles * L), dt)   # packed_rows_linear's scratch
        p = np.empty((B, width), dt)
        zr = np.empty((B, 2 * d_max), dt)
        pre = np.empty((B, d_max), dt)
        x_w = np.empty((B, d0 + dK), dt)
        w_raw = np.empty((B, d_m), dt)
        dots = np.empty((H, J), dt)          # route_one's scratch, as router.route allocates it
        scores = np.empty(J, np.float64)
        A = np.empty(J, np.float64)
        served = np.empty(J, np.int64)
        key_scale = np.empty(J, np.float64)
        empty_w = np.empty(J, np.float64)
        w_clip = np.empty(d_m, dt)           # write_one's scratch, as writer.write allocates it
        aff = np.empty(J, np.float64)
        prio = np.empty(J, np.float64)
        w_dots = np.empty(J, dt)
        one = np.empty(1, dt)
        eager = c.memory_decay < writer.MIN_DECAY
        for i in range(T):
            # 1. embedding
            for b in range(B):
                e[b] = w.emb[ids[b, i]]
            # 2. local attention over the ring, then the ring takes e (its key and value with it)
            if W > 0:
                linalg.packed_rows_linear(w.W_qkv, w.zeros, e, acc, qkv)
                if ring_n > 0:
                    for b in range(B):
                        q_loc[b, :d_q] = qkv[b, :d_q]
                    local_attention.local_attend(q_loc, ring_k, ring_v, ring_start, ring_n, inv_sqrt_q, loc)
                else:
                    loc[:] = 0.0
                if ring_n < W:
                    pos = (ring_start + ring_n) % W
                    ring_n += 1
                else:
                    pos = ring_start
                    ring_start = (ring_start + 1) % W
                for b in range(B):
                    ring_e[b, pos] = e[b]
                    ring_k[b, pos] = qkv[b, d_q:2 * d_q]
                    ring_v[b, pos] = qkv[b, 2 * d_q:]
            # 3-4. router read (u = [e; s^0; s^{K-1}]) and read metadata
            for b in range(B):
                u[b, :d_e] = e[b]
                u[b, d_e:d_e + d0] = S[b, :d0]
                u[b, d_e + d0:] = S[b, o[K - 1]:o[K]]
            linalg.packed_rows_linear(w.W_q, w.zeros, u, acc, q)
            for h in range(H):   # q_mem_h = W_k,h^T q_h
                for b in range(B):
                    q_heads[h, b] = q[b, h * d_h:(h + 1) * d_h]
                linalg.packed_rows_linear(w.W_k_heads_T[h], w.zeros, q_heads[h], acc, head_out[:, :d_m])
                for b in range(B):
                    q_mem[b, h] = head_out[b, :d_m]
            for b in range(B):
                router.route_one(q_mem[b], scale, read_ema[b], last_read[b], memory[b], t, c.load_penalty,
                                 inv_sqrt_h, c.read_topk, c.read_slot_capacity, c.read_ema_decay, c.key_rule,
                                 mix[b], idx[b], alpha[b], dots, scores, A, served, key_scale, empty_w)
            for h in range(H):   # r_h = W_v,h mix_h
                for b in range(B):
                    mix_h[b] = mix[b, h]
                linalg.packed_rows_linear(w.W_v_heads[h], w.zeros, mix_h, acc, head_out[:, :dvh])
                for b in range(B):
                    r[b, h * dvh:(h + 1) * dvh] = head_out[b, :dvh]
            # 5. tiers under their clocks: p = [s_k; lower; ctx], ctx = r (+ loc for tier 0)
            for k in range(K):
                a0, a1 = o[k], o[k + 1]
                if t % c.timescales[k] == 0:
                    d = a1 - a0
                    lo0, lo1 = (0, d_e) if k == 0 else (o[k - 1], o[k])
                    n_lo = lo1 - lo0
                    for b in range(B):
                        p[b, :d] = S[b, a0:a1]
                        if k == 0:
                            p[b, d:d + n_lo] = e[b]
                            for j in range(d_v):
                                p[b, d + n_lo + j] = r[b, j] + loc[b, j]
                        else:
                            p[b, d:d + n_lo] = S[b, lo0:lo1]
                            p[b, d + n_lo:d + n_lo + d_v] = r[b]
                    W_zr, b_zr, W_h, b_h = tier_weights(w, o, d_e, d_v, k)
                    linalg.packed_rows_linear(W_zr, b_zr, p, acc, zr[:, :2 * d])
                    gru.gru_reset(zr, p, d)
                    linalg.packed_rows_linear(W_h, b_h, p, acc, pre[:, :d])
                    gru.gru_update(S, a0, zr, pre[:, :d])
            # 6-7. writer, memory decay (lazy: the scale) and write
            for b in range(B):
                x_w[b, :d0] = S[b, :d0]
                x_w[b, d0:] = S[b, o[K - 1]:o[K]]
            linalg.packed_rows_linear(w.W_w, w.b_w, x_w, acc, w_raw)
            new_scale = scale if eager else scale * c.memory_decay
            for b in range(B):
                g[b], novel[b] = writer.write_one(
                    w_raw[b], memory[b], norm2[b], scale, read_ema[b], write_ema[b], last_write[b], t,
                    c.write_slots, c.write_clip_max, c.novelty_beta, c.novelty_theta, c.stale_weight,
                    c.underuse_weight, new_scale, c.write_rate, c.write_ema_decay, targets[b], w_clip, aff, prio,
                    w_dots, eager, c.memory_decay)
            scale = new_scale
            if scale < renorm_below:   # FastDecoder._renormalise: the rows times the scale in their dtype
                one[0] = scale
                for b in range(B):
                    for j in range(J):
                        for m in range(d_m):
                            memory[b, j, m] *= one[0]
                primitives.row_norms2(memory, norm2)
                scale = 1.0
            t += 1
            if keep_hidden:
                for b in range(B):
                    hidden[b, i] = S[b]
        return scale, t, ring_start, ring_n

    return run_steps


run_steps = _build(_kernel_digest())


# ------------------------------------------------------------------------------------------------ use
def step_parameters(config) -> int:
    """Parameters in a step's products: everything but the embedding table and the output head."""
    c = config
    n = (2 * c.query_dim + c.value_dim) * c.embedding_dim if c.local_window else 0
    n += c.num_heads * c.head_dim * (c.router_input_dim + c.memory_dim) + c.value_dim * c.memory_dim
    n += c.memory_dim * c.writer_input_dim
    for k, d in enumerate(c.tier_dims):
        n += 3 * d * (d + c.tier_input_dim(k) + c.value_dim)
    return n


def prepare(decoder) -> tuple | None:
    """(StepWeights, StepConfig) for a FastDecoder where ``run_steps`` applies (float32/float64 weights, no
    int8 matrix, at most MAX_STEP_PARAMETERS in the step's products), else None. Built per session, as
    FastDecoder builds its own concatenations, so a new session sees the parameters as they are now; a
    parameter array is used as it is where it already is a writable C array of the dtype (else copied: a
    small model's step weights are a few MB)."""
    c, dt = decoder.config, decoder.dtype
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)) or step_parameters(c) > MAX_STEP_PARAMETERS:
        return None
    mats = [decoder.emb, decoder.W_qkv, decoder.W_q, decoder.W_k_heads_T, decoder.W_v_heads, decoder.W_w,
            *decoder.W_zr, *decoder.W_h, decoder.W_o]
    if not all(isinstance(m, np.ndarray) for m in mats):
        return None   # a quantized model's Q8Matrix: FastDecoder._advance

    def a(x):   # a writable C ndarray: run_steps's argument types do not depend on how params were loaded
        return np.require(x, dt, ["C", "W", "E"])

    def ravel(per_tier):
        return np.concatenate([np.asarray(x, dtype=dt).ravel() for x in per_tier])

    def pack(W):
        return linalg.packed(np.asarray(W, dt))

    weights = StepWeights(
        emb=a(decoder.emb), W_qkv=pack(decoder.W_qkv), W_q=pack(decoder.W_q),
        zeros=np.zeros(max(decoder.W_qkv.shape[0], decoder.W_q.shape[0], c.memory_dim, c.value_dim), dt),
        W_k_heads_T=np.stack([pack(W) for W in decoder.W_k_heads_T]),
        W_v_heads=np.stack([pack(W) for W in decoder.W_v_heads]),
        W_zr=ravel([pack(W) for W in decoder.W_zr]), b_zr=ravel(decoder.b_zr),
        W_h=ravel([pack(W) for W in decoder.W_h]), b_h=ravel(decoder.b_h),
        W_w=pack(decoder.W_w), b_w=a(decoder.b_w), W_o=pack(decoder.W_o), b_o=a(decoder.b_o))
    cfg = StepConfig(
        local_window=int(c.local_window), query_dim=int(c.query_dim), num_heads=int(c.num_heads),
        head_dim=int(c.head_dim), read_topk=int(c.read_topk), read_slot_capacity=int(c.read_slot_capacity or 0),
        key_rule=key_rule(c), load_penalty=float(c.load_penalty),
        read_ema_decay=float(c.read_ema_decay), write_slots=int(c.write_slots),
        write_clip_max=float(c.write_clip_max), novelty_beta=float(c.novelty_beta),
        novelty_theta=float(c.novelty_theta), stale_weight=float(c.stale_weight),
        underuse_weight=float(c.underuse_weight), memory_decay=float(c.memory_decay),
        write_rate=float(c.write_rate), write_ema_decay=float(c.write_ema_decay),
        offsets=np.asarray(decoder.offsets, np.int64), timescales=np.asarray(c.tier_timescales, np.int64))
    return weights, cfg


def _arguments(decoder, ids: np.ndarray, hidden: np.ndarray) -> tuple:
    weights, cfg = decoder._compiled
    d = decoder
    return (ids, weights, cfg, d.S, d.memory, d.norm2, d.read_ema, d.write_ema, d.last_read, d.last_write,
            d.ring_e, d.ring_k, d.ring_v, d._loc, d._mix, d._idx, d._alpha, d._targets, d._g, d._novel,
            int(d.t), float(d.scale), int(d.ring_start), int(d.ring_n), float(d.renorm_below), hidden)


def advance(decoder, ids: np.ndarray, hidden: np.ndarray | None = None) -> np.ndarray:
    """Run checked ids [B, T] through ``decoder`` (a FastDecoder that ``prepare`` accepted), CHUNK steps a
    call; ``hidden`` [B, T, Σd_k] receives every step's tier states. Returns the tier states after the last
    step (the session's own array)."""
    B, T = ids.shape
    D = decoder.S.shape[1]
    none = np.empty((B, 0, D), decoder.dtype)
    for a in range(0, T, CHUNK):
        b = min(T, a + CHUNK)
        chunk = np.require(ids[:, a:b], np.int64, ["C", "W"])   # a read-only array: another signature
        out = none if hidden is None else (hidden[:, a:b] if B == 1 else np.empty((B, b - a, D), decoder.dtype))
        scale, t, start, n = run_steps(*_arguments(decoder, chunk, out))
        decoder.scale, decoder.t, decoder.ring_start, decoder.ring_n = scale, t, start, n
        if hidden is not None and B > 1:
            hidden[:, a:b] = out
    return decoder.S


def head(decoder, h: np.ndarray) -> np.ndarray:
    """The output head for rows h [n, Σd_k] (C-contiguous, after the LayerNorm): packed_rows_linear on one
    thread, so each row gets its bits whatever the rows beside it, for any n: a prompt's logits="all" in a batch
    of B equal each sequence's alone (BLAS GEMM's bits for a row change with the number of rows: 6 × 11
    float32 positions differed by an ulp from 11). For a small model the head is a few µs a row; linalg.gemv
    splits it over Numba's threads, which on a busy machine made each call take milliseconds (measured:
    3.4 ms a token, 1.7 s of a 500-byte `thl-np generate`, with one other CPU-bound process)."""
    weights = decoder._compiled[0]
    out = np.empty((h.shape[0], weights.b_o.shape[0]), h.dtype)
    linalg.packed_rows_linear(weights.W_o, weights.b_o, h, np.empty((h.shape[0], weights.W_o.shape[0] *
                                                                      weights.W_o.shape[2]), h.dtype), out)
    return out


def step_logits(decoder, ids: np.ndarray) -> np.ndarray:
    """One step of a FastDecoder for ids [B, 1] that are already checked (ids the session itself sampled),
    then the logits [B, V]: ``decoder.step`` without its input checks (a generation loop's step)."""
    if decoder._compiled is None:
        return decoder.step(ids[:, 0])
    return decoder.logits(advance(decoder, ids))


def applies(model) -> bool:
    """Whether a FastDecoder of ``model`` steps with ``run_steps`` (see ``prepare``), from the model alone."""
    from ..quant.quantize import is_quantized

    return (model.dtype in (np.dtype(np.float32), np.dtype(np.float64)) and not is_quantized(model)
            and step_parameters(model.config) <= MAX_STEP_PARAMETERS)


def _signature(model) -> tuple:
    """run_steps's argument types for a session of ``model`` (``_arguments``), from the model alone: every
    array a writable C array of the model's dtype (``prepare``, ``FastDecoder.load``), ids int64."""
    from numba import typeof

    dt = model.dtype
    f1, f2, f3 = np.zeros(1, dt), np.zeros((1, 1), dt), np.zeros((1, 1, 1), dt)
    i1, i2, i3 = np.zeros(1, np.int64), np.zeros((1, 1), np.int64), np.zeros((1, 1, 1), np.int64)
    f4 = np.zeros((1, 1, 1, 1), dt)
    weights = StepWeights(emb=f2, W_qkv=f3, zeros=f1, W_q=f3, W_k_heads_T=f4, W_v_heads=f4, W_zr=f1, b_zr=f1,
                          W_h=f1, b_h=f1, W_w=f3, b_w=f1, W_o=f3, b_o=f1)
    cfg = StepConfig(0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, i1, i1)
    return tuple(typeof(x) for x in (i2, weights, cfg, f2, f3, f2, f2, f2, i2, i2, f3, f3, f3, f2, f3, i3, f3, i2,
                                     f1, np.zeros(1, np.bool_), 0, 0.0, 0, 0, 0.0, f3))


def _compiled_or_cached(dispatcher, sig) -> bool:
    if any(tuple(s) == sig for s in dispatcher.signatures):
        return True
    # Numba's cache index (numba.core.caching: the key that Cache.load_overload looks up)
    cache = dispatcher._cache
    key = cache._index_key(sig, dispatcher.targetctx.codegen())
    return key in cache._cache_file._load_index()


def is_warm(model) -> bool:
    """Whether a FastDecoder of ``model`` would find ``run_steps`` and ``head``'s kernel compiled, in this
    process or in Numba's cache (a look at the cache's index: nothing is loaded or compiled); False when
    its first step would compile first (about 10 s), and for a model that ``run_steps`` does not apply to."""
    if not applies(model):
        return False
    from numba import typeof

    try:
        f1, f2, f3 = np.zeros(1, model.dtype), np.zeros((1, 1), model.dtype), np.zeros((1, 1, 1), model.dtype)
        return all(_compiled_or_cached(fn, sig) for fn, sig in (
            (run_steps, _signature(model)),
            (linalg.packed_rows_linear, tuple(typeof(x) for x in (f3, f1, f2, f2, f2)))))
    except Exception:  # another Numba's internals, or NUMBA_DISABLE_JIT: say cold, so the caller only
        # avoids a compile it fears
        return False
