"""InferenceState: the bounded recurrent state of spec §3, an explicit value passed in and out of a step.

Its size depends on the config and the batch only, never on how many steps were taken. The spec §3
keys are also the state file format (.npz). No method modifies a state in place except the model's
internal step, which always works on a copy it owns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..config import THLConfig
from ..errors import StateError

FLOAT_KEYS = ("memory", "read_ema", "write_ema", "local_buffer")
INT_KEYS = ("last_read", "last_write")


@dataclass
class InferenceState:
    """Spec §3. ``tiers[k]`` is ``tier_state_k`` [B, d_k]; the other fields carry the spec's names."""

    timestep: int
    tiers: list
    memory: np.ndarray        # [B, J, d_m]
    read_ema: np.ndarray      # [B, J]
    write_ema: np.ndarray     # [B, J]
    last_read: np.ndarray     # [B, J] int64
    last_write: np.ndarray    # [B, J] int64
    local_buffer: np.ndarray  # [B, W_loc, d_e]
    local_valid: int
    # Not part of the spec's state: the fast decoding session (``FastDecoder``) that produced this state,
    # so that the next fast step from it starts without rebuilding the decoder's caches (the bank stored
    # divided by a running decay scalar, the slot norms, the local keys and values). ``THLModel`` sets it
    # on the states its fast path returns and makes their arrays read-only meanwhile, so the cache can
    # never disagree with them; ``copy()`` gives a writable state without it. Never saved.
    decoder: object = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, batch_size=None, config=None, tiers=None, memory_bank=None, dtype=None) -> InferenceState:
        """The all-zero initial state (spec §3) for ``batch_size`` sequences of ``config``.

        ``tiers`` and ``memory_bank`` (``model.tiers`` and ``model.memory_bank``) are accepted so the
        README form ``InferenceState.init(batch_size=1, config=cfg, tiers=model.tiers,
        memory_bank=model.memory_bank)`` works; they must agree with ``config``.
        """
        if isinstance(batch_size, THLConfig) and (config is None or isinstance(config, int)):
            batch_size, config = config, batch_size  # tolerate init(config, batch_size)
        if not isinstance(config, THLConfig):
            raise StateError(f"InferenceState.init needs config=THLConfig(...), got {type(config).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise StateError(f"batch_size = {batch_size!r} must be a positive integer")
        if tiers is not None and list(getattr(tiers, "dims", config.tier_dims)) != list(config.tier_dims):
            raise StateError(f"tiers have widths {list(tiers.dims)}, config says {config.tier_dims}")
        if memory_bank is not None:
            shape = (getattr(memory_bank, "slots", config.memory_slots), getattr(memory_bank, "dim", config.memory_dim))
            if shape != (config.memory_slots, config.memory_dim):
                raise StateError(
                    f"memory_bank is {shape[0]} slots x {shape[1]}, config says "
                    f"{config.memory_slots} x {config.memory_dim}"
                )
        B, J = int(batch_size), config.memory_slots
        dt = np.dtype(dtype or config.dtype)
        return cls(
            timestep=0,
            tiers=[np.zeros((B, d), dt) for d in config.tier_dims],
            memory=np.zeros((B, J, config.memory_dim), dt),
            read_ema=np.zeros((B, J), dt),
            write_ema=np.zeros((B, J), dt),
            last_read=np.zeros((B, J), np.int64),
            last_write=np.zeros((B, J), np.int64),
            local_buffer=np.zeros((B, config.local_window, config.embedding_dim), dt),
            local_valid=0,
        )

    # ------------------------------------------------------------------ basic facts
    @property
    def batch_size(self) -> int:
        return int(self.memory.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.memory.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's arrays: fixed by the config and batch, whatever the step count."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    def arrays(self) -> dict[str, np.ndarray]:
        """The spec §3 keys and their arrays (the .npz layout)."""
        out = {"timestep": np.asarray(self.timestep, dtype=np.int64)}
        for k, s in enumerate(self.tiers):
            out[f"tier_state_{k}"] = s
        out.update(memory=self.memory, read_ema=self.read_ema, write_ema=self.write_ema,
                   last_read=self.last_read, last_write=self.last_write, local_buffer=self.local_buffer,
                   local_valid=np.asarray(self.local_valid, dtype=np.int64))
        return out

    def copy(self, dtype=None) -> InferenceState:
        """A deep copy, optionally cast to another float dtype."""
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        return InferenceState(
            timestep=int(self.timestep),
            tiers=[np.array(s, dtype=dt) for s in self.tiers],
            memory=np.array(self.memory, dtype=dt),
            read_ema=np.array(self.read_ema, dtype=dt),
            write_ema=np.array(self.write_ema, dtype=dt),
            last_read=np.array(self.last_read, dtype=np.int64),
            last_write=np.array(self.last_write, dtype=np.int64),
            local_buffer=np.array(self.local_buffer, dtype=dt),
            local_valid=int(self.local_valid),
        )

    # ------------------------------------------------------------------ checks
    def check(self, config: THLConfig, batch_size: int | None = None) -> None:
        """Raise StateError if this state was made for another config or batch size."""
        B = self.batch_size
        if batch_size is not None and B != batch_size:
            raise StateError(
                f"the state holds {B} sequence(s) but the input has batch size {batch_size}: "
                f"use InferenceState.init({batch_size}, config) or a state from a batch-{batch_size} run"
            )
        if len(self.tiers) != config.num_tiers:
            raise StateError(
                f"the state has {len(self.tiers)} tier(s) but the model has {config.num_tiers}: "
                "it was made for another config"
            )
        J = config.memory_slots
        expect = {f"tier_state_{k}": (B, d) for k, d in enumerate(config.tier_dims)}
        expect.update(memory=(B, J, config.memory_dim), read_ema=(B, J), write_ema=(B, J), last_read=(B, J),
                      last_write=(B, J), local_buffer=(B, config.local_window, config.embedding_dim))
        arrays = self.arrays()
        for key, want in expect.items():
            if arrays[key].shape != want:
                raise StateError(
                    f"state {key} has shape {list(arrays[key].shape)}, the model needs {list(want)}: "
                    "the state was made for another config"
                )
        if not 0 <= int(self.local_valid) <= config.local_window:
            raise StateError(f"state local_valid = {self.local_valid} is outside [0, {config.local_window}]")
        if int(self.timestep) < 0:
            raise StateError(f"state timestep = {self.timestep} is negative")

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Write the spec §3 keys to an .npz file (atomically: temporary file, then rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp.npz"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **self.arrays())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> InferenceState:
        """Read a state .npz written by ``save`` (or by the PyTorch THL's state export)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise StateError(f"no state file at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:  # a corrupt zip, a pickle, a truncated file
            raise StateError(f"{path} is not a readable state .npz ({type(exc).__name__}: {exc})") from None
        required = ("timestep", "memory", "read_ema", "write_ema", "last_read", "last_write",
                    "local_buffer", "local_valid", "tier_state_0")
        missing = [k for k in required if k not in data]
        if missing:
            raise StateError(f"{path} lacks state key(s) {missing}; spec §3 lists the keys a state file holds")
        K = 0
        while f"tier_state_{K}" in data:
            K += 1
        known = set(required) | {f"tier_state_{k}" for k in range(K)}
        extra = sorted(set(data) - known)
        if extra:
            raise StateError(f"{path} has unexpected key(s) {extra}")
        dt = np.result_type(data["memory"].dtype, np.float32)
        state = cls(
            timestep=int(data["timestep"]),
            tiers=[np.asarray(data[f"tier_state_{k}"], dtype=dt) for k in range(K)],
            memory=np.asarray(data["memory"], dtype=dt),
            read_ema=np.asarray(data["read_ema"], dtype=dt),
            write_ema=np.asarray(data["write_ema"], dtype=dt),
            last_read=np.asarray(data["last_read"], dtype=np.int64),
            last_write=np.asarray(data["last_write"], dtype=np.int64),
            local_buffer=np.asarray(data["local_buffer"], dtype=dt),
            local_valid=int(data["local_valid"]),
        )
        B = state.memory.shape[0] if state.memory.ndim == 3 else -1
        if state.memory.ndim != 3 or any(s.ndim != 2 or s.shape[0] != B for s in state.tiers):
            raise StateError(f"{path}: memory must be [B, J, d_m] and tier states [B, d_k]")
        return state
