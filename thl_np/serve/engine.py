"""The server's engine: one worker thread owns the model and runs every request (continuous batching).

Each pass of the worker (a tick): admit new requests (their prompts prefilled one by one, each from the
longest cached prefix or its session's state), regroup, then step every group once (one batched
``FastDecoder.step``) and sample its rows' next tokens with ``thl_np.generation.sample_rows`` (each row
drawing what ``sample_next`` draws with its own generator). A request
joins or leaves a group between two ticks; a finished request's state is taken out of its group and, for a
session, committed. Nothing else runs the model, so the server never runs two heavy steps at once.

Which requests share a batch: THL's step reads a clock that is one number for the whole batch (the
timestep: tier k updates when it is a multiple of ``tier_timescales[k]``; the local window holds
``local_valid`` rows). Requests whose clocks agree modulo the timescales' least common multiple and whose
windows hold as many rows are stepped together: the step numbers of their slot histories (``last_read``,
``last_write``, only ever used as ages ``t - last``) are shifted to a common timestep for the batch and
shifted back when they leave it. Such a batch computes each row as the row alone would: bit-identical for
a model whose step is compiled (``compiled_steps``, the shipped model), within float32 rounding for a larger
one, whose batched kernels sum in another order (~5e-6 on the logits of the default 174M config).

Requests whose clocks differ are stepped as separate batches in the same tick, one after the other (for the
shipped model: timestep mod 64); a batch at most ``align_steps`` steps ahead of another pauses until the
other catches up, and the two merge. Requests that arrive close together thus share one batch after a few
steps.
"""
from __future__ import annotations

import codecs
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .._blas import blas_threads
from ..errors import InputError
from ..generation import StopScanner, sample_next, sample_rows
from ..state import InferenceState
from ..tokenizer import NUM_BYTES
from .sessions import PrefixCache, Session, SessionStore


class QueueFull(Exception):
    """More requests than ``max_queue`` are waiting or running (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is shutting down (HTTP 503)."""


@dataclass
class Request:
    """One generation job, as the HTTP side checked it."""

    prompt_ids: np.ndarray                  # this request's new tokens (may be empty only with a session)
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list = field(default_factory=list)
    session: str | None = None
    cache_points: tuple = ()                # prompt prefix lengths whose states go into the prefix cache


class Job:
    """A request inside the engine. ``emit(kind, payload)`` is called on the worker thread: ("text", str)
    for each piece of text, then exactly one of ("done", info), ("cancelled", None), ("error", exception)."""

    def __init__(self, request: Request, emit):
        self.request = request
        self.emit = emit
        self.cancelled = False               # set by the HTTP side (a client gone); read by the worker
        self.finished = False
        self.finish_reason = None
        self.state = None                    # the row's state while it is outside a group
        self.pending = None                  # the sampled token to feed at the next step
        self.rng = np.random.default_rng(request.seed)
        self.sampling = (self.rng, request.temperature, request.top_k, request.top_p)  # a sample_rows row
        self.stops = StopScanner(request.stop)
        self.stream = None
        self.generated = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.session = None                  # the Session this request continues (its counters)
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True


def new_decoder(model, template, state: InferenceState):
    """A decoding session of ``model`` at ``state``: a copy of ``template`` (a FastDecoder of the model, or
    None) loaded with the state. ``model.decoder(state)`` prepares the step's weights anew each time (so
    that a session sees the parameters as they are now), 4-5 ms for the shipped model, paid whenever a batch
    is rebuilt; a server's parameters never change, so its sessions share the template's (0.6 ms)."""
    if template is None or not hasattr(template, "clone"):
        return model.decoder(state)
    decoder = template.clone()
    decoder.load(state)
    return decoder


class Group:
    """Jobs stepped together: one FastDecoder over their stacked states, their clocks aligned (module
    docstring)."""

    def __init__(self, model, jobs: list[Job], template=None):
        self.jobs = jobs
        states = [j.state for j in jobs]
        T = max(int(s.timestep) for s in states)
        self.shift = [T - int(s.timestep) for s in states]
        cat = lambda name: np.concatenate([getattr(s, name) for s in states])
        stacked = InferenceState(
            timestep=T, tiers=[np.concatenate([s.tiers[k] for s in states]) for k in range(len(states[0].tiers))],
            memory=cat("memory"), read_ema=cat("read_ema"), write_ema=cat("write_ema"),
            last_read=np.concatenate([s.last_read + d for s, d in zip(states, self.shift, strict=True)]),
            last_write=np.concatenate([s.last_write + d for s, d in zip(states, self.shift, strict=True)]),
            local_buffer=cat("local_buffer"), local_valid=int(states[0].local_valid))
        self.decoder = new_decoder(model, template, stacked)
        self.t, self.local_valid, self.window = T, int(states[0].local_valid), model.config.local_window
        for j in jobs:
            j.state = None

    def split(self) -> list[InferenceState]:
        """Each job's own state (batch 1, its own timestep), in job order."""
        st = self.decoder.state()
        out = []
        for b, d in enumerate(self.shift):
            row = slice(b, b + 1)
            out.append(InferenceState(
                timestep=int(st.timestep) - d, tiers=[s[row].copy() for s in st.tiers], memory=st.memory[row].copy(),
                read_ema=st.read_ema[row].copy(), write_ema=st.write_ema[row].copy(),
                last_read=st.last_read[row] - d, last_write=st.last_write[row] - d,
                local_buffer=st.local_buffer[row].copy(), local_valid=int(st.local_valid)))
        return out

    def signature(self, period: int) -> tuple:
        return self.t % period, self.local_valid

    def step(self) -> np.ndarray:
        logits = self.decoder.step(np.array([j.pending for j in self.jobs], dtype=np.int64))
        self.t += 1
        self.local_valid = min(self.local_valid + 1, self.window)
        return logits


class Engine:
    """The worker (module docstring). ``submit`` may be called from any thread."""

    def __init__(self, model, tokenizer, sessions: SessionStore, prefix: PrefixCache | None = None,
                 max_batch: int = 8, max_queue: int = 64, align_steps: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.prefix = prefix if prefix is not None else PrefixCache(0)
        self.max_batch = max(1, int(max_batch))
        self.max_queue = max(1, int(max_queue))
        self.align_steps = max(0, int(align_steps))
        c = model.config
        self.period = math.lcm(*c.tier_timescales)
        V = c.vocab_size
        self.limit = min(V, tokenizer.vocab_size)
        self.eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id < V else None
        self._inbox: deque[Job] = deque()
        self._joining: list[Job] = []
        self._groups: list[Group] = []
        self._busy: dict[str, Job] = {}      # session id -> the job running on it
        self._cv = threading.Condition()
        self._closing = False
        self._thread = None
        self._template = model.decoder(None, 1)  # whose weights every batch shares (new_decoder)
        self.steps = 0                       # batched steps run (statistics for /health)
        self.rows = 0                        # rows stepped in them

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thl-np-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if self.load() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already queued or running: retry later")
            self._inbox.append(job)
            self._cv.notify()

    def load(self) -> int:
        """Requests queued or running."""
        return len(self._inbox) + len(self._joining) + sum(len(g.jobs) for g in self._groups)

    def running(self) -> int:
        return sum(len(g.jobs) for g in self._groups)

    def session_busy(self, sid: str) -> bool:
        with self._cv:
            return sid in self._busy or any(j.request.session == sid for j in self._inbox)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is still queued or running (committed sessions are already on disk), then stop."""
        with self._cv:
            self._closing = True
            for j in list(self._inbox) + self._joining + [j for g in self._groups for j in g.jobs]:
                j.cancel()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        # OpenBLAS on one thread for the worker's whole life: its few products (a batch's local-window keys
        # when a group is built, a prompt's head) are small, and BLAS threads spinning on a busy machine
        # made building a batch of 8 take 34 ms instead of 5; the decoder raises it where it needs more
        with blas_threads(1):
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._groups and not self._closing:
                    self._cv.wait()
                if self._closing and not self._groups and not self._inbox:
                    return
                new = self._take_new()
            for job in new:
                self._guard(job, self._admit)
            try:
                self._regroup()
                self._step_all()
                self._regroup(leavers_only=True)
            except Exception as exc:  # a failure in a batch fails its requests, never the worker
                self._fail_running(exc)

    def _fail_running(self, exc: Exception) -> None:
        jobs = self._joining + [j for g in self._groups for j in g.jobs]
        self._joining, self._groups = [], []
        for j in jobs:
            self._release(j)
            j.emit("error", exc)

    def _take_new(self) -> list[Job]:
        """Up to max_batch queued jobs whose session is free (a session runs one request at a time, in
        order of arrival); cancelled ones are answered at once."""
        out, kept = [], deque()
        while self._inbox:
            job = self._inbox.popleft()
            sid = job.request.session
            if job.cancelled:
                job.emit("cancelled", None)
            elif len(out) >= self.max_batch or (sid is not None and sid in self._busy):
                kept.append(job)
            else:
                if sid is not None:
                    self._busy[sid] = job
                out.append(job)
        self._inbox = kept
        return out

    def _guard(self, job: Job, fn) -> None:
        try:
            fn(job)
        except Exception as exc:  # one request's failure (a damaged session file) is its error alone
            self._release(job)
            job.emit("error", exc)

    def _release(self, job: Job) -> None:
        sid = job.request.session
        with self._cv:
            if sid is not None and self._busy.get(sid) is job:
                del self._busy[sid]

    def _admit(self, job: Job) -> None:
        """Prefill: the session's state or the longest cached prefix, then the rest of the prompt; then the
        first token."""
        if job.cancelled:
            self._release(job)
            job.emit("cancelled", None)
            return
        r = job.request
        ids = np.asarray(r.prompt_ids, dtype=np.int64)
        state, logits, cached = None, None, 0
        if r.session is not None:
            job.session = self.sessions.get(r.session)
            if job.session is not None:
                state = job.session.state
                ids = np.concatenate([np.asarray(job.session.pending, np.int64), ids])
        job.prompt_tokens = len(ids)
        if state is None:
            cached, state, logits = self.prefix.lookup(ids)
            job.cached_tokens = cached
        if len(ids) == cached and logits is None:
            raise InputError("the prompt is empty and there is nothing to continue from: give at least one "
                             "character")
        if len(ids) > cached:
            decoder = new_decoder(self.model, self._template, state if state is not None else
                                  InferenceState.init(1, self.model.config, dtype=self.model.dtype))
            points = sorted({p for p in r.cache_points if cached < p < len(ids)} | {len(ids)})
            done = cached
            for p in points:
                logits = decoder.prompt(ids[None, done:p], logits="last")[0]
                done = p
                if p in r.cache_points or (r.session is None and p == len(ids)):
                    self.prefix.put(ids[:p], decoder.state(), logits)
            state = decoder.state()
        job.state = state
        job.stream = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if self._sample(job, logits):
            self._finish(job, state)
        else:
            self._joining.append(job)

    def _sample(self, job: Job, logits: np.ndarray) -> bool:
        """Draw the next token, emit its text; whether the job is finished."""
        return self._take(job, sample_next(logits[:self.limit], *job.sampling))

    def _take(self, job: Job, token: int) -> bool:
        """The job's next token: emit its text; whether the job is finished."""
        r = job.request
        job.pending = token
        job.generated += 1
        if token == self.eos:
            job.finish_reason = "stop"
        else:
            # the byte tokenizer's rule (ids below 256 are bytes, specials decode to nothing) without its
            # input checks, a sampled id being valid: they cost more than the rest of a row's token
            text = job.stops.push(job.stream.decode(bytes((token,)) if token < NUM_BYTES else b""))
            if job.stops.stopped:
                job.finish_reason = "stop"
            elif job.generated >= r.max_tokens:
                job.finish_reason = "length"
                text += job.stops.push(job.stream.decode(b"", True)) + job.stops.flush()
            if text:
                job.emit("text", text)
        job.finished = job.finish_reason is not None
        return job.finished

    def _finish(self, job: Job, state: InferenceState) -> None:
        """Commit a finished job's session, then answer it."""
        r = job.request
        try:
            if r.session is not None:
                before = job.session or Session(state)
                session = Session(state, [int(job.pending)], before.requests + 1,
                                  before.tokens + job.prompt_tokens + job.generated - len(before.pending))
                self.sessions.put(r.session, session)
        finally:
            self._release(job)
        info = {"finish_reason": job.finish_reason, "prompt_tokens": job.prompt_tokens,
                "completion_tokens": job.generated, "cached_tokens": job.cached_tokens}
        if r.session is not None:
            info["session"] = {"id": r.session, "requests": session.requests, "tokens": session.tokens}
        job.emit("done", info)

    def _regroup(self, leavers_only: bool = False) -> None:
        """Take finished and cancelled jobs out of their groups; put joining jobs into groups of equal clocks
        (module docstring), rebuilding only the groups whose members change."""
        joining, self._joining = ([], self._joining) if leavers_only else (self._joining, [])
        signature = lambda s: (int(s.timestep) % self.period, int(s.local_valid))
        wanted = {}
        for j in joining:
            wanted.setdefault(signature(j.state), []).append(j)
        keep, by_signature = [], {}
        for g in self._groups:
            if any(j.finished or j.cancelled for j in g.jobs):
                self._dissolve(g, wanted)
            else:
                by_signature.setdefault(g.signature(self.period), []).append(g)
        for sig, groups in by_signature.items():
            # groups with room merge with the joiners and with each other (equal clocks: one batch); full
            # ones stay as they are, so a full set of groups is never rebuilt
            room = [g for g in groups if len(g.jobs) < self.max_batch]
            if len(room) > 1 or (room and sig in wanted):
                for g in room:
                    self._dissolve(g, wanted)
                keep.extend(g for g in groups if g not in room)
            else:
                keep.extend(groups)
        self._groups = keep
        for jobs in wanted.values():
            live = []
            for j in jobs:
                if j.cancelled:
                    self._release(j)
                    j.emit("cancelled", None)
                else:
                    live.append(j)
            for i in range(0, len(live), self.max_batch):
                self._groups.append(Group(self.model, live[i:i + self.max_batch], self._template))

    def _dissolve(self, g: Group, wanted: dict) -> None:
        """Take a group's jobs back out: finished ones are committed, cancelled ones answered, the others
        wait in ``wanted`` (by clock signature) for their next group."""
        for j, st in zip(g.jobs, g.split(), strict=True):
            if j.cancelled:
                self._release(j)
                j.emit("cancelled", None)
            elif j.finished:
                self._guard(j, lambda job, st=st: self._finish(job, st))
            else:
                j.state = st
                wanted.setdefault((int(st.timestep) % self.period, int(st.local_valid)), []).append(j)

    def _paused(self) -> set:
        """Groups that skip this tick so that a group a few steps behind them catches up (their clocks then
        agree and the two merge into one batch): a group whose full window is at most ``align_steps`` steps
        ahead of another's. Never every group: where each is ahead of another (three or more around the
        clock), the first steps alone and so catches up with the one ahead of it."""
        W = self.model.config.local_window
        full = [g for g in self._groups if g.local_valid == W]
        paused = set()
        for g in full:
            for h in full:
                ahead = (g.t - h.t) % self.period  # the shorter way round the clock; half-way: the later one
                shorter = 2 * ahead < self.period or (2 * ahead == self.period and g.t > h.t)
                if h is not g and 1 <= ahead <= self.align_steps and shorter:
                    paused.add(g)
                    break
        if len(paused) == len(self._groups):
            paused.discard(self._groups[0])
        return paused

    def _step_all(self) -> None:
        paused = self._paused() if self.align_steps and len(self._groups) > 1 else set()
        for g in self._groups:
            if g in paused or all(j.cancelled for j in g.jobs):
                continue
            logits = g.step()
            self.steps += 1
            self.rows += len(g.jobs)
            # read once, after the step: a client may disconnect (set ``cancelled``) while the step runs,
            # even every client of the group (sampling no rows is an error that would fail every batch)
            live = [b for b, j in enumerate(g.jobs) if not j.cancelled]
            if not live:
                continue
            rows = logits[:, :self.limit] if len(live) == len(g.jobs) else logits[live, :self.limit]
            jobs = [g.jobs[b] for b in live]
            for j, token in zip(jobs, sample_rows(rows, [j.sampling for j in jobs]), strict=True):
                self._take(j, token)


def load_engine(model_dir: str, sessions_dir: str, max_sessions: int = 256, prefix_cache: int = 32,
                max_batch: int = 8, max_queue: int = 64, align_steps: int = 32, engine_class=Engine):
    """(model, tokenizer, started engine) for a model folder: the model loaded and warmed up (its compiled
    steps loaded or compiled, the batched head packed) before the first request comes."""
    from ..model import THLModel
    from ..tokenizer import Tokenizer

    model = THLModel.from_pretrained(model_dir)
    tokenizer = Tokenizer.for_vocab_size(model.config.vocab_size)
    for B in sorted({1, min(2, max_batch), max_batch}):
        decoder = model.decoder(None, B)
        decoder.prompt(np.zeros((B, 2), np.int64), logits="last")
        decoder.step(np.zeros(B, np.int64))
    engine = engine_class(model, tokenizer, SessionStore(sessions_dir, model.config, max_sessions),
                          PrefixCache(prefix_cache), max_batch=max_batch, max_queue=max_queue,
                          align_steps=align_steps)
    engine.start()
    return model, tokenizer, engine
