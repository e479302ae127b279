"""The layered inference engine: one spec §4 step on a device with less memory than the model.

The engine owns a plan (``plan.py``), the resident weights, the streamer (``stream.py``) and a backend
(``backends/``); it checks tokens and states, moves states on and off the device, re-plans for a larger
batch and keeps the stats. The step itself is the plain path's ``thl_np.step.thl_step``, with the
weights streamed into it (``weights.py``), then §4.8's LayerNorm and the output head, chunk by chunk.
"""
from __future__ import annotations

import time

import numpy as np

from ...checks import as_int_array
from ...components.output import layer_norm_forward
from ...config import THLConfig
from ...errors import InputError, StateError
from ...state import InferenceState
from ...step import thl_step
from .backends import make_backend
from .plan import LayeredPlan, plan_layers
from .storage import head_linear, stored_tensors, tensor_layout
from .stream import Streamer
from .units import format_bytes, parse_bytes
from .weights import StreamedWeights


class LayeredInferenceEngine:
    """Spec §4 steps of ``model`` on ``device`` ("cpu" or "cuda") within ``vram_budget`` bytes.

    ``vram_budget``: bytes (int) or a string such as "64MB", "4GB", "512MiB"; None takes all free device
    memory (CPU: the available RAM). ``batch_size``: the batch the first plan is made for (a larger
    batch later re-plans). ``overlap``: copy the next
    streamed piece on a worker thread while the current one computes. ``extra_states``: how many device
    states the caller keeps besides the one being stepped (interleaved sessions); the plan leaves room.
    """

    def __init__(self, model, device: str = "cpu", vram_budget=None, *, batch_size: int = 1,
                 overlap: bool = True, extra_states: int = 0):
        if not (hasattr(model, "params") and isinstance(getattr(model, "config", None), THLConfig)):
            raise InputError(f"LayeredInferenceEngine needs a THLModel, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size = {batch_size!r} must be a positive integer")
        if (isinstance(extra_states, bool) or not isinstance(extra_states, (int, np.integer))
                or extra_states < 0):
            raise InputError(f"extra_states = {extra_states!r} must be an integer >= 0")
        self.extra_states = int(extra_states)
        self.model = model
        self.config = model.config
        self.dtype = np.dtype(model.dtype)
        self._stored = stored_tensors(model.params)   # what moves: float weights, or int8 values and scales
        budget = None if vram_budget is None else parse_bytes(vram_budget)
        self.device = device
        self.backend = make_backend(device, budget, overlap=overlap)
        self.budget = self.backend.budget
        self._plan: LayeredPlan | None = None
        self._resident: dict = {}
        self._streamer: Streamer | None = None
        self.stats = dict(steps=0, tokens=0, bytes_streamed=0, last_step_bytes_streamed=0,
                          bytes_prefetch_wasted=0, copy_wait_seconds=0.0, step_seconds=0.0)
        try:
            self._replan(int(batch_size))
        except BaseException:
            self.backend.close()
            raise

    # ----------------------------------------------------------------- planning
    @staticmethod
    def minimum_budget(model, batch_size: int = 1, device: str = "cpu", extra_states: int = 0) -> int:
        """The smallest vram_budget (bytes) with which ``model`` steps a batch of ``batch_size``."""
        layout = tensor_layout(model.config, model.dtype, model.params)
        return plan_layers(model.config, 1 << 62, batch_size, model.dtype, device, None, extra_states,
                           layout=layout).minimum_budget

    def plan(self, batch_size: int | None = None) -> LayeredPlan:
        """The plan in use (``print(engine.plan())`` describes it), or the plan a batch would get."""
        if batch_size is None or int(batch_size) == self._plan.batch_size:
            return self._plan
        return plan_layers(self.config, self.budget, int(batch_size), self.dtype, self.backend.profile.device,
                           None, self.extra_states, layout=self._layout())

    def describe(self) -> str:
        return self._plan.describe(self._stored) + f"\n  backend: {self.backend.describe()}"

    def _layout(self):
        return tensor_layout(self.config, self.dtype, self.model.params)

    def _replan(self, batch_size: int):
        plan = plan_layers(self.config, self.budget, batch_size, self.dtype, self.backend.profile.device,
                           None, self.extra_states, layout=self._layout())
        if self._streamer is not None:
            self._streamer.abort()
        self._resident, self._streamer = {}, None   # the old buffers go back to the pool
        P = self._stored
        be = self.backend
        with be.activate():
            if plan.num_slots:
                self._streamer = Streamer(be, P, plan.slot_bytes)
            for m in plan.modules:
                if m.resident and m.has_weights:
                    self._resident[m.name] = {p: be.asarray(P[p], what=f"resident weight {p}")
                                              for p in m.params}
        self._plan = plan

    # ----------------------------------------------------------------- accounting
    @property
    def peak_device_bytes(self) -> int:
        """The most device bytes in use at any moment since the engine was made (or reset_peak)."""
        return self.backend.peak_bytes

    @property
    def device_bytes(self) -> int:
        """Device bytes in use now (resident weights, slots, and device states still referenced)."""
        return self.backend.current_bytes

    def reset_peak(self) -> None:
        self.backend.reset_peak()

    # ----------------------------------------------------------------- inputs
    def _token_ids(self, token) -> np.ndarray:
        if self.backend.device == "cuda" and not isinstance(token, np.ndarray) and hasattr(token, "get") \
                and hasattr(token, "device"):
            token = token.get()   # a CuPy array of ids
        ids = as_int_array(token, "token")
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        elif ids.ndim == 0:
            ids = ids[None]
        if ids.ndim != 1:
            raise InputError(f"token must have shape [B] or [B, 1] (one token per sequence), got shape "
                             f"{list(ids.shape)}")
        if ids.size == 0:
            raise InputError("token is empty: give one token id per sequence")
        V = self.config.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise InputError(f"token holds id {bad}, outside [0, {V - 1}] (vocab_size = {V}): encode with a "
                             "tokenizer that fits the model")
        return ids

    def _expected_shapes(self, B: int) -> dict:
        c = self.config
        J = c.memory_slots
        shapes = {f"tier_state_{k}": (B, d) for k, d in enumerate(c.tier_dims)}
        shapes.update(memory=(B, J, c.memory_dim), read_ema=(B, J), write_ema=(B, J), last_read=(B, J),
                      last_write=(B, J), local_buffer=(B, c.local_window, c.embedding_dim))
        return shapes

    def _check_state(self, state, B: int) -> None:
        if not isinstance(state, InferenceState):
            raise StateError("state must be an InferenceState (InferenceState.init(batch_size=..., "
                             f"config=...)), got {type(state).__name__}")
        c = self.config
        if len(state.tiers) != c.num_tiers:
            raise StateError(f"the state has {len(state.tiers)} tier(s) but the model has {c.num_tiers}: it "
                             "was made for another config")
        Bs = state.memory.shape[0] if getattr(state.memory, "ndim", 0) == 3 else None
        if Bs is not None and Bs != B:
            raise StateError(f"the state holds {Bs} sequence(s) but the token has batch size {B}: use "
                             f"InferenceState.init(batch_size={B}, config=...) or a state from a batch-{B} "
                             "run")
        got = {f"tier_state_{k}": s for k, s in enumerate(state.tiers)}
        got.update(memory=state.memory, read_ema=state.read_ema, write_ema=state.write_ema,
                   last_read=state.last_read, last_write=state.last_write, local_buffer=state.local_buffer)
        for key, want in self._expected_shapes(B).items():
            shape = tuple(getattr(got[key], "shape", ()))
            if shape != want:
                raise StateError(f"state {key} has shape {list(shape)}, the model needs {list(want)}: the "
                                 "state was made for another config")
        state.check(c, B)  # counters, dtypes, finite values: the one state check every path makes

    def _state_to_device(self, state, B: int) -> InferenceState:
        be = self.backend
        if state is None:
            state = InferenceState.init(B, self.config, dtype=self.dtype)
        self._check_state(state, B)

        def dev(a, dtype):
            if be.owns(a) and a.dtype == dtype:
                return a
            return be.asarray(a if be.owns(a) else np.asarray(a), dtype=dtype, what="the input state")

        dt = self.dtype
        i64 = np.dtype(np.int64)
        return InferenceState(
            timestep=int(state.timestep), tiers=[dev(s, dt) for s in state.tiers],
            memory=dev(state.memory, dt),
            read_ema=dev(state.read_ema, dt), write_ema=dev(state.write_ema, dt),
            last_read=dev(state.last_read, i64), last_write=dev(state.last_write, i64),
            local_buffer=dev(state.local_buffer, dt), local_valid=int(state.local_valid))

    def state_to_host(self, state: InferenceState) -> InferenceState:
        """A copy of a (device) state as NumPy arrays, e.g. to save it; device memory is not kept."""
        h = self.backend.to_host
        return InferenceState(
            timestep=int(state.timestep), tiers=[h(s) for s in state.tiers], memory=h(state.memory),
            read_ema=h(state.read_ema), write_ema=h(state.write_ema), last_read=h(state.last_read),
            last_write=h(state.last_write), local_buffer=h(state.local_buffer),
            local_valid=int(state.local_valid))

    def state_to_device(self, state: InferenceState) -> InferenceState:
        """A device copy of a host state (``step`` does this itself for a state it was not given back)."""
        B = int(np.shape(state.memory)[0])
        with self.backend.activate():
            return self._state_to_device(state, B)

    # ----------------------------------------------------------------- the step
    def _weights(self, module: str) -> dict:
        res = self._resident.get(module)
        if res is not None:
            return res
        return self._streamer.acquire(module)

    def _done(self, module: str) -> None:
        if module not in self._resident:
            self._streamer.release()

    def step(self, token, state: InferenceState | None = None):
        """One spec §4 step: token ids [B] or [B, 1] and a state → (logits [B, V], a NumPy array; next state).

        The input state is not modified; the next state's arrays live on the device (on "cpu" they are
        NumPy arrays). ``state=None`` starts from the all-zero state.
        """
        ids = self._token_ids(token)
        B = int(ids.shape[0])
        if B > self._plan.batch_size:
            self._replan(B)
        t0 = time.perf_counter()
        wait0 = self._streamer.wait_seconds if self._streamer else 0.0
        copied0 = self._streamer.bytes_copied if self._streamer else 0
        try:
            with self.backend.activate():
                self.backend.begin_step()
                logits, state = self._step(ids, state)
        except BaseException:
            if self._streamer is not None:
                self._streamer.abort()
            raise
        st = self.stats
        st["steps"] += 1
        st["tokens"] += B
        st["step_seconds"] += time.perf_counter() - t0
        if self._streamer is not None:
            st["copy_wait_seconds"] += self._streamer.wait_seconds - wait0
            st["bytes_streamed"] = self._streamer.bytes_copied
            st["last_step_bytes_streamed"] = self._streamer.bytes_copied - copied0
            st["bytes_prefetch_wasted"] = self._streamer.bytes_wasted
        return logits, state

    __call__ = step

    def _step(self, ids: np.ndarray, state):
        c, plan, be = self.config, self._plan, self.backend
        st = self._state_to_device(state, int(ids.shape[0]))
        if self._streamer is not None:
            self._streamer.begin(self._queue(int(st.timestep), int(st.local_valid)))
        weights = StreamedWeights(self)
        tier_states, next_state, _ = thl_step(weights, c, ids, st)       # spec §4 steps 1-7 and 9
        weights.keep(tier_states)
        # 8. output: LayerNorm over [s^0; …; s^{K-1}], then the head (whole, or chunk by chunk)
        with weights.module("layer_norm") as W:
            h, _ = layer_norm_forward(tier_states, W["layer_norm.weight"], W["layer_norm.bias"])
        weights.keep(h)
        del tier_states
        with be.workspace(weights.workspace["output_head"]):
            block = c.quantization["block_size"] if c.quantization else None
            if "output_head" in self._resident:
                logits = head_linear(h, self._resident["output_head"], self.dtype, block)
            else:
                logits = be.xp.empty((h.shape[0], c.vocab_size), dtype=h.dtype)
                for a, b in plan.head_chunks:
                    W = self._streamer.acquire("output_head")
                    head_linear(h, W, self.dtype, block, out=logits[:, a:b])
                    del W
                    self._streamer.release()
            del h
        weights.keep(logits)
        logits_host = be.to_host(logits)
        del logits
        if self._streamer is not None:
            self._streamer.end_step(self._queue(int(next_state.timestep), int(next_state.local_valid)))
        return logits_host, next_state

    def _queue(self, t: int, n: int) -> list:
        plan, P = self._plan, self._stored
        return [p for name in plan.needed(t, n) if not plan.module(name).resident
                for p in plan.pieces(name, P)]

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the copy thread and drop the device buffers (the engine cannot step afterwards)."""
        if self._streamer is not None:
            self._streamer.abort()
        self._resident, self._streamer = {}, None
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        p = self._plan
        return (f"LayeredInferenceEngine(device={self.device!r}, budget={format_bytes(self.budget)}, "
                f"resident={[m.name for m in p.modules if m.resident and m.has_weights]}, "
                f"streamed={p.streamed}, "
                f"peak={format_bytes(self.peak_device_bytes)})")
