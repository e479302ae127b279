"""`thl-np train` and `thl-np eval`: train a byte-level THL model on text, measure bits per byte.

Both are thin wrappers over ``thl_np.training.train`` / ``evaluate``; this module only turns flags into
configs and training events into lines on the terminal. Heavy imports happen inside the commands.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import click

from ..checks import check_allocation, check_output_dir, check_plot_file, require_matplotlib
from ..config import DTYPES
from ..errors import InputError
from ..io.folder import resolve_model_dir
from ..training.haystack import HAYSTACKS
from ..training.trainer import TrainConfig
from .params import Number
from .train_init import NEW_RUN_DIM, NEW_RUN_SLOTS

# flag name -> TrainConfig field, for the flags that fall back to a resumed run's saved values
_TRAIN_FLAGS = ("steps", "seq_len", "batch_size", "lr", "warmup", "lr_decay_steps", "weight_decay", "grad_clip",
                "eval_every", "eval_tokens", "checkpoint_every", "held_out_fraction", "seed", "carry_state", "path",
                "full_bptt", "seq_len_final", "seq_len_ramp", "task_mix", "tasks", "filler", "answer_weight", "routing",
                "freeze", "read_weight", "read_through", "read_match", "memory_bptt", "skip_overflow")


def _fmt_time(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4.2s'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Progress:
    """Training events -> terminal lines: a live ``\\r`` line on a TTY, plain lines every
    ``log_every`` steps otherwise (logs and CI capture stay readable)."""

    def __init__(self, log_every: int, tty: bool | None = None, width: int | None = None):
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.width = width
        self.log_every = max(1, log_every)
        self.live = False

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "step":
            self._step(event)
        elif kind == "eval_progress":
            self._eval_progress(event)
        elif kind == "eval":
            self._line(f"step {event['step']}: held-out {event['bits_per_byte']:.4f} bits/byte "
                       f"({event['bytes']} bytes, {_fmt_time(event['seconds'])})")
        elif kind == "message":
            self._line(event["text"])
        elif kind == "start":
            verb = "resuming at step" if event["resumed"] else "training from step"
            self._line(f"{verb} {event['step']} to {event['steps']}: {event['parameters']:,} parameters, "
                       f"{event['train_bytes']:,} training bytes, {event['held_out_bytes']:,} held out")
        elif kind == "done":
            self._done(event)

    def _columns(self) -> int:
        return self.width or shutil.get_terminal_size((80, 24)).columns

    def _step(self, e: dict) -> None:
        # one unit everywhere: bits per byte (the loss is in nats inside the trainer)
        essentials = [f"step {e['step']}/{e['steps']}", f"loss {e['loss'] / math.log(2):.4f} bits/byte",
                      f"ETA {_fmt_time(e['eta_s'])}"]
        extras = [f"lr {e['lr']:.2e}", f"{e['tokens_per_s']:,.0f} tok/s"]
        if "mem_read_entropy" in e:  # the memory over the step's chunk (thl_np.eval.diagnostics)
            extras += [f"T {e['seq_len']}", f"mem H {e['mem_read_entropy']:.2f}", f"top1 {e['mem_top1_mass']:.2f}",
                       f"eff {e['mem_effective_slots']:.1f}", f"refine {e['mem_share_refine']:.0%}",
                       f"evict {e['mem_share_novel_evict']:.0%}", f"g {e['mem_mean_gate']:.2f}"]
        if "read_nats" in e:  # the read-target term's mean ℓ (nats), part of the loss times --read-weight
            extras.insert(0, f"read {e['read_nats']:.2f}")
        if self.tty:  # the live line fits the terminal: the extras are dropped, last first
            width = self._columns() - 1
            cols = list(essentials)
            for extra in extras:
                if len("  ".join([*cols, extra])) > width:
                    break
                cols.append(extra)
            text = "  ".join(cols)[:width]
            click.echo("\r" + text.ljust(width), nl=False)
            self.live = True
            return
        text = "  ".join(essentials + extras)
        if e["step"] % self.log_every == 0 or e["step"] == e["steps"]:
            click.echo(text)

    def _eval_progress(self, e: dict) -> None:
        """A live line on a TTY only (quiet in logs): how far the held-out evaluation is, with an estimate."""
        if not self.tty or not e["total"]:
            return
        frac = e["done"] / e["total"]
        eta = e["elapsed_s"] / frac * (1 - frac) if frac > 0 else 0.0
        width = self._columns() - 1
        text = (f"step {e['step']}: evaluating held-out {frac:.0%} ({e['done']:,}/{e['total']:,} bytes) "
                f"ETA {_fmt_time(eta)}")
        click.echo("\r" + text[:width].ljust(width), nl=False)
        self.live = True

    def _line(self, text: str) -> None:
        if self.live:
            click.echo()
            self.live = False
        click.echo(text)

    def _done(self, e: dict) -> None:
        loss = "n/a" if e["train_loss"] is None else f"{e['train_loss'] / math.log(2):.4f} bits/byte"
        bpb = "n/a" if e["held_out_bpb"] is None else f"{e['held_out_bpb']:.4f}"
        state = "interrupted" if e["interrupted"] else "done"
        self._line(f"{state}: step {e['step']}/{e['steps']}, train loss {loss}, held-out bits/byte {bpb}, "
                   f"time {_fmt_time(e['wall_time_s'])} ({e['tokens_per_s']:,.0f} tok/s); "
                   f"checkpoint {e['checkpoint']}")


class _StderrProgress:
    """``bar(done, total)`` → a live ``\\r`` line on standard error with an estimate of the time left; nothing
    with ``quiet`` or when standard error is not a terminal. The line is cleared at the end."""

    def __init__(self, what: str, quiet: bool = False, stream=None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.on = not quiet and (self.stream.isatty() if tty is None else tty)
        self.what, self.t0, self.shown = what, time.perf_counter(), False

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __call__(self, done: int, total: int) -> None:
        if not self.on or total <= 0:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (total - done) if done else 0.0
        width = shutil.get_terminal_size((80, 24)).columns - 1
        text = f"{self.what}: {done:,}/{total:,} ({done / total:.0%}), ETA {_fmt_time(eta)}"
        self.stream.write("\r" + text[:width].ljust(width))
        self.stream.flush()
        self.shown = True

    def __exit__(self, *exc):
        if self.shown:
            self.stream.write("\r" + " " * (shutil.get_terminal_size((80, 24)).columns - 1) + "\r")
            self.stream.flush()
        return False


def _data_filters(f):
    """--include / --exclude: repeatable glob patterns that select a data folder's files."""
    f = click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
                     help="Skip files whose name, folder names or relative path match (repeatable): "
                          "--exclude test --exclude 'site-packages'.")(f)
    f = click.option("--include", "include", multiple=True, metavar="GLOB",
                     help="Read only a folder's files whose name (or relative path, if GLOB has a '/') "
                          "matches (repeatable): --include '*.py'.")(f)
    return f


def _load_data(data, include, exclude):
    """The path itself when no filter is given (the trainer reads it), else the selected bytes."""
    if not include and not exclude:
        return data
    from ..training.data import load_bytes

    return load_bytes(data, include, exclude)


@click.command("train", context_settings={"show_default": True})
@click.option("--data", "data", required=True, help="Text file, or folder of text files (read recursively).")
@click.option("--out", "out", required=True, help="Output folder: checkpoints, logs, loss.png.")
@click.option("--steps", type=Number("steps"), help="Steps to reach.  [default: 1000]")
@click.option("--seq-len", "seq_len_text", metavar="L|START:FINAL",
              help="Bytes per chunk (BPTT length), or a schedule START:FINAL (128:4096: the length doubles in "
                   "equal stages over --seq-len-ramp steps; implies --full-bptt).  [default: 128]")
@click.option("--seq-len-ramp", type=Number("seq_len_ramp"),
              help="Steps over which START:FINAL reaches FINAL.  [default: --steps]")
@click.option("--full-bptt/--no-full-bptt", default=None,
              help="Independent windows of --seq-len bytes, each from an empty state with the gradient through "
                   "all of it (instead of lanes with a carried state).  [default: off]")
@click.option("--task-mix", type=Number("task_mix"),
              help="Share of the rows that are synthetic long-range tasks (implies --full-bptt).  [default: 0]")
@click.option("--tasks", help="Synthetic tasks, comma-separated: passkey, recall, copy, kv (key-value recall: "
                                "many templates, labels and value formats, updates, distractors; "
                                "docs/MEMORY.md), kv1 (kv with one pair, no update, no distractor), "
                                "kvp and kv1p (the same, half of them in procedural templates), kvq and kv1q "
                                "(those with procedural questions in forms of their own), kv1r (kv1q with wild "
                                "separators: punctuation marks), kv1w (one pair, half in wide forms: wild "
                                "separators, a question of its own, the statement's closing as the stop), kv1ws "
                                "(kv1w, some values closed by a space), kv1wst (kv1ws, some forms naming the "
                                "label twice: [name]V[/name]), "
                                "kv2p, kv4p and "
                                "kv8p (kv1p with 2, 4 and 8 pairs).  "
                                "[default: passkey,recall,copy]")
@click.option("--filler", type=click.Choice(["corpus", "python", "prose", "mixed"]),
              help="Text the tasks are hidden in: the training data itself, the passkey evaluation's filler "
                   "lines, or a mix.  [default: corpus]")
@click.option("--answer-weight", type=Number("answer_weight"),
              help="Loss weight of a task's answer bytes (1: like any byte).  [default: 1]")
@click.option("--read-weight", type=Number("read_weight"),
              help="Weight of the read-target term: a loss on the router's scores at a key-value task's answer, "
                   "toward the slots its value was written to (0: off; needs kv tasks).  [default: 0]")
@click.option("--read-through", type=click.Choice(["all", "query", "router"]),
              help="Where the read-target term's gradient goes: everything the scores depend on, or the query's "
                   "side only (never the memory that was written), or W_q and W_k alone.  [default: all]")
@click.option("--read-match", type=click.Choice(["value", "byte", "value+stop"]),
              help="The slots the read-target term points an answer step at: any slot of the value, or those "
                   "of the byte the step writes (answer byte k, value byte k); the step writing the stop byte "
                   "at none (value+stop: at the value's too, an ablation).  [default: value]")
@click.option("--memory-bptt", type=Number("memory_bptt"), metavar="N",
              help="Cut the memory bank's gradient every N steps of a window (a truncated backward through the "
                   "memory: the writes learn from the reads within N steps; the tiers' gradient still crosses).  "
                   "[default: the whole window]")
@click.option("--skip-overflow", type=Number("skip_overflow"), metavar="N",
              help="Skip up to N steps whose loss is finite and whose gradient overflowed (no update; the log "
                   "marks them), instead of stopping at the first.  [default: 0]")
@click.option("--routing", type=click.Choice(["gumbel", "hard"]),
              help="Memory reads while training: with the Gumbel noise of training-mode routing, or the hard "
                   "top-k of inference (no noise).  [default: gumbel]")
@click.option("--freeze", "freeze_globs", multiple=True, metavar="GLOB",
              help="Leave the parameters whose name matches untrained (repeatable; comma-separated also): "
                   "--freeze 'writer.*'. Each must match a parameter.  [default: none]")
@click.option("--batch-size", type=Number("batch_size"), help="Parallel lanes per batch.  [default: 8]")
@click.option("--dim", type=Number("dim"), help=f"Every model width, new run.  [default: {NEW_RUN_DIM}]")
@click.option("--memory-slots", type=Number("memory_slots"),
              help=f"Memory slots J, new run.  [default: {NEW_RUN_SLOTS}]")
@click.option("--write-rate", type=Number("write_rate"), help="Memory write rate η, new run.  [default: 0.05]")
@click.option("--config", "config_file", type=click.Path(dir_okay=True),
              help="Model config.json to start from (new run); --dim etc. override it.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype, new run.  [default: float32]")
@click.option("--lr", type=Number("lr"), help="Peak learning rate.  [default: 3e-3]")
@click.option("--warmup", type=Number("warmup"), help="Linear warm-up steps.  [default: 50]")
@click.option("--lr-decay-steps", type=Number("lr_decay_steps"),
              help="Step at which the cosine decay reaches its floor (default: --steps). With a larger value, "
                   "a run stopped at --steps is the first part of a longer schedule.")
@click.option("--weight-decay", type=Number("weight_decay"), help="AdamW decay.  [default: 0.01]")
@click.option("--grad-clip", type=Number("grad_clip"), help="Global-norm clip, 0 = off.  [default: 1.0]")
@click.option("--eval-every", type=Number("eval_every"), help="Eval period, 0 = end only.  [default: 100]")
@click.option("--eval-tokens", type=Number("eval_tokens"), help="Held-out bytes per eval (the final too).")
@click.option("--checkpoint-every", type=Number("checkpoint_every"), help="Save period, 0 = end only.  [default: 100]")
@click.option("--held-out", "held_out_fraction", type=Number("held_out_fraction"),
              help="Fraction of the byte stream held out (its end).  [default: 0.1]")
@click.option("--seed", type=Number("seed"), help="Seed: weights and routing noise.  [default: 0]")
@click.option("--carry-state/--no-carry-state", default=None,
              help="Carry the recurrent state between chunks (gradient cut).  [default: carry]")
@click.option("--init", "init", metavar="MODEL",
              help="Start from a model's weights (a model folder, a training run folder, or 'default': the "
                   "packaged model) instead of fresh ones; new run.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
              help="Set a model config field for a new run (repeatable): --set memory_decay=1.0.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--path", type=click.Choice(["auto", "fast", "plain"]),
              help="Gradient path: fast kernels, or the spec's composition (plain); auto takes fast where the "
                   "model's components have kernels.  [default: auto]")
@click.option("--log-every", type=click.IntRange(min=1), default=10, help="Line period when not on a TTY.")
@click.option("--distributed", is_flag=True,
              help="Require an MPI world (mpirun -n N thl-np train ...; needs the [mpi] extra). Without the "
                   "flag, a run started by mpirun is detected.")
@_data_filters
def train(data, out, config_file, dim, memory_slots, write_rate, dtype, resume, log_every, include, exclude,
          distributed, seq_len_text, init, sets, freeze_globs, **flags):
    """Train a byte-level THL model on a text file or folder (first 90% trained on, last 10% held out).

    Each step reads B lanes x T bytes, carries the recurrent state from chunk to chunk (truncated BPTT),
    and takes one AdamW step. Ctrl-C writes a checkpoint before stopping; --resume continues exactly
    where it stopped: give --data (and --include/--exclude) again, the run checks they are the same bytes;
    other flags not given again keep their saved values. A non-finite loss stops the run with an error and
    keeps the last checkpoint. --out is checked before the first step.

    \b
    Example:
      thl-np train --data /usr/share/common-licenses/GPL-3 --out runs/gpl \\
          --dim 128 --memory-slots 64 --steps 600 --batch-size 8 --seq-len 128
      thl-np train --data /usr/share/common-licenses/GPL-3 --out runs/gpl --resume --steps 1200
      thl-np eval --model runs/gpl --data held-out.txt
      thl-np train --data /usr/lib/python3.11 --include "*.py" --exclude test --out runs/py
      mpirun -n 4 thl-np train --data corpus.txt --out runs/c --batch-size 16   # 4 ranks, 4 lanes each
      thl-np train --data corpus/ --out runs/long --seq-len 128:2048 --task-mix 0.5 --answer-weight 10
    """
    from ..training.checkpoint import is_model_folder
    from ..training.distributed import detect_world
    from ..training.trainer import saved_train_config
    from ..training.trainer import train as run_training

    # --out is checked before anything is read or trained (train() checks it again, with the run's size)
    check_output_dir(out, "--out")
    if is_model_folder(out):
        raise InputError(f"--out {out} holds a model (config.json / model.safetensors), not a training run: "
                         "choose another folder (a run keeps its models in step-NNNNNN/model)")
    world = detect_world(required=distributed)  # under mpirun: the ranks share each batch's lanes
    base = (saved_train_config(out) if resume else None) or TrainConfig()
    base = world.root_value(base)  # rank 0's --out decides: only rank 0 need see it
    if seq_len_text is not None:
        from ..training.synthetic_tasks import parse_seq_len

        try:
            flags["seq_len"], flags["seq_len_final"] = parse_seq_len(seq_len_text)
        except InputError as exc:
            raise click.BadParameter(str(exc), param_hint="--seq-len") from None
        if flags["seq_len_final"] is None:
            flags.pop("seq_len_final")   # a plain length keeps a resumed run's schedule (if any)
    if freeze_globs:  # not given: a resumed run keeps its saved set, a new one freezes nothing
        flags["freeze"] = ",".join(freeze_globs)
    given = {k: v for k, v in flags.items() if k in _TRAIN_FLAGS and v is not None}
    tc = base.replace(**given, resume=resume)
    model_config = None
    if not resume:
        from .train_init import parse_sets, start_model

        model_config = start_model(init, config_file, dim, memory_slots, write_rate, dtype, parse_sets(sets))
    elif (any(v is not None for v in (config_file, dim, memory_slots, write_rate, dtype, init)) or sets) \
            and world.is_root:
        click.echo("note: --config/--dim/--memory-slots/--write-rate/--dtype/--init/--set are ignored with "
                   "--resume (the model comes from the checkpoint)", err=True)
    result = run_training(model_config, _load_data(data, include, exclude), out, tc,
                          log=_Progress(log_every) if world.is_root else None, world=world)
    if result.interrupted:
        click.get_current_context().exit(130)


# the longest context a --lengths / --plot-lengths entry may ask for (2 GiB of bytes): longer prompts are
# refused up front, before any array is sized from them
MAX_LENGTH = 2**31 - 1


def _int_list(ctx, param, value):
    """'256,1024,4096' -> [256, 1024, 4096] (a usage error names the flag otherwise)."""
    if value is None:
        return None
    try:
        out = [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1 or max(out) > MAX_LENGTH:
        raise click.BadParameter(f"{value if len(str(value)) <= 40 else str(value)[:40] + '...'!r} must list "
                                 f"integers in 1..{MAX_LENGTH:,}, e.g. 256,1024,4096")
    return out


def _depth(ctx, param, value):
    """--depth 0.5 or 0.1:0.9 -> (lo, hi); a usage error naming the flag otherwise."""
    from ..training.haystack import parse_depth

    try:
        return parse_depth(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_haystack(filler, haystack_dir, lengths) -> None:
    """The passkey haystack can be read and is long enough for every length (an InputError otherwise)."""
    from ..training.haystack import Haystack

    if haystack_dir is not None and filler != "source":
        raise click.UsageError(f"--haystack-dir is the source of --filler source, not --filler {filler}: drop one")
    hay = Haystack(filler, haystack_dir)
    for length in lengths:
        hay.check_prompt(length, "--lengths")
    # the prompt's bytes and its int64 ids, at least: refused now rather than failing mid-run
    check_allocation(9 * max(lengths), f"a {max(lengths):,}-byte passkey prompt", "give shorter --lengths")


@click.command("eval")
@click.option("--model", "model_dir",
              help="Model folder (config.json + model.safetensors) or a `thl-np train` output folder "
                   "[default: the packaged model].")
@click.option("--data", "data", help="Text file, or folder of text files (read recursively): bits per byte.")
@_data_filters
@click.option("--held-out", "held_out", type=Number("held_out"),
              help="Evaluate only the last FRACTION of the byte stream: the part `thl-np train --held-out "
                   "FRACTION` held out of the same --data/--include/--exclude.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Bytes per forward call (the state is carried across calls).")
@click.option("--lanes", type=click.IntRange(min=1), default=4, show_default=True,
              help="Contiguous lanes evaluated in parallel (each starts from an empty state).")
@click.option("--max-bytes", type=click.IntRange(min=2), help="Evaluate only the first N bytes.")
@click.option("--passkey", is_flag=True, help="Passkey retrieval: a 5-digit key hidden in a haystack (--filler), "
                                               "asked for at the end, at each --lengths.")
@click.option("--lengths", callback=_int_list, default="256,1024,4096", show_default=True,
              help="Passkey context lengths (bytes).")
@click.option("--trials", type=click.IntRange(min=1), default=10, show_default=True,
              help="Passkey trials per length.")
@click.option("--depth", callback=_depth, default="0.1:0.9", show_default=True, metavar="D|LO:HI",
              help="Where the key sits in the haystack (0 = start, 1 = just before the question): a fraction, "
                   "or a range LO:HI drawn uniformly for each trial.")
@click.option("--filler", type=click.Choice(HAYSTACKS), default="source", show_default=True,
              help="Passkey haystack: real Python source ('source': thl-np's own .py files, never trained on "
                   "by the packaged model, or --haystack-dir's), or filler lines ('python', 'prose').")
@click.option("--haystack-dir", "haystack_dir", type=click.Path(),
              help="With --filler source: a folder of .py files to hide the key in instead of thl-np's sources.")
@click.option("--seed", type=Number("seed"), default=0, show_default=True,
              help="Seed of the passkey keys and filler.")
@click.option("--memory-plot", "memory_plot", type=click.Path(dir_okay=False),
              help="Measure memory after each --plot-lengths tokens and draw it against a Transformer's "
                   "KV cache into this PNG (needs matplotlib).")
@click.option("--plot-lengths", callback=_int_list, default="256,1024,4096,16384,65536", show_default=True,
              help="Context lengths (tokens) measured for --memory-plot.")
@click.option("--compare", "compare_dir", metavar="OTHER_MODEL",
              help="With --data: also evaluate this model (e.g. a quantized copy) on the same bytes; print both "
                   "bits per byte, their difference and the mean KL divergence of the next-byte distributions.")
@click.option("--diagnostics", is_flag=True,
              help="Memory diagnostics (reads, writes, slots) over the first 4,096 bytes of --data, or without "
                   "--data over a passkey prompt at the longest --lengths.")
@click.option("--plot", "diag_plot", type=click.Path(dir_okay=False),
              help="With --diagnostics: draw slot use and the writer's branch over time into this PNG "
                   "(needs matplotlib).")
@click.option("--recall", "recall", is_flag=True,
              help="Associative recall: labels stated with values in real source, one asked at the end; "
                   "named cells (--cells), right = the whole value and its stop byte (docs/MEMORY.md).")
@click.option("--cells", "cells", metavar="CELL,...|all",
              help="With --recall: the cells to run (held, update, pairs-4, len-16K, writer-off, ...; 'all' adds "
                   "len-64K and len-256K).  [default: every cell up to 16K bytes]")
@click.option("--recall-length", "recall_length", type=click.IntRange(min=64),
              help="With --recall: the prompt length of every cell but the len-* ones.  [default: 4096]")
@click.option("--trace", is_flag=True, help="With --passkey: follow the first trial at each --lengths through "
                                             "the memory (where the key is written, kept, read); with --recall: "
                                             "the first trial of each cell.")
@click.option("--path", "run_path", type=click.Choice(["auto", "fast", "plain"]), default="auto", show_default=True,
              help="Decoding path of --passkey, --diagnostics and --trace (both give the same figures).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line on standard error (there is none when it is "
                                                  "not a terminal either).")
def eval_(model_dir, data, include, exclude, held_out, seq_len, lanes, max_bytes, passkey, lengths, trials,
          depth, filler, haystack_dir, seed, memory_plot, plot_lengths, compare_dir, diagnostics, diag_plot, trace,
          run_path, dtype, as_json, quiet, recall, cells, recall_length):
    """Evaluate a model: bits per byte on text (--data), passkey retrieval (--passkey), memory against
    context length (--memory-plot), the memory's workings (--diagnostics, --passkey --trace). Give at least
    one of them.

    Bits per byte is the next-byte cross-entropy / ln 2. Passkey accuracy is the fraction of trials whose
    greedy 5-byte answer is the key (chance: 1e-5; per digit 0.1); the key's teacher-forced bits per digit
    are shown next to a control prompt holding another key (equal: the key did not reach the question).
    Each length also reports the process's resident memory and the THL state's bytes (fixed).

    \b
    Example:
      thl-np eval --model runs/gpl --data /usr/share/common-licenses/MPL-2.0 --max-bytes 20000
      thl-np eval --data /usr/lib/python3.11 --include "*.py" --exclude test --held-out 0.05
      thl-np eval --passkey --lengths 1024,4096,16384 --trials 20 --seed 1000   # source haystack, depth 0.1:0.9
      thl-np eval --passkey --filler python --depth 0.5 --json   # the filler lines at a fixed depth
      thl-np eval --memory-plot docs/memory_vs_context.png
      thl-np eval --data /usr/lib/python3.11/json --compare default-int8   # float model vs its int8 copy
      thl-np eval --diagnostics --plot slots.png --lengths 4096
      thl-np eval --passkey --trace --lengths 1024 --trials 1
      thl-np eval --recall --trials 50 --seed 5000 --json > recall.json   # every cell up to 16K bytes
      thl-np eval --recall --cells held,update,len-1K --trials 5 --recall-length 1024 --trace
    """
    from ..model import THLModel

    if data is None and not passkey and memory_plot is None and not diagnostics and not recall:
        raise click.UsageError("nothing to evaluate: give --data PATH, --passkey, --recall, --diagnostics and/or "
                               "--memory-plot PATH")
    if (cells is not None or recall_length is not None) and not recall:
        raise click.UsageError("--cells and --recall-length choose --recall's trials: give --recall")
    recall_cells = None
    if recall:  # the cells and the haystack, before the model is loaded
        from ..eval.recall import cell_length, parse_cells
        from ..training.haystack import Haystack

        try:
            recall_cells = parse_cells(cells)
        except InputError as exc:
            raise click.BadParameter(str(exc), param_hint="--cells") from None
        hay = Haystack("source", haystack_dir)
        for name in recall_cells:
            hay.check_length(cell_length(name, recall_length))
        check_allocation(9 * max(cell_length(c, recall_length) for c in recall_cells), "a recall prompt",
                         "give shorter cells")
    if data is None and (include or exclude or held_out or max_bytes):
        raise click.UsageError("--include/--exclude/--held-out/--max-bytes select --data: give --data PATH")
    if compare_dir is not None and data is None:
        raise click.UsageError("--compare evaluates both models on --data: give --data PATH")
    if memory_plot is not None:  # the plot's file and its library, before the measurements
        check_plot_file(memory_plot, "--memory-plot")
        require_matplotlib("the memory plot")
    if (diag_plot and not diagnostics) or (trace and not (passkey or recall)):
        raise click.UsageError("--plot draws --diagnostics, --trace follows --passkey or --recall: give them "
                               "together")
    if diag_plot:
        check_plot_file(diag_plot, "--plot")
        require_matplotlib("the diagnostics plot")
    if passkey or (diagnostics and data is None):  # the haystack, before the model is loaded
        _check_haystack(filler, haystack_dir, lengths if passkey else [max(lengths)])
    t0 = time.perf_counter()
    path = resolve_model_dir(model_dir)
    model = THLModel.from_pretrained(path, dtype=dtype)
    other = None if compare_dir is None else THLModel.from_pretrained(resolve_model_dir(compare_dir), dtype=dtype)
    res = {"model": os.fspath(path)}
    say = (lambda text: None) if as_json else click.echo
    if passkey:
        from ..eval.long_context import passkey_eval, passkey_lines

        with _StderrProgress("passkey trials", quiet) as bar:
            report = passkey_eval(model, lengths, trials=trials, depth=depth, seed=seed, filler=filler,
                                  haystack_dir=haystack_dir, path=run_path, on_trial=bar)
        res["passkey"] = report
        for line in passkey_lines(report):
            say(line)
        if trace and passkey:
            from .memory import run_traces

            res["trace"] = run_traces(model, lengths, seed, depth, filler, run_path, say, haystack_dir)
    if recall:
        from ..eval.recall import recall_eval, recall_lines

        with _StderrProgress("recall trials", quiet) as bar:
            report = recall_eval(model, recall_cells, trials=trials, seed=seed, length=recall_length,
                                 haystack_dir=haystack_dir, path=run_path, on_trial=bar)
        res["recall"] = report
        for line in recall_lines(report):
            say(line)
        if trace:
            from ..eval.recall import recall_trace
            from ..eval.trace import trace_lines

            res["recall_trace"] = []
            for name in recall_cells:
                tr = recall_trace(model, name, seed=seed, length=recall_length, haystack_dir=haystack_dir,
                                  path=run_path)
                for line in trace_lines(tr):
                    say(line)
                res["recall_trace"].append(tr)
    if memory_plot is not None:
        from ..eval.long_context import format_bytes, memory_vs_context, plot_memory

        report = memory_vs_context(model, plot_lengths, seed=seed)
        report["plot"] = plot_memory(report, memory_plot)
        res["memory"] = report
        tf = report["transformer"]
        say(f"memory vs context (batch 1); Transformer KV cache computed for {tf['layers']} layers x "
            f"width {tf['width']}, float32:")
        for r in report["results"]:
            say(f"  T={r['length']:>7}: THL state {format_bytes(r['state_bytes'])}, session "
                f"{format_bytes(r['session_bytes'])}, RSS {format_bytes(r['rss_bytes'])} (grew "
                f"{format_bytes(r['rss_growth_bytes'])} over the T tokens); "
                f"KV cache {format_bytes(r['kv_cache_bytes'])}")
        say(f"wrote {report['plot']}")
    stream = None
    if data is not None:
        from ..training.data import load_bytes, split_bytes

        stream = load_bytes(data, include, exclude)
        if held_out:
            stream = split_bytes(stream, held_out)[1]
    if diagnostics:
        from .memory import diagnostics_text, run_diagnostics

        ids, what = diagnostics_text(stream, lengths, filler, seed, depth, haystack_dir)
        res["diagnostics"] = run_diagnostics(model, ids, what, run_path, diag_plot, say)
    if data is not None:
        from ..training.trainer import evaluate

        if other is None:
            bpb = evaluate(model, stream, seq_len=seq_len, lanes=lanes, max_bytes=max_bytes)
        else:
            from ..eval.compare import compare_lines, compare_models

            with _StderrProgress("comparing, bytes", quiet) as bar:
                bpb = compare_models(model, other, stream, seq_len=seq_len, lanes=lanes, max_bytes=max_bytes,
                                     progress=bar)
            bpb["compare"]["model"] = os.fspath(resolve_model_dir(compare_dir))
        res.update(bpb, data=data)
        if include or exclude or held_out:
            res.update(include=list(include), exclude=list(exclude), held_out=held_out)
        say(f"model {path}: {bpb['bytes']:,} bytes predicted over {bpb['lanes']} lane(s) "
            f"in {_fmt_time(bpb['seconds'])}")
    res["seconds"] = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(res))
    elif other is not None:
        for line in compare_lines(res, os.fspath(path), res["compare"]["model"]):
            click.echo(line)
    elif data is not None:
        click.echo(f"bits_per_byte: {res['bits_per_byte']:.4f}")


COMMANDS = [train, eval_]
