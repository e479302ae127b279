"""Conversation sessions and the prefix cache: THL's whole context is its state, a few fixed arrays.

A session is the state after every byte of its conversation (prompts and generations, a stop string or an
eos the client did not see included) plus the last generated token, which has not been fed yet
(``pending``: the next request feeds it before its own text). Each committed request writes the session's
file at once (write-through, atomically), so a kill -9 loses no committed request; ``max_in_memory``
sessions stay in memory, the least recently used others are read back from disk on demand.

The session file (also the export format of ``GET /v1/sessions/{id}``) is an .npz with the spec §3 state keys
(``InferenceState.arrays``) and ``thl_session``: UTF-8 JSON with the format name, the config's fingerprint,
the pending tokens and counters. An import is checked: the fingerprint must be this model's config, and the
state must pass ``InferenceState.check``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, StateError
from ..io.folder import atomic_write_bytes, remove_stale_temps
from ..state import InferenceState

FORMAT = "thl-np-session/1"
META_KEY = "thl_session"
SUFFIX = ".session.npz"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")


def config_fingerprint(config) -> str:
    """What a session file must match: a digest of the config (every field that shapes the state)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def check_session_id(value) -> str:
    if not isinstance(value, str) or not SESSION_ID.match(value):
        raise InputError(f"session = {value!r}: a session id is 1-128 letters, digits, '_', '-' or '.', not "
                         "starting with '.'")
    return value


@dataclass
class Session:
    state: InferenceState          # batch 1, every token fed except ``pending``
    pending: list = field(default_factory=list)
    requests: int = 0              # committed requests
    tokens: int = 0                # tokens consumed or generated, pending included

    def to_bytes(self, fingerprint: str) -> bytes:
        meta = {"format": FORMAT, "fingerprint": fingerprint, "pending": [int(i) for i in self.pending],
                "requests": self.requests, "tokens": self.tokens}
        buf = io.BytesIO()
        np.savez(buf, **self.state.arrays(), **{META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, config, fingerprint: str, what: str = "the session file") -> Session:
        """Parse and check a session file; a one-line StateError says what is wrong."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # not a zip, a pickle, truncated
            raise StateError(f"{what} is not a session .npz ({type(exc).__name__})") from None
        try:
            meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
            assert isinstance(meta, dict) and meta.get("format") == FORMAT
        except Exception:
            raise StateError(f"{what} lacks a valid '{META_KEY}' record ({FORMAT}): export it with "
                             "GET /v1/sessions/ID") from None
        if meta.get("fingerprint") != fingerprint:
            raise StateError(f"{what} was made for another model config (fingerprint {meta.get('fingerprint')!r}, "
                             f"this server's is {fingerprint!r})")
        pending = meta.get("pending")
        V = config.vocab_size
        if not (isinstance(pending, list) and all(isinstance(i, int) and 0 <= i < V for i in pending)):
            raise StateError(f"{what}: pending must be a list of token ids below {V}")
        counts = [meta.get("requests"), meta.get("tokens")]
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise StateError(f"{what}: requests and tokens must be non-negative integers")
        K = config.num_tiers
        needed = ["timestep", "memory", "read_ema", "write_ema", "last_read", "last_write", "local_buffer",
                  "local_valid"] + [f"tier_state_{k}" for k in range(K)]
        if sorted(arrays) != sorted(needed):
            raise StateError(f"{what} holds the state keys {sorted(arrays)}, the model needs {sorted(needed)}")
        for key in ("timestep", "local_valid"):
            if arrays[key].shape != () or arrays[key].dtype.kind not in "iu":
                raise StateError(f"{what}: {key} must be an integer scalar")
        state = InferenceState(
            timestep=int(arrays["timestep"]), tiers=[arrays[f"tier_state_{k}"] for k in range(K)],
            memory=arrays["memory"], read_ema=arrays["read_ema"], write_ema=arrays["write_ema"],
            last_read=arrays["last_read"], last_write=arrays["last_write"], local_buffer=arrays["local_buffer"],
            local_valid=int(arrays["local_valid"]))
        try:
            state.check(config, 1)
        except StateError as exc:
            raise StateError(f"{what}: {exc}") from None
        if state.dtype != np.dtype(config.dtype):
            raise StateError(f"{what}: the state is {state.dtype}, the model runs {config.dtype}")
        return cls(state, pending, meta["requests"], meta["tokens"])


class SessionStore:
    """Sessions by id: the ``max_in_memory`` most recently used in memory, every one on disk in ``directory``.
    Thread-safe (the engine commits, the HTTP side imports, exports and deletes)."""

    def __init__(self, directory: str, config, max_in_memory: int = 256):
        self.directory = os.fspath(directory)
        self.config = config
        self.fingerprint = config_fingerprint(config)
        self.max_in_memory = max(1, int(max_in_memory))
        self._memory: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        os.makedirs(self.directory, exist_ok=True)
        remove_stale_temps(self.directory)

    def _path(self, sid: str) -> str:
        return os.path.join(self.directory, sid + SUFFIX)

    def ids(self) -> list[str]:
        with self._lock:
            on_disk = [n[:-len(SUFFIX)] for n in os.listdir(self.directory) if n.endswith(SUFFIX)]
            return sorted(set(on_disk) | set(self._memory))

    def __len__(self) -> int:
        return len(self.ids())

    def in_memory(self) -> int:
        return len(self._memory)

    def get(self, sid: str) -> Session | None:
        with self._lock:
            s = self._memory.get(sid)
            if s is not None:
                self._memory.move_to_end(sid)
                return s
            try:
                with open(self._path(sid), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            s = Session.from_bytes(data, self.config, self.fingerprint, f"session file {self._path(sid)}")
            self._remember(sid, s)
            return s

    def put(self, sid: str, session: Session) -> None:
        """Write the session's file (atomically), then keep it in memory."""
        data = session.to_bytes(self.fingerprint)
        with self._lock:
            atomic_write_bytes(self._path(sid), data)
            self._remember(sid, session)

    def export(self, sid: str) -> bytes | None:
        s = self.get(sid)
        return None if s is None else s.to_bytes(self.fingerprint)

    def import_bytes(self, sid: str, data: bytes) -> Session:
        s = Session.from_bytes(data, self.config, self.fingerprint)
        self.put(sid, s)
        return s

    def delete(self, sid: str) -> bool:
        with self._lock:
            found = self._memory.pop(sid, None) is not None
            try:
                os.unlink(self._path(sid))
                found = True
            except FileNotFoundError:
                pass
            return found

    def _remember(self, sid: str, session: Session) -> None:
        self._memory[sid] = session
        self._memory.move_to_end(sid)
        while len(self._memory) > self.max_in_memory:
            self._memory.popitem(last=False)  # already on disk: it is read back when next used


class PrefixCache:
    """States after prompt prefixes already processed (a system prompt, a few-shot header, a whole earlier
    prompt), with the logits of their last position: a prompt that starts with one starts from its state.
    At most ``capacity`` entries, least recently used dropped first. Used by the engine's thread only."""

    def __init__(self, capacity: int = 32):
        self.capacity = max(0, int(capacity))
        self._entries: OrderedDict[bytes, tuple[InferenceState, np.ndarray]] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: np.ndarray):
        """(length, state, logits) of the longest cached prefix of ``ids``, or (0, None, None)."""
        best, best_key = 0, None
        for key in self._entries:
            n = len(key) // 8
            if best < n <= len(ids) and ids[:n].tobytes() == key:
                best, best_key = n, key
        if best_key is None:
            return 0, None, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        state, logits = self._entries[best_key]
        return best, state, logits

    def put(self, ids: np.ndarray, state: InferenceState, logits: np.ndarray) -> None:
        if self.capacity == 0 or len(ids) == 0:
            return
        key = np.ascontiguousarray(ids, np.int64).tobytes()
        self._entries[key] = (state, np.array(logits))
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
