"""The THL model: one spec §4 step composed from the components in ``thl_np.components``, sequences of steps,
and back-propagation through time over the tape those steps leave (spec §5).

This file is the plain path: it is the spec, read top to bottom. ``thl_np.inference.fast`` is the
fast path, tested equal to it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .checks import as_dtype, as_path
from .components.embedding import embedding_backward, embedding_forward
from .components.gru import gru_backward, gru_forward
from .components.local_attention import local_attention_backward, local_attention_forward
from .components.output import (
    cross_entropy_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    load_balance_forward,
)
from .components.router import gumbel_noise, read_meta_backward, read_meta_forward, router_backward, router_forward
from .components.writer import memory_write_backward, memory_write_forward, writer_backward, writer_forward
from .config import THLConfig
from .errors import InputError, StateError, WeightsError
from .inference.state import InferenceState
from .params import check_params, init_params, num_parameters, param_shapes

FORMAT_VERSION = "1"
VERIFY_BELOW_BYTES = 64 << 20  # from_pretrained reads (and NaN-checks) every page of files this small


@dataclass(frozen=True)
class TierStack:
    """What ``model.tiers`` describes: the tier widths and clocks (for ``InferenceState.init``)."""

    dims: tuple
    timescales: tuple


@dataclass(frozen=True)
class MemoryBank:
    """What ``model.memory_bank`` describes: J slots of width d_m (for ``InferenceState.init``)."""

    slots: int
    dim: int


@dataclass
class StepRecord:
    """What one step leaves on the tape for the backward: the few rows it read and wrote, never the bank."""

    token_ids: np.ndarray
    local: tuple | None          # local attention cache, or None when ℓ = 0
    local_start: int             # index of the first buffer row read, in the sequence's embedding history
    router: tuple
    idx: np.ndarray
    A: np.ndarray
    tier_caches: list            # cache per tier, None for an inactive tier
    writer: dict
    targets: np.ndarray
    g: np.ndarray
    w: np.ndarray


# ---------------------------------------------------------------------------------------------------
# One step (spec §4)
# ---------------------------------------------------------------------------------------------------
def thl_step(params, config: THLConfig, token_ids, state: InferenceState, gumbel=None, record=False):
    """One spec §4 step: token ids [B] and a state → (tier states [B, Σ d_k], next state, StepRecord|None).

    ``gumbel`` is the transformed noise [B, H, J] (training-mode routing) or None. The input state is
    not modified. Logits are left to ``output_forward`` so a sequence can apply the head once.
    """
    c = config
    P = params
    t = int(state.timestep)
    B = token_ids.shape[0]
    # 1. embed
    e = embedding_forward(P["embedding.weight"], token_ids)
    # 2. local attention over the buffer, then the buffer takes e
    n = int(state.local_valid)
    local_cache = None
    if c.local_window > 0 and n > 0:
        loc, local_cache = local_attention_forward(
            e, state.local_buffer[:, :n], P["local_attn.q.weight"], P["local_attn.k.weight"],
            P["local_attn.v.weight"])
    else:
        loc = np.zeros((B, c.value_dim), dtype=e.dtype)
    buffer = state.local_buffer.copy()
    if c.local_window > 0:
        if n < c.local_window:
            buffer[:, n] = e
            n_next = n + 1
        else:
            buffer[:, :-1] = state.local_buffer[:, 1:]
            buffer[:, -1] = e
            n_next = n
    else:
        n_next = 0
    # 3. router read, with the tier states of the previous step
    s_prev = state.tiers
    u = np.concatenate([e, s_prev[0], s_prev[-1]], axis=1)
    r, alpha, idx, router_cache = router_forward(
        u, state.memory, state.read_ema, P["router.W_q.weight"], P["router.W_k.weight"],
        P["router.W_v.weight"], num_heads=c.num_heads, head_dim=c.head_dim, topk=c.read_topk,
        load_penalty=c.load_penalty, capacity=c.read_slot_capacity, gumbel=gumbel)
    # 4. read metadata
    read_ema, last_read, A = read_meta_forward(state.read_ema, state.last_read, alpha, idx, t, c.read_ema_decay)
    # 5. tiers under their clocks
    s_new, tier_caches = [], []
    lower = e
    for k in range(c.num_tiers):
        if t % c.tier_timescales[k] == 0:
            ctx = r + loc if k == 0 else r
            pre = f"tiers.cells.{k}."
            s_k, cache = gru_forward(
                s_prev[k], np.concatenate([lower, ctx], axis=1),
                P[pre + "W_z.weight"], P[pre + "W_z.bias"], P[pre + "W_r.weight"], P[pre + "W_r.bias"],
                P[pre + "W_h.weight"], P[pre + "W_h.bias"])
        else:
            s_k, cache = s_prev[k], None
        s_new.append(s_k)
        tier_caches.append(cache)
        lower = s_k
    # 6. writer, against the memory before this step's decay
    x_w = np.concatenate([s_new[0], s_new[-1]], axis=1)
    w, g, targets, writer_cache = writer_forward(
        x_w, state.memory, read_ema, state.last_write, t, P["writer.W_w.weight"], P["writer.W_w.bias"],
        write_slots=c.write_slots, clip_max=c.write_clip_max, beta=c.novelty_beta, theta=c.novelty_theta,
        stale_weight=c.stale_weight, underuse_weight=c.underuse_weight)
    # 7. memory decay and write
    memory, write_ema, last_write = memory_write_forward(
        state.memory, state.write_ema, state.last_write, targets, g, w, t, decay=c.memory_decay,
        write_rate=c.write_rate, ema_decay=c.write_ema_decay)
    # 9. advance
    next_state = InferenceState(timestep=t + 1, tiers=s_new, memory=memory, read_ema=read_ema,
                                write_ema=write_ema, last_read=last_read, last_write=last_write,
                                local_buffer=buffer, local_valid=n_next)
    rec = None
    if record:
        rec = StepRecord(token_ids=token_ids, local=local_cache, local_start=-n, router=router_cache, idx=idx,
                         A=A, tier_caches=tier_caches, writer=writer_cache, targets=targets, g=g, w=w)
    return np.concatenate(s_new, axis=1), next_state, rec


def output_forward(params, tier_states):
    """Spec §4.8 over any leading shape: tier states [..., Σ d_k] → (logits [..., V], LayerNorm cache, h)."""
    h, ln_cache = layer_norm_forward(tier_states, params["layer_norm.weight"], params["layer_norm.bias"])
    return linear_forward(h, params["output_head.weight"], params["output_head.bias"]), ln_cache, h


# ---------------------------------------------------------------------------------------------------
# Sequences and BPTT (spec §5)
# ---------------------------------------------------------------------------------------------------
def run_sequence(params, config, input_ids, state, gumbel_uniform=None, record=False):
    """T steps over input_ids [B, T] → (tier states [B, T, Σ d_k], final state, tape)."""
    B, T = input_ids.shape
    dtype = params["embedding.weight"].dtype
    out = np.empty((B, T, config.total_tier_dim), dtype=dtype)
    tape = []
    for t in range(T):
        gumbel = None if gumbel_uniform is None else gumbel_noise(gumbel_uniform[t], dtype)
        out[:, t], state, rec = thl_step(params, config, input_ids[:, t], state, gumbel, record)
        if record:
            tape.append(rec)
    return out, state, tape


def sequence_backward(params, config, tape, d_tier_states, d_A_steps, input_ids, initial_state):
    """Back-propagate through T recorded steps.

    d_tier_states [B, T, Σ d_k] comes from the output head; d_A_steps is a list of [B, J] (load-balance
    term) or None. Returns (grads dict, gradient w.r.t. the initial state as a dict of spec §3 keys).
    Running gradients: the bank (dM), read_ema, the tier states, and the embedding history that the
    local buffer holds (so the buffer's stored embeddings pass gradient to earlier tokens).
    """
    c = config
    P = params
    grads = {name: np.zeros_like(p) for name, p in P.items()}
    B, T = input_ids.shape
    K = c.num_tiers
    dims = c.tier_dims
    offsets = np.cumsum([0] + dims)
    dtype = d_tier_states.dtype
    dM = np.zeros(initial_state.memory.shape, dtype=dtype)
    d_ema = np.zeros(initial_state.read_ema.shape, dtype=dtype)
    d_s = [np.zeros((B, d), dtype=dtype) for d in dims]
    n0 = int(initial_state.local_valid) if c.local_window > 0 else 0
    d_hist = np.zeros((B, n0 + T, c.embedding_dim), dtype=dtype)
    d_e_all = np.zeros((B, T, c.embedding_dim), dtype=dtype)
    rows = np.arange(B)
    sel_rows = rows[:, None, None]
    for t in range(T - 1, -1, -1):
        rec = tape[t]
        step_t = int(initial_state.timestep) + t
        ds_new = [d_s[k] + d_tier_states[:, t, offsets[k]:offsets[k + 1]] for k in range(K)]
        # 7. memory decay and write
        dM, d_w, d_g = memory_write_backward(dM, rec.targets, rec.g, rec.w, decay=c.memory_decay,
                                             write_rate=c.write_rate)
        # 6. writer
        d_xw, d_m_star, dW, db = writer_backward(d_w, d_g, rec.writer, P["writer.W_w.weight"])
        grads["writer.W_w.weight"] += dW
        grads["writer.W_w.bias"] += db
        dM[rows, rec.writer["j_star"]] += d_m_star
        ds_new[0] += d_xw[:, :dims[0]]
        ds_new[K - 1] += d_xw[:, dims[0]:]
        # 5. tiers, top down so each tier's input gradient reaches the tier below first
        d_r = np.zeros((B, c.value_dim), dtype=dtype)
        d_loc = None
        d_e = None
        d_s_prev = [None] * K
        for k in range(K - 1, -1, -1):
            cache = rec.tier_caches[k]
            if cache is None:
                d_s_prev[k] = ds_new[k]
                continue
            pre = f"tiers.cells.{k}."
            d_sp, d_x, g = gru_backward(ds_new[k], cache, P[pre + "W_z.weight"], P[pre + "W_r.weight"],
                                        P[pre + "W_h.weight"])
            for key, val in g.items():  # W_z → W_z.weight, b_z → W_z.bias (the checkpoint's names)
                grads[pre + ("W" + key[1:] + ".weight" if key[0] == "W" else "W" + key[1:] + ".bias")] += val
            d_s_prev[k] = d_sp
            n_in = c.tier_input_dim(k)
            d_r += d_x[:, n_in:]
            if k > 0:
                ds_new[k - 1] += d_x[:, :n_in]
            else:
                d_e = d_x[:, :n_in].copy()
                d_loc = d_x[:, n_in:]
        # 4. read metadata
        d_A = None if d_A_steps is None else d_A_steps[t]
        d_ema_prev, d_alpha = read_meta_backward(d_ema, d_A, rec.idx, c.read_ema_decay)
        # 3. router
        d_u, d_m_sel, d_ema_sel, dWq, dWk, dWv = router_backward(
            d_r, d_alpha, rec.router, P["router.W_q.weight"], P["router.W_k.weight"], P["router.W_v.weight"],
            num_heads=c.num_heads, head_dim=c.head_dim, load_penalty=c.load_penalty)
        grads["router.W_q.weight"] += dWq
        grads["router.W_k.weight"] += dWk
        grads["router.W_v.weight"] += dWv
        np.add.at(dM, (sel_rows, rec.idx), d_m_sel)
        np.add.at(d_ema_prev, (sel_rows, rec.idx), d_ema_sel)
        d_e += d_u[:, :c.embedding_dim]
        d_s_prev[0] = d_s_prev[0] + d_u[:, c.embedding_dim:c.embedding_dim + dims[0]]
        d_s_prev[K - 1] = d_s_prev[K - 1] + d_u[:, c.embedding_dim + dims[0]:]
        # 2. local attention: the rows it read are embeddings n0 + t - n .. n0 + t - 1 of the history
        if rec.local is not None:
            d_el, d_buf, dWq_l, dWk_l, dWv_l = local_attention_backward(
                d_loc, rec.local, P["local_attn.q.weight"], P["local_attn.k.weight"], P["local_attn.v.weight"])
            d_e += d_el
            start = n0 + t + rec.local_start
            d_hist[:, start:n0 + t] += d_buf
            grads["local_attn.q.weight"] += dWq_l
            grads["local_attn.k.weight"] += dWk_l
            grads["local_attn.v.weight"] += dWv_l
        d_e_all[:, t] = d_e
        d_ema, d_s = d_ema_prev, d_s_prev
        del step_t
    # 1. embedding: direct use plus every later read of the token's row in the local buffer
    d_e_all += d_hist[:, n0:]
    grads["embedding.weight"] = embedding_backward(d_e_all, input_ids, c.vocab_size)
    d_buffer0 = np.zeros(initial_state.local_buffer.shape, dtype=dtype)
    d_buffer0[:, :n0] = d_hist[:, :n0]
    d_state = {f"tier_state_{k}": d_s[k] for k in range(K)}
    d_state.update(memory=dM, read_ema=d_ema, local_buffer=d_buffer0)
    return grads, d_state


# ---------------------------------------------------------------------------------------------------
# The model object
# ---------------------------------------------------------------------------------------------------
class THLModel:
    """A THL language model: a config and a dict of parameters (spec §2 names). Stateless: the
    recurrent state is an ``InferenceState`` passed in and returned."""

    def __init__(self, config: THLConfig | None = None, seed: int | None = None, params=None, dtype=None):
        if config is None:
            config = THLConfig()
        if not isinstance(config, THLConfig):
            raise InputError(f"THLModel needs a THLConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = as_dtype(dtype or config.dtype)
        if self.dtype not in (np.float32, np.float64):
            raise InputError(f"dtype {self.dtype} is not supported: use float32 or float64")
        if params is None:
            params = init_params(config, seed=seed, dtype=self.dtype)
        else:
            check_params(config, params)
            params = {k: (v if v.dtype == self.dtype else v.astype(self.dtype)) for k, v in params.items()}
        self.params = params

    # ----------------------------------------------------------------- descriptions
    @property
    def tiers(self) -> TierStack:
        return TierStack(tuple(self.config.tier_dims), tuple(self.config.tier_timescales))

    @property
    def memory_bank(self) -> MemoryBank:
        return MemoryBank(self.config.memory_slots, self.config.memory_dim)

    def weights_key(self) -> tuple:
        """Identifies the current parameter arrays. A decoder cache (derived from the weights) is reused
        only while this is unchanged: optimisers replace arrays, which changes it. After editing a
        parameter array in place, pass states through ``state.copy()`` to drop their caches."""
        return tuple(id(v) for v in self.params.values())

    def num_parameters(self) -> int:
        return num_parameters(self.config)

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.params.values()))

    def init_state(self, batch_size: int = 1) -> InferenceState:
        return InferenceState.init(batch_size, self.config, dtype=self.dtype)

    # ----------------------------------------------------------------- input checks
    def _check_ids(self, input_ids, name="input_ids", ndim=2):
        ids = _as_int_array(input_ids, name)
        if ids.ndim != ndim:
            shape = "[B, T]" if ndim == 2 else "[B]"
            raise InputError(f"{name} must have shape {shape}, got shape {list(ids.shape)}"
                             + (" (wrap a single sequence as ids[None, :])" if ids.ndim == 1 and ndim == 2 else ""))
        if ids.size == 0:
            raise InputError(f"{name} is empty (shape {list(ids.shape)}): give at least one token per sequence")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"{name} holds token id {bad}, outside [0, {self.config.vocab_size - 1}] "
                             f"(vocab_size = {self.config.vocab_size}): encode with a tokenizer that fits the model")
        return ids

    def _prepare_state(self, state, batch_size):
        if state is None:
            return self.init_state(batch_size)
        if not isinstance(state, InferenceState):
            raise StateError(f"state must be an InferenceState, got {type(state).__name__}")
        state.check(self.config, batch_size)
        return state.copy(dtype=self.dtype)

    def _check_gumbel(self, gumbel_uniform, B, T):
        if gumbel_uniform is None:
            return None
        U = np.asarray(gumbel_uniform)
        want = (T, B, self.config.num_heads, self.config.memory_slots)
        if U.shape != want:
            raise InputError(f"gumbel_uniform must have shape [T, B, H, J] = {list(want)}, got {list(U.shape)}")
        # written so that NaN fails too (every comparison with NaN is False)
        if not np.issubdtype(U.dtype, np.floating) or not np.all((U >= 0) & (U < 1)):
            raise InputError("gumbel_uniform must hold floats in [0, 1) (no NaN)")
        return U

    # ----------------------------------------------------------------- forward
    def __call__(self, input_ids, state=None, gumbel_uniform=None, path: str = "auto"):
        """Run input_ids [B, T] from ``state`` (zeros if None) → (logits [B, T, V], the state after T steps).

        ``gumbel_uniform`` [T, B, H, J] of uniforms in [0, 1) selects training-mode routing (spec §4.3),
        which runs on the plain path. ``path`` is "auto" (the fast path where it applies), "fast" or
        "plain" (this file's step, the spec itself); both give the same numbers.
        """
        ids = self._check_ids(input_ids)
        B, T = ids.shape
        U = self._check_gumbel(gumbel_uniform, B, T)
        if self._use_plain(path, U):
            state = self._prepare_state(state, B)
            tier_states, state, _ = run_sequence(self.params, self.config, ids, state, U)
            logits, _, _ = output_forward(self.params, tier_states)
            return logits, state
        decoder = self._decoder(state, B)
        logits = decoder.prompt(ids, logits="all")
        return logits, _state_with_cache(decoder)

    forward = __call__

    def forward_step(self, token_ids, state=None, path: str = "auto"):
        """One step for token_ids [B] (or [B, 1]) → (logits [B, V], next state)."""
        ids = _as_int_array(token_ids, "token_ids")
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        elif ids.ndim == 0:
            ids = ids[None]
        ids = self._check_ids(ids, "token_ids", ndim=1)
        if self._use_plain(path, None):
            state = self._prepare_state(state, ids.shape[0])
            tier_states, state, _ = thl_step(self.params, self.config, ids, state)
            logits, _, _ = output_forward(self.params, tier_states)
            return logits, state
        decoder = self._decoder(state, ids.shape[0])
        logits = decoder.step(ids)
        return logits, _state_with_cache(decoder)

    def decoder(self, state=None, batch_size: int = 1):
        """A mutable fast decoding session (``thl_np.inference.fast.FastDecoder``) starting at ``state``."""
        return self._decoder(state, batch_size if state is None else state.batch_size)

    @staticmethod
    def _use_plain(path, gumbel):
        if path not in ("auto", "fast", "plain"):
            raise InputError(f"path = {path!r}: use 'auto', 'fast' or 'plain'")
        if path == "fast" and gumbel is not None:
            raise InputError("training-mode routing (gumbel_uniform) runs on the plain path: use path='auto'")
        return path == "plain" or gumbel is not None

    def _decoder(self, state, batch_size):
        from .inference.fast import FastDecoder

        if state is None:
            return FastDecoder(self, batch_size=batch_size)
        if not isinstance(state, InferenceState):
            raise StateError(f"state must be an InferenceState, got {type(state).__name__}")
        state.check(self.config, batch_size)
        cached = getattr(state, "_fast", None)
        if cached is not None and cached.model is self and cached.weights_key == self.weights_key():
            # the state's arrays are read-only while it carries a cache, so the cache is still exact;
            # it is handed over (not copied), so a second use of the same state rebuilds it
            state._fast = None
            return cached
        return FastDecoder(self, state=state)

    # ----------------------------------------------------------------- files
    def save_pretrained(self, directory: str, dtype: str | None = None) -> None:
        """Write config.json + model.safetensors (spec §2 names) into ``directory``."""
        from .io.folder import write_model_folder

        config = self.config
        if dtype in ("float32", "float64") and dtype != config.dtype:
            config = config.replace(dtype=dtype)
        write_model_folder(directory, self.params, config,
                           metadata={"format": "thl-np", "format_version": FORMAT_VERSION,
                                     "config": config.to_json()}, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory: str, dtype: str | None = None, verify: bool | None = None) -> THLModel:
        """Load a model folder (config.json + model.safetensors). Weights are memory-mapped (pages are read
        when a step first touches them); with ``dtype`` (float32 | float64) they are cast to that compute
        dtype. ``verify`` checks every weight is finite (WeightsError otherwise): by default only for
        files under 64 MB, since it reads every page; pass True to check a large file too."""
        from .io.safetensors import check_finite, read_safetensors

        directory = as_path(directory, "from_pretrained's directory")
        if not os.path.isdir(directory):
            raise WeightsError(f"no model folder at {directory}: it should hold config.json and model.safetensors")
        config = THLConfig.load(directory)
        path = os.path.join(directory, "model.safetensors")
        if not os.path.exists(path):
            raise WeightsError(f"{path} is missing: a model folder needs model.safetensors next to config.json")
        tensors, _ = read_safetensors(path)
        check_params(config, tensors, source=path)
        if verify or (verify is None and os.path.getsize(path) < VERIFY_BELOW_BYTES):
            check_finite(tensors, source=path)
        compute = dtype or config.dtype
        if compute not in ("float32", "float64"):
            raise InputError(f"dtype {compute!r} is not a compute dtype: use float32 or float64")
        if compute != config.dtype:
            config = config.replace(dtype=compute)
        return cls(config, params=tensors, dtype=compute)

    def __repr__(self):
        c = self.config
        return (f"THLModel({self.num_parameters():,} parameters, V={c.vocab_size}, tiers={c.tier_dims}, "
                f"J={c.memory_slots}, dtype={self.dtype})")


# ---------------------------------------------------------------------------------------------------
# Loss and gradients
# ---------------------------------------------------------------------------------------------------
def value_and_grad(model: THLModel, input_ids, targets, state=None, gumbel_uniform=None, return_state=False,
                   return_state_grad=False, path: str = "auto"):
    """Loss (spec §5: mean cross-entropy over B·T, plus the load-balance term when its weight is non-zero)
    and the exact gradient of every parameter, by back-propagation through all T steps.

    Returns ``(loss, grads)``; with ``return_state=True`` also the final state (to carry into the next
    chunk of truncated BPTT); with ``return_state_grad=True`` also the gradient w.r.t. the initial state.
    ``path``: "auto" / "fast" run ``thl_np.training.fast_grad`` (the same numbers with much less work),
    "plain" runs this file's tape and ``sequence_backward`` (the spec, step by step).
    """
    if path not in ("auto", "fast", "plain"):
        raise InputError(f"path = {path!r}: use 'auto', 'fast' or 'plain'")
    if path != "plain":
        from .training.fast_grad import fast_value_and_grad  # imported here: fast_grad imports this module

        return fast_value_and_grad(model, input_ids, targets, state=state, gumbel_uniform=gumbel_uniform,
                                   return_state=return_state, return_state_grad=return_state_grad)
    ids = model._check_ids(input_ids)
    tg = model._check_ids(targets, name="targets")
    if tg.shape != ids.shape:
        raise InputError(f"targets have shape {list(tg.shape)} but input_ids have {list(ids.shape)}")
    B, T = ids.shape
    U = model._check_gumbel(gumbel_uniform, B, T)
    state0 = model._prepare_state(state, B)
    P, c = model.params, model.config
    tier_states, state_out, tape = run_sequence(P, c, ids, state0, U, record=True)
    loss, d_tiers, head_grads = head_loss_and_backward(P, tier_states.reshape(B * T, -1), tg.reshape(-1))
    d_A_steps = None
    lam = c.router_load_balance_lambda
    if lam:
        d_A_steps = []
        kl_total = 0.0
        for rec in tape:
            kl, d_A = load_balance_forward(rec.A)
            kl_total += kl.sum()
            d_A_steps.append(d_A * (lam / (B * T)))
        loss = loss + lam * kl_total / (B * T)
    grads, d_state = sequence_backward(P, c, tape, d_tiers.reshape(B, T, -1), d_A_steps, ids, state0)
    grads.update(head_grads)
    return pack_value_and_grad(loss, grads, state_out, d_state, return_state, return_state_grad)


def head_loss_and_backward(params, tier_states, targets):
    """Spec §4.8 and §5's cross-entropy over every position at once, as 2-D products: tier states
    [N, Σ d_k] and targets [N] → (mean cross-entropy, d tier states [N, Σ d_k], the gradients of the
    LayerNorm and the output head)."""
    logits, ln_cache, h = output_forward(params, tier_states)
    loss, d_logits = cross_entropy_forward(logits, targets)
    del logits
    d_h, dW_o, db_o = linear_backward(d_logits, h, params["output_head.weight"])
    del d_logits
    d_tiers, d_gamma, d_beta = layer_norm_backward(d_h, ln_cache, params["layer_norm.weight"])
    return loss, d_tiers, {"output_head.weight": dW_o, "output_head.bias": db_o,
                           "layer_norm.weight": d_gamma, "layer_norm.bias": d_beta}


def pack_value_and_grad(loss, grads, state_out, d_state, return_state, return_state_grad):
    """value_and_grad's return value: (loss, grads[, final state][, initial-state gradient])."""
    out = [float(loss), grads]
    if return_state:
        out.append(state_out)
    if return_state_grad:
        out.append(d_state)
    return tuple(out)


def _state_with_cache(decoder) -> InferenceState:
    """The decoder's state as an InferenceState that carries the decoder (its slot-key cache) along, so
    the next step from it starts without rebuilding. Its arrays are made read-only to keep the two in
    agreement; ``state.copy()`` gives a writable state without the cache."""
    state = decoder.state()
    for arr in state.arrays().values():
        if isinstance(arr, np.ndarray) and arr.ndim:
            arr.flags.writeable = False
    state._fast = decoder
    return state


def _as_int_array(x, name):
    """Any array-like of integer token ids (lists, NumPy, a CPU torch tensor) → an int64 array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:
        raise InputError(f"{name} could not be read as an array ({exc})") from None
    if arr.dtype == object:
        raise InputError(f"{name} must be a rectangular array of integer token ids")
    if arr.size == 0 and arr.dtype.kind not in "iu":  # np.asarray([]) is float64: say what is wrong
        raise InputError(f"{name} is empty (shape {list(arr.shape)}): give at least one token per sequence")
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integer token ids, got dtype {arr.dtype}: "
                         "convert with np.asarray(ids, dtype=np.int64)")
    return arr.astype(np.int64, copy=False)


__all__ = ["THLModel", "InferenceState", "value_and_grad", "thl_step", "run_sequence", "param_shapes"]
