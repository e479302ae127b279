"""The math the layered engine runs on device arrays, and the step it composes from it.

On the NumPy backend the engine calls the ``thl_np.components`` component functions themselves
(``nn_ops``). On CuPy, the components whose NumPy calls CuPy dispatches correctly
(``__array_function__`` / ``__array_ufunc__``: local attention, the GRU cell, LayerNorm, linear) are
called as they are; the router, read metadata, writer and memory write use NumPy constructs CuPy does not
take (``np.add.at``, ``np.argsort(kind="stable")``, arrays created with ``np.zeros``/``np.arange`` mixed
with device arrays, a per-sequence Python loop), so they have backend-generic variants below, written
against an array module ``xp`` (``generic_ops``). With ``xp = numpy`` each variant returns bit-for-bit
what its ``thl_np.components`` original returns (``tests/test_layered.py`` checks this), so the CuPy
path's logic is tested on machines without a GPU.

``layered_step`` composes these in spec §4 order exactly as ``thl_np.model.thl_step`` composes the
component functions, LayerNorm included (the PyTorch THL's engine skipped it, spec §6), with the
engine's weight fetching, workspace reservations and streaming around each module.

The variants and the composition repeat model math that ``thl_np.components`` and ``thl_np.model``
define; they live in this one file so that replacing them with the shared definitions touches nothing
else in the engine.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...components.embedding import embedding_forward
from ...components.gru import gru_forward
from ...components.local_attention import local_attention_forward
from ...components.output import layer_norm_forward, linear_forward
from ...components.router import apply_slot_capacity, read_meta_forward, router_forward
from ...components.writer import EMPTY_NORM, memory_write_forward, writer_forward
from ..state import InferenceState


# ---------------------------------------------------------------------------------------------------
# Backend-generic variants of spec §4.3, §4.4, §4.6, §4.7 (xp is numpy or cupy)
# ---------------------------------------------------------------------------------------------------
def argsort_stable(xp, a):
    """Indices sorting ``a`` along its last axis; equal keys keep index order (stable).

    NumPy needs kind="stable"; CuPy's sort is always stable and older versions reject ``kind``.
    """
    if xp is np:
        return np.argsort(a, axis=-1, kind="stable")
    return xp.argsort(a, axis=-1)


def router_forward_xp(xp, u, memory, read_ema, W_q, W_k, W_v, *, num_heads, head_dim, topk, load_penalty,
                      capacity=None, to_numpy=np.asarray):
    """Spec §4.3 as ``thl_np.components.router.router_forward`` computes it (eval mode) → (r, alpha, idx).

    Top-κ is a stable argsort of the negated scores (ties to the lower slot); ``+ 0.0`` turns −0.0 into
    +0.0 so a radix sort (CuPy) cannot order the two zeros apart. The capacity walk is a short loop
    over picks: it runs on host copies through ``apply_slot_capacity`` itself.
    """
    B, J, d_m = memory.shape
    H, d_h = num_heads, head_dim
    q = (u @ W_q.T).reshape(B, H, d_h)
    # as thl_np.components.router.slot_scores: m_j·(W_k,h^T q_h), so identical rows get identical scores
    q_mem = xp.einsum("bhd,hdm->bhm", q, W_k.reshape(H, d_h, d_m))
    scale = 1.0 / math.sqrt(d_h)
    scores = xp.einsum("bjm,bhm->bhj", memory, q_mem) * scale - load_penalty * read_ema[:, None, :]
    idx = argsort_stable(xp, -scores + 0.0)[..., :topk]
    picked = xp.take_along_axis(scores, idx, axis=-1)
    ex = xp.exp(picked - picked[..., :1])
    alpha = ex / ex.sum(axis=-1, keepdims=True)
    if capacity is not None:
        capped, _, _ = apply_slot_capacity(to_numpy(alpha), to_numpy(idx), capacity)
        alpha = xp.asarray(capped)
    b_ix = xp.arange(B)[:, None, None]
    m_sel = memory[b_ix, idx]                                          # [B, H, κ, d_m]
    v_sel = xp.einsum("bhrm,hvm->bhrv", m_sel, W_v.reshape(H, -1, d_m))
    r = xp.einsum("bhr,bhrv->bhv", alpha, v_sel).reshape(B, -1)
    return r, alpha, idx


def read_meta_forward_xp(xp, read_ema, last_read, alpha, idx, t, decay):
    """Spec §4.4 → (read_ema, last_read). ``A`` is accumulated one pick at a time, in the (head, rank)
    order ``np.add.at`` uses, so the sums are the same bits; within one pick every row adds to its own
    slot, so no scatter has duplicate indices (and nothing depends on atomics)."""
    B, H, kappa = idx.shape
    A = xp.zeros(read_ema.shape, dtype=alpha.dtype)
    rows = xp.arange(B)
    flat_idx = idx.reshape(B, H * kappa)
    flat_alpha = alpha.reshape(B, H * kappa)
    for p in range(H * kappa):
        A[rows, flat_idx[:, p]] += flat_alpha[:, p]
    new_ema = decay * read_ema + (1.0 - decay) * A
    new_last = last_read.copy()
    new_last[rows[:, None, None], idx] = t
    return new_ema, new_last


def writer_forward_xp(xp, x_w, memory, read_ema, last_write, t, W_w, b_w, *, write_slots, clip_max, beta,
                      theta, stale_weight, underuse_weight):
    """Spec §4.6 as ``thl_np.components.writer.writer_forward`` computes it → (w, g, targets), with the
    per-sequence target choice vectorised: one stable argsort of a key per row, where the key is
    0/1 "not empty" (novel with an empty slot: empty slots by index, then the rest by index), or
    −(λ_s·staleness + λ_u·underuse) in float64 (novel, bank full), or −aff (refine)."""
    B, J, _ = memory.shape
    w_raw = x_w @ W_w.T + b_w
    n_raw = xp.sqrt((w_raw * w_raw).sum(axis=1))
    ratio = clip_max / (n_raw + 1e-6)
    clipped = ratio < 1.0
    scale = xp.where(clipped, ratio, 1.0)
    w = w_raw * scale[:, None]
    n_w = xp.sqrt((w * w).sum(axis=1))
    n_m = xp.sqrt((memory * memory).sum(axis=2))                  # [B, J]
    dots = xp.einsum("bjm,bm->bj", memory, w)
    aff = dots / ((n_w[:, None] + 1e-8) * (n_m + 1e-8))
    j_star = xp.argmax(aff, axis=1)                                # first maximum: the lower index
    novelty = 1.0 - aff[xp.arange(B), j_star]
    novel = novelty > theta
    g = xp.where(novel, 1.0 / (1.0 + xp.exp(-beta * (novelty - theta))), 1.0).astype(w.dtype)
    empty = n_m <= EMPTY_NORM
    any_empty = empty.any(axis=1)
    staleness = (t - last_write).astype(xp.float64)
    underuse = 1.0 / (1e-8 + read_ema.astype(xp.float64))
    stale_score = stale_weight * staleness + underuse_weight * underuse
    key = xp.where(any_empty[:, None], (~empty).astype(xp.float64), -stale_score)
    key = xp.where(novel[:, None], key, -aff.astype(xp.float64)) + 0.0
    targets = argsort_stable(xp, key)[:, :write_slots]
    return w, g, targets


def memory_write_forward_xp(xp, memory, write_ema, last_write, targets, g, w, t, *, decay, write_rate,
                            ema_decay):
    """Spec §4.7 as ``thl_np.components.writer.memory_write_forward`` computes it (arrays made with ``xp``)."""
    B = memory.shape[0]
    rows = xp.arange(B)[:, None]
    new_memory = memory * decay
    new_memory[rows, targets] += (write_rate * g)[:, None, None] * w[:, None, :]
    is_target = xp.zeros(write_ema.shape, dtype=write_ema.dtype)
    is_target[rows, targets] = 1.0
    new_write_ema = ema_decay * write_ema + (1.0 - ema_decay) * is_target
    new_last_write = last_write.copy()
    new_last_write[rows, targets] = t
    return new_memory, new_write_ema, new_last_write


@dataclass(frozen=True)
class Ops:
    """The math the engine runs on device arrays, one function per spec §4 component (eval mode)."""

    name: str
    local_attention: Callable   # (e, buffer, Wq, Wk, Wv) → ℓ
    router: Callable            # (u, memory, read_ema, W_q, W_k, W_v, **kw) → (r, alpha, idx)
    read_meta: Callable         # (read_ema, last_read, alpha, idx, t, decay) → (read_ema, last_read)
    gru: Callable               # (s_prev, x, W_z, b_z, W_r, b_r, W_h, b_h) → s_new
    writer: Callable            # (x_w, memory, read_ema, last_write, t, W_w, b_w, **kw) → (w, g, targets)
    memory_write: Callable      # (memory, write_ema, last_write, targets, g, w, t, **kw) → new M, EMA, last
    layer_norm: Callable        # (x, gamma, beta) → h
    linear: Callable            # (x, W, b) → x W^T + b


def nn_ops() -> Ops:
    """The ``thl_np.components`` component functions themselves (the NumPy backend's default)."""
    return Ops(
        name="thl_np.components",
        local_attention=lambda *a: local_attention_forward(*a)[0],
        router=lambda *a, **k: router_forward(*a, **k)[:3],
        read_meta=lambda *a: read_meta_forward(*a)[:2],
        gru=lambda *a: gru_forward(*a)[0],
        writer=lambda *a, **k: writer_forward(*a, **k)[:3],
        memory_write=memory_write_forward,
        layer_norm=lambda x, g, b: layer_norm_forward(x, g, b)[0],
        linear=linear_forward,
    )


def generic_ops(xp, to_numpy=np.asarray) -> Ops:
    """Backend-generic ops over the array module ``xp``: the ``thl_np.components`` functions where CuPy's NumPy
    dispatch covers every call they make, the ``*_xp`` variants above where it does not."""
    return Ops(
        name=f"generic[{xp.__name__}]",
        local_attention=lambda *a: local_attention_forward(*a)[0],
        router=lambda *a, **k: router_forward_xp(xp, *a, to_numpy=to_numpy, **k),
        read_meta=lambda *a: read_meta_forward_xp(xp, *a),
        gru=lambda *a: gru_forward(*a)[0],
        writer=lambda *a, **k: writer_forward_xp(xp, *a, **k),
        memory_write=lambda *a, **k: memory_write_forward_xp(xp, *a, **k),
        layer_norm=lambda x, g, b: layer_norm_forward(x, g, b)[0],
        linear=linear_forward,
    )


# ---------------------------------------------------------------------------------------------------
# The step: spec §4 in order, each module's weights fetched (resident or streamed) around its math
# ---------------------------------------------------------------------------------------------------
def layered_step(engine, ids: np.ndarray, state):
    """One spec §4 step of ``engine`` (``LayeredInferenceEngine._step``): token ids [B] → (logits [B, V] on
    the host, next device state). Weights come from ``engine._weights(module)`` (resident, or the
    streamer's slot) and are handed back with ``engine._done(module)``; every module runs inside
    the backend's workspace reservation for it, and what it keeps is adopted by the backend."""
    c, P, plan, be = engine.config, engine.model.params, engine._plan, engine.backend
    xp, ops = be.xp, be.ops
    B = int(ids.shape[0])
    ws = {m.name: m.workspace for m in plan.modules}
    st = engine._state_to_device(state, B)
    t, n, Wl = int(st.timestep), int(st.local_valid), c.local_window
    streamer = engine._streamer
    if streamer is not None:
        streamer.begin(engine._queue(t, n))

    # 1. embed: the batch's rows are gathered on the host; only they move
    with be.workspace(ws["embedding"]):
        e = xp.asarray(embedding_forward(P["embedding.weight"], ids))
    be.adopt(e)

    # 2. local attention over the buffer, then the buffer takes e
    with be.workspace(ws["local_attn"]):
        if Wl > 0 and n > 0:
            W = engine._weights("local_attn")
            loc = ops.local_attention(e, st.local_buffer[:, :n], W["local_attn.q.weight"],
                                      W["local_attn.k.weight"], W["local_attn.v.weight"])
            del W
            engine._done("local_attn")
        else:
            loc = xp.zeros((B, c.value_dim), dtype=e.dtype)
        buffer = xp.empty_like(st.local_buffer)
        if Wl > 0:
            if n < Wl:
                buffer[...] = st.local_buffer
                buffer[:, n] = e
                n_next = n + 1
            else:
                buffer[:, :-1] = st.local_buffer[:, 1:]
                buffer[:, -1] = e
                n_next = n
        else:
            n_next = 0
    be.adopt(loc, buffer)

    # 3-4. router read with the previous tier states, then the read metadata
    with be.workspace(ws["router"]):
        W = engine._weights("router")
        u = xp.concatenate([e, st.tiers[0], st.tiers[-1]], axis=1)
        r, alpha, idx = ops.router(
            u, st.memory, st.read_ema, W["router.W_q.weight"], W["router.W_k.weight"],
            W["router.W_v.weight"], num_heads=c.num_heads, head_dim=c.head_dim, topk=c.read_topk,
            load_penalty=c.load_penalty, capacity=c.read_slot_capacity)
        del W, u
        engine._done("router")
        read_ema, last_read = ops.read_meta(st.read_ema, st.last_read, alpha, idx, t, c.read_ema_decay)
        del alpha, idx
    be.adopt(r, read_ema, last_read)

    # 5. tiers under their clocks (an inactive tier's weights are not fetched)
    s_new = []
    lower = e
    for k in range(c.num_tiers):
        name = f"tier.{k}"
        with be.workspace(ws[name]):
            if t % c.tier_timescales[k] == 0:
                W = engine._weights(name)
                ctx = r + loc if k == 0 else r
                pre = f"tiers.cells.{k}."
                s_k = ops.gru(st.tiers[k], xp.concatenate([lower, ctx], axis=1),
                              W[pre + "W_z.weight"], W[pre + "W_z.bias"], W[pre + "W_r.weight"],
                              W[pre + "W_r.bias"], W[pre + "W_h.weight"], W[pre + "W_h.bias"])
                del W, ctx
                engine._done(name)
            else:
                s_k = st.tiers[k].copy()
        be.adopt(s_k)
        s_new.append(s_k)
        lower = s_k

    # 6-7. writer against the memory before this step's decay, then decay and write
    with be.workspace(ws["writer"]):
        W = engine._weights("writer")
        x_w = xp.concatenate([s_new[0], s_new[-1]], axis=1)
        w, g, targets = ops.writer(
            x_w, st.memory, read_ema, st.last_write, t, W["writer.W_w.weight"], W["writer.W_w.bias"],
            write_slots=c.write_slots, clip_max=c.write_clip_max, beta=c.novelty_beta,
            theta=c.novelty_theta, stale_weight=c.stale_weight, underuse_weight=c.underuse_weight)
        del W, x_w
        engine._done("writer")
        memory, write_ema, last_write = ops.memory_write(
            st.memory, st.write_ema, st.last_write, targets, g, w, t, decay=c.memory_decay,
            write_rate=c.write_rate, ema_decay=c.write_ema_decay)
        del w, g, targets
    be.adopt(memory, write_ema, last_write)

    # 8. output: LayerNorm over [s^0; …; s^{K-1}], then the head (whole, or chunk by chunk)
    with be.workspace(ws["layer_norm"]):
        W = engine._weights("layer_norm")
        h = ops.layer_norm(xp.concatenate(s_new, axis=1), W["layer_norm.weight"], W["layer_norm.bias"])
        del W
        engine._done("layer_norm")
    be.adopt(h)
    with be.workspace(ws["output_head"]):
        if "output_head" in engine._resident:
            W = engine._resident["output_head"]
            logits = ops.linear(h, W["output_head.weight"], W["output_head.bias"])
        else:
            logits = xp.empty((B, c.vocab_size), dtype=h.dtype)
            for a, b in plan.head_chunks:
                W = engine._streamer.acquire("output_head")
                logits[:, a:b] = ops.linear(h, W["output_head.weight"], W["output_head.bias"])
                del W
                engine._streamer.release()
        del h
    be.adopt(logits)
    logits_host = be.to_host(logits)
    del logits

    # 9. advance
    next_state = InferenceState(timestep=t + 1, tiers=s_new, memory=memory, read_ema=read_ema,
                                write_ema=write_ema, last_read=last_read, last_write=last_write,
                                local_buffer=buffer, local_valid=n_next)
    if streamer is not None:
        streamer.end_step(engine._queue(t + 1, n_next))
    return logits_host, next_state
