"""`thl-np train` and `thl-np eval`: train a byte-level THL model on text, measure bits per byte.

Both are thin wrappers over ``thl_np.training.train`` / ``evaluate``; this module only turns flags into
configs and training events into lines on the terminal. Heavy imports happen inside the commands.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import click

from ..config import DTYPES, THLConfig
from ..training.trainer import TrainConfig

NEW_RUN_DIM = 128
NEW_RUN_SLOTS = 64

# flag name -> TrainConfig field, for the flags that fall back to a resumed run's saved values
_POS = click.IntRange(min=1)
_NONNEG = click.IntRange(min=0)
_TRAIN_FLAGS = ("steps", "seq_len", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "eval_every",
                "eval_tokens", "checkpoint_every", "held_out_fraction", "seed", "carry_state")


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

    def __init__(self, log_every: int, tty: bool | None = None):
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.log_every = max(1, log_every)
        self.live = False

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "step":
            self._step(event)
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

    def _step(self, e: dict) -> None:
        text = (f"step {e['step']}/{e['steps']}  loss {e['loss']:.4f}  lr {e['lr']:.2e}  "
                f"{e['tokens_per_s']:,.0f} tok/s  ETA {_fmt_time(e['eta_s'])}")
        if self.tty:
            click.echo("\r" + text.ljust(78), nl=False)
            self.live = True
        elif e["step"] % self.log_every == 0 or e["step"] == e["steps"]:
            click.echo(text)

    def _line(self, text: str) -> None:
        if self.live:
            click.echo()
            self.live = False
        click.echo(text)

    def _done(self, e: dict) -> None:
        loss = "n/a" if e["train_loss"] is None else f"{e['train_loss']:.4f} nats/byte"
        bpb = "n/a" if e["held_out_bpb"] is None else f"{e['held_out_bpb']:.4f}"
        state = "interrupted" if e["interrupted"] else "done"
        self._line(f"{state}: step {e['step']}/{e['steps']}, train loss {loss}, held-out bits/byte {bpb}, "
                   f"time {_fmt_time(e['wall_time_s'])} ({e['tokens_per_s']:,.0f} tok/s); "
                   f"checkpoint {e['checkpoint']}")


def _model_config(config_file, dim, memory_slots, write_rate, dtype) -> THLConfig:
    """A new run's model: vocab 259 (byte tokenizer), every width ``dim``, ``memory_slots`` slots, the
    rest THLConfig defaults; or ``--config``'s fields with only the flags actually given on top."""
    from .basic import build_init_config

    if config_file is None:
        dim = NEW_RUN_DIM if dim is None else dim
        memory_slots = NEW_RUN_SLOTS if memory_slots is None else memory_slots
    overrides = {"memory_slots": memory_slots, "write_rate": write_rate, "dtype": dtype}
    return build_init_config(config_file, overrides, dim, None)


@click.command("train", context_settings={"show_default": True})
@click.option("--data", "data", required=True, help="Text file, or folder of text files (read recursively).")
@click.option("--out", "out", required=True, help="Output folder: checkpoints, logs, loss.png.")
@click.option("--steps", type=_POS, help="Steps to reach.  [default: 1000]")
@click.option("--seq-len", type=_POS, help="Bytes per chunk (BPTT length).  [default: 128]")
@click.option("--batch-size", type=_POS, help="Parallel lanes per batch.  [default: 8]")
@click.option("--dim", type=_POS, help=f"Every model width, new run.  [default: {NEW_RUN_DIM}]")
@click.option("--memory-slots", type=click.IntRange(min=1),
              help=f"Memory slots J, new run.  [default: {NEW_RUN_SLOTS}]")
@click.option("--write-rate", type=float, help="Memory write rate η, new run.  [default: 0.05]")
@click.option("--config", "config_file", type=click.Path(dir_okay=True),
              help="Model config.json to start from (new run); --dim etc. override it.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype, new run.  [default: float32]")
@click.option("--lr", type=float, help="Peak learning rate.  [default: 3e-3]")
@click.option("--warmup", type=_NONNEG, help="Linear warm-up steps.  [default: 50]")
@click.option("--weight-decay", type=click.FloatRange(min=0), help="AdamW decay.  [default: 0.01]")
@click.option("--grad-clip", type=click.FloatRange(min=0), help="Global-norm clip, 0 = off.  [default: 1.0]")
@click.option("--eval-every", type=_NONNEG, help="Eval period, 0 = end only.  [default: 100]")
@click.option("--eval-tokens", type=click.IntRange(min=2), help="Cap on held-out bytes per periodic eval.")
@click.option("--checkpoint-every", type=_NONNEG, help="Save period, 0 = end only.  [default: 100]")
@click.option("--held-out", "held_out_fraction", type=click.FloatRange(min=0, max=1, max_open=True),
              help="Fraction of the byte stream held out (its end).  [default: 0.1]")
@click.option("--seed", type=_NONNEG, help="Seed: weights and routing noise.  [default: 0]")
@click.option("--carry-state/--no-carry-state", default=None,
              help="Carry the recurrent state between chunks (gradient cut).  [default: carry]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, help="Line period when not on a TTY.")
def train(data, out, config_file, dim, memory_slots, write_rate, dtype, resume, log_every, **flags):
    """Train a byte-level THL model on a text file or folder (first 90% trained on, last 10% held out).

    Each step reads B lanes x T bytes, carries the recurrent state from chunk to chunk (truncated BPTT),
    and takes one AdamW step. Ctrl-C writes a checkpoint before stopping; --resume continues exactly
    where it stopped (flags not given again keep their saved values).

    \b
    Example:
      thl-np train --data /usr/share/common-licenses/GPL-3 --out runs/gpl \\
          --dim 128 --memory-slots 64 --steps 600 --batch-size 8 --seq-len 128
      thl-np eval --model runs/gpl --data held-out.txt
    """
    from ..training.trainer import saved_train_config
    from ..training.trainer import train as run_training

    base = (saved_train_config(out) if resume else None) or TrainConfig()
    given = {k: v for k, v in flags.items() if k in _TRAIN_FLAGS and v is not None}
    tc = base.replace(**given, resume=resume)
    model_config = None
    if not resume:
        model_config = _model_config(config_file, dim, memory_slots, write_rate, dtype)
    elif any(v is not None for v in (config_file, dim, memory_slots, write_rate, dtype)):
        click.echo("note: --config/--dim/--memory-slots/--write-rate/--dtype are ignored with --resume "
                   "(the model comes from the checkpoint)", err=True)
    result = run_training(model_config, data, out, tc, log=_Progress(log_every))
    if result.interrupted:
        click.get_current_context().exit(130)


@click.command("eval")
@click.option("--model", "model_dir", required=True,
              help="Model folder (config.json + model.safetensors) or a `thl-np train` output folder.")
@click.option("--data", "data", required=True, help="Text file, or folder of text files (read recursively).")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Bytes per forward call (the state is carried across calls).")
@click.option("--lanes", type=click.IntRange(min=1), default=4, show_default=True,
              help="Contiguous lanes evaluated in parallel (each starts from an empty state).")
@click.option("--max-bytes", type=click.IntRange(min=2), help="Evaluate only the first N bytes.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def eval_(model_dir, data, seq_len, lanes, max_bytes, dtype, as_json):
    """Bits per byte of a model on a text file or folder (next-byte cross-entropy / ln 2).

    \b
    Example:
      thl-np eval --model runs/gpl --data /usr/share/common-licenses/MPL-2.0 --max-bytes 20000
    """
    from ..model import THLModel
    from ..training.checkpoint import resolve_model_dir
    from ..training.data import load_bytes
    from ..training.trainer import evaluate

    t0 = time.perf_counter()
    path = resolve_model_dir(model_dir)
    model = THLModel.from_pretrained(path, dtype=dtype)
    stream = load_bytes(data)
    res = evaluate(model, stream, seq_len=seq_len, lanes=lanes, max_bytes=max_bytes)
    res.update(model=os.fspath(path), data=data, seconds=time.perf_counter() - t0)
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"model {path}: {res['bytes']:,} bytes predicted over {res['lanes']} lane(s) "
               f"in {_fmt_time(res['seconds'])}")
    click.echo(f"bits_per_byte: {res['bits_per_byte']:.4f}")


COMMANDS = [train, eval_]
