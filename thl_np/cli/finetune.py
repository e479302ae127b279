"""`thl-np finetune` and `thl-np predict`: task heads from the command line.

Thin wrappers over ``thl_np.finetune.trainer.finetune`` and ``thl_np.finetune.evaluate``; heavy imports happen
inside the commands.
"""
from __future__ import annotations

import json
import math

import click

from .params import Number
from .train import _fmt_time, _Progress

TASK_CHOICES = ("sequence-classification", "token-classification", "multiple-choice")
_FINETUNE_FLAGS = ("steps", "seq_len", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "eval_every",
                   "eval_examples", "checkpoint_every", "held_out_fraction", "seed", "path", "dropout")

JSONL_HELP = """\b
JSONL, one object per line (blank lines skipped, other keys ignored):
  sequence-classification  {"text": "...", "label": "spam"}
  token-classification     {"text": "ab c", "labels": ["W", "W", null, "W"]}
                           one label per UTF-8 byte of the text; null = not scored
  multiple-choice          {"context": "...", "choices": ["...", "...", "..."], "label": 1}
                           label = index of the right choice; each choice is read as
                           context + choice; every line has the same number of choices
A label may be an integer (used as its string). A bad line stops the run with a message naming it."""


class _FinetuneProgress(_Progress):
    """``_Progress`` with the start, evaluation and end lines of a fine-tuning run."""

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            verb = "resuming at step" if event["resumed"] else "fine-tuning from step"
            labels = event["labels"]
            what = f"{len(labels)} labels {list(labels.values())}" if labels else "one score per choice"
            base = event["majority_accuracy"]
            self._line(f"{verb} {event['step']} to {event['steps']}: {event['task']}, {what}; "
                       f"{event['parameters']:,} parameters; {event['train_examples']:,} training examples, "
                       f"{event['held_out_examples']:,} held out"
                       + ("" if base is None else f" (majority-class baseline {base:.4f})"))
        elif kind == "eval":
            if event["accuracy"] is None:
                self._line(f"step {event['step']}: no labelled held-out item")
                return
            self._line(f"step {event['step']}: held-out accuracy {event['accuracy']:.4f}, loss {event['loss']:.4f} "
                       f"({event['count']:,} items, {_fmt_time(event['seconds'])})")
        elif kind == "done":
            acc = "n/a" if event["held_out_accuracy"] is None else f"{event['held_out_accuracy']:.4f}"
            base = "n/a" if event["majority_accuracy"] is None else f"{event['majority_accuracy']:.4f}"
            loss = "n/a" if event["train_loss"] is None else f"{event['train_loss']:.4f}"
            state = "interrupted" if event["interrupted"] else "done"
            self._line(f"{state}: step {event['step']}/{event['steps']}, train loss {loss}, held-out accuracy {acc} "
                       f"(majority baseline {base}), time {_fmt_time(event['wall_time_s'])}; checkpoint "
                       f"{event['checkpoint']}")
        else:
            super().__call__(event)


@click.command("finetune", context_settings={"show_default": True}, epilog=JSONL_HELP)
@click.option("--task", type=click.Choice(TASK_CHOICES), help="The head to train (required for a new run).")
@click.option("--model", "base", help="Model to start from: a language-model folder (a new head is made), a task "
                                      "model folder, a run folder.  [default: the packaged model]")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training examples (JSONL).")
@click.option("--eval-data", type=click.Path(dir_okay=False),
              help="Held-out examples (JSONL). Default: --held-out of --data, chosen at random (seeded).")
@click.option("--out", required=True, help="Output folder: checkpoints, logs.")
@click.option("--steps", type=Number("steps"), help="Steps to reach.  [default: 300]")
@click.option("--seq-len", type=Number("seq_len"), help="Bytes per row at most (a longer text is cut).  [default: 129]")
@click.option("--batch-size", type=Number("batch_size"), help="Examples per step.  [default: 16]")
@click.option("--lr", type=Number("lr"), help="Peak learning rate.  [default: 1e-3]")
@click.option("--warmup", type=Number("warmup"), help="Linear warm-up steps.  [default: 30]")
@click.option("--weight-decay", type=Number("weight_decay"), help="AdamW decay.  [default: 0.01]")
@click.option("--grad-clip", type=Number("grad_clip"), help="Global-norm clip, 0 = off.  [default: 1.0]")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True),
              help="Dropout before a new head's classifier.  [default: 0.1]")
@click.option("--eval-every", type=Number("eval_every"), help="Eval period, 0 = end only.  [default: 100]")
@click.option("--eval-examples", type=Number("eval_examples"),
              help="Cap on held-out examples per periodic eval (the last reads all).")
@click.option("--checkpoint-every", type=Number("checkpoint_every"), help="Save period, 0 = end only.  [default: 100]")
@click.option("--held-out", "held_out_fraction", type=Number("held_out_fraction"),
              help="Fraction of --data held out when no --eval-data.  [default: 0.1]")
@click.option("--seed", type=Number("seed"),
              help="Seed: the new head, example order, dropout, routing noise.  [default: 0]")
@click.option("--path", type=click.Choice(["auto", "fast", "plain"]),
              help="Gradient path: fast kernels or the spec's composition (the same numbers).  [default: auto]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, help="Line period when not on a TTY.")
def finetune(task, base, data, eval_data, out, resume, log_every, **flags):
    """Fine-tune a task head (and the THL body under it) on labelled JSONL examples.

    Each step takes --batch-size examples (a seeded order, epoch after epoch), runs the body from the
    zero state over their bytes (BPTT through every step), the head and its loss, clips the gradient
    and takes an AdamW step (warm-up, then cosine). The held-out accuracy is printed every --eval-every
    steps and at the end, beside the majority-class baseline. Ctrl-C writes a checkpoint; --resume
    continues exactly where it stopped. The output folder loads with
    thl_np.THLForSequenceClassification.from_pretrained(OUT) (or the other two) and `thl-np predict`.

    \b
    Example:
      thl-np finetune --task sequence-classification --data train.jsonl --eval-data test.jsonl \\
          --out runs/topic --steps 300 --batch-size 16
      thl-np predict --model runs/topic "import email.message"
    """
    from ..finetune.trainer import FinetuneConfig, saved_finetune_config
    from ..finetune.trainer import finetune as run_finetune

    saved = saved_finetune_config(out) if resume else None
    if resume and saved is None:
        raise click.UsageError(f"nothing to resume in {out}: no checkpoint there")
    if not resume and task is None:
        raise click.UsageError("--task is required for a new run")
    if resume and task is not None and task != saved.task:
        raise click.UsageError(f"{out} is a {saved.task} run, not {task}")
    if resume and base is not None:
        click.echo("note: --model is ignored with --resume (the model comes from the checkpoint)", err=True)
    base_config = saved or FinetuneConfig(task=task)
    given = {k: v for k, v in flags.items() if k in _FINETUNE_FLAGS and v is not None}
    tc = base_config.replace(**given, resume=resume)
    result = run_finetune(base, data, out, tc, eval_data=eval_data, log=_FinetuneProgress(log_every))
    if result.interrupted:
        click.get_current_context().exit(130)


@click.command("predict", epilog=JSONL_HELP)
@click.option("--model", "model_dir", required=True, help="A task model folder or a `thl-np finetune` output folder.")
@click.argument("texts", nargs=-1)
@click.option("--data", type=click.Path(dir_okay=False),
              help="JSONL of the model's task (labels optional; with them, the accuracy is printed too).")
@click.option("--choice", "choices", multiple=True,
              help="Multiple choice with TEXTS: a choice for every text (the context). Repeat for each choice.")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Labels shown per text, most probable first.")
@click.option("--max-len", type=click.IntRange(min=1),
              help="Read at most this many bytes of a row (default: all; finetune's --seq-len reads rows as the "
                   "model was trained on them).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--path", type=click.Choice(["auto", "fast", "plain"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per example instead of text.")
def predict(model_dir, texts, data, choices, top, max_len, batch_size, path, as_json):
    """Label texts (arguments) or a JSONL file with a fine-tuned task model, with probabilities.

    Sequence classification prints the --top labels of each text; token classification prints the
    text as runs of bytes that share a label; multiple choice prints the probability of each choice.

    \b
    Examples:
      thl-np predict --model runs/topic "import email.message" "def test_x(self):"
      thl-np predict --model runs/tokens --data held-out.jsonl --json
      thl-np predict --model runs/nextline "for x in y:" --choice "    pass" --choice "import os"
    """
    import numpy as np

    from ..config import THLConfig
    from ..finetune import CHOICE, MODEL_CLASSES, TOKEN
    from ..finetune.evaluate import predict_batches
    from ..finetune.examples import IGNORE, read_task_file, texts_as_data
    from ..io.folder import resolve_model_dir

    folder = resolve_model_dir(model_dir)
    config = THLConfig.load(folder)
    if config.task is None:
        raise click.UsageError(f"{model_dir} is a language model, not a task model: fine-tune one with "
                               "`thl-np finetune` (or use `thl-np generate`)")
    if bool(texts) == bool(data):
        raise click.UsageError("give texts as arguments or --data FILE.jsonl (one of the two)")
    if config.task == CHOICE and texts and len(choices) < 2:
        raise click.UsageError("multiple choice from the command line needs at least two --choice")
    if choices and config.task != CHOICE:
        raise click.UsageError(f"--choice is for multiple-choice models; this one is {config.task}")
    model = MODEL_CLASSES[config.task].from_pretrained(folder)
    examples = (read_task_file(data, config.task, config.label2id, require_labels=False) if data
                else texts_as_data(config.task, texts, choices))
    names = config.id2label
    correct = counted = 0
    for index, ids, logp in predict_batches(model, examples, batch_size, max_len, path):
        probs = np.exp(logp)
        for row, i in enumerate(index):
            ex = examples.examples[i]
            if config.task == TOKEN:
                n = min(len(ex.ids[0]), ids.shape[1])
                pred, p = probs[row, :n].argmax(-1), probs[row, :n].max(-1)
                out = {"labels": [names[int(k)] for k in pred], "probabilities": [round(float(x), 6) for x in p]}
                y = ex.label[:n]
                correct += int(((pred == y) & (y != IGNORE)).sum())
                counted += int((y != IGNORE).sum())
                text = _token_runs(bytes(ex.ids[0][:n].astype(np.uint8)), out["labels"], p)
            elif config.task == CHOICE:
                p = probs[row]
                out = {"choice": int(p.argmax()), "probabilities": [round(float(x), 6) for x in p]}
                if ex.label != IGNORE:
                    correct += int(p.argmax() == ex.label)
                    counted += 1
                ctx = ex.text
                text = "\n".join(f"  {'*' if k == p.argmax() else ' '} {k}: {x:.4f}  "
                                 f"{_preview(bytes(ex.ids[k].astype(np.uint8))[len(ctx.encode()):])}"
                                 for k, x in enumerate(p))
                text = f"{_preview(ctx.encode())}\n{text}"
            else:
                p = probs[row]
                order = np.argsort(-p, kind="stable")
                out = {"label": names[int(order[0])], "probabilities": {names[k]: round(float(p[k]), 6)
                                                                         for k in range(len(p))}}
                if ex.label != IGNORE:
                    correct += int(order[0] == ex.label)
                    counted += 1
                shown = ", ".join(f"{names[int(k)]} {p[k]:.4f}" for k in order[:top])
                text = f"{names[int(order[0])]}\t{shown}\t{_preview(bytes(ex.ids[0].astype(np.uint8)))}"
            if as_json:
                click.echo(json.dumps({"line" if data else "text": ex.line, **out}))
            else:
                click.echo(text)
    if counted:
        acc = correct / counted
        if not math.isfinite(acc):  # pragma: no cover - a ratio of counts
            raise click.ClickException("accuracy is not finite")
        line = {"accuracy": acc, "count": counted}
        click.echo(json.dumps(line) if as_json else f"accuracy {acc:.4f} over {counted:,} labelled items")


def _preview(data: bytes, width: int = 60) -> str:
    text = data.decode("utf-8", errors="replace")
    return repr(text if len(text) <= width else text[:width - 1] + "…")


def _token_runs(data: bytes, labels, probs) -> str:
    """The text as runs of bytes with one label: '<label> <mean probability> <bytes>' per run."""
    lines, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            lines.append(f"{labels[start]:>12} {float(sum(probs[start:i]) / (i - start)):.3f} "
                         f"{data[start:i].decode('utf-8', errors='replace')!r}")
            start = i
    return "\n".join(lines) + "\n"


COMMANDS = [finetune, predict]
