"""The fast path: the same function as the plain step (spec §4), computed with less work.

What it does less of, and why that is exact:
- The global decay ``M ← γM`` is a running scalar: the bank is stored divided by ``scale`` and the
  decay costs one multiplication; the stored rows are renormalised before the scalar gets small.
- Router scores are ``m_j·(W_k,h^T q_h)``: the query is mapped into memory space once per head, so no
  slot keys are computed at all (see ``thl_np.components.router.slot_scores``).
- Slot norms are cached (squared norms of the stored rows), updated only where a step writes.
- Values are projected only for what is read: ``r_h = W_v,h (Σ_rank α m_idx)``, one product per head.
- The local buffer keeps its keys and values (``E Wk^T``, ``E Wv^T``) in a ring, computed once per token.
- The output head runs only where logits are asked for, once over all positions of a prompt.
- A step's products have few rows (the batch): they run in Numba kernels that stream each weight once
  for the whole batch (``linear``), on Numba's thread pool alone: up to SMALL_BATCH sequences a step
  makes no BLAS call (see ``thl_np.fast.linalg`` for why), above it OpenBLAS runs on one thread.
  For 2..SMALL_BATCH sequences the output head runs on a copy of its weights packed in tiles
  (``thl_np.fast.linalg.packed_linear``), built on first use and kept on the model: a second V·d array
  (463 MB for the default config in float32); ``packed_head=False`` does without. For 2..PACK_ROWS
  sequences the step's other matrices run on packed copies too (built when such a batch is first loaded,
  kept on the model like the head's: 42 MB for the default config).

For a small float model (``thl_np.engines.compiled_steps``: at most MAX_STEP_PARAMETERS in the step's
products) ``prompt`` and ``step`` run the same composition, with the same kernels, as one compiled call
(``compiled_steps.run_steps``) on the session's arrays: a prompt without Python per byte. ``_advance``
below is the composition kernel by kernel, for larger and quantized models.

``FastDecoder`` owns a mutable state and steps it in place (no per-step allocation of large arrays);
``state()`` / ``load()`` convert to and from the spec's ``InferenceState``. Training-mode routing
(Gumbel noise) and the tape for gradients stay on the plain path.

The functional API (``model.forward_step(ids, state) → (logits, state)``) runs at the session's speed
without copying the state out each step: the state it returns holds the session that computed it
(``InferenceState.held_by``), which is not stepped again while that state lives; the next step runs on
the session's ``successor()``, a second session (the spare) brought up to date by copying only what one
step changed (``sync_from``): the tier states, the [B, J] EMAs and step numbers, the bank rows written and
the ring's new row, ~1% of the state for the default config. In a chain ``state = forward_step(ids,
state)`` the two sessions alternate; a state stepped from twice (a branch) costs one copy.

Threads: a step runs its kernels on ``self.threads.count`` threads (``thl_np._threads``: one for a step too
small to gain from more, and only the cores other processes leave idle).
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref

import numpy as np

from .._blas import blas_threads
from .._threads import StepThreads
from ..checks import as_int_array
from ..components.output import layer_norm_forward
from ..components.registry import components_for, has_fast_path, key_rule
from ..errors import InputError
from ..fast import gru, int8, linalg, local_attention, primitives, router, writer
from ..fast.linalg import SMALL_BATCH, linear
from ..state import InferenceState
from . import compiled_steps

RENORM_BELOW = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-6}
# the arrays that hold a session's state (with the scalars t, scale, ring_start and ring_n)
STATE_ARRAYS = ("S", "memory", "norm2", "read_ema", "write_ema", "last_read", "last_write", "ring_e", "ring_k",
                "ring_v")
_VERSIONS = itertools.count(1)  # a session's state is tagged with a number that changes at each step


class FastDecoder:
    """A decoding session over ``model``: ``step(ids)`` advances every sequence by one token in place.

    >>> dec = FastDecoder(model, batch_size=1)
    >>> logits = dec.prompt(ids[None, :], logits="last")   # [1, V]
    >>> logits = dec.step([next_id])                         # [1, V]
    >>> state = dec.state()                                  # an InferenceState (spec §3)
    """

    def __init__(self, model, state: InferenceState | None = None, batch_size: int = 1, renorm_below=None,
                 packed_head: bool = True, checked: bool = False):
        if not has_fast_path(model.config):
            raise InputError(f"FastDecoder has no kernels for the component variant(s) "
                             f"{components_for(model.config).without_kernels()}: use model.decoder(), which runs them "
                             "on the plain path")
        self.model = model
        self.key_rule = key_rule(model.config)
        self.packed_head = packed_head
        self.weights_key = model.weights_key()
        c = self.config = model.config
        P = model.params
        dt = self.dtype = model.dtype
        self.renorm_below = RENORM_BELOW[dt] if renorm_below is None else float(renorm_below)
        H = c.num_heads
        # a quantized model's matrices stay int8 (thl_np.fast.int8.Q8Matrix, its own kernels behind linear)
        w = functools.partial(int8.decoder_weight, P)
        self.emb = w("embedding.weight")
        # the local attention's q, k and v of a token in one product
        self.W_qkv = int8.concat_rows([w("local_attn.q.weight"), w("local_attn.k.weight"),
                                        w("local_attn.v.weight")], dt)
        self.lk = w("local_attn.k.weight")
        self.lv = w("local_attn.v.weight")
        self.W_q = w("router.W_q.weight")
        # per head: q_mem_h = W_k,h^T q_h as a product with the rows of W_k,h^T; r_h = W_v,h mix_h
        self.W_k_heads_T = int8.heads_transposed(w("router.W_k.weight"), H)
        self.W_v_heads = int8.heads(w("router.W_v.weight"), H)
        # update and reset gates read the same input: one product for both
        self.W_zr = [int8.concat_rows([w(f"tiers.cells.{k}.W_z.weight"), w(f"tiers.cells.{k}.W_r.weight")], dt)
                     for k in range(c.num_tiers)]
        self.b_zr = [np.concatenate([P[f"tiers.cells.{k}.W_z.bias"], P[f"tiers.cells.{k}.W_r.bias"]])
                     for k in range(c.num_tiers)]
        self.W_h = [w(f"tiers.cells.{k}.W_h.weight") for k in range(c.num_tiers)]
        self.b_h = [P[f"tiers.cells.{k}.W_h.bias"] for k in range(c.num_tiers)]
        self.W_w = w("writer.W_w.weight")
        self.b_w = P["writer.W_w.bias"]
        self.ln_w = P["layer_norm.weight"]
        self.ln_b = P["layer_norm.bias"]
        self.W_o = w("output_head.weight", packed=packed_head)
        self.b_o = P["output_head.bias"]
        self.zeros = np.zeros(max(self.W_qkv.shape[0], self.W_q.shape[0]), dt)  # the bias of bias-free products
        self.offsets = np.cumsum([0] + list(c.tier_dims)).tolist()
        # a small float model's whole step in one compiled call (thl_np.engines.compiled_steps), else None
        self._compiled = compiled_steps.prepare(self)
        self.load(state if state is not None else InferenceState.init(batch_size, c, dtype=dt),
                  checked=checked or state is None)

    # ------------------------------------------------------------------ state conversion
    def load(self, state: InferenceState, checked: bool = False) -> None:
        """Take ``state`` (copied, never modified) as the session's state and build the caches.
        ``checked``: the caller has just run ``state.check(config)``."""
        c, dt = self.config, self.dtype
        if not checked:
            state.check(c)
        B, J, H = state.batch_size, c.memory_slots, c.num_heads
        self.B = B
        self.t = int(state.timestep)
        self.S = np.ascontiguousarray(np.concatenate([np.asarray(s, dt) for s in state.tiers], axis=1))
        self.memory = np.array(state.memory, dtype=dt)
        self.scale = 1.0
        self.norm2 = np.empty((B, J), dt)
        primitives.row_norms2(self.memory, self.norm2)
        self.read_ema = np.array(state.read_ema, dtype=dt)
        self.write_ema = np.array(state.write_ema, dtype=dt)
        self.last_read = np.array(state.last_read, dtype=np.int64)
        self.last_write = np.array(state.last_write, dtype=np.int64)
        self.ring_e = np.array(state.local_buffer, dtype=dt)
        self.ring_start = 0
        self.ring_n = int(state.local_valid)
        if self.ring_n:
            self.ring_k = int8.times_transposed(self.ring_e, self.lk, dt)
            self.ring_v = int8.times_transposed(self.ring_e, self.lv, dt)
        else:  # an empty window (a new session): no rows are read before the steps write them, and no BLAS
            # call (its threads, spinning on a busy machine, made a new session take 30 ms instead of 2)
            self.ring_k = np.zeros(self.ring_e.shape[:2] + (self.lk.shape[0],), dt)
            self.ring_v = np.zeros(self.ring_e.shape[:2] + (self.lv.shape[0],), dt)
        # per-step scratch, allocated once (the per-head products read and write head-major blocks)
        self._q_mem_heads = np.empty((H, B, c.memory_dim), dt)
        self._mix = np.empty((B, H, c.memory_dim), dt)
        self._r_heads = np.empty((H, B, c.value_dim // H), dt)
        self._idx = np.empty((B, H, c.read_topk), np.int64)
        self._alpha = np.empty((B, H, c.read_topk), dt)
        self._loc = np.zeros((B, c.value_dim), dt)
        self._targets = np.empty((B, c.write_slots), np.int64)
        self._g = np.empty(B, dt)
        self._novel = np.empty(B, np.bool_)   # the writer's branch of the last step (memory diagnostics)
        self._mats = self._step_matrices(B)
        self.threads = StepThreads(self._step_bytes())
        self._new_version()

    def _step_bytes(self) -> int:
        """What sets a step's threads (thl_np._threads.BYTES_PER_THREAD): the weights it streams, counted
        twice for a batch of 2 or more (more arithmetic per byte), and the banks it scans twice."""
        weights = [self.W_qkv, self.W_q, self.W_k_heads_T, self.W_v_heads, self.W_w, self.W_o, *self.W_zr, *self.W_h]
        total = 0
        for W in weights:
            shape = getattr(W, "shape", None)
            if shape is not None:
                total += math.prod(shape) * (W.dtype.itemsize if isinstance(W, np.ndarray) else 1)
        return total * min(self.B, 2) + 2 * self.memory.nbytes

    def _step_matrices(self, B: int) -> dict:
        """The matrices of a step's products, by name: packed copies (linalg.PackedMatrix) for 2..PACK_ROWS
        sequences of a float model, where they stream each weight once without horizontal sums; else the
        weights as they are (a quantized model's Q8Matrix picks its own kernel)."""
        mats = {"qkv": self.W_qkv, "q": self.W_q, "w": self.W_w}
        mats.update({f"zr{k}": W for k, W in enumerate(self.W_zr)})
        mats.update({f"h{k}": W for k, W in enumerate(self.W_h)})
        if not (1 < B <= linalg.PACK_ROWS and self.packed_head):
            return mats
        # kept on the model, like the packed head, for as long as its parameter arrays are these (the
        # cache holds them, so their ids cannot be reused while it stands)
        cached = getattr(self.model, "_packed_step_matrices", None)
        if cached is None or cached[0] != self.weights_key:
            cached = self.model._packed_step_matrices = (self.weights_key, {}, list(self.model.params.values()))
        packed = cached[1]
        for name, W in mats.items():
            if isinstance(W, np.ndarray):
                if name not in packed:
                    packed[name] = linalg.PackedMatrix(W)
                mats[name] = packed[name]
        return mats

    def state(self) -> InferenceState:
        """The session's state as a spec §3 ``InferenceState`` (a copy: the session may go on)."""
        c = self.config
        buf = np.roll(self.ring_e, -self.ring_start, axis=1) if self.ring_start else self.ring_e.copy()
        return InferenceState(
            timestep=self.t,
            tiers=[self.S[:, a:b].copy() for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)],
            memory=self.memory * self.dtype.type(self.scale),
            read_ema=self.read_ema.copy(), write_ema=self.write_ema.copy(),
            last_read=self.last_read.copy(), last_write=self.last_write.copy(),
            local_buffer=buf, local_valid=self.ring_n if c.local_window else 0)

    def clone(self) -> FastDecoder:
        """An independent copy of the session (the caches included, so no rebuild)."""
        new = object.__new__(FastDecoder)
        new.__dict__.update(self.__dict__)
        for name, value in self.__dict__.items():
            if isinstance(value, np.ndarray) and name not in _SHARED_WEIGHTS:
                setattr(new, name, value.copy())
        new._new_version()
        return new

    # ------------------------------------------------------------------ the functional API's hand-over
    def _new_version(self) -> None:
        """A state no other session is known to share (after loading, cloning, a prompt)."""
        self._version, self._prev_version, self._prev_t = next(_VERSIONS), None, -1
        self._owner = self._spare = None

    def held_by(self, state) -> None:
        """``state`` (an InferenceState, or None) now holds this session as its value: the session is not
        stepped or synced while that state lives (``owned``)."""
        self._owner = None if state is None else weakref.ref(state)

    @property
    def owned(self) -> bool:
        return self._owner is not None and self._owner() is not None

    def begin_steps(self) -> tuple:
        """Call before stepping a session that states may share: returns the tag of its state and gives it
        a new one, so that no other session (or a failed step) is taken for this state. After exactly
        one ``step``, pass the tag to ``stepped_once``."""
        before = (self._version, self.t)
        self._version, self._prev_version, self._prev_t = next(_VERSIONS), None, -1
        return before

    def stepped_once(self, before: tuple) -> None:
        """Record that this session took exactly one step from the state tagged ``before``, so that its
        successor can copy only what that step changed."""
        self._prev_version, self._prev_t = before

    def successor(self, link: bool = True) -> FastDecoder:
        """A session at this session's state that may be stepped while this one stays as it is. The spare
        left by the previous call is reused when no state holds it any more (``sync_from``, usually a
        copy of one step's changes), else this session is cloned. With ``link``, this session becomes the
        new one's spare (a chain of steps alternates between two sessions); a session handed to a user
        (``model.decoder``) is not linked."""
        spare, self._spare = self._spare, None
        if (spare is None or spare.owned or spare.model is not self.model or spare.B != self.B
                or spare.weights_key != self.weights_key):
            spare = self.clone()
        else:
            spare.sync_from(self)
        spare._spare = self if link else None
        spare._owner = None
        return spare

    def sync_from(self, src: FastDecoder) -> None:
        """Make this session's state equal to ``src``'s (same model and batch), in place, caches included.
        When this session holds the state ``src`` took its last single step from, only what that step
        changed is copied: the tier states, the [B, J] EMAs and step numbers, the bank rows written (and
        their squared norms), the ring's new row; else every state array."""
        c = self.config
        one_step = (src._prev_version is not None and self._version == src._prev_version
                    and self.t == src._prev_t == src.t - 1 and c.memory_decay >= writer.MIN_DECAY
                    and src.scale == self.scale * c.memory_decay)  # a renormalised bank changed every row
        if one_step:
            for name in ("S", "read_ema", "write_ema", "last_read", "last_write"):
                np.copyto(getattr(self, name), getattr(src, name))
            rows = (np.arange(self.B)[:, None], src._targets)
            self.memory[rows] = src.memory[rows]
            self.norm2[rows] = src.norm2[rows]
            W = c.local_window
            if W:
                pos = (self.ring_start + self.ring_n) % W if self.ring_n < W else self.ring_start
                for name in ("ring_e", "ring_k", "ring_v"):
                    getattr(self, name)[:, pos] = getattr(src, name)[:, pos]
        else:
            for name in STATE_ARRAYS:
                np.copyto(getattr(self, name), getattr(src, name))
        self.t, self.scale, self.ring_start, self.ring_n = src.t, src.scale, src.ring_start, src.ring_n
        self._version, self._prev_version, self._prev_t = src._version, src._prev_version, src._prev_t

    # ------------------------------------------------------------------ stepping
    def advance(self, token_ids) -> np.ndarray:
        """Steps 1-7 and 9 of spec §4 for token ids [B]; returns the tier states [B, Σ d_k] (a view)."""
        ids = self._ids(token_ids, 1)
        with self.threads.applied():
            if self._compiled is not None:
                return compiled_steps.advance(self, ids[:, None])
            if self.B <= SMALL_BATCH:
                return self._advance(ids)  # every product in the Numba kernels: no BLAS call
            with blas_threads(1):
                return self._advance(ids)

    def _ids(self, token_ids, ndim: int) -> np.ndarray:
        """Token ids checked as the model checks its own (integers, in the vocabulary, [B] or [B, T]),
        for this session's batch."""
        name = "token_ids" if ndim == 1 else "input_ids"
        ids = as_int_array(token_ids, name)
        if ndim == 1 and ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        elif ndim == 1 and ids.ndim == 0:
            ids = ids[None]
        ids = self.model._check_ids(ids, name, ndim=ndim)
        if ids.shape[0] != self.B:
            raise InputError(f"{name} holds {ids.shape[0]} sequence(s) but this decoding session steps {self.B}: "
                             f"give one row per sequence, or start a session with batch_size={ids.shape[0]}")
        return ids

    def _advance(self, ids) -> np.ndarray:
        c = self.config
        t = self.t
        H, d_h, zeros = c.num_heads, c.head_dim, self.zeros
        e = int8.rows(self.emb, ids, self.dtype)
        # 2. local attention over the ring, then the ring takes e
        W = c.local_window
        if W > 0:
            d_q = c.query_dim
            qkv = linear(e, self._mats["qkv"], zeros[:self.W_qkv.shape[0]])
            n = self.ring_n
            if n > 0:
                local_attention.local_attend(np.ascontiguousarray(qkv[:, :d_q]), self.ring_k, self.ring_v,
                                             self.ring_start, n, 1.0 / math.sqrt(d_q), self._loc)
            else:
                self._loc[:] = 0
            if n < W:
                pos = (self.ring_start + n) % W
                self.ring_n = n + 1
            else:
                pos = self.ring_start
                self.ring_start = (self.ring_start + 1) % W
            self.ring_e[:, pos] = e
            self.ring_k[:, pos] = qkv[:, d_q:2 * d_q]
            self.ring_v[:, pos] = qkv[:, 2 * d_q:]
        # 3-4. router read and read metadata
        o = self.offsets
        u = np.concatenate([e, self.S[:, :o[1]], self.S[:, o[-2]:]], axis=1)
        q = linear(u, self._mats["q"], zeros[:self.W_q.shape[0]])
        q_heads = np.ascontiguousarray(q.reshape(self.B, H, d_h).transpose(1, 0, 2))            # [H, B, d_h]
        int8.per_head(q_heads, self.W_k_heads_T, self._q_mem_heads)                             # [H, B, d_m]
        q_mem = np.ascontiguousarray(self._q_mem_heads.transpose(1, 0, 2))                       # [B, H, d_m]
        route = router.route if self.B == 1 else router.route_parallel
        route(q_mem, self.scale, self.read_ema, self.last_read, self.memory, t, c.load_penalty, 1.0 / math.sqrt(d_h),
              c.read_topk, c.read_slot_capacity or 0, c.read_ema_decay, self.key_rule, self._mix, self._idx,
              self._alpha)
        int8.per_head(np.ascontiguousarray(self._mix.transpose(1, 0, 2)), self.W_v_heads, self._r_heads)
        r = self._r_heads.transpose(1, 0, 2).reshape(self.B, c.value_dim)
        # 5. tiers under their clocks
        lower = e
        for k in range(c.num_tiers):
            if t % c.tier_timescales[k] == 0:
                d = o[k + 1] - o[k]
                ctx = r + self._loc if k == 0 else r
                p = np.concatenate([self.S[:, o[k]:o[k + 1]], lower, ctx], axis=1)
                zr = linear(p, self._mats[f"zr{k}"], self.b_zr[k])
                gru.gru_reset(zr, p, d)
                gru.gru_update(self.S, o[k], zr, linear(p, self._mats[f"h{k}"], self.b_h[k]))
            lower = self.S[:, o[k]:o[k + 1]]
        # 6-7. writer, memory decay (lazy) and write
        x_w = np.concatenate([self.S[:, :o[1]], self.S[:, o[-2]:]], axis=1)
        w_raw = linear(x_w, self._mats["w"], self.b_w)
        write = writer.write if self.B == 1 else writer.write_parallel
        self.scale = write(
            w_raw, self.memory, self.norm2, self.scale, self.read_ema, self.write_ema,
            self.last_write, t, c.write_slots, c.write_clip_max, c.novelty_beta, c.novelty_theta, c.stale_weight,
            c.underuse_weight, c.memory_decay, c.write_rate, c.write_ema_decay, self._targets, self._g,
            self._novel)
        if self.scale < self.renorm_below:
            self._renormalise()
        self.t = t + 1
        return self.S

    def _renormalise(self) -> None:
        self.memory *= self.dtype.type(self.scale)
        primitives.row_norms2(self.memory, self.norm2)
        self.scale = 1.0

    def logits(self, tier_states: np.ndarray) -> np.ndarray:
        """Spec §4.8 over any leading shape: LayerNorm then the output head."""
        h, _ = layer_norm_forward(tier_states, self.ln_w, self.ln_b)
        flat = np.ascontiguousarray(h.reshape(-1, h.shape[-1]))
        n = flat.shape[0]
        with self.threads.applied() as threads:
            if self._compiled is not None:  # a small model: one thread, each row's bits alone (compiled_steps.head)
                out = compiled_steps.head(self, flat)
            elif n > 1 and n <= SMALL_BATCH and self.packed_head and isinstance(self.W_o, np.ndarray):
                out = self._head_batch(flat)
            elif n <= SMALL_BATCH:
                out = linear(flat, self.W_o, self.b_o)  # one row: linalg.gemv
            else:
                with blas_threads(threads):  # a prompt's positions: BLAS GEMM, on the step's threads
                    out = linear(flat, self.W_o, self.b_o)
        return out.reshape(h.shape[:-1] + (self.W_o.shape[0],))

    def _head_batch(self, h: np.ndarray) -> np.ndarray:
        """The head for 2..SMALL_BATCH rows, on the packed copy of its weights (linalg.packed_linear)."""
        return self._packed_head().linear(h, self.b_o)

    def _packed_head(self) -> linalg.PackedMatrix:
        """The output head packed for linalg.packed_linear: built once per weight array and kept on the
        model (it is a second copy of the head: V·d values, 463 MB for the default config in float32)."""
        cached = getattr(self.model, "_packed_output_head", None)
        if cached is None or cached[0] is not self.W_o:
            cached = self.model._packed_output_head = (self.W_o, linalg.PackedMatrix(self.W_o))
        return cached[1]

    def step(self, token_ids, want_logits: bool = True):
        """One token per sequence → logits [B, V] (or None with want_logits=False)."""
        S = self.advance(token_ids)
        return self.logits(S) if want_logits else None

    def prompt(self, input_ids, logits: str = "all"):
        """Consume input_ids [B, T]; logits "all" → [B, T, V], "last" → [B, V], "none" → None.
        The recurrence runs step by step; the head runs once over the positions asked for."""
        if logits not in ("all", "last", "none"):
            raise InputError(f"logits = {logits!r}: use 'all', 'last' or 'none'")
        ids = self._ids(input_ids, 2)
        B, T = ids.shape
        if self._compiled is not None:  # the whole prompt in one compiled call
            hidden = np.empty((B, T, self.S.shape[1]), self.dtype) if logits == "all" else None
            S = compiled_steps.advance(self, ids, hidden)
            return None if logits == "none" else self.logits(hidden if logits == "all" else S)
        if logits == "all":
            hidden = np.empty((B, T, self.S.shape[1]), self.dtype)
            for t in range(T):
                hidden[:, t] = self.advance(ids[:, t])
            return self.logits(hidden)
        for t in range(T):
            self.advance(ids[:, t])
        return self.logits(self.S) if logits == "last" else None


# weights (and views of them) that a clone shares with its original instead of copying
_SHARED_WEIGHTS = {"emb", "W_qkv", "lk", "lv", "W_q", "W_k_heads_T", "W_v_heads", "W_w", "b_w", "ln_w", "ln_b",
                   "W_o", "b_o", "zeros"}
