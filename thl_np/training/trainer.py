"""The training loop: truncated BPTT over byte lanes, AdamW, periodic held-out bits per byte, checkpoints.

One step (``_train_step``), in this order:

1. the next chunk of every lane (``LaneBatches``); the carried state is dropped when the lanes wrap;
2. Gumbel uniforms [T, B, H, J] from the run's own seeded ``np.random.Generator`` (training-mode routing;
   none with ``routing="hard"``: eval-mode routing);
3. ``value_and_grad(model, inputs, targets, state, gumbel_uniform, return_state=True)``: the loss, the
   gradients, and the state after the chunk (the gradient does not flow back into the state passed in);
4. global-norm clipping, the learning rate of the step (a pure function of it), AdamW;
5. the state after the chunk is carried into the next one (``carry_state``), or dropped.

Everything a step depends on (weights, optimiser moments, data position, RNG state, carried state, step
count) is in the checkpoint, so a resumed run reaches bit for bit the weights of an uninterrupted one.
Ctrl-C is deferred to the end of the running step, then a checkpoint is written and the run stops; a
second Ctrl-C stops at once, keeping the last complete checkpoint.

Under MPI (``mpirun -n N``), ``distributed`` shares each step's lanes among the ranks through the ``world``
hooks (one Allreduce of the gradient per step): the same training as one process, with rank 0 alone
writing the output folder.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .._blas import blas_threads
from .._threads import StepThreads
from ..checks import NON_FINITE_OUTPUT, check, check_allocation, check_metric, check_output_dir, first_non_finite
from ..components.output import log_softmax
from ..components.read_target import THROUGH, ReadTargets
from ..components.registry import components_for
from ..config import THLConfig
from ..errors import ConfigError, InputError, WeightsError
from . import checkpoint as ckpt
from . import distributed
from .data import LaneBatches, as_byte_array, eval_lanes, fingerprint, load_bytes, split_bytes
from .optim import AdamW, clip_grad_norm, frozen_names
from .schedule import lr_at
from .synthetic_tasks import FILLER_SOURCES, KV_TASK_NAMES, WindowBatches, parse_tasks

# the memory columns: thl_np.eval.diagnostics.LOG_COLUMNS, each figure over the step's chunk (all its sequences)
LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "seq_len", "mem_read_entropy", "mem_top1_mass",
              "mem_effective_slots", "mem_share_refine", "mem_share_novel_empty", "mem_share_novel_evict",
              "mem_mean_gate", "mem_slot_norm_max", "mem_empty_slots", "read_nats", "read_rows", "skipped"]
#: The columns of logs written before the skipped steps' column, and before the read-target term's (a run from
#: then resumes).
OLDER_LOG_FIELDS = (LOG_FIELDS[:-1], LOG_FIELDS[:-3])
EVAL_FIELDS = ["step", "bits_per_byte"]
#: Which slots an answer step's read-target term points at (TrainConfig.read_match).
READ_MATCHES = ("value", "byte", "value+stop")
#: Routing while training: with the Gumbel noise of spec §4.3 (the default), or the hard top-κ of eval mode.
ROUTINGS = ("gumbel", "hard")
#: The reported training loss is the mean over this many last steps (one step's loss is noisy).
LOSS_WINDOW = 20


# checked by their own rules (parse_tasks, TASKS, ...)
_TEXT_FIELDS = ("tasks", "filler", "task", "routing", "freeze", "read_through", "read_match")
_OPTIONAL_FIELDS = ("lr_decay_steps", "eval_tokens", "seq_len_final", "seq_len_ramp", "eval_examples", "dropout",
                    "memory_bptt")
_RULE_OF = {"dropout": "classifier_dropout"}         # a field named otherwise than its rule


@dataclass
class TrainConfig:
    """The knobs of a training run (the model's own hyper-parameters live in THLConfig).

    ``steps`` is the step count to reach (a resumed run continues up to it). The cosine decays over
    ``lr_decay_steps`` (default: ``steps``) to ``min_lr_ratio · lr``. ``eval_every`` / ``checkpoint_every``
    of 0 mean "only at the end". ``eval_tokens`` caps the held-out bytes of every evaluation, the
    final one included (None: all of it). ``beta2 = 0.99`` rather than PyTorch's 0.999: short runs on small models
    adapt faster with it (nanoGPT's character-level setting).

    Whole-sequence training (``thl_np.training.synthetic_tasks``): ``full_bptt`` reads independent windows of
    ``seq_len`` bytes, each from an empty state with the gradient through all of it, instead of lanes with a
    carried state; it is implied by ``task_mix > 0`` (that share of the rows are synthetic ``tasks`` hidden
    in ``filler``) and by ``seq_len_final`` (the length doubles in stages from ``seq_len`` to it over
    ``seq_len_ramp`` steps, default ``steps``). ``answer_weight``: the loss weight of a task's answer bytes.
    ``read_weight`` μ: the read-target term (``thl_np.components.read_target``) on the key-value tasks' rows,
    a loss on the router's scores at the answer toward the slots the value was written to (0: off);
    ``read_through``: "all" (its gradient reaches the memory too), "query" (the query's side only) or "router"
    (W_q and W_k alone); ``read_match``: "value" (every answer step that writes a value byte toward any slot
    of the value) or "byte" (answer step k toward the slots that value byte k was written to). Neither points
    the step that writes the stop byte anywhere: reading the value there writes one more value byte
    ("value+stop", "value" with that step too, is the ablation that showed it).

    ``routing``: "gumbel" (training-mode routing, spec §4.3: Gumbel noise on the router's scores picks the
    slots read, the run's own seeded stream) or "hard" (no noise: the eval-mode top-κ, the reads training sees
    are the reads inference makes; an ablation of the noise).

    ``memory_bptt`` N: a truncated backward through the memory bank within each window: the bank's gradient is
    cut before every N-th step (``thl_np.step.cut_memory_gradient``), so no gradient circulates through the
    memory's loop for more than N steps; the tiers' and the local window's gradients still cross the cut, and
    the reads after it still learn from what they read. None: the whole window (the exact gradient). It does
    not prevent the overflow of round eleven's long windows (docs/MEMORY.md, round twelve).

    ``skip_overflow`` N: a step whose loss is finite and whose gradient is not (the backward overflowed) is
    skipped, up to N such steps in the run: no update, the lanes' state not carried, the step counted (its
    log row has ``skipped`` = 1 and no gradient norm); the N+1-th stops the run with the divergence error,
    and so does a non-finite loss. 0: the first stops it.

    ``freeze``: comma-separated globs of parameter names AdamW leaves as they are (``writer.*``): they take no
    step, no decay, and are out of the clipping norm; each glob must match a parameter of the model.
    """

    steps: int = 1000
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    lr_decay_steps: int | None = None
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    held_out_fraction: float = 0.1
    eval_every: int = 100
    eval_tokens: int | None = None
    eval_lanes: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    carry_state: bool = True
    resume: bool = False
    path: str = "auto"            # "auto" | "fast" | "plain": where value_and_grad runs (thl_np.model.choose_fast)
    full_bptt: bool = False
    seq_len_final: int | None = None
    seq_len_ramp: int | None = None
    task_mix: float = 0.0
    tasks: str = "passkey,recall,copy"
    filler: str = "corpus"
    answer_weight: float = 1.0
    routing: str = "gumbel"       # "gumbel": training-mode routing (spec §4.3's noise); "hard": eval-mode top-κ
    read_weight: float = 0.0      # μ of the read-target term on key-value task rows (0: off)
    read_through: str = "all"     # "all" | "query" | "router": where the term's gradient goes (ReadTargets.through)
    read_match: str = "value"     # "value" | "byte" | "value+stop": which slots an answer step should read
    freeze: str = ""              # globs of parameter names left untrained, e.g. "writer.*"
    memory_bptt: int | None = None  # cut the bank's gradient every N steps of a window (None: never)
    skip_overflow: int = 0        # steps whose gradient overflowed that the run may skip (0: the first stops it)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every field by its rule in thl_np.checks.RULES (the rules the CLI flags use too)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "path":
                if value not in ("auto", "fast", "plain"):
                    raise InputError(f"path = {value!r}: use 'auto', 'fast' or 'plain'")
            elif f.name in _TEXT_FIELDS:
                if not isinstance(value, str):
                    raise InputError(f"{f.name} = {value!r} must be a string")
            elif f.name in ("carry_state", "resume", "full_bptt"):
                if not isinstance(value, (bool, np.bool_)):
                    raise InputError(f"{f.name} = {value!r} must be True or False")
            elif value is not None or f.name not in _OPTIONAL_FIELDS:
                check(_RULE_OF.get(f.name, f.name), value, InputError, f.name)
        if self.seq_len_final is not None and self.seq_len_final < self.seq_len:
            raise InputError(f"seq_len_final = {self.seq_len_final} is below seq_len = {self.seq_len}: the "
                             "schedule grows from seq_len to seq_len_final")
        parse_tasks(self.tasks)
        if self.filler not in FILLER_SOURCES:
            raise InputError(f"filler = {self.filler!r}: use one of {', '.join(FILLER_SOURCES)}")
        if self.routing not in ROUTINGS:
            raise InputError(f"routing = {self.routing!r}: use one of {', '.join(ROUTINGS)}")
        if self.read_through not in THROUGH:
            raise InputError(f"read_through = {self.read_through!r}: use one of {', '.join(THROUGH)}")
        if self.read_match not in READ_MATCHES:
            raise InputError(f"read_match = {self.read_match!r}: use one of {', '.join(READ_MATCHES)}")
        if self.read_weight and not (self.task_mix > 0 and set(parse_tasks(self.tasks)) & set(KV_TASK_NAMES)):
            raise InputError(f"read_weight = {self.read_weight} needs key-value task rows: give --task-mix > 0 and "
                             f"a kv task in --tasks (one of {', '.join(KV_TASK_NAMES)})")

    @property
    def windows(self) -> bool:
        """Whole-sequence training on independent windows (the class docstring)."""
        return self.full_bptt or self.task_mix > 0 or self.seq_len_final is not None

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise InputError(f"a train config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """What a run reached. ``train_loss`` is the mean loss of the last ``LOSS_WINDOW`` steps (nats)."""

    out_dir: str
    step: int
    steps: int
    train_loss: float | None
    last_loss: float | None
    held_out_bpb: float | None
    wall_time_s: float
    tokens_per_s: float
    checkpoint: str | None
    interrupted: bool = False
    history: list = field(default_factory=list, repr=False)
    evals: list = field(default_factory=list, repr=False)


@dataclass
class _Run:
    """The mutable state of a run: exactly what a checkpoint stores."""

    model: object
    optimizer: AdamW
    batches: LaneBatches
    rng: np.random.Generator
    state: object  # InferenceState or None
    step: int
    history: list
    evals: list
    elapsed_before: float = 0.0


# ---------------------------------------------------------------------- evaluation
def cross_entropy_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Σ −log softmax(logits)[target] over every position, in float64 (nats)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64))
    return float(-np.take_along_axis(logp, targets[..., None].astype(np.int64), axis=-1).sum())


class EvaluationStopped(Exception):
    """``evaluate``'s ``stop()`` said to stop (a Ctrl-C during a training run's evaluation)."""


def evaluate(model, data, seq_len: int = 128, lanes: int = 4, max_bytes: int | None = None, *,
             progress: Callable[[int, int], None] | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Bits per byte of ``model`` on a byte stream: mean next-byte cross-entropy (nats) / ln 2.

    Eval-mode routing (no Gumbel noise). The stream is cut into ``lanes`` contiguous lanes run in
    parallel, each read in chunks of ``seq_len`` with its state carried from chunk to chunk, so every
    byte but a lane's first is predicted with all of its lane's preceding text as context.
    Returns ``{"bits_per_byte", "nats_per_byte", "bytes", "lanes", "seconds"}``. ``progress(done, total)``
    is called after each chunk (bytes predicted so far, of all); when ``stop()`` turns true between chunks,
    EvaluationStopped is raised.
    """
    check("seq_len", seq_len)
    ids = eval_lanes(data, lanes, max_bytes)
    n_lanes, lane_len = ids.shape
    t0 = time.perf_counter()
    state, total, count = None, 0.0, 0
    for start in range(0, lane_len - 1, seq_len):
        if stop is not None and stop():
            raise EvaluationStopped
        end = min(start + seq_len, lane_len - 1)
        logits, state = model(ids[:, start:end], state=state)
        total += cross_entropy_sum(logits, ids[:, start + 1 : end + 1])
        count += n_lanes * (end - start)
        if progress is not None:
            progress(count, n_lanes * (lane_len - 1))
    nats = total / count
    check_metric("bits per byte", nats / math.log(2), NON_FINITE_OUTPUT, WeightsError)
    return {"bits_per_byte": nats / math.log(2), "nats_per_byte": nats, "bytes": count,
            "lanes": n_lanes, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------- the loop
def train(
    model_or_config,
    data,
    out_dir: str,
    config: TrainConfig | None = None,
    log: Callable[[dict], None] | None = None,
    world: distributed.World | None = None,
    callbacks=(),
    **overrides,
) -> TrainResult:
    """Train a THL model on bytes and checkpoint it to ``out_dir``.

    ``model_or_config``: a THLModel, or a THLConfig for a fresh model seeded with ``config.seed`` (ignored,
    may be None, when resuming: the model comes from the checkpoint). ``data``: a path (file or folder)
    or the bytes themselves. ``config`` plus keyword ``overrides`` (``steps=6, seq_len=16, ...``) make the
    TrainConfig. ``log`` receives one dict per event (``event`` = start, step, eval_progress, eval,
    checkpoint, message, done). ``callbacks``: objects whose methods named ``on_<event>`` (any of
    ``on_start``, ``on_step``, ``on_eval_progress``, ``on_eval``, ``on_checkpoint``, ``on_message``,
    ``on_done``) are called with that event's dict, after ``log`` (``on_step`` gets the step, loss, lr,
    grad_norm, ...; ``on_eval`` the held-out bits_per_byte; ``on_checkpoint`` the path written); a
    missing method is skipped. Returns a TrainResult; with ``interrupted=True`` after Ctrl-C (a checkpoint
    was written). A Ctrl-C during the final evaluation stops that evaluation and keeps the trained
    checkpoint (``held_out_bpb`` is then None).
    ``world``: the ranks sharing the run's lanes (``thl_np.training.distributed``); by default the MPI world
    when an MPI launcher started this process, else this process alone. The run holds ``out_dir``'s run
    lock (``thl_np.io.folder.run_lock``) throughout: a second run into the same folder is refused.
    """
    from ..io.folder import run_lock

    world = distributed.detect_world() if world is None else world
    with run_lock(out_dir, active=world.rank == 0):  # rank 0 writes the folder, so rank 0 holds its lock
        return _train(model_or_config, data, out_dir, config, log, world, callbacks, **overrides)


def _train(model_or_config, data, out_dir, config, log, world, callbacks, **overrides) -> TrainResult:
    from ..engines.gradient import training_memory_bytes
    from ..model import THLModel, choose_fast, value_and_grad

    world.start()
    tc = (config or TrainConfig()).replace(**overrides)
    if world.size > 1 and tc.answer_weight != 1.0:
        raise InputError("--answer-weight is not supported under mpirun yet: each rank would divide by its own "
                         "answer bytes, so ranks would not match one process; train in one process or drop it")
    if world.size > 1 and tc.read_weight:
        raise InputError("--read-weight is not supported under mpirun yet: each rank would divide by its own "
                         "answers, so ranks would not match one process; train in one process or drop it")
    emit = _dispatch(log, callbacks)
    # the output folder is checked before any work: a run must never train and then fail at its first save
    out_dir = check_output_dir(out_dir, "the output folder")
    if ckpt.is_model_folder(out_dir):
        raise InputError(f"{out_dir!r} holds a model (config.json / model.safetensors), not a training run: choose "
                         "another output folder (a run keeps its models in step-NNNNNN/model)")
    train_bytes, held_bytes = split_bytes(_as_bytes(data), tc.held_out_fraction)
    latest = ckpt.latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    latest = world.root_value(latest)  # rank 0's folder decides: only rank 0 need see it
    if tc.resume:
        if latest is None:
            raise InputError(f"nothing to resume in {out_dir!r}: no checkpoint there; drop --resume to start")
        run = world.restore(latest, lambda path: _restore(path, tc, train_bytes, THLModel, emit), tc.batch_size)
    else:
        if latest is not None:
            raise InputError(
                f"{out_dir!r} already holds a training run ({os.path.basename(latest)}): pass --resume to "
                "continue it, or choose another output folder"
            )
        model = model_or_config
        if isinstance(model, THLConfig):
            model = THLModel(model, seed=tc.seed)
        if model is None:
            raise InputError("train() needs a THLModel or a THLConfig for a new run")
        run = _fresh_run(model, tc, train_bytes)
    _check_vocab(run.model.config)
    if run.model.config.quantization:
        raise InputError("this model's weights are int8 (quantized): train the float model it came from, then "
                         "quantize the result (thl-np quantize)")
    if tc.path == "auto" and not choose_fast(run.model.config, "auto"):
        custom = components_for(run.model.config).without_kernels()
        emit({"event": "message", "text": f"training on the plain path: the fast path has no kernels for {custom}"})
    elif tc.path == "fast":
        choose_fast(run.model.config, "fast")  # an InputError before any work when it cannot
    value_and_grad = functools.partial(value_and_grad, path=tc.path)
    if world.is_root:  # rank 0 alone writes to the output folder
        # a checkpoint holds the weights and AdamW's two moments; the previous one stays until the new one is complete
        need = 3 * sum(p.nbytes for p in run.model.params.values()) + (1 << 20)
        check_output_dir(out_dir, "the output folder", need_bytes=need)
    step = training_memory_bytes(run.model.config, tc.batch_size, tc.seq_len, run.model.dtype, breakdown=True)
    check_allocation(step["total"] - step["params"], f"a training step of {tc.batch_size} x {tc.seq_len} bytes",
                     "lower --batch-size or --seq-len, or train a smaller model")
    world.agree(run, tc, train_bytes, len(held_bytes))

    if run.optimizer.frozen:
        frozen = sorted(run.optimizer.frozen)
        count = sum(run.model.params[n].size for n in frozen)
        emit({"event": "message", "text": f"frozen: {len(frozen)} arrays, {count:,} weights ("
              + ", ".join(frozen[:6]) + (", ..." if len(frozen) > 6 else "") + ")"})
    emit({"event": "start", "step": run.step, "steps": tc.steps, "resumed": tc.resume,
          "train_bytes": len(train_bytes), "held_out_bytes": len(held_bytes),
          "parameters": int(sum(p.size for p in run.model.params.values()))})
    result = _loop(run, tc, value_and_grad, train_bytes, held_bytes, out_dir, emit, world)
    world.finish()
    return result


def _dispatch(log, callbacks):
    """One emit: ``log(event)`` then each callback's ``on_<event>(event)`` (train's docstring)."""
    hooks = list(callbacks or ())

    def emit(event: dict) -> None:
        if log is not None:
            log(event)
        for hook in hooks:
            method = getattr(hook, "on_" + event["event"], None)
            if method is not None:
                method(event)

    return emit


def _loop(run: _Run, tc: TrainConfig, value_and_grad, train_bytes, held_bytes, out_dir, emit,
          world=distributed.SINGLE) -> TrainResult:
    fp = fingerprint(train_bytes)
    t_start = time.perf_counter()
    step_time, tokens, first_step = 0.0, 0, run.step
    saved_step = run.step if tc.resume else None
    interrupted, in_step, checkpoint_path = False, False, ckpt.latest_checkpoint(out_dir)

    def elapsed():
        return run.elapsed_before + time.perf_counter() - t_start

    def save():
        nonlocal saved_step, checkpoint_path
        if saved_step != run.step:
            _check_not_diverged(run, tc, checkpoint_path)  # a diverged model never replaces a good checkpoint
            checkpoint_path = world.save(run, lambda whole: _save(whole, tc, out_dir, fp, elapsed(),
                                                                  len(held_bytes), emit))
            saved_step = run.step
            emit({"event": "checkpoint", "step": run.step, "path": checkpoint_path})

    with _DeferredInterrupt() as stop, world.stop_together(stop) as stop:
        try:
            while run.step < tc.steps:
                in_step = True
                row, dt = _train_step(run, tc, value_and_grad, emit, world)
                in_step = False
                if math.isfinite(row["loss"]) and not math.isfinite(row["grad_norm"]) and \
                        skipped_steps(run.history) <= tc.skip_overflow:
                    del row["grad_norm"]        # a log holds no non-finite figure: the row says skipped instead
                    row["skipped"] = 1
                    emit({"event": "message", "text": f"step {run.step}: the gradient overflowed, the step is "
                          f"skipped ({skipped_steps(run.history)} of at most {tc.skip_overflow}, --skip-overflow)"})
                elif not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                    raise _diverged(tc, checkpoint_path, f"step {run.step} has loss {row['loss']} and gradient "
                                                         f"norm {row['grad_norm']}",
                                    overflow_over=row["seq_len"] if math.isfinite(row["loss"]) else None)
                step_time += dt
                tokens += tc.batch_size * row["seq_len"]
                eta = step_time / (run.step - first_step) * (tc.steps - run.step)
                emit({"event": "step", "steps": tc.steps, "eta_s": eta, "elapsed_s": elapsed(), **row})
                if stop.requested:
                    interrupted = True
                    break
                last = run.step == tc.steps  # the final evaluation and save follow the loop
                if tc.eval_every and run.step % tc.eval_every == 0 and len(held_bytes) >= 2 and not last:
                    _eval(run, tc, held_bytes, tc.eval_tokens, emit, world, stop)
                    if stop.requested:
                        interrupted = True
                        break
                if tc.checkpoint_every and run.step % tc.checkpoint_every == 0 and not last:
                    save()
        except KeyboardInterrupt:
            interrupted = True
            if in_step:  # the step was cut half way: its weights are not consistent, keep the last save
                emit({"event": "message", "text": f"interrupted inside step {run.step + 1}: keeping the last "
                      f"checkpoint ({checkpoint_path or 'none'})"})
                return _result(run, tc, out_dir, checkpoint_path, time.perf_counter() - t_start,
                               step_time, tokens, interrupted)
        if not interrupted and len(held_bytes) >= 2:
            if not (run.evals and run.evals[-1]["step"] == run.step):  # a resume at the end: done already
                try:  # a Ctrl-C (first or second) stops the evaluation, never the save of the trained weights
                    _eval(run, tc, held_bytes, tc.eval_tokens, emit, world, stop)
                except KeyboardInterrupt:
                    emit({"event": "message", "text": "final evaluation interrupted: saving the trained model"})
        save()
    if interrupted:
        emit({"event": "message", "text": f"interrupted: checkpoint at step {run.step} in {checkpoint_path}; "
              "run again with --resume to continue"})
    result = _result(run, tc, out_dir, checkpoint_path, time.perf_counter() - t_start, step_time, tokens,
                     interrupted)
    emit({"event": "done", **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                              if f.name not in ("history", "evals")}})
    return result


def skipped_steps(history) -> int:
    """How many steps of a run's log were skipped (``TrainConfig.skip_overflow``), the step just taken included
    when its gradient overflowed (its row not yet marked)."""
    return sum(1 for r in history if r.get("skipped") or not math.isfinite(r.get("grad_norm", 0.0)))


@functools.lru_cache(maxsize=4)
def _norm_threads(nbytes: int) -> StepThreads:
    """OpenBLAS's threads for the gradient norm over ``nbytes`` (thl_np._threads: one for a small model,
    and only the cores other processes leave idle; re-read every second)."""
    return StepThreads(nbytes)


def _train_step(run: _Run, tc: TrainConfig, value_and_grad, emit, world=distributed.SINGLE) -> tuple[dict, float]:
    """One truncated-BPTT step (module docstring). Returns the log row and the step's wall time."""
    from ..eval.diagnostics import MemoryStats, log_row

    t0 = time.perf_counter()
    cfg = run.model.config
    batch = run.batches.next_batch()
    T = batch.inputs.shape[1]
    state_in = run.state if (tc.carry_state and not batch.reset) else None
    # hard routing draws nothing: the noise stream stays where it is (a resumed run reads the same)
    uniforms = None if tc.routing == "hard" else \
        world.draw_uniforms(run.rng, (T, tc.batch_size, cfg.num_heads, cfg.memory_slots))
    inputs, targets = world.take_batch(batch.inputs, batch.targets)  # this rank's lanes (all, alone)
    weights = None if batch.weights is None else world.take_batch(batch.weights, batch.weights)[0]
    read_term = {}
    read = None if not tc.read_weight else read_targets_of(
        batch, tc, report=lambda mean, n: read_term.update(read_nats=mean, read_rows=n))   # one process only
    stats = MemoryStats(cfg.memory_slots)
    loss, grads, state_out = value_and_grad(run.model, inputs, targets, state=state_in,
                                            gumbel_uniform=uniforms, return_state=True,
                                            loss_weights=weights, observe=stats.add, read_targets=read,
                                            memory_bptt=tc.memory_bptt)
    loss = float(loss)
    grads = dict(grads)
    loss = world.sum_gradients(grads, loss, tc.batch_size)  # the whole batch's, on every rank
    for name in run.optimizer.frozen:  # a frozen weight's gradient neither steps nor counts in the clipping norm
        grads.pop(name, None)
    # the norm's dot products run outside the training step's one-thread block: on the idle cores only
    with blas_threads(_norm_threads(sum(np.asarray(g).nbytes for g in grads.values())).count):
        norm = clip_grad_norm(grads, tc.grad_clip)
    lr = lr_at(run.step, tc.lr, tc.warmup, tc.lr_decay_steps or tc.steps, tc.min_lr_ratio)
    if math.isfinite(loss) and math.isfinite(norm):
        run.optimizer.step(run.model.params, grads, lr)
        run.state = state_out if tc.carry_state else None
    # else: the run has diverged; the loop stops it (the update is not applied, the weights stay finite)
    run.step += 1
    dt = time.perf_counter() - t0
    row = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": norm,
           "tokens_per_s": tc.batch_size * T / max(dt, 1e-9), "seq_len": T, **read_term}
    if math.isfinite(loss) and math.isfinite(norm):  # a diverged step's memory figures are left empty
        row.update(log_row(stats.summary(state_out)))
    run.history.append(row)
    return row, dt


def read_targets_of(batch, tc: TrainConfig, report=None):
    """The read-target term's ``ReadTargets`` for a batch's key-value rows under ``tc`` (None: no such row).
    ``read_match`` "value": one id, every step that writes a value byte toward any of the value's slots;
    "byte": the batch's own ids (step k toward value byte k's slots). The step writing the stop byte points
    nowhere in either (reading the value there writes one more value byte); "value+stop" is "value" with
    that step too (the ablation that showed it)."""
    if batch.asks is None:
        return None
    sources, asks = batch.sources, batch.asks
    if tc.read_match != "value+stop":
        asks = np.where(asks <= sources.max(axis=1, keepdims=True), asks, 0)
    if tc.read_match != "byte":
        sources, asks = (sources > 0).astype(np.int64), (asks > 0).astype(np.int64)
    return ReadTargets(sources=sources, asks=asks, weight=tc.read_weight, through=tc.read_through, report=report)


def _diverged(tc: TrainConfig, checkpoint_path, what: str, overflow_over: int | None = None) -> InputError:
    """The divergence error. ``overflow_over``: the step's window (bytes) when its loss was finite and its
    gradient was not, i.e. the backward overflowed, which no learning rate or clip can prevent: they act after it."""
    kept = f"the last good checkpoint, {checkpoint_path}, is kept" if checkpoint_path else "no checkpoint was written"
    if overflow_over is not None:
        # Seen on recall models at 2,048-byte windows (γ = 1) and 4,096 (γ = 0.9999): a long repeated table in the
        # window makes the forward chaotic and the gradient grows up to ~1.15x a step through the tiers reading the
        # memory (cutting the bank's own gradient does not stop it; docs/MEMORY.md, rounds eleven and twelve).
        return InputError(
            f"training diverged: {what}; {kept}. The loss is finite and its gradient is not: the gradient overflowed "
            f"on its way back through the window's {overflow_over} steps (it can grow step by step through the "
            f"recurrence where the model's forward is chaotic, as on long repeated text read from memory); a lower "
            f"--lr or --grad-clip acts after the backward and cannot prevent it. Train on shorter windows "
            f"(--seq-len), or with a memory decay below 1 (--set memory_decay=0.9999 delays the growth to longer "
            f"windows), then start again; or let the run skip such steps (--skip-overflow N, now {tc.skip_overflow})")
    return InputError(f"training diverged: {what}; {kept}. Lower the learning rate (--lr, now {tc.lr:g}) or clip "
                      f"the gradient (--grad-clip, now {tc.grad_clip:g}), then start again or resume")


def _check_not_diverged(run: _Run, tc: TrainConfig, checkpoint_path) -> None:
    """Every weight and optimiser moment finite, or the divergence error (and no checkpoint)."""
    stores = [("weight", run.model.params), ("AdamW first moment", run.optimizer.m),
              ("AdamW second moment", run.optimizer.v)]
    for what, store in stores:
        for name, a in store.items():
            where = first_non_finite(a)
            if where is not None:
                raise _diverged(tc, checkpoint_path, f"the {what} {name} holds {a[where]} at step {run.step}")


def _eval(run: _Run, tc: TrainConfig, held_bytes, max_bytes, emit, world=distributed.SINGLE,
          stop=None) -> float | None:
    """One held-out evaluation, its progress emitted as ``eval_progress`` events. A Ctrl-C (``stop``, in one
    process: ranks would wait on each other) ends it early: a message, no result, None."""
    t0 = time.perf_counter()

    def progress(done, total):
        emit({"event": "eval_progress", "step": run.step, "done": done, "total": total,
              "elapsed_s": time.perf_counter() - t0})

    stopped = None if stop is None or world.size > 1 else (lambda: stop.requested)
    fn = functools.partial(evaluate, progress=progress, stop=stopped)
    try:
        res = world.evaluate(fn, run.model, held_bytes, tc.seq_len, tc.eval_lanes, max_bytes)
    except EvaluationStopped:
        emit({"event": "message", "text": f"evaluation at step {run.step} stopped by Ctrl-C"})
        return None
    run.evals.append({"step": run.step, "bits_per_byte": res["bits_per_byte"]})
    emit({"event": "eval", "step": run.step, **res})
    return res["bits_per_byte"]


def _result(run, tc, out_dir, checkpoint_path, wall, step_time, tokens, interrupted) -> TrainResult:
    losses = [r["loss"] for r in run.history[-LOSS_WINDOW:]]
    final_eval = run.evals[-1]["bits_per_byte"] if run.evals and run.evals[-1]["step"] == run.step else None
    return TrainResult(
        out_dir=out_dir, step=run.step, steps=tc.steps,
        train_loss=float(np.mean(losses)) if losses else None,
        last_loss=run.history[-1]["loss"] if run.history else None,
        held_out_bpb=final_eval, wall_time_s=wall,
        tokens_per_s=tokens / step_time if step_time > 0 else 0.0,
        checkpoint=checkpoint_path, interrupted=interrupted,
        history=list(run.history), evals=list(run.evals),
    )


# ---------------------------------------------------------------------- set-up, save, restore
def _as_bytes(data) -> np.ndarray:
    if isinstance(data, (str, os.PathLike)):
        return load_bytes(data)
    return as_byte_array(data)


def _check_vocab(config: THLConfig) -> None:
    if config.vocab_size < 256:
        raise ConfigError(
            f"vocab_size = {config.vocab_size}, but byte training needs ids 0..255: use vocab_size >= 256 "
            "(259 for the byte tokenizer with its specials)"
        )


def _new_rng(seed: int) -> np.random.Generator:
    """The Gumbel noise stream: seeded separately from the weights' initialisation."""
    return np.random.default_rng([int(seed), 0x6E6F6973])


def _new_optimizer(model, tc: TrainConfig) -> AdamW:
    return AdamW(model.params, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                 frozen=frozen_names(model.params, tc.freeze))


def _new_batches(tc: TrainConfig, train_bytes):
    """Lanes with a carried state (truncated BPTT), or independent windows (``TrainConfig.windows``)."""
    if not tc.windows:
        return LaneBatches(train_bytes, tc.batch_size, tc.seq_len)
    return WindowBatches(train_bytes, tc.batch_size, tc.seq_len, tc.seq_len_final, tc.seq_len_ramp or tc.steps,
                         tc.task_mix, parse_tasks(tc.tasks), tc.filler, tc.answer_weight, tc.seed)


def _fresh_run(model, tc: TrainConfig, train_bytes) -> _Run:
    return _Run(model=model, optimizer=_new_optimizer(model, tc), batches=_new_batches(tc, train_bytes),
                rng=_new_rng(tc.seed), state=None, step=0, history=[], evals=[])


def _save(run: _Run, tc: TrainConfig, out_dir, fp, elapsed, held_len, emit) -> str:
    def write(folder):
        run.model.save_pretrained(os.path.join(folder, "model"))
        with open(os.path.join(folder, "optimizer.npz"), "wb") as f:
            np.savez(f, **run.optimizer.state_dict())
        if run.state is not None:
            run.state.save(os.path.join(folder, "train_state.npz"))
        ckpt.write_csv(os.path.join(folder, "log.csv"), LOG_FIELDS, run.history)
        ckpt.write_csv(os.path.join(folder, "eval.csv"), EVAL_FIELDS, run.evals)
        ckpt.write_json(os.path.join(folder, "trainer.json"), {
            "format": "thl-np training checkpoint", "version": 1, "step": run.step,
            "data_position": run.batches.position, "rng_state": run.rng.bit_generator.state,
            "has_train_state": run.state is not None, "elapsed_s": elapsed,
            "data": {"train_bytes": len(run.batches.data), "held_out_bytes": held_len, "fingerprint": fp},
            "train_config": tc.to_dict(),
        })

    path = ckpt.write_checkpoint(out_dir, run.step, write, keep=tc.keep_checkpoints)
    _plot_losses(out_dir, run.history, run.evals, emit)
    return path


def saved_train_config(out_dir: str) -> TrainConfig | None:
    """The TrainConfig stored in the latest checkpoint of ``out_dir`` (None without one): a resumed
    command line starts from it, so flags not given again keep their values."""
    latest = ckpt.latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    if latest is None:
        return None
    info = _read_trainer_json(latest)
    try:
        return TrainConfig.from_dict(info["train_config"])
    except InputError as exc:
        raise _damaged(latest, "trainer.json", f"its train_config is invalid: {exc}") from None


# what trainer.json must hold, and the type of each entry
_TRAINER_KEYS = {"step": int, "data_position": dict, "rng_state": dict, "has_train_state": bool,
                 "elapsed_s": (int, float), "data": dict, "train_config": dict}


def _damaged(path: str, file: str, why: str) -> InputError:
    return InputError(f"the checkpoint {path} is damaged: {file} {why}. Resume from another copy of the run, "
                      "or start a new run in another output folder")


def _read_trainer_json(path: str) -> dict:
    info = ckpt.read_json(os.path.join(path, "trainer.json"))
    if not isinstance(info, dict):
        raise _damaged(path, "trainer.json", f"is a JSON {type(info).__name__}, not an object")
    for key, kind in _TRAINER_KEYS.items():
        if key not in info:
            raise _damaged(path, "trainer.json", f"lacks {key!r}")
        if not isinstance(info[key], kind) or (kind is int and isinstance(info[key], bool)):
            raise _damaged(path, "trainer.json", f"has {key} = {info[key]!r:.60}, of the wrong type")
    if not isinstance(info["data"].get("fingerprint"), str):
        raise _damaged(path, "trainer.json", "lacks data.fingerprint")
    return info


def _restore(path: str, tc: TrainConfig, train_bytes, model_cls, emit) -> _Run:
    """The run saved at ``path``; a damaged file is an InputError naming it, never a KeyError deep inside."""
    import zipfile

    from ..state import InferenceState

    info = _read_trainer_json(path)
    saved = info["train_config"]
    if saved.get("batch_size") != tc.batch_size:
        raise InputError(
            f"the checkpoint was trained with batch_size {saved.get('batch_size')}, not {tc.batch_size}: "
            "resume with the same batch size (the carried state and the lanes depend on it)"
        )
    model = model_cls.from_pretrained(os.path.join(path, "model"))
    optimizer = _new_optimizer(model, tc)
    try:
        with np.load(os.path.join(path, "optimizer.npz"), allow_pickle=False) as z:
            optimizer.load_state_dict({k: z[k] for k in z.files})
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as exc:
        raise _damaged(path, "optimizer.npz", f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
    except InputError as exc:
        raise _damaged(path, "optimizer.npz", f"does not fit the model ({exc})") from None
    rng = _new_rng(tc.seed)
    try:
        rng.bit_generator.state = info["rng_state"]
    except (ValueError, TypeError, KeyError) as exc:
        raise _damaged(path, "trainer.json", f"has an rng_state NumPy cannot restore ({exc})") from None
    batches = _new_batches(tc, train_bytes)
    state = None
    if info["data"]["fingerprint"] == fingerprint(train_bytes):
        try:
            batches.position = info["data_position"]
        except InputError as exc:
            raise _damaged(path, "trainer.json", str(exc)) from None
        if info["has_train_state"]:
            state = InferenceState.load(os.path.join(path, "train_state.npz"))
            state.check(model.config, tc.batch_size)
    else:
        emit({"event": "message", "text": "the training data differs from the checkpoint's: its lanes start "
              "from the beginning with a fresh state"})
    logs = {}
    for name, fields, older in (("log.csv", LOG_FIELDS, OLDER_LOG_FIELDS), ("eval.csv", EVAL_FIELDS, ())):
        try:
            logs[name] = ckpt.read_csv(os.path.join(path, name), fields, older)
        except (OSError, ValueError, KeyError, TypeError, csv.Error) as exc:
            raise _damaged(path, name, f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
    if info["step"] < 0 or not math.isfinite(info["elapsed_s"]):
        raise _damaged(path, "trainer.json", f"has step {info['step']}, elapsed_s {info['elapsed_s']}")
    return _Run(model=model, optimizer=optimizer, batches=batches, rng=rng, state=state, step=info["step"],
                history=logs["log.csv"], evals=logs["eval.csv"], elapsed_before=float(info["elapsed_s"]))


def _plot_losses(out_dir: str, history: list, evals: list, emit) -> None:
    """``loss.png``: training loss and held-out loss (both nats/byte) against the step. Needs matplotlib
    (the optional ``[plot]`` extra); without it nothing is drawn and nothing is said."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    tmp = os.path.join(out_dir, f".loss.tmp-{os.getpid()}.png")
    try:
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([r["step"] for r in history], [r["loss"] / math.log(2) for r in history], lw=1, label="train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["bits_per_byte"] for r in evals], "o-", label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (bits per byte)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, os.path.join(out_dir, "loss.png"))
    except Exception as exc:  # a plot is a convenience: never let it stop a run
        if os.path.lexists(tmp):
            os.unlink(tmp)
        emit({"event": "message", "text": f"loss.png not written ({type(exc).__name__}: {exc})"})


class _DeferredInterrupt:
    """First Ctrl-C: set ``requested`` (the loop finishes its step, checkpoints and stops).
    Second Ctrl-C: KeyboardInterrupt at once. Only the main thread can own SIGINT; elsewhere this is
    a no-op and Ctrl-C behaves as usual."""

    def __enter__(self):
        self.requested, self._installed, self._previous = False, False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
        return False
