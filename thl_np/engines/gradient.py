"""The fast training path: ``loss_and_grads`` is ``thl_np.step.loss_and_grads`` (same arguments, same return
values, the same loss ``thl_np.step.sequence_loss``, the same numbers up to rounding) computed with much less
work; ``thl_np.model.value_and_grad(..., path="fast")`` checks its inputs and calls ``loss_and_grads``.

Every discrete choice is the forward's (spec §5), so the savings are exact rearrangements of the same math:

- **The bank is stored divided by a running scalar** (as in ``thl_np.engines.decoder``): the decay ``M ← γM``
  is one multiplication of ``scale``, a write touches its target rows, and the squared norms of the stored
  rows are kept up to date. Scores are ``m_j · q_mem_h`` with ``q_mem_h = W_k,h^T q_h`` (the plain router's
  ``slot_scores``), so no key is ever projected and identical rows tie exactly; values are projected once
  per head from the α-mix of the rows read. The backward's key path reuses the recorded ``q_mem``.
- **The memory gradient is sparse plus a decay.** Going back one step, dM ← γ·dM + (terms at the κ·H rows
  read, the write targets' use of dM, the novelty arg-max row). The running dM is stored as D = dM / c
  with a scalar c (c ← γ·c), so a step touches O(rows read or written), not O(J·d_m). Both scalars are
  folded back into the arrays when they fall below ``RENORM_BELOW`` (so nothing under- or overflows).
- **Token-only work is batched over the sequence**: embedding rows, the local attention's q/k/v of every
  token (keys and values once per token, not once per window position), the embedding part of Tier 0's
  gate pre-activations and of the router query are one product each over all B·T positions; the output
  head, LayerNorm and cross-entropy run once over all positions (as in the plain path).
- **Weight gradients are accumulated as tape rows**, not per step: each step records the gradient of a
  product's output (d pre-activations, d q, d w_raw, d r, the local keys/values …) and one product per
  weight at the end turns them into dW (and into the embedding gradient).
- **Few calls per step**: one Numba kernel per component and direction (``thl_np.fast``), with the
  small dense products inside them on BLAS.

Supported: every config the plain path supports (K = 1..n tiers with any clocks, local_window 0,
read_slot_capacity, write_slots > 1, the load-balance term, Gumbel noise or none, float32 / float64), and
the read-target term (``thl_np.components.read_target``: a copy of the bank at each asked step, its dense
gradient joined to the running one there).
For ``memory_decay < 1e-6`` (γ = 0 included) the lazy decay would divide by γ, so the decay is applied
eagerly instead (O(J·d_m) per step, same numbers); no config falls back to the plain path.

Training memory of one call, in bytes, with f the float size (4 or 8), B sequences of T steps, H heads of
d_h, Q = H·d_h, κ reads per head, W_w write slots, K tiers of widths d_k active on n_k = ⌈T/τ_k⌉ steps
(from t = 0), D = Σd_k, d_x = d_0 + d_{K-1}, p_0 = d_0 + d_v, p_k = d_k + d_{k-1} + d_v, W = local_window,
L = [W > 0], n_0 the local buffer's filled rows, V the vocabulary, [G] = Gumbel noise given, [λ] = load
balance on. ``training_memory_bytes(config, B, T)`` evaluates it (``breakdown=True`` for the parts):

    tape  (forward record; Tape.nbytes, exact)
      = f·B·T·( D + d_e + 2Q + 3d_0 + d_v + d_x + 3d_m                       states, e, q (e-part, full),
                                                                          Tier-0 e-part, r, x_w, writer rows
              + 3Hκ + Hκ·d_m + 2H·d_m + 6                                  α's, mask, rows read, mix,
                                                                          q_mem, writer scalars
              + L·(d_e + 2d_lq + d_v + W + d_v) + [G]·H·J + [λ]·J )        window e/q/k/v, weights, ℓ; noise
      + f·B·(D + L·n_0·(d_e + d_lq + d_v))     + 8·B·T·(Hκ + W_w + 1) + B·T·(H + 2)     (int64 / bool)
      + Σ_k f·B·n_k·(p_k + 3d_k)                                           GRU inputs, z, r_g, s̃
    backward rows (exact)
      = f·B·T·( Q + H·d_m + d_m + d_v + L·(2d_lq + d_v) + [λ]·J )  + Σ_k f·B·n_k·3d_k
      + f·B·(J·d_m + J + D + d_v + L·n_0·(d_lq + d_v))                     running dM/c, d read_ema, d s, d ℓ
    output head (transient, largest at the cross-entropy)  ≈ f·B·T·(4V + 4D)
    final products (transient)                            ≈ f·B·(T·(3d_e + d_x) + Σ_k n_k·p_k)
    fixed: the running bank, norms and emas f·B·J·(d_m + 3) + 16·B·J, the prepared weights
           (≈ 2× the tier weights + the router's and writer's), the gradients (1× the parameters);
           the parameters themselves are counted too.

At J = 1024, d = 768 (THLConfig() otherwise, V = 50257), T = 512, B = 1, float32: tape 78 MiB (160 kB per
step), backward rows 19 MiB, output head 411 MiB, final products 11 MiB, parameters 665 MiB, gradients +
prepared weights + bank 799 MiB: 1.9 GiB in all, within the issue's 4 GB (the plain path's StepRecords
hold 0.38 MiB per step there, 0.19 GiB for 512 steps, on top of the same parameters, gradients and head).
At the issue's benchmark config (dim 128, J = 64, V = 259, B = 8, T = 128): tape 27 MiB (28 kB per step and
sequence), 58 MiB in all.
``benchmarks/bench_train.py --big`` measures a real call at the large config: peak RSS 2.36 GiB, of which
1.64 GiB is already reached while building the model (parameters initialised in float64, then cast).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._blas import blas_threads
from ..components.read_target import read_target_term
from ..components.registry import key_rule, router_score_rule
from ..components.router import gumbel_noise, router_input
from ..fast import embedding, gru, local_attention, primitives, router, writer
from ..state import InferenceState
from ..step import cut_memory_gradient, sequence_loss

RENORM_BELOW = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-6}
MIN_DECAY = writer.MIN_DECAY
BLAS_THREADS = 1
"""OpenBLAS threads while ``loss_and_grads`` runs (None: leave BLAS alone). Its per-step products are
far too small to gain from threads, and on a busy machine OpenBLAS's threaded path costs up to 10× (its
workers spin for a core that another process holds); the few large products at the end lose < 2× at most."""


# ---------------------------------------------------------------------------------------------------
# Weights rearranged for the fast path (columns split by what they multiply, transposed for BLAS)
# ---------------------------------------------------------------------------------------------------
class _Weights:
    def __init__(self, config, P):
        c = self.c = config
        K, d_e, d_v, H = c.num_tiers, c.embedding_dim, c.value_dim, c.num_heads
        dims = list(c.tier_dims)
        # C-contiguous and writeable (memory-mapped weights are read-only: a distinct Numba type, so the
        # kernels would compile twice)
        C = lambda x: np.require(x, requirements=["C", "W"])   # noqa: E731
        self.emb = P["embedding.weight"]
        self.Wql, self.Wkl, self.Wvl = P["local_attn.q.weight"], P["local_attn.k.weight"], P["local_attn.v.weight"]
        Wq = P["router.W_q.weight"]
        self.Wq_e = C(Wq[:, :d_e])                  # [Q, d_e]
        self.Wq_s = C(Wq[:, d_e:])                  # [Q, d0 + dK]
        self.WqsT = C(self.Wq_s.T)                  # [d0 + dK, Q]
        self.Ww = C(P["writer.W_w.weight"])         # [d_m, d0 + dK]
        self.WwT = C(self.Ww.T)                     # [d0 + dK, d_m]
        self.b_w = C(P["writer.W_w.bias"])
        Wk = P["router.W_k.weight"]                  # [Q, d_m]
        self.Wk_heads = C(Wk.reshape(H, -1, c.memory_dim))               # [H, d_h, d_m]
        self.WkT_heads = C(self.Wk_heads.transpose(0, 2, 1))             # [H, d_m, d_h]
        Wv = P["router.W_v.weight"]
        self.Wv_heads = C(Wv.reshape(H, -1, c.memory_dim))              # [H, d_v/H, d_m]
        self.WvT_heads = C(self.Wv_heads.transpose(0, 2, 1))            # [H, d_m, d_v/H]
        self.W1T, self.W2T, self.Wh_p, self.Wzr_p, self.bias = [], [], [], [], []
        for k in range(K):
            d, n_in = dims[k], c.tier_input_dim(k)
            pre = f"tiers.cells.{k}."
            Wz, Wr, Wh = P[pre + "W_z.weight"], P[pre + "W_r.weight"], P[pre + "W_h.weight"]
            bias = np.concatenate([P[pre + "W_z.bias"], P[pre + "W_r.bias"], P[pre + "W_h.bias"]])
            if k == 0:   # the embedding columns are applied once for the whole sequence (W0_e)
                cols = np.r_[0:d, d + n_in:d + n_in + d_v]
                self.W0_e = C(np.concatenate([Wz[:, d:d + n_in], Wr[:, d:d + n_in], Wh[:, d:d + n_in]]))
            else:
                cols = np.arange(d + n_in + d_v)
            Wh_p = Wh[:, cols]
            W1 = np.concatenate([Wz[:, cols], Wr[:, cols], Wh_p], axis=0)
            W1[2 * d:, :d] = 0.0   # the candidate's s_prev-part acts on r_g ⊙ s_prev: W2T
            self.W1T.append(C(W1.T))
            self.W2T.append(C(Wh[:, :d].T))
            self.Wh_p.append(C(Wh_p))
            self.Wzr_p.append(C(np.concatenate([Wz[:, cols], Wr[:, cols]], axis=0)))
            self.bias.append(bias)


@dataclass
class Tape:
    """What the fast forward leaves for the backward (time-major arrays, ``X[i]`` is step i)."""

    arrays: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values() if isinstance(a, np.ndarray)))

    @property
    def read_weights(self):
        """The read weights per slot A [T, B, J] (recorded when the loss has the load-balance term), or None."""
        return self.arrays["AW"] if self.steps["record_A"] else None


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
def fast_forward(params, config, ids, state0: InferenceState, U=None, weights=None, keep_steps=()):
    """T steps of spec §4 from ``state0`` (not modified) over ids [B, T] with the record the backward needs.
    ``U``: the Gumbel uniforms [T, B, H, J] or None; ``weights``: a ``_Weights`` of ``params`` to reuse;
    ``keep_steps``: steps whose memory and read_ema (as the step reads them) the tape keeps, in
    ``tape.steps["kept"]`` ({i: (memory, read_ema)}: the read-target term's input).
    Returns (tier states [T, B, Σd_k] (time-major), final state, tape)."""
    c = config
    dt = np.dtype(params["embedding.weight"].dtype)
    Wt = weights or _Weights(c, params)
    B, T = ids.shape
    K, H, J, kappa = c.num_tiers, c.num_heads, c.memory_slots, c.read_topk
    d_e, d_m, d_v, Dh, d_lq = c.embedding_dim, c.memory_dim, c.value_dim, c.head_dim, c.query_dim
    Q = H * Dh
    dims = list(c.tier_dims)
    offs = np.cumsum([0] + dims).tolist()
    Dtot = offs[-1]
    d0, dK = dims[0], dims[-1]
    off0, offK = 0, offs[K - 1]
    Wl = c.local_window
    t0 = int(state0.timestep)
    n0 = int(state0.local_valid) if Wl > 0 else 0
    a = {}
    # token-only work for the whole sequence
    ids_T = np.ascontiguousarray(ids.T)
    E = Wt.emb[ids_T]                                           # [T, B, d_e]
    E2 = E.reshape(T * B, d_e)
    a["E"] = E
    a["QE"] = (E2 @ Wt.Wq_e.T).reshape(T, B, Q)
    a["PE0"] = (E2 @ Wt.W0_e.T + Wt.bias[0]).reshape(T, B, 3 * d0)
    if Wl > 0:
        hist = np.concatenate([state0.local_buffer[:, :n0], E.transpose(1, 0, 2)], axis=1)   # [B, n0+T, d_e]
        h2 = hist.reshape(-1, d_e)
        a["hist"] = hist
        a["QL"] = (E2 @ Wt.Wql.T).reshape(T, B, d_lq)
        a["KL"] = (h2 @ Wt.Wkl.T).reshape(B, n0 + T, d_lq)
        a["VL"] = (h2 @ Wt.Wvl.T).reshape(B, n0 + T, d_v)
        a["LA"] = np.zeros((T, B, Wl), dt)
        a["LOC"] = np.zeros((T, B, d_v), dt)
        n_steps = np.minimum(n0 + np.arange(T), Wl)
    else:
        a["LOC"] = np.zeros((1, 1, 1), dt)
        n_steps = np.zeros(T, np.int64)
    use_gumbel = U is not None
    G = gumbel_noise(U, dt) if use_gumbel else np.zeros((1, 1, 1, 1), dt)
    a["G"] = G
    # the running state: the bank stored divided by `scale`, its squared norms (of the stored rows)
    S = np.empty((T + 1, B, Dtot), dt)
    S[0] = np.concatenate([np.asarray(s, dt) for s in state0.tiers], axis=1)
    a["S"] = S
    mem = np.array(state0.memory, dtype=dt)
    norm2 = np.empty((B, J), dt)
    primitives.row_norms2(mem, norm2)
    read_ema = np.array(state0.read_ema, dtype=dt)
    write_ema = np.array(state0.write_ema, dtype=dt)
    last_read = np.array(state0.last_read, dtype=np.int64)
    last_write = np.array(state0.last_write, dtype=np.int64)
    scale = 1.0
    # the record
    z = lambda *shape, dtype=dt: np.zeros(shape, dtype)   # noqa: E731
    a.update(
        QV=z(T, B, H, Dh), QK=z(T, B, H, d_m), IDX=z(T, B, H, kappa, dtype=np.int64), ASOFT=z(T, B, H, kappa),
        ALPHA=z(T, B, H, kappa), CAPM=z(T, B, H, kappa), CAPU=z(T, B, H, dtype=np.bool_),
        MSEL=z(T, B, H, kappa, d_m), MIX=z(T, H, B, d_m), R=z(T, B, d_v),
        XW=z(T, B, d0 + dK), TGT=z(T, B, c.write_slots, dtype=np.int64), GG=z(T, B), WRAW=z(T, B, d_m),
        WCL=z(T, B, d_m), NRAW=z(T, B), CLIP=z(T, B, dtype=np.bool_), SC=z(T, B), NW=z(T, B),
        JSTAR=z(T, B, dtype=np.int64), MSTAR=z(T, B, d_m), NMSTAR=z(T, B), DOTSTAR=z(T, B),
        NOVEL=z(T, B, dtype=np.bool_))
    record_A = bool(c.router_load_balance_lambda)
    a["AW"] = z(T, B, J) if record_A else z(1, 1, 1)
    # tiers: step i → slot of each active tier
    active = [[k for k in range(K) if (t0 + i) % c.tier_timescales[k] == 0] for i in range(T)]
    n_act = [sum(k in act for act in active) for k in range(K)]
    slots = [[-1] * T for _ in range(K)]
    for k in range(K):
        n = 0
        for i in range(T):
            if k in active[i]:
                slots[k][i] = n
                n += 1
    tiers = []
    for k in range(K):
        d = dims[k]
        pw = Wt.W1T[k].shape[0]
        tiers.append(dict(P=z(n_act[k], B, pw), Z=z(n_act[k], B, d), RG=z(n_act[k], B, d),
                          ST=z(n_act[k], B, d),
                          extra=a["PE0"] if k == 0 else np.ascontiguousarray(Wt.bias[k][None, None, :]),
                          off_lo=offs[k - 1] if k else 0, d_lo=dims[k - 1] if k else 0))
        for name in ("P", "Z", "RG", "ST"):
            a[f"{name}{k}"] = tiers[k][name]
    thr = RENORM_BELOW[np.dtype(dt)]
    inv_lq = 1.0 / math.sqrt(d_lq)
    inv_h = 1.0 / math.sqrt(Dh)
    cap = int(c.read_slot_capacity or 0)
    eager = float(c.memory_decay) < MIN_DECAY
    route_args = (float(c.load_penalty), inv_h, kappa, cap, float(c.read_ema_decay), key_rule(c),
                  Wt.Wk_heads, Wt.WvT_heads,
                  record_A, a["QV"], a["QK"], a["IDX"], a["ASOFT"], a["ALPHA"], a["CAPM"], a["CAPU"], a["MSEL"],
                  a["MIX"], a["AW"], a["R"])
    write_args = (c.write_slots, float(c.write_clip_max), float(c.novelty_beta), float(c.novelty_theta),
                  float(c.stale_weight), float(c.underuse_weight), float(c.memory_decay), float(c.write_rate),
                  float(c.write_ema_decay), eager, a["TGT"], a["GG"], a["WRAW"], a["WCL"], a["NRAW"], a["CLIP"],
                  a["SC"], a["NW"], a["JSTAR"], a["MSTAR"], a["NMSTAR"], a["DOTSTAR"], a["NOVEL"])
    keep_steps, kept = set(keep_steps), {}
    for i in range(T):
        t = t0 + i
        S[i + 1] = S[i]
        if i in keep_steps:
            kept[i] = (mem * dt.type(scale), read_ema.copy())
        # 2. local attention over the window's precomputed keys/values
        n = int(n_steps[i])
        if n > 0:
            local_attention.local_forward(i, n0 + i - n, n, a["QL"], a["KL"], a["VL"], inv_lq, a["LA"], a["LOC"])
        # 3-4. router read (scores m_j·q_mem_h over the scaled bank), read metadata
        router.route_forward(i, t, a["QE"], S, off0, d0, offK, dK, Wt.WqsT, scale, read_ema, last_read, mem, G,
                             use_gumbel, *route_args)
        # 5. tiers under their clocks; the context is r, and for Tier 0 r + the local attention's output
        r = a["R"][i]
        ctx0 = r + a["LOC"][i] if n > 0 else r
        for k in active[i]:
            tk = tiers[k]
            gru.gru_forward(i, slots[k][i], S, offs[k], dims[k], tk["off_lo"], tk["d_lo"], ctx0 if k == 0 else r,
                            tk["extra"], i if k == 0 else 0, Wt.W1T[k], Wt.W2T[k], tk["P"], tk["Z"], tk["RG"],
                            tk["ST"])
        # 6-7. writer, lazy decay and write
        scale = writer.write_forward(i, t, S, off0, d0, offK, dK, Wt.WwT, Wt.b_w, a["XW"], mem, norm2, scale,
                                     read_ema, write_ema, last_write, *write_args)
        if scale < thr:
            mem *= dt.type(scale)
            primitives.row_norms2(mem, norm2)
            scale = 1.0
    # final state
    if Wl > 0:
        buf = np.array(state0.local_buffer, dtype=dt)
        nf = min(n0 + T, Wl)
        buf[:, :nf] = hist[:, n0 + T - nf:]
        nv = nf
    else:
        buf, nv = np.array(state0.local_buffer, dtype=dt), 0
    state = InferenceState(
        timestep=t0 + T, tiers=[S[T, :, offs[k]:offs[k + 1]].copy() for k in range(K)],
        memory=mem * dt.type(scale), read_ema=read_ema, write_ema=write_ema, last_read=last_read,
        last_write=last_write, local_buffer=buf, local_valid=nv)
    tape = Tape(arrays=a, steps=dict(active=active, slots=slots, n_steps=n_steps, n0=n0, t0=t0, tiers=tiers,
                                     offs=offs, use_gumbel=use_gumbel, record_A=record_A, kept=kept))
    return S[1:], state, tape


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------
def fast_backward(params, config, tape: Tape, dS_out, d_A, ids, weights=None, read_grads=None, read_through="all",
                  memory_bptt=None):
    """Back-propagate d tier states [T, B, Σd_k] (and the load-balance term's d A [T, B, J] or None) through
    the recorded steps → (parameter gradients, gradient w.r.t. the initial state as spec §3 keys).
    ``read_grads`` ({i: (d memory, d read_ema, d q, d q_mem)}, ``read_target_term``'s): the read-target term's
    gradients w.r.t. what step i read, let through as ``read_through`` says (``ReadTargets.through``).
    ``memory_bptt``: the bank's gradient cut as ``thl_np.step.cut_memory_gradient`` says."""
    c = config
    P = params
    dt = np.dtype(P["embedding.weight"].dtype)
    Wt = weights or _Weights(c, P)
    a, st = tape.arrays, tape.steps
    T, B, Dtot = dS_out.shape
    K, H, J = c.num_tiers, c.num_heads, c.memory_slots
    d_e, d_m, d_v, Dh, d_lq = c.embedding_dim, c.memory_dim, c.value_dim, c.head_dim, c.query_dim
    Q = H * Dh
    dvh = d_v // H
    dims = list(c.tier_dims)
    offs = st["offs"]
    d0, dK = dims[0], dims[-1]
    off0, offK = 0, offs[K - 1]
    Wl = c.local_window
    n0 = st["n0"]
    gamma = float(c.memory_decay)
    thr = RENORM_BELOW[np.dtype(dt)]
    inv_lq = 1.0 / math.sqrt(d_lq)
    inv_h = 1.0 / math.sqrt(Dh)
    cap = int(c.read_slot_capacity or 0)
    eager = gamma < MIN_DECAY
    dS_out = np.ascontiguousarray(dS_out, dtype=dt)
    # running gradients
    D = np.zeros((B, J, d_m), dt)       # dM / cD
    cD = 1.0
    d_ema = np.zeros((B, J), dt)
    DS = np.zeros((B, Dtot), dt)
    DLOC = np.zeros((B, d_v), dt)      # d loc: Tier 0's d ctx
    DCTX = np.zeros((B, d_v), dt)      # d ctx of the tiers above
    # backward rows for the final products
    DQ = np.zeros((T, B, Q), dt)
    MK = np.zeros((T, H, B, d_m), dt)
    DWR = np.zeros((T, B, d_m), dt)
    DR = np.zeros((T, B, d_v), dt)
    DPRE = [np.zeros((len(tk["Z"]), B, 3 * dims[k]), dt) for k, tk in enumerate(st["tiers"])]
    if Wl > 0:
        DQL = np.zeros((T, B, d_lq), dt)
        DKL = np.zeros((B, n0 + T, d_lq), dt)
        DVL = np.zeros((B, n0 + T, d_v), dt)
    use_DA = d_A is not None
    DA = np.ascontiguousarray(d_A, dtype=dt) if use_DA else np.zeros((1, 1, 1), dt)
    active, slots, n_steps = st["active"], st["slots"], st["n_steps"]
    write_args = (a["TGT"], a["GG"], a["WCL"], a["WRAW"], a["NRAW"], a["CLIP"], a["SC"], a["NW"], a["JSTAR"],
                  a["MSTAR"], a["NMSTAR"], a["DOTSTAR"], a["NOVEL"], float(c.write_rate), float(c.novelty_beta),
                  float(c.write_clip_max), Wt.Ww, DWR, off0, d0, offK, dK, eager, gamma)
    route_args = (Wt.Wv_heads, Wt.WkT_heads, a["IDX"], a["ASOFT"], a["ALPHA"], a["CAPM"], a["CAPU"], a["MSEL"],
                  a["QK"])
    for i in range(T - 1, -1, -1):
        if cD < thr:
            D *= dt.type(cD)
            cD = 1.0
        c_new = cD if eager else cD * gamma
        # 8: the step's output gradient joins the tiers'
        DS += dS_out[i]
        # 7 → 6: the write (dM's target rows), the decay, the writer
        writer.write_backward(i, DS, D, cD, c_new, *write_args)
        cD = c_new
        # 5. tiers, top down so each tier's input gradient reaches the tier below first; every tier's context
        # holds r, Tier 0's also the local attention's output
        for k in reversed(active[i]):
            tk = st["tiers"][k]
            d_ctx = DLOC if k == 0 else DCTX
            gru.gru_backward(slots[k][i], DS, offs[k], dims[k], tk["off_lo"], tk["d_lo"], Wt.Wh_p[k], Wt.Wzr_p[k],
                             tk["P"], tk["Z"], tk["RG"], tk["ST"], DPRE[k], d_ctx)
            DR[i] += d_ctx
        # 4-3. read metadata and router: the rows read, read_ema, d q (and d u's state part into DS)
        router.route_backward(i, DR, d_ema, DA, use_DA, float(c.read_ema_decay), float(c.load_penalty), inv_h,
                              cap, key_rule(c), *route_args, D, cD, DQ, MK, Wt.Wq_s, DS, off0, d0, offK, dK)
        if read_grads and i in read_grads:
            _add_read_grads(i, read_grads[i], read_through, D, cD, d_ema, DQ, MK, Wt.Wq_s, DS, off0, d0, offK, dK)
        # 2. local attention: its query, and the keys/values of the window's rows
        n = int(n_steps[i])
        if n > 0:
            local_attention.local_backward(i, n0 + i - n, n, a["QL"], a["KL"], a["VL"], inv_lq, a["LA"], DLOC, DQL,
                                           DKL, DVL)
        if cut_memory_gradient(i, memory_bptt):
            D[...] = 0.0
    # one product per weight over all B·T rows
    TB = T * B
    grads = {name: np.zeros_like(p) for name, p in P.items()}
    E2 = a["E"].reshape(TB, d_e)
    S = a["S"]
    for k in range(K):
        tk = st["tiers"][k]
        d = dims[k]
        Pk = tk["P"].reshape(-1, tk["P"].shape[-1])
        DP = DPRE[k].reshape(-1, 3 * d)
        if k == 0:
            full = np.concatenate([Pk[:, :d], E2, Pk[:, d:]], axis=1)
        else:
            full = Pk.copy()
        dWzr = DP[:, :2 * d].T @ full
        full[:, :d] *= tk["RG"].reshape(-1, d)
        pre = f"tiers.cells.{k}."
        grads[pre + "W_z.weight"] = dWzr[:d]
        grads[pre + "W_r.weight"] = dWzr[d:]
        grads[pre + "W_h.weight"] = DP[:, 2 * d:].T @ full
        db = DP.sum(axis=0)
        grads[pre + "W_z.bias"], grads[pre + "W_r.bias"], grads[pre + "W_h.bias"] = db[:d], db[d:2 * d], db[2 * d:]
    DQ2 = DQ.reshape(TB, Q)
    dE = DPRE[0].reshape(TB, 3 * d0) @ Wt.W0_e + DQ2 @ Wt.Wq_e
    d_buffer0 = np.zeros((B, Wl, d_e), dt)
    if Wl > 0:
        DQL2 = DQL.reshape(TB, d_lq)
        dE += DQL2 @ Wt.Wql
        hist2 = a["hist"].reshape(-1, d_e)
        DKL2, DVL2 = DKL.reshape(-1, d_lq), DVL.reshape(-1, d_v)
        d_hist = (DKL2 @ Wt.Wkl + DVL2 @ Wt.Wvl).reshape(B, n0 + T, d_e)
        dE += d_hist[:, n0:].transpose(1, 0, 2).reshape(TB, d_e)
        d_buffer0[:, :n0] = d_hist[:, :n0]
        grads["local_attn.q.weight"] = DQL2.T @ E2
        grads["local_attn.k.weight"] = DKL2.T @ hist2
        grads["local_attn.v.weight"] = DVL2.T @ hist2
    dW_emb = np.zeros_like(P["embedding.weight"])
    embedding.scatter_rows(dW_emb, np.ascontiguousarray(ids.T).reshape(-1), dE)
    grads["embedding.weight"] = dW_emb
    U_all = router_input(a["E"], [S[:-1, :, off0:off0 + d0], S[:-1, :, offK:offK + dK]]).reshape(TB, -1)
    grads["router.W_q.weight"] = DQ2.T @ U_all
    if read_grads and read_through == "router":
        grads["router.W_q.weight"] += _router_only_dWq(tape, read_grads, offs)
    QV2 = a["QV"].reshape(TB, H, Dh)
    dWk = np.empty_like(P["router.W_k.weight"])
    dWv = np.empty_like(P["router.W_v.weight"])
    DR2 = DR.reshape(TB, d_v)
    for h in range(H):
        dWk[h * Dh:(h + 1) * Dh] = QV2[:, h].T @ MK[:, h].reshape(TB, d_m)
        dWv[h * dvh:(h + 1) * dvh] = DR2[:, h * dvh:(h + 1) * dvh].T @ a["MIX"][:, h].reshape(TB, d_m)
    grads["router.W_k.weight"] = dWk
    grads["router.W_v.weight"] = dWv
    DWR2 = DWR.reshape(TB, d_m)
    grads["writer.W_w.weight"] = DWR2.T @ a["XW"].reshape(TB, d0 + dK)
    grads["writer.W_w.bias"] = DWR2.sum(axis=0)
    d_state = {f"tier_state_{k}": DS[:, offs[k]:offs[k + 1]].copy() for k in range(K)}
    d_state.update(memory=D * dt.type(cD), read_ema=d_ema, local_buffer=d_buffer0)
    return grads, d_state


def _add_read_grads(i, grads, through, D, cD, d_ema, DQ, MK, Wq_s, DS, off0, d0, offK, dK):
    """The read-target term's gradients at step i joined to the running ones, as ``route_backward`` joins the
    read's: the memory into D = dM / cD, read_ema into d_ema (both as the step read them; ``through`` "all"),
    d q into DQ[i] (W_q's and the embedding's rows) and the tier states (W_q's state columns; not for
    "router", whose W_q gradient ``_router_only_dWq`` makes), d q_mem into MK[i] (W_k's rows)."""
    d_mem, d_ema_i, d_q, d_q_mem = grads
    MK[i] += d_q_mem.transpose(1, 0, 2)
    if through == "router":
        return
    if through == "all":
        D += d_mem / cD
        d_ema += d_ema_i
    d_q2 = d_q.reshape(d_q.shape[0], -1)
    DQ[i] += d_q2
    d_x = d_q2 @ Wq_s
    DS[:, off0:off0 + d0] += d_x[:, :d0]
    DS[:, offK:offK + dK] += d_x[:, d0:]


def _router_only_dWq(tape, read_grads, offs):
    """W_q's part of the read-target term when it goes through the router alone: Σ_i d q_i^T u_i."""
    S, E = tape.S, tape.E
    d0, offK, dK = offs[1], offs[-2], offs[-1] - offs[-2]
    out = 0.0
    for i, (_, _, d_q, _) in read_grads.items():
        u = router_input(E[i], [S[i, :, :d0], S[i, :, offK:offK + dK]])
        out = out + d_q.reshape(d_q.shape[0], -1).T @ u
    return out


# ---------------------------------------------------------------------------------------------------
# Loss and gradients
# ---------------------------------------------------------------------------------------------------
def loss_and_grads(params, config, input_ids, targets, state, gumbel_uniform=None, loss_weights=None,
                   observe=None, read_targets=None, memory_bptt=None):
    """``thl_np.step.loss_and_grads`` on the fast path: the same arguments (input_ids and targets [B, T] int64,
    ``state`` the initial state, ``gumbel_uniform`` [T, B, H, J] or None, ``loss_weights`` [B, T] or None,
    ``observe`` a callable or None, ``read_targets`` a ``ReadTargets`` or None, ``memory_bptt`` an int or None),
    the same loss
    (``sequence_loss``, plus ``read_target_term`` with read targets), the same return value
    (loss, grads, final state, gradient w.r.t. the initial state), checked by the caller as there.

    Runs with OpenBLAS limited to ``BLAS_THREADS`` threads (see ``blas_threads``)."""
    B, T = input_ids.shape
    Wt = _Weights(config, params)
    with blas_threads(BLAS_THREADS):
        asked = () if read_targets is None else np.flatnonzero(read_targets.asks.any(axis=0)).tolist()
        tier_states, state_out, tape = fast_forward(params, config, input_ids, state, gumbel_uniform, Wt, asked)
        if observe is not None:
            from ..memory_steps import steps_from_fast_tape

            observe(steps_from_fast_tape(tape, state))
        # time-major positions: (step, sequence) pairs in the order of the tier states
        loss, d_tiers, head_grads, d_A = sequence_loss(
            params, config, tier_states.reshape(T * B, -1), targets.T.reshape(-1),
            tape.read_weights, None if loss_weights is None else loss_weights.T.reshape(-1))
        read_grads = None
        if read_targets is not None:
            term, read_grads = read_target_term(
                read_targets, tape.TGT, {i: (mem, ema, tape.QV[i]) for i, (mem, ema) in tape.steps["kept"].items()},
                params["router.W_k.weight"], config.load_penalty, router_score_rule(config))
            loss = loss + term
        grads, d_state = fast_backward(params, config, tape, d_tiers.reshape(T, B, -1), d_A, input_ids, Wt,
                                       read_grads, None if read_targets is None else read_targets.through,
                                       memory_bptt)
    grads.update(head_grads)
    return loss, grads, state_out, d_state


def training_memory_bytes(config, batch_size, seq_len, dtype=None, gumbel=True, local_valid=0, breakdown=False):
    """The module docstring's formula for one ``loss_and_grads`` call → total bytes (or, with
    ``breakdown=True``, a dict: tape, backward, head, products, fixed, params, total)."""
    from ..params import param_shapes

    c = config
    f = np.dtype(dtype or c.dtype).itemsize
    B, T = int(batch_size), int(seq_len)
    H, J, kappa, Dh, d_m, d_v, d_e, d_lq = (c.num_heads, c.memory_slots, c.read_topk, c.head_dim, c.memory_dim,
                                            c.value_dim, c.embedding_dim, c.query_dim)
    Q = H * Dh
    dims = list(c.tier_dims)
    D, d0, d_x = sum(dims), dims[0], dims[0] + dims[-1]
    W = c.local_window
    L = int(W > 0)
    n0 = int(local_valid) if W else 0
    G, lam = int(bool(gumbel)), int(bool(c.router_load_balance_lambda))
    n_k = [-(-T // tau) for tau in c.tier_timescales]
    p_k = [dims[k] + (dims[k - 1] if k else 0) + d_v for k in range(len(dims))]
    tape = (f * B * T * (D + d_e + 2 * Q + 3 * d0 + d_v + d_x + 3 * d_m + 3 * H * kappa + H * kappa * d_m
                         + 2 * H * d_m + 6 + L * (d_e + 2 * d_lq + d_v + W + d_v) + G * H * J + lam * J)
            + f * B * (D + L * n0 * (d_e + d_lq + d_v)) + 8 * B * T * (H * kappa + c.write_slots + 1)
            + B * T * (H + 2) + sum(f * B * n * (p + 3 * d) for n, p, d in zip(n_k, p_k, dims, strict=True))
            + f * ((1 - L) + (1 - G) + (1 - lam)))                          # 1-element placeholders
    backward = (f * B * T * (Q + H * d_m + d_m + d_v + L * (2 * d_lq + d_v) + lam * J)
                + sum(f * B * n * 3 * d for n, d in zip(n_k, dims, strict=True))
                + f * B * (J * d_m + J + D + d_v + L * n0 * (d_lq + d_v)))
    head = f * B * T * (4 * c.vocab_size + 4 * D)
    products = f * B * T * (2 * d_e + d_x) + sum(f * B * n * (p + (d_e if k == 0 else 0))
                                                 for k, (n, p) in enumerate(zip(n_k, p_k, strict=True)))
    shapes = param_shapes(c)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    n_tiers = sum(int(np.prod(s)) for name, s in shapes.items() if name.startswith("tiers."))
    n_router = sum(int(np.prod(s)) for name, s in shapes.items() if name.startswith(("router.", "writer.W_w")))
    fixed = f * B * J * (d_m + 3) + 16 * B * J + f * (2 * n_tiers + n_router + n_params)
    params = f * n_params
    out = dict(tape=tape, backward=backward, head=head, products=products, fixed=fixed, params=params)
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out if breakdown else out["total"]


__all__ = ["loss_and_grads", "fast_forward", "fast_backward", "training_memory_bytes",
           "blas_threads", "RENORM_BELOW", "BLAS_THREADS"]
