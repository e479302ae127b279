"""InferenceState: the bounded recurrent state of spec §3, an explicit value passed in and out of a step.

Its size depends on the config and the batch only, never on how many steps were taken. The spec §3
keys are also the state file format (.npz). No method modifies a state in place.

A state the fast path returns (``model(ids)``, ``model.forward_step``) is handed over, not copied: it
holds the decoding session that computed it (its ``decoder``) and reads its fields from that session on
first access (a copy, with the decay scalar applied), read-only while it holds the session. The session
is never stepped while such a state lives, so the state keeps its value; the next step from it runs on a
second session brought up to date by copying the few rows one step changed (``FastDecoder.successor``).
It is still a value: keep it, ``copy()`` it (writable, without the session), ``save`` it, step from it
twice (two independent futures), ``copy.deepcopy`` or pickle it. Assigning a field detaches the session,
and the state is then validated (once) when next used, as a state the user built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .checks import MAX_SIZE, Rule, check, check_allocation, check_float_array, check_int_array
from .config import THLConfig
from .errors import StateError

FLOAT_KEYS = ("memory", "read_ema", "write_ema", "local_buffer")
INT_KEYS = ("last_read", "last_write")
FIELDS = ("timestep", "tiers", "memory", "read_ema", "write_ema", "last_read", "last_write", "local_buffer",
          "local_valid")


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
    # Not part of the spec's state: the fast decoding session (``FastDecoder``) that computed this state and
    # holds it (module docstring), so that the next fast step from it starts without copying the state out
    # or rebuilding the decoder's caches (the bank stored divided by a running decay scalar, the slot norms,
    # the local keys and values). ``THLModel`` sets it on the states its fast path returns; their fields
    # are read from it on first access and are read-only while it is set, so the two never disagree;
    # ``copy()`` gives a writable state without it. Never saved. Do not step it: it is the state's value.
    decoder: object = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ a state held by its session
    @classmethod
    def held_by(cls, decoder) -> InferenceState:
        """The state of a fast session ``decoder``, read from it on first access (module docstring). The
        session is this state's from now on: it is not stepped while the state lives."""
        state = object.__new__(cls)
        state.__dict__["decoder"] = decoder
        decoder.held_by(state)
        return state

    def _held(self):
        """The session this state still reads its fields from (none once they are materialised)."""
        d = self.__dict__
        dec = d.get("decoder")
        return dec if dec is not None and "memory" not in d else None

    def _materialise(self) -> None:
        st = self.__dict__["decoder"].state()
        for key, arr in st.arrays().items():
            if isinstance(arr, np.ndarray) and arr.ndim and key not in ("timestep", "local_valid"):
                arr.flags.writeable = False
        self.__dict__.update({k: st.__dict__[k] for k in FIELDS})

    def __getattr__(self, name):
        # reached only for an attribute not set: a field of a state its session has not materialised yet
        if name in FIELDS and self._held() is not None:
            self._materialise()
            return self.__dict__[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    def __setattr__(self, name, value):
        d = self.__dict__
        if name in FIELDS or name == "decoder":
            old = d.get("decoder")
            if old is not None:
                if self._held() is not None:
                    self._materialise()  # the other fields keep their values
                d["decoder"] = None      # an edited state no longer matches its session
                old.held_by(None)
            d.pop("_valid_for", None)    # validated again when next used
        object.__setattr__(self, name, value)

    def __getstate__(self):
        """Pickle, copy.copy and copy.deepcopy see the spec's fields only (materialised), never the session."""
        return {**{k: getattr(self, k) for k in FIELDS}, "decoder": None}

    def __setstate__(self, data):
        self.__dict__.update(data)

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
        try:
            dt = np.dtype(dtype or config.dtype)
        except TypeError:
            dt = None
        if dt not in (np.float32, np.float64):
            raise StateError(f"dtype = {dtype!r} is not a state dtype: use float32 or float64")
        per_sequence = (J * (config.memory_dim + 2) + sum(config.tier_dims)
                        + config.local_window * config.embedding_dim) * dt.itemsize + 16 * J
        check_allocation(B * per_sequence, f"a state of {B:,} sequence(s)", "use a smaller batch", StateError)
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
        dec = self._held()
        if dec is not None:
            return dec.B
        shape = getattr(self.memory, "shape", None)
        if shape is None or len(shape) != 3:
            raise StateError(f"state memory is {type(self.memory).__name__} of shape {shape}, not a [B, J, d_m] "
                             "array: rebuild the state (InferenceState.init or a state a model returned)")
        return int(shape[0])

    @property
    def dtype(self) -> np.dtype:
        dec = self._held()
        return dec.dtype if dec is not None else self.memory.dtype

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
        dec = self._held()
        if dec is not None and dt == dec.dtype:
            return dec.state()  # already a fresh, writable copy
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

    def rows(self, indices) -> InferenceState:
        """A new state holding the sequences ``indices`` of this one (in that order), copied: one
        conversation taken out of a batch. Timestep and local_valid are shared by every row (spec §3)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        B = self.batch_size
        if idx.size == 0 or idx.min() < -B or idx.max() >= B:
            raise StateError(f"rows {idx.tolist()} are not rows of a state of {B} sequence(s)")
        return InferenceState(
            timestep=int(self.timestep),
            tiers=[np.array(s[idx]) for s in self.tiers],
            memory=np.array(self.memory[idx]), read_ema=np.array(self.read_ema[idx]),
            write_ema=np.array(self.write_ema[idx]), last_read=np.array(self.last_read[idx]),
            last_write=np.array(self.last_write[idx]), local_buffer=np.array(self.local_buffer[idx]),
            local_valid=int(self.local_valid),
        )

    @classmethod
    def stack(cls, states) -> InferenceState:
        """One batch of the sequences of ``states`` (in order), copied. The states must be at the same step
        (timestep and local_valid are one scalar for the whole batch, spec §3) and share a dtype: e.g. one
        conversation branched several ways, or prompts of one length prefilled separately."""
        states = list(states)
        if not states or not all(isinstance(s, InferenceState) for s in states):
            raise StateError("stack needs a non-empty list of InferenceState")
        first = states[0]
        for s in states[1:]:
            if (int(s.timestep), int(s.local_valid)) != (int(first.timestep), int(first.local_valid)):
                raise StateError(
                    f"states at different steps (timestep {int(first.timestep)} and {int(s.timestep)}, "
                    f"local_valid {int(first.local_valid)} and {int(s.local_valid)}) cannot share a batch: "
                    "one step counter serves every row (spec §3); step them separately"
                )
            if s.dtype != first.dtype or len(s.tiers) != len(first.tiers):
                raise StateError("states of different dtypes or tier counts cannot share a batch")
        try:
            return cls(
                timestep=int(first.timestep),
                tiers=[np.concatenate([s.tiers[k] for s in states]) for k in range(len(first.tiers))],
                **{key: np.concatenate([getattr(s, key) for s in states]) for key in FLOAT_KEYS + INT_KEYS},
                local_valid=int(first.local_valid),
            )
        except ValueError as exc:
            raise StateError(f"states of different shapes cannot share a batch ({exc})") from None

    # ------------------------------------------------------------------ checks
    def check(self, config: THLConfig, batch_size: int | None = None) -> None:
        """Raise StateError if this state was made for another config or batch size, or holds a value no
        step can take: a counter that is not an integer in range, an array of the wrong type, shape or
        dtype, a NaN or an infinity, a step number outside [0, timestep]. Every path checks its input
        state here, so a state one path accepts is never mangled by another.

        A state a model computed for this config (one held by its fast session, or a read-only state its
        plain path returned) is not scanned again: only its batch size is compared."""
        dec = self.__dict__.get("decoder")
        if self.__dict__.get("_valid_for") is config or (dec is not None and dec.config is config):
            self._check_batch(batch_size)
            return
        self._check_arrays()
        B = self._check_batch(batch_size)
        if len(self.tiers) != config.num_tiers:
            raise StateError(
                f"the state has {len(self.tiers)} tier(s) but the model has {config.num_tiers}: "
                "it was made for another config"
            )
        J = config.memory_slots
        expect = {f"tier_state_{k}": (B, d) for k, d in enumerate(config.tier_dims)}
        expect.update(memory=(B, J, config.memory_dim), read_ema=(B, J), write_ema=(B, J), last_read=(B, J),
                      last_write=(B, J), local_buffer=(B, config.local_window, config.embedding_dim))
        arrays = self._named_arrays()
        for key, want in expect.items():
            if tuple(arrays[key].shape) != want:
                raise StateError(
                    f"state {key} has shape {list(arrays[key].shape)}, the model needs {list(want)}: "
                    "the state was made for another config"
                )
        self.check_values(config.local_window)

    def _check_batch(self, batch_size: int | None) -> int:
        B = self.batch_size
        if batch_size is not None and B != batch_size:
            raise StateError(
                f"the state holds {B} sequence(s) but the input has batch size {batch_size}: "
                f"use InferenceState.init({batch_size}, config) or a state from a batch-{batch_size} run"
            )
        return B

    def check_values(self, local_window: int | None = None) -> None:
        """The config-free part of ``check``: counters, array dtypes, finite floats, step numbers in range."""
        self._check_arrays()
        t = self._check_counters(local_window)
        for key, a in self._named_arrays().items():
            if key in INT_KEYS:
                check_int_array(key, a, 0, t)
            else:
                check_float_array(key, a)

    def _check_counters(self, local_window: int | None) -> int:
        t = check("timestep", self.timestep, StateError, "state timestep",
                  "a state's step counter is a non-negative integer (int64)")
        hi = MAX_SIZE if local_window is None else local_window
        Rule(0, hi, integer=True).check("state local_valid", self.local_valid, StateError,
                                        "it counts the local buffer's rows in use")
        return t

    def _named_arrays(self) -> dict:
        out = {f"tier_state_{k}": s for k, s in enumerate(self.tiers)}
        out.update(memory=self.memory, read_ema=self.read_ema, write_ema=self.write_ema, last_read=self.last_read,
                   last_write=self.last_write, local_buffer=self.local_buffer)
        return out

    def _check_arrays(self) -> None:
        """Every field an array (anything with shape and dtype: NumPy, or a device array of the layered
        engine), the batch the same in all."""
        if not isinstance(self.tiers, (list, tuple)) or not self.tiers:
            raise StateError(f"state tiers must be a non-empty list of [B, d_k] arrays, got "
                             f"{type(self.tiers).__name__}")
        for key, a in self._named_arrays().items():
            if not (hasattr(a, "shape") and hasattr(a, "dtype")):
                raise StateError(f"state {key} is {type(a).__name__}, not an array: rebuild the state "
                                 "(InferenceState.init or a state a model returned)")
        B = self.batch_size  # memory [B, J, d_m] sets the batch
        for key, a in self._named_arrays().items():
            nd = 3 if key in ("memory", "local_buffer") else 2
            if len(a.shape) != nd or a.shape[0] != B:
                raise StateError(f"state {key} has shape {list(a.shape)}: it must be {nd}-D with the batch first, "
                                 "as every other state array (spec §3)")

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Write the spec §3 keys to an .npz file (atomically: temporary file, then rename)."""
        path = os.fspath(path)
        # unique per process (and call): concurrent --state-out writers never share a temporary file
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp.npz"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **self.arrays())
            os.replace(tmp, path)
        except OSError as exc:
            raise StateError(f"cannot write the state file {path} ({exc.strerror or exc}): check that its folder "
                             "exists, is writable and has free space") from None
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
        for key, a in data.items():
            kinds = "iu" if key in INT_KEYS + ("timestep", "local_valid") else "f"
            if a.dtype.kind not in kinds:
                want = "integers" if kinds == "iu" else "floats"
                raise StateError(f"{path}: state {key} has dtype {a.dtype}; it must hold {want} (spec §3)")
        try:
            t = check("timestep", data["timestep"], StateError, "state timestep")
            n = Rule(0, MAX_SIZE, integer=True).check("state local_valid", data["local_valid"], StateError)
        except StateError as exc:
            raise StateError(f"{path}: {exc} (a scalar int64 in the file)") from None
        dt = np.result_type(data["memory"].dtype, np.float32)
        state = cls(
            timestep=t,
            tiers=[np.asarray(data[f"tier_state_{k}"], dtype=dt) for k in range(K)],
            memory=np.asarray(data["memory"], dtype=dt),
            read_ema=np.asarray(data["read_ema"], dtype=dt),
            write_ema=np.asarray(data["write_ema"], dtype=dt),
            last_read=np.asarray(data["last_read"], dtype=np.int64),
            last_write=np.asarray(data["last_write"], dtype=np.int64),
            local_buffer=np.asarray(data["local_buffer"], dtype=dt),
            local_valid=n,
        )
        if state.memory.ndim != 3 or any(s.ndim != 2 or s.shape[0] != state.memory.shape[0] for s in state.tiers):
            raise StateError(f"{path}: memory must be [B, J, d_m] and tier states [B, d_k]")
        try:
            state.check_values()
        except StateError as exc:
            raise StateError(f"{path}: {exc}") from None
        return state
