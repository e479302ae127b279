"""The spec §4 step, composed once from the components, and its back-propagation through time (spec §5).

This file is the plain path: the spec, read top to bottom. Its callers:

- ``THLModel`` (``thl_np.model``): the plain forward, ``value_and_grad(path="plain")``, training on the
  plain path;
- the layered engine (``thl_np.engines.layered``): the same ``thl_step``, with weights streamed into
  it through a weight provider and arrays on the device (NumPy or CuPy);
- the reference-vector generator (``thl_np.reference``).

The fast path (``thl_np.engines.decoder``, ``thl_np.engines.gradient``) computes the same numbers with
Numba kernels, and is tested equal to this file.

Weights come from a *provider*: ``provider.module(name)`` is a context manager giving the parameters
(spec §2 names) that one part of the step reads, and ``provider.keep(*arrays)`` marks arrays that
outlive that part. For the plain model (``ParamWeights``) both do nothing but hand over the dict; the
layered engine fetches or streams each module's weights there and charges its device budget. The
module names are the layered engine's: embedding, local_attn, router, tier.{k}, writer (then
layer_norm and output_head for §4.8). A module's weights are fetched only when its code reads them
(a local attention over an empty buffer, an inactive tier read none).

Which implementation of each component the step calls is the config's choice
(``thl_np.components.registry``): the spec's by default.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .components import gru
from .components.embedding import embedding_backward, embedding_forward
from .components.local_attention import buffer_push
from .components.output import (
    cross_entropy_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    load_balance_forward,
)
from .components.primitives import array_module, scatter_add, to_host
from .components.read_target import read_target_term
from .components.registry import check_forward_shapes, components_for, router_score_rule
from .components.router import gumbel_noise, read_meta_backward, read_meta_forward, router_input, slot_scores
from .components.writer import writer_input
from .errors import InputError
from .state import InferenceState


class ParamWeights:
    """The plain weight provider: every module reads the model's own parameter dict."""

    def __init__(self, params):
        self.params = params

    @contextlib.contextmanager
    def module(self, name):
        yield self.params

    def keep(self, *arrays) -> None:
        pass


def _provider(weights):
    return weights if hasattr(weights, "module") else ParamWeights(weights)


@dataclass
class StepRecord:
    """What one step leaves on the tape for the backward: the few rows it read and wrote, never the bank.
    The caches are the components' own (``RouterCache``, ``WriterCache``, ... or a variant's)."""

    token_ids: np.ndarray
    local: object | None         # local attention cache, or None when nothing was attended
    local_start: int             # index of the first buffer row read, relative to this token (−n)
    router: object
    idx: np.ndarray              # [B, H, κ] slots read
    A: np.ndarray                # [B, J] read weight per slot (the load-balance term's input)
    tier_caches: list            # cache per tier, None for an inactive tier
    writer: object
    targets: np.ndarray          # [B, W_w] slots written
    g: np.ndarray                # [B] write gate
    w: np.ndarray                # [B, d_m] write vector
    t: int                       # the step's timestep
    last_write: np.ndarray       # [B, J] the state's last_write before this step's write


# ---------------------------------------------------------------------------------------------------
# One step (spec §4)
# ---------------------------------------------------------------------------------------------------
def thl_step(weights, config, token_ids, state: InferenceState, gumbel=None, record=False):
    """One spec §4 step: token ids [B] and a state → (tier states [B, Σ d_k], next state, StepRecord|None).

    ``weights`` is a parameter dict or a weight provider (module docstring). ``gumbel`` is the
    transformed noise [B, H, J] (training-mode routing) or None. The input state is not modified.
    Logits are left to ``output_forward`` so a sequence can apply the head once.
    """
    c, W = config, _provider(weights)
    comp = components_for(c)
    xp = array_module(state.memory)
    t = int(state.timestep)
    B = token_ids.shape[0]
    # 1. embed
    with W.module("embedding") as P:
        e = embedding_forward(P["embedding.weight"], token_ids)
    W.keep(e)
    # 2. local attention over the buffer, then the buffer takes e
    n = int(state.local_valid)
    local_cache = None
    with W.module("local_attn") as P:
        if c.local_window > 0 and n > 0:
            loc, local_cache = comp.local_attention.forward(
                e, state.local_buffer[:, :n], P["local_attn.q.weight"], P["local_attn.k.weight"],
                P["local_attn.v.weight"])
            check_forward_shapes(comp.local_attention, (loc,), (("the local read", (B, c.value_dim)),))
        else:
            loc = xp.zeros((B, c.value_dim), dtype=e.dtype)
        buffer, n_next = buffer_push(state.local_buffer, n, e)
    W.keep(loc, buffer)
    # 3. router read, with the tier states of the previous step; 4. read metadata
    s_prev = state.tiers
    with W.module("router") as P:
        u = router_input(e, s_prev)
        r, alpha, idx, router_cache = comp.router.forward(
            u, state.memory, state.read_ema, P["router.W_q.weight"], P["router.W_k.weight"],
            P["router.W_v.weight"], num_heads=c.num_heads, head_dim=c.head_dim, topk=c.read_topk,
            load_penalty=c.load_penalty, capacity=c.read_slot_capacity, gumbel=gumbel)
        check_forward_shapes(comp.router, (r, alpha, idx), (
            ("the read r", (B, c.value_dim)), ("alpha", (B, c.num_heads, c.read_topk)),
            ("idx", (B, c.num_heads, c.read_topk))))
        read_ema, last_read, A = read_meta_forward(state.read_ema, state.last_read, alpha, idx, t,
                                                   c.read_ema_decay)
    W.keep(r, read_ema, last_read)
    # 5. tiers under their clocks
    s_new, tier_caches = tiers_forward(W, t, e, r, loc, s_prev, c.tier_timescales, comp.gru.forward,
                                       variant=comp.gru)
    # 6. writer, against the memory before this step's decay; 7. memory decay and write
    with W.module("writer") as P:
        x_w = writer_input(s_new)
        w, g, targets, writer_cache = comp.writer.forward(
            x_w, state.memory, read_ema, state.last_write, t, P["writer.W_w.weight"], P["writer.W_w.bias"],
            write_slots=c.write_slots, clip_max=c.write_clip_max, beta=c.novelty_beta, theta=c.novelty_theta,
            stale_weight=c.stale_weight, underuse_weight=c.underuse_weight)
        memory, write_ema, last_write = comp.memory_write.forward(
            state.memory, state.write_ema, state.last_write, targets, g, w, t, decay=c.memory_decay,
            write_rate=c.write_rate, ema_decay=c.write_ema_decay)
        check_forward_shapes(comp.memory_write, (memory, write_ema), (
            ("the memory", state.memory.shape), ("write_ema", state.write_ema.shape)))
    W.keep(memory, write_ema, last_write)
    # 9. advance
    next_state = InferenceState(timestep=t + 1, tiers=s_new, memory=memory, read_ema=read_ema,
                                write_ema=write_ema, last_read=last_read, last_write=last_write,
                                local_buffer=buffer, local_valid=n_next)
    rec = None
    if record:
        rec = StepRecord(token_ids=token_ids, local=local_cache, local_start=-n, router=router_cache, idx=idx,
                         A=A, tier_caches=tier_caches, writer=writer_cache, targets=targets, g=g, w=w, t=t,
                         last_write=state.last_write)
    return xp.concatenate(s_new, axis=1), next_state, rec


def read_scores(params, config, e, state, gumbel=None):
    """Every slot's spec §4.3 score [B, H, J] at the step that reads embeddings e [B, d_e] from ``state``: the
    numbers the config's router ranks (its ``ScoreRule``: the spec's, ``unit_keys`` or ``empty_last``), for
    code that looks at a step from outside (the passkey trace, the reference margins). ``gumbel``: the transformed noise
    [B, H, J] or None. InputError for a plugin router, whose scores are its own."""
    c = config
    rule = router_score_rule(c)
    if rule is None:
        raise InputError(f"the router variant {c.components.get('router')!r} has scores of its own, which only "
                         "its forward computes: recomputing them needs a built-in router")
    u = router_input(e, state.tiers)
    q = (u @ params["router.W_q.weight"].T).reshape(u.shape[0], c.num_heads, c.head_dim)
    _, scores = slot_scores(state.memory, q, params["router.W_k.weight"], state.read_ema, c.load_penalty, rule)
    return scores if gumbel is None else scores + gumbel


def tiers_forward(weights, t, e, r, loc, s_prev, timescales, gru_forward=None, variant=None):
    """Spec §4.5 over the K tiers at step t: tier k runs when t mod τ_k = 0, on [its lower tier's new state
    (e for Tier 0); r (+ ℓ for Tier 0)]; an inactive tier keeps its state. → (s_new list, caches list with
    None for an inactive tier). ``gru_forward``: the cell (a registered variant's; the spec's by default);
    ``variant``: its registry entry, whose outputs' shapes are then checked."""
    gru_forward = gru_forward or gru.gru_forward
    W = _provider(weights)
    xp = array_module(e)
    s_new, caches, lower = [], [], e
    for k in range(len(s_prev)):
        with W.module(f"tier.{k}") as P:
            if t % timescales[k] == 0:
                ctx = r + loc if k == 0 else r
                pre = f"tiers.cells.{k}."
                s_k, cache = gru_forward(
                    s_prev[k], xp.concatenate([lower, ctx], axis=1),
                    P[pre + "W_z.weight"], P[pre + "W_z.bias"], P[pre + "W_r.weight"], P[pre + "W_r.bias"],
                    P[pre + "W_h.weight"], P[pre + "W_h.bias"])
                if variant is not None:
                    check_forward_shapes(variant, (s_k,), ((f"tier {k}'s state", s_prev[k].shape),))
            else:
                s_k, cache = s_prev[k], None
        W.keep(s_k)
        s_new.append(s_k)
        caches.append(cache)
        lower = s_k
    return s_new, caches


def tiers_backward(params, caches, d_s_new, input_dims, gru_backward=None):
    """The backward of ``tiers_forward``, top down, so tier k+1's input gradient reaches tier k first.

    d_s_new: the gradient of every tier's new state; input_dims: in_k (d_e, d_0, …, d_{K-2}).
    → (d s_prev list, d_e, d_r, d_ℓ, {parameter name: gradient} of the active tiers)."""
    gru_backward = gru_backward or gru.gru_backward
    K = len(caches)
    ds = list(d_s_new)
    grads, d_prev = {}, [None] * K
    d_r = d_e = d_loc = None
    for k in range(K - 1, -1, -1):
        if caches[k] is None:
            d_prev[k] = ds[k]
            continue
        pre = f"tiers.cells.{k}."
        d_sp, d_x, g = gru_backward(ds[k], caches[k], params[pre + "W_z.weight"], params[pre + "W_r.weight"],
                                    params[pre + "W_h.weight"])
        for key, val in g.items():  # W_z → W_z.weight, b_z → W_z.bias (the checkpoint's names)
            grads[pre + ("W" + key[1:] + ".weight" if key[0] == "W" else "W" + key[1:] + ".bias")] = val
        d_prev[k] = d_sp
        n_in = input_dims[k]
        d_r = d_x[:, n_in:] if d_r is None else d_r + d_x[:, n_in:]
        if k > 0:
            ds[k - 1] = ds[k - 1] + d_x[:, :n_in]
        else:
            d_e, d_loc = d_x[:, :n_in].copy(), d_x[:, n_in:]
    return d_prev, d_e, d_r, d_loc, grads


def output_forward(params, tier_states):
    """Spec §4.8 over any leading shape: tier states [..., Σ d_k] → (logits [..., V], LayerNorm cache, h)."""
    h, ln_cache = layer_norm_forward(tier_states, params["layer_norm.weight"], params["layer_norm.bias"])
    return linear_forward(h, params["output_head.weight"], params["output_head.bias"]), ln_cache, h


# ---------------------------------------------------------------------------------------------------
# Sequences and BPTT (spec §5)
# ---------------------------------------------------------------------------------------------------
def run_sequence(params, config, input_ids, state, gumbel_uniform=None, record=False, before_step=None):
    """T steps over input_ids [B, T] → (tier states [B, T, Σ d_k], final state, tape).
    ``before_step(t, state)``, if given, sees the state each step t (0-based in the call) starts from."""
    B, T = input_ids.shape
    dtype = getattr(params, "dtype", None) or params["embedding.weight"].dtype  # a quantized model's: its own
    out = np.empty((B, T, config.total_tier_dim), dtype=dtype)
    tape = []
    for t in range(T):
        gumbel = None if gumbel_uniform is None else gumbel_noise(gumbel_uniform[t], dtype)
        if before_step is not None:
            before_step(t, state)
        out[:, t], state, rec = thl_step(params, config, input_ids[:, t], state, gumbel, record)
        if record:
            tape.append(rec)
    return out, state, tape


def cut_memory_gradient(t: int, memory_bptt) -> bool:
    """Whether the backward cuts the bank's gradient before step t (0-based in the window): at every t > 0 that
    is a multiple of ``memory_bptt`` (None: never). Cut there, the gradient is that of the loss whose bank, as
    step t reads and updates it, is a constant (the value the forward had): what steps t.. read of earlier
    writes teaches the reads but not those writes. The tiers' and the local window's gradients still cross.
    A training option (``TrainConfig.memory_bptt``), not part of the spec's step: a truncated backward through
    the bank, the writes learning only from reads within N steps. It does not stop the overflow of long recall
    windows (docs/MEMORY.md, round twelve: that growth runs through the tiers, not the bank's own gradient).
    """
    return memory_bptt is not None and t > 0 and t % memory_bptt == 0


def sequence_backward(params, config, tape, d_tier_states, d_A_steps, input_ids, initial_state, read_grads=None,
                      memory_bptt=None):
    """Back-propagate through T recorded steps.

    d_tier_states [B, T, Σ d_k] comes from the output head; d_A_steps [T, B, J] (or a list of T [B, J]) is
    the load-balance term's gradient, or None. Returns (grads dict, gradient w.r.t. the initial state as a
    dict of spec §3 keys). ``read_grads`` ({step: ``ReadTargetGrads``}, optional): the read-target term's
    gradients w.r.t. the memory, read_ema and router input that step t read. ``memory_bptt`` N (optional):
    the bank's gradient is cut at every step t > 0 that is a multiple of N (``cut_memory_gradient``).
    Running gradients: the bank (dM), read_ema, the tier states, and the embedding history that the
    local buffer holds (so the buffer's stored embeddings pass gradient to earlier tokens).
    """
    c = config
    P = params
    comp = components_for(c)
    xp = array_module(d_tier_states)
    grads = {name: xp.zeros_like(p) for name, p in P.items()}
    B, T = input_ids.shape
    K = c.num_tiers
    dims = c.tier_dims
    offsets = np.cumsum([0] + dims)
    dtype = d_tier_states.dtype
    dM = xp.zeros(initial_state.memory.shape, dtype=dtype)
    d_ema = xp.zeros(initial_state.read_ema.shape, dtype=dtype)
    d_s = [xp.zeros((B, d), dtype=dtype) for d in dims]
    n0 = int(initial_state.local_valid) if c.local_window > 0 else 0
    d_hist = xp.zeros((B, n0 + T, c.embedding_dim), dtype=dtype)
    d_e_all = xp.zeros((B, T, c.embedding_dim), dtype=dtype)
    input_dims = [c.tier_input_dim(k) for k in range(K)]
    rows = xp.arange(B)
    sel_rows = rows[:, None, None]
    for t in range(T - 1, -1, -1):
        rec = tape[t]
        ds_new = [d_s[k] + d_tier_states[:, t, offsets[k]:offsets[k + 1]] for k in range(K)]
        # 7. memory decay and write
        dM, d_w, d_g = comp.memory_write.backward(dM, rec.targets, rec.g, rec.w, decay=c.memory_decay,
                                                  write_rate=c.write_rate, last_write=rec.last_write, t=rec.t)
        # 6. writer
        d_xw, d_m_star, dW, db = comp.writer.backward(d_w, d_g, rec.writer, P["writer.W_w.weight"])
        grads["writer.W_w.weight"] += dW
        grads["writer.W_w.bias"] += db
        dM[rows, rec.writer.j_star] += d_m_star
        ds_new[0] += d_xw[:, :dims[0]]
        ds_new[K - 1] += d_xw[:, dims[0]:]
        # 5. tiers, top down so each tier's input gradient reaches the tier below first
        d_s_prev, d_e, d_r, d_loc, tier_grads = tiers_backward(P, rec.tier_caches, ds_new, input_dims,
                                                               comp.gru.backward)
        for name, val in tier_grads.items():
            grads[name] += val
        # 4. read metadata
        d_A = None if d_A_steps is None else d_A_steps[t]
        d_ema_prev, d_alpha = read_meta_backward(d_ema, d_A, rec.idx, c.read_ema_decay)
        # 3. router
        d_u, d_m_sel, d_ema_sel, dWq, dWk, dWv = comp.router.backward(
            d_r, d_alpha, rec.router, P["router.W_q.weight"], P["router.W_k.weight"], P["router.W_v.weight"],
            num_heads=c.num_heads, head_dim=c.head_dim, load_penalty=c.load_penalty)
        grads["router.W_q.weight"] += dWq
        grads["router.W_k.weight"] += dWk
        grads["router.W_v.weight"] += dWv
        scatter_add(dM, (sel_rows, rec.idx), d_m_sel)
        scatter_add(d_ema_prev, (sel_rows, rec.idx), d_ema_sel)
        if read_grads is not None and t in read_grads:
            extra = read_grads[t]
            dM += extra.memory
            d_ema_prev += extra.read_ema
            d_u = d_u + extra.u
        d_e += d_u[:, :c.embedding_dim]
        d_s_prev[0] = d_s_prev[0] + d_u[:, c.embedding_dim:c.embedding_dim + dims[0]]
        d_s_prev[K - 1] = d_s_prev[K - 1] + d_u[:, c.embedding_dim + dims[0]:]
        # 2. local attention: the rows it read are embeddings n0 + t - n .. n0 + t - 1 of the history
        if rec.local is not None:
            d_el, d_buf, dWq_l, dWk_l, dWv_l = comp.local_attention.backward(
                d_loc, rec.local, P["local_attn.q.weight"], P["local_attn.k.weight"], P["local_attn.v.weight"])
            d_e += d_el
            start = n0 + t + rec.local_start
            d_hist[:, start:n0 + t] += d_buf
            grads["local_attn.q.weight"] += dWq_l
            grads["local_attn.k.weight"] += dWk_l
            grads["local_attn.v.weight"] += dWv_l
        d_e_all[:, t] = d_e
        d_ema, d_s = d_ema_prev, d_s_prev
        if cut_memory_gradient(t, memory_bptt):
            dM = xp.zeros_like(dM)
    # 1. embedding: direct use plus every later read of the token's row in the local buffer
    d_e_all += d_hist[:, n0:]
    grads["embedding.weight"] = embedding_backward(d_e_all, input_ids, c.vocab_size)
    d_buffer0 = xp.zeros(initial_state.local_buffer.shape, dtype=dtype)
    d_buffer0[:, :n0] = d_hist[:, :n0]
    d_state = {f"tier_state_{k}": d_s[k] for k in range(K)}
    d_state.update(memory=dM, read_ema=d_ema, local_buffer=d_buffer0)
    return grads, d_state


def head_loss_and_backward(params, tier_states, targets, weights=None):
    """Spec §4.8 and §5's cross-entropy over every position at once, as 2-D products: tier states
    [N, Σ d_k] and targets [N] → (mean cross-entropy, d tier states [N, Σ d_k], the gradients of the
    LayerNorm and the output head). ``weights`` [N] (optional): the weighted mean Σ w·CE / Σ w instead."""
    logits, ln_cache, h = output_forward(params, tier_states)
    loss, d_logits = cross_entropy_forward(logits, targets, weights)
    del logits
    d_h, dW_o, db_o = linear_backward(d_logits, h, params["output_head.weight"])
    del d_logits
    d_tiers, d_gamma, d_beta = layer_norm_backward(d_h, ln_cache, params["layer_norm.weight"])
    return loss, d_tiers, {"output_head.weight": dW_o, "output_head.bias": db_o,
                           "layer_norm.weight": d_gamma, "layer_norm.bias": d_beta}


def add_load_balance(config, loss, A):
    """Spec §5's router load-balance term added to ``loss``: λ times the mean, over the B·T (step, sequence)
    rows of A [T, B, J] (the read weight per slot of every step), of KL(p ‖ uniform) with p = A / Σ_j A.
    → (the loss with the term, its gradient d/dA [T, B, J]); (loss, None) when λ = 0 (A may then be None).
    The term is the same whatever the cross-entropy's ``loss_weights``."""
    lam = config.router_load_balance_lambda
    if not lam:
        return loss, None
    kl, d_A = load_balance_forward(A)
    n = kl.size
    return loss + lam * kl.sum() / n, d_A * (lam / n)


def sequence_loss(params, config, tier_states, targets, A=None, weights=None):
    """Spec §5's loss, the one definition every path and every gradient check calls: the output head's mean
    cross-entropy over N = B·T positions (tier states [N, Σ d_k] and targets [N], the positions in any
    order; ``weights`` [N]: the weighted mean Σ w·CE / Σ w instead), plus ``add_load_balance`` of the read
    weights A [T, B, J] (``read_weights``; None when λ = 0).
    → (loss, d tier states [N, Σ d_k], the LayerNorm's and output head's gradients, d A [T, B, J] or None)."""
    loss, d_tiers, head_grads = head_loss_and_backward(params, tier_states, targets, weights)
    loss, d_A = add_load_balance(config, loss, A)
    return loss, d_tiers, head_grads, d_A


def read_weights(config, tape):
    """The recorded steps' read weights per slot, A [T, B, J], when the config's loss has the load-balance
    term (λ ≠ 0); else None."""
    if not config.router_load_balance_lambda:
        return None
    return array_module(tape[0].A).stack([rec.A for rec in tape])


def loss_and_grads(params, config, input_ids, targets, state, gumbel_uniform=None, loss_weights=None,
                   observe=None, read_targets=None, memory_bptt=None):
    """Spec §5 on the plain path: T steps with a tape, ``sequence_loss`` (mean cross-entropy over B·T, or
    weighted by ``loss_weights`` [B, T], plus the load-balance term when its weight is non-zero) and BPTT
    through all T steps. ``observe``, if given, is called with the steps' memory choices
    (``thl_np.eval.diagnostics``). ``read_targets`` (a ``ReadTargets``, optional) adds the read-target term
    (``thl_np.components.read_target``). ``memory_bptt`` (optional): cut the bank's gradient every that many
    steps (``cut_memory_gradient``). Returns (loss, grads, final state, gradient w.r.t. the initial state).
    ``thl_np.engines.gradient.loss_and_grads`` is its fast sibling (same arguments, same numbers)."""
    B, T = input_ids.shape
    asked = {}

    def keep_asked(t, st):
        if read_targets is not None and read_targets.asks[:, t].any():
            asked[t] = st

    tier_states, state_out, tape = run_sequence(params, config, input_ids, state, gumbel_uniform, record=True,
                                                before_step=keep_asked)
    if observe is not None:
        from .memory_steps import steps_from_records

        observe(steps_from_records(tape, state))
    loss, d_tiers, head_grads, d_A = sequence_loss(
        params, config, tier_states.reshape(B * T, -1), targets.reshape(-1), read_weights(config, tape),
        None if loss_weights is None else loss_weights.reshape(-1))
    read_grads, read_param_grads = None, {}
    if read_targets is not None:
        write_targets = np.stack([to_host(rec.targets) for rec in tape])
        loss, read_grads, read_param_grads = add_read_targets(
            params, config, loss, read_targets, write_targets,
            {t: (embedding_forward(params["embedding.weight"], input_ids[:, t]), st) for t, st in asked.items()})
    grads, d_state = sequence_backward(params, config, tape, d_tiers.reshape(B, T, -1), d_A, input_ids, state,
                                       read_grads, memory_bptt)
    grads.update(head_grads)
    for name, g in read_param_grads.items():
        grads[name] = grads[name] + g
    return loss, grads, state_out, d_state


@dataclass
class ReadTargetGrads:
    """The read-target term's gradients at one step, scaled by μ/N: w.r.t. the memory [B, J, d_m] and read_ema
    [B, J] the step read, and its router input u [B, d_u]."""

    memory: np.ndarray
    read_ema: np.ndarray
    u: np.ndarray


def add_read_targets(params, config, loss, read_targets, write_targets, asked):
    """The read-target term (``thl_np.components.read_target``) added to ``loss``, on the plain path: ``asked``
    maps each asked step t to (its embeddings e [B, d_e], the state it starts from), ``write_targets``
    [T, B, W_w] the slots every step wrote. → (loss with the term, {t: ReadTargetGrads}, {W_q, W_k grads});
    the step gradients are 0 where ``read_targets.through`` stops them."""
    W_q, W_k = params["router.W_q.weight"], params["router.W_k.weight"]
    H, d_h = config.num_heads, config.head_dim
    inputs = {}
    for t, (e, st) in asked.items():
        u = router_input(e, st.tiers)
        inputs[t] = (u, (u @ W_q.T).reshape(u.shape[0], H, d_h), st)
    term, rows = read_target_term(read_targets, write_targets,
                                  {t: (st.memory, st.read_ema, q) for t, (u, q, st) in inputs.items()},
                                  W_k, config.load_penalty, router_score_rule(config))
    grads, dW_q, dW_k = {}, np.zeros_like(W_q), np.zeros_like(W_k)
    through = read_targets.through
    for t, (d_mem, d_ema, d_q, d_q_mem) in rows.items():
        u, q, _ = inputs[t]
        d_q2 = d_q.reshape(d_q.shape[0], -1)
        keep_memory, keep_u = through == "all", through != "router"
        grads[t] = ReadTargetGrads(memory=d_mem if keep_memory else np.zeros_like(d_mem),
                                   read_ema=d_ema if keep_memory else np.zeros_like(d_ema),
                                   u=d_q2 @ W_q if keep_u else np.zeros_like(u))
        dW_q += d_q2.T @ u
        dW_k += np.einsum("bhd,bhm->hdm", q, d_q_mem).reshape(W_k.shape)
    return loss + term, grads, {"router.W_q.weight": dW_q, "router.W_k.weight": dW_k}
