"""Fine-tuning a task model on JSONL examples (``thl-np finetune``): the training loop of ``trainer.py``,
over examples instead of byte lanes.

One step, in this order:

1. the next ``batch_size`` examples of a seeded per-epoch order (``ExampleOrder``), as a batch
   (``thl_np.finetune.examples.batch``: byte ids padded with ``pad_token_id``, at most ``seq_len`` bytes a row);
2. Gumbel uniforms [T, N, H, J] (training-mode routing), then the head's dropout keep-mask, both from the
   run's own seeded ``np.random.Generator``;
3. ``model.value_and_grad``: the loss and the exact gradient through the head and the body (BPTT, every
   sequence from the zero state);
4. global-norm clipping and AdamW (``trainer``'s: warm-up + cosine ``lr_at``) over the trainable
   parameters (the language-model output head, and for the pooled heads the LayerNorm, stay as loaded).

Held-out accuracy is measured every ``eval_every`` steps and at the end, next to the majority-class
baseline. Checkpoints are ``trainer``'s (atomic, ``LATEST``): ``model/`` (the task model), ``optimizer.npz``,
``trainer.json`` (step, example position, RNG state, data fingerprints, the config), ``log.csv``,
``eval.csv``; a resumed run reaches the weights of an uninterrupted one bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..task_fields import CHOICE, SEQUENCE, TASKS
from ..training import checkpoint as ckpt
from ..training.optim import AdamW, clip_grad_norm
from ..training.schedule import lr_at
from ..training.trainer import LOG_FIELDS, LOSS_WINDOW, TrainConfig, _DeferredInterrupt, _new_rng

EVAL_FIELDS = ["step", "loss", "accuracy"]
BYTE_PAD_ID = 256   # the byte tokenizer's pad (thl_np.tokenizer.PAD_ID)


@dataclass
class FinetuneConfig(TrainConfig):
    """``TrainConfig`` with fine-tuning's defaults and three more knobs: ``task``; ``eval_examples``, a cap on
    the held-out examples of the periodic evaluations (the final one reads them all); ``dropout``, the
    head's dropout for a new head (None: 0.1, the PyTorch THL's). ``seq_len`` caps the bytes of a row;
    129 = 2·64 + 1 lets the default model's top tier (clock 64) run on a row's last byte.
    ``held_out_fraction`` of the examples is held out (a seeded random choice) unless held-out data is given.
    ``carry_state``, ``eval_tokens`` and ``eval_lanes`` do not apply (every example starts from the zero state).
    """

    steps: int = 300
    seq_len: int = 129
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 30
    eval_every: int = 100
    checkpoint_every: int = 100
    task: str = SEQUENCE
    eval_examples: int | None = None
    dropout: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.task not in TASKS:
            raise InputError(f"task = {self.task!r}: use one of {list(TASKS)}")


@dataclass
class FinetuneResult:
    """What a run reached: ``held_out_accuracy`` / ``held_out_loss`` of the final evaluation (None without
    held-out data), ``majority_accuracy`` the majority-class baseline on the same held-out data."""

    out_dir: str
    step: int
    steps: int
    train_loss: float | None
    held_out_loss: float | None
    held_out_accuracy: float | None
    majority_accuracy: float | None
    wall_time_s: float
    tokens_per_s: float
    checkpoint: str | None
    interrupted: bool = False
    labels: list | None = None
    history: list = field(default_factory=list, repr=False)
    evals: list = field(default_factory=list, repr=False)


@dataclass
class _Run:
    model: object
    optimizer: AdamW
    order: object
    rng: np.random.Generator
    step: int
    history: list
    evals: list
    elapsed_before: float = 0.0


# ---------------------------------------------------------------------------------------------- set-up
def start_model(task: str, base=None, id2label=None, seed: int | None = 0, dropout=None, log=None):
    """The model a new run starts from: ``base`` a task model (used as it is), a ``THLModel``, or a model
    folder (None: the packaged default model); a head of another task or none is initialised fresh for
    ``id2label`` (``log`` hears it)."""
    from ..model import THLModel
    from . import MODEL_CLASSES, TaskModel

    cls = MODEL_CLASSES[task]
    labels = {} if task == CHOICE else {"id2label": id2label}
    if isinstance(base, TaskModel):
        if base.task != task:
            raise InputError(f"the model is a {base.task} model, not {task}")
        return base
    if isinstance(base, THLModel):
        from .models import language_model_config

        model = cls(language_model_config(base.config), seed=seed, params=base.params, dtype=base.dtype,
                    classifier_dropout=dropout, **labels)
        if log:
            log(f"a new {task} head on the given THLModel (seed {seed})")
        return model
    if base is None:
        from ..io.folder import resolve_model_dir

        base = resolve_model_dir(None)
    model = cls.from_pretrained(base, seed=seed, log=log, **labels)
    if dropout is not None and dropout != model.config.classifier_dropout:
        model.body.config = model.config.replace(classifier_dropout=dropout)
    return model


def _ensure_pad(model, emit) -> None:
    """Batches of different lengths need a pad id: the byte tokenizer's (256) when the config has none."""
    c = model.config
    if c.pad_token_id is not None:
        return
    if c.vocab_size < BYTE_PAD_ID + 1:
        raise InputError(f"the model has no pad_token_id and its vocabulary ({c.vocab_size}) has no room for the "
                         f"byte tokenizer's pad ({BYTE_PAD_ID}): set pad_token_id in its config.json")
    model.body.config = c.replace(pad_token_id=BYTE_PAD_ID)
    emit({"event": "message", "text": f"pad_token_id = {BYTE_PAD_ID} (the byte tokenizer's pad): the model had none"})


def _held_out_split(data, fraction: float, seed: int):
    """A seeded random ``fraction`` of the examples (at least one, when the fraction is positive)."""
    n = len(data)
    n_held = int(round(n * fraction))
    if fraction > 0:
        n_held = max(1, n_held)
    if n_held >= n:
        raise InputError(f"{n} example(s) cannot give {n_held} held-out example(s) and still train: lower --held-out "
                         "or add examples")
    perm = np.random.default_rng([int(seed), 0x68656C64]).permutation(n)
    return data.subset(np.sort(perm[n_held:])), data.subset(np.sort(perm[:n_held]))


def _read(data, task, label2id, what):
    from .examples import TaskData, read_task_file

    if isinstance(data, TaskData):
        if data.task != task:
            raise InputError(f"the {what} are {data.task} examples, not {task}")
        return data
    return read_task_file(data, task, label2id=label2id)


# ---------------------------------------------------------------------------------------------- the loop
def finetune(base, data, out_dir, config: FinetuneConfig | None = None, *, eval_data=None,
             log: Callable[[dict], None] | None = None, **overrides) -> FinetuneResult:
    """Fine-tune a task model on ``data`` (a JSONL path or ``TaskData``) into ``out_dir``.

    ``base``: what a new run starts from (``start_model``: a task model, a THLModel, a model folder, None
    for the packaged default model); ignored when resuming. ``eval_data``: held-out examples (a path or
    TaskData); without it ``held_out_fraction`` of ``data`` is held out. ``config`` plus keyword
    ``overrides`` make the FinetuneConfig. ``log`` receives one dict per event (start, step, eval,
    checkpoint, message, done), as ``trainer.train``'s does. The run holds ``out_dir``'s run lock
    (``thl_np.io.folder.run_lock``) throughout: a second run into the same folder is refused."""
    from ..io.folder import run_lock

    with run_lock(out_dir):
        return _finetune(base, data, out_dir, config, log=log, eval_data=eval_data, **overrides)


def _finetune(base, data, out_dir, config, *, eval_data, log, **overrides) -> FinetuneResult:
    from .examples import ExampleOrder, majority_accuracy

    tc = (config or FinetuneConfig()).replace(**overrides)
    emit = log or (lambda event: None)
    say = lambda text: emit({"event": "message", "text": text})   # noqa: E731
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"the output path {out_dir!r} is a file: give a folder for the run's checkpoints")
    if ckpt.is_model_folder(out_dir):  # as train refuses it: the folder would hold a model and a run
        raise InputError(f"{out_dir!r} holds a model (config.json / model.safetensors), not a fine-tuning run: "
                         "choose another --out (a run keeps its models in step-NNNNNN/model)")
    latest = ckpt.latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    if tc.resume and latest is None:
        raise InputError(f"nothing to resume in {out_dir!r}: no checkpoint there; drop --resume to start")
    if not tc.resume and latest is not None:
        raise InputError(f"{out_dir!r} already holds a run ({os.path.basename(latest)}): pass --resume to continue "
                         "it, or choose another output folder")
    if tc.resume:
        run, train, held = _restore(latest, tc, data, eval_data)
    else:
        model, train, held = _prepare(tc, base, data, eval_data, say)
        _ensure_pad(model, emit)
        trainable = model.trainable_names()
        from .models import Subset

        optimizer = AdamW(Subset(model.params, trainable), weight_decay=tc.weight_decay,
                          betas=(tc.beta1, tc.beta2), eps=tc.eps)
        run = _Run(model=model, optimizer=optimizer, order=ExampleOrder(len(train), tc.batch_size, tc.seed),
                   rng=_new_rng(tc.seed), step=0, history=[], evals=[])
    _check_memory(run.model, train, tc)
    _check_writable(out_dir)
    tick = run.model.config.tier_timescales[-1]
    if run.model.pooled and tick > 1 and tc.seq_len < tick + 1:
        say(f"seq_len {tc.seq_len} < {tick + 1}: the top tier, which the head reads, runs every {tick} steps, so "
            "it will not see a row's last bytes; use --seq-len >= " + str(tick + 1))
    baseline = majority_accuracy(train, held, tc.seq_len) if held is not None else None
    emit({"event": "start", "step": run.step, "steps": tc.steps, "resumed": tc.resume, "task": tc.task,
          "train_examples": len(train), "held_out_examples": 0 if held is None else len(held),
          "labels": run.model.config.id2label, "majority_accuracy": baseline,
          "parameters": run.model.num_parameters(), "trainable": len(run.model.trainable_names())})
    return _loop(run, tc, train, held, baseline, out_dir, emit)


def _check_memory(model, train, tc) -> None:
    """Refuse, before the first step allocates it, a batch whose training step needs more memory than is
    available (as ``train`` does): ``batch_size`` rows (× the choices of multiple choice) of ``seq_len``."""
    from ..checks import check_allocation
    from ..engines.gradient import training_memory_bytes

    rows = tc.batch_size * (len(train.examples[0].ids) if train.examples and tc.task == CHOICE else 1)
    step = training_memory_bytes(model.config, rows, tc.seq_len, model.dtype, breakdown=True)
    check_allocation(step["total"] - step["params"], f"a fine-tuning step of {tc.batch_size} examples x "
                     f"{tc.seq_len} bytes", f"lower --batch-size (this file has {len(train)} training examples) "
                     "or --seq-len")


def _check_writable(out_dir) -> None:
    """The run's folder exists (made now, after the data and the model were read) and can be written to:
    found out before the first step, not at the first checkpoint."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {out_dir!r} ({exc.strerror}): choose another "
                         "--out") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"the output folder {out_dir!r} is not writable: choose another --out")


def _prepare(tc, base, data, eval_data, say):
    """A new run's model and examples: labels from the model's head when it has this task's, else from the
    training examples (sorted)."""
    from . import TaskModel

    label2id = None
    if isinstance(base, TaskModel) and base.task == tc.task:
        label2id = base.config.label2id
    elif isinstance(base, (str, os.PathLike)):
        from ..config import THLConfig
        from ..io.folder import resolve_model_dir

        cfg = THLConfig.load(resolve_model_dir(base))
        if cfg.task == tc.task:
            label2id = cfg.label2id
    train = _read(data, tc.task, label2id, "training examples")
    if tc.task != CHOICE and len(train.labels) < 2:
        raise InputError(f"the training examples use {len(train.labels)} label(s) ({train.labels}): a classifier "
                         "needs at least 2")
    labels = train.labels
    if eval_data is not None:
        held = _read(eval_data, tc.task, None if tc.task == CHOICE else {n: i for i, n in enumerate(labels)},
                     "held-out examples")
    elif tc.held_out_fraction > 0:
        train, held = _held_out_split(train, tc.held_out_fraction, tc.seed)
    else:
        held = None
    id2label = None if tc.task == CHOICE else dict(enumerate(labels))
    model = start_model(tc.task, base, id2label, tc.seed, tc.dropout, log=say)
    return model, train, held


def _loop(run, tc, train, held, baseline, out_dir, emit) -> FinetuneResult:
    t_start = time.perf_counter()
    step_time, tokens, first_step = 0.0, 0, run.step
    saved_step = run.step if tc.resume else None
    interrupted, in_step, checkpoint_path = False, False, ckpt.latest_checkpoint(out_dir)
    fingerprints = {"train": train.fingerprint(), "held_out": None if held is None else held.fingerprint()}

    def elapsed():
        return run.elapsed_before + time.perf_counter() - t_start

    def save():
        nonlocal saved_step, checkpoint_path
        if saved_step != run.step:
            checkpoint_path = _save(run, tc, out_dir, fingerprints, baseline, elapsed())
            saved_step = run.step
            emit({"event": "checkpoint", "step": run.step, "path": checkpoint_path})

    def evaluate(limit):
        from .evaluate import evaluate_task

        res = evaluate_task(run.model, held, tc.batch_size, tc.seq_len, limit, path=tc.path)
        run.evals.append({"step": run.step, "loss": res["loss"], "accuracy": res["accuracy"]})
        emit({"event": "eval", "step": run.step, "majority_accuracy": baseline, **res})

    with _DeferredInterrupt() as stop:
        try:
            while run.step < tc.steps:
                in_step = True
                row, dt, n_tokens = _step(run, tc, train, emit)
                in_step = False
                step_time += dt
                tokens += n_tokens
                eta = step_time / (run.step - first_step) * (tc.steps - run.step)
                emit({"event": "step", "steps": tc.steps, "eta_s": eta, "elapsed_s": elapsed(), **row})
                if stop.requested:
                    interrupted = True
                    break
                last = run.step == tc.steps
                if tc.eval_every and run.step % tc.eval_every == 0 and held is not None and not last:
                    evaluate(tc.eval_examples)
                if tc.checkpoint_every and run.step % tc.checkpoint_every == 0 and not last:
                    save()
        except KeyboardInterrupt:
            interrupted = True
            if in_step:
                emit({"event": "message", "text": f"interrupted inside step {run.step + 1}: keeping the last "
                      f"checkpoint ({checkpoint_path or 'none'})"})
                return _result(run, tc, out_dir, checkpoint_path, baseline, time.perf_counter() - t_start,
                               step_time, tokens, True)
        if not interrupted and held is not None and not (run.evals and run.evals[-1]["step"] == run.step):
            evaluate(None)
        save()
    if interrupted:
        emit({"event": "message", "text": f"interrupted: checkpoint at step {run.step} in {checkpoint_path}; "
              "run again with --resume to continue"})
    result = _result(run, tc, out_dir, checkpoint_path, baseline, time.perf_counter() - t_start, step_time, tokens,
                     interrupted)
    emit({"event": "done", **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                              if f.name not in ("history", "evals")}})
    return result


def _step(run, tc, train, emit):
    """One step (module docstring) → (log row, wall time, bytes in the batch)."""
    from .examples import batch
    from .models import Subset

    t0 = time.perf_counter()
    model = run.model
    ids, labels = batch(train, run.order.next_batch(), model.config, tc.seq_len)
    T = ids.shape[-1]
    N = ids.size // T
    c = model.config
    uniforms = run.rng.random((T, N, c.num_heads, c.memory_slots))
    loss, grads = model.value_and_grad(ids, labels, dropout=run.rng, gumbel_uniform=uniforms, path=tc.path)
    trainable = model.trainable_names()
    grads = {name: grads[name] for name in trainable}
    norm = clip_grad_norm(grads, tc.grad_clip)
    lr = lr_at(run.step, tc.lr, tc.warmup, tc.lr_decay_steps or tc.steps, tc.min_lr_ratio)
    if math.isfinite(loss) and math.isfinite(norm):
        run.optimizer.step(Subset(model.params, trainable), grads, lr)
    else:
        emit({"event": "message", "text": f"step {run.step + 1}: non-finite loss/gradient (loss {loss}, grad norm "
              f"{norm}); update skipped"})
    run.step += 1
    dt = time.perf_counter() - t0
    row = {"step": run.step, "loss": float(loss), "lr": lr, "grad_norm": norm, "tokens_per_s": ids.size / max(dt, 1e-9)}
    run.history.append(row)
    return row, dt, int(ids.size)


def _result(run, tc, out_dir, checkpoint_path, baseline, wall, step_time, tokens, interrupted) -> FinetuneResult:
    losses = [r["loss"] for r in run.history[-LOSS_WINDOW:]]
    final = run.evals[-1] if run.evals and run.evals[-1]["step"] == run.step else {}
    return FinetuneResult(
        out_dir=out_dir, step=run.step, steps=tc.steps, train_loss=float(np.mean(losses)) if losses else None,
        held_out_loss=final.get("loss"), held_out_accuracy=final.get("accuracy"), majority_accuracy=baseline,
        wall_time_s=wall, tokens_per_s=tokens / step_time if step_time > 0 else 0.0, checkpoint=checkpoint_path,
        interrupted=interrupted, labels=None if run.model.config.id2label is None
        else list(run.model.config.id2label.values()), history=list(run.history), evals=list(run.evals))


# ---------------------------------------------------------------------------------------------- save, restore
def _save(run, tc, out_dir, fingerprints, baseline, elapsed) -> str:
    def write(folder):
        run.model.save_pretrained(os.path.join(folder, "model"))
        with open(os.path.join(folder, "optimizer.npz"), "wb") as f:
            np.savez(f, **run.optimizer.state_dict())
        ckpt.write_csv(os.path.join(folder, "log.csv"), LOG_FIELDS, run.history)
        ckpt.write_csv(os.path.join(folder, "eval.csv"), EVAL_FIELDS, run.evals)
        ckpt.write_json(os.path.join(folder, "trainer.json"), {
            "format": "thl-np fine-tuning checkpoint", "version": 1, "step": run.step,
            "example_position": run.order.position, "rng_state": run.rng.bit_generator.state,
            "elapsed_s": elapsed, "data": fingerprints, "majority_accuracy": baseline,
            "train_config": tc.to_dict(),
        })

    return ckpt.write_checkpoint(out_dir, run.step, write, keep=tc.keep_checkpoints)


def saved_finetune_config(out_dir: str) -> FinetuneConfig | None:
    """The FinetuneConfig of the latest checkpoint in ``out_dir`` (None without one)."""
    latest = ckpt.latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    if latest is None:
        return None
    return FinetuneConfig.from_dict(ckpt.read_json(os.path.join(latest, "trainer.json"))["train_config"])


def _restore(path, tc, data, eval_data):
    from . import MODEL_CLASSES
    from .examples import ExampleOrder
    from .models import Subset

    info = ckpt.read_json(os.path.join(path, "trainer.json"))
    saved = info.get("train_config", {})
    for name in ("task", "batch_size", "seed", "held_out_fraction"):
        if saved.get(name) != getattr(tc, name):
            raise InputError(f"the checkpoint was trained with {name} {saved.get(name)!r}, not {getattr(tc, name)!r}: "
                             "resume with the same value (the example order depends on it)")
    model = MODEL_CLASSES[tc.task].from_pretrained(os.path.join(path, "model"))
    label2id = model.config.label2id
    train = _read(data, tc.task, label2id, "training examples")
    if eval_data is not None:
        held = _read(eval_data, tc.task, label2id, "held-out examples")
    elif tc.held_out_fraction > 0:
        train, held = _held_out_split(train, tc.held_out_fraction, tc.seed)
    else:
        held = None
    fp = info["data"]
    if fp["train"] != train.fingerprint() or fp["held_out"] != (None if held is None else held.fingerprint()):
        raise InputError(f"the examples differ from those the checkpoint {path} was trained on: resume with the same "
                         "--data (and --eval-data)")
    optimizer = AdamW(Subset(model.params, model.trainable_names()), weight_decay=tc.weight_decay,
                      betas=(tc.beta1, tc.beta2), eps=tc.eps)
    with np.load(os.path.join(path, "optimizer.npz"), allow_pickle=False) as z:
        optimizer.load_state_dict({k: z[k] for k in z.files})
    rng = _new_rng(tc.seed)
    rng.bit_generator.state = info["rng_state"]
    order = ExampleOrder(len(train), tc.batch_size, tc.seed)
    order.position = info["example_position"]
    run = _Run(model=model, optimizer=optimizer, order=order, rng=rng, step=int(info["step"]),
               history=_read_rows(os.path.join(path, "log.csv")), evals=_read_rows(os.path.join(path, "eval.csv")),
               elapsed_before=float(info["elapsed_s"]))
    return run, train, held


def _read_rows(path):
    """``ckpt.read_csv``, with an empty cell (a metric that had no value) read back as None."""
    import csv

    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: int(v) if k == "step" else (None if v in ("", "None") else float(v)) for k, v in row.items()}
            for row in rows]


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "start_model", "saved_finetune_config", "EVAL_FIELDS"]
