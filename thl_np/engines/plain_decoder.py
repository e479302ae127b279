"""A decoding session on the plain path: ``FastDecoder``'s interface (``step``, ``prompt``, ``state``,
``clone``) over the spec's composition (``thl_np.step.thl_step``).

``THLModel.decoder()`` hands it out for a model whose config chooses a component variant that the fast
path's kernels do not compute, so generation and evaluation (passkey retrieval included) run any
registered variant with no kernel written. It is slower than ``FastDecoder`` (every step allocates its
next state) and gives the same numbers as the fast path wherever both apply.
"""
from __future__ import annotations

import numpy as np

from .._blas import blas_threads
from ..state import InferenceState
from ..step import output_forward, thl_step


class PlainDecoder:
    """A decoding session over ``model`` that steps ``thl_np.step.thl_step``; the state is a plain value.
    With ``keep_record = True`` each step keeps its ``StepRecord`` in ``last_record`` (the memory
    diagnostics read the step's choices from it, as they read ``FastDecoder``'s)."""

    keep_record = False
    last_record = None

    def __init__(self, model, state: InferenceState | None = None, batch_size: int = 1):
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        self.weights_key = model.weights_key()
        self.load(state if state is not None else InferenceState.init(batch_size, model.config, dtype=model.dtype))

    def load(self, state: InferenceState) -> None:
        """Take ``state`` (copied, never modified) as the session's state."""
        state.check(self.config)
        self._state = state.copy(dtype=self.dtype)
        self.B = self._state.batch_size

    def state(self) -> InferenceState:
        """The session's state (a copy: the session may go on)."""
        return self._state.copy()

    def clone(self) -> PlainDecoder:
        new = object.__new__(PlainDecoder)
        new.__dict__.update(self.__dict__)
        new._state = self._state.copy()
        return new

    def advance(self, token_ids) -> np.ndarray:
        """Steps 1-7 and 9 of spec §4 for token ids [B]; returns the tier states [B, Σ d_k]."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        with blas_threads(self.model.plain_threads(), scipy=False):  # OpenBLAS on the machine's idle cores only
            tier_states, self._state, self.last_record = thl_step(self.model.params, self.config, ids,
                                                                  self._state, record=self.keep_record)
        return tier_states

    def logits(self, tier_states: np.ndarray) -> np.ndarray:
        """Spec §4.8 over any leading shape."""
        with blas_threads(self.model.plain_threads(), scipy=False):
            return output_forward(self.model.params, tier_states)[0]

    def step(self, token_ids, want_logits: bool = True):
        """One token per sequence → logits [B, V] (or None with want_logits=False)."""
        S = self.advance(token_ids)
        return self.logits(S) if want_logits else None

    def prompt(self, input_ids, logits: str = "all"):
        """Consume input_ids [B, T]; logits "all" → [B, T, V], "last" → [B, V], "none" → None."""
        ids = np.asarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        if logits != "all":  # keep only the last position: memory flat in T
            last = None
            for t in range(T):
                last = self.advance(ids[:, t])
            return self.logits(last) if logits == "last" and last is not None else None
        hidden = np.empty((B, T, self.config.total_tier_dim), self.dtype)
        for t in range(T):
            hidden[:, t] = self.advance(ids[:, t])
        return self.logits(hidden)
