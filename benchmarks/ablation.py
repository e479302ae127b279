"""Ablations of THL's memory (issue 14): each row trains a small model from scratch with `thl-np train`, all
rows on the same data, seed and step budget, then measures held-out bits per byte and passkey retrieval.

The base recipe is docs/MEMORY.md's retr1 run (a fresh model trained on the long-range task mix):

    --dim 64 --memory-slots 16 --set memory_decay=1.0 --task-mix 0.9 --tasks passkey,recall,copy
    --filler mixed --seq-len 128:1024 --seq-len-ramp (0.8 x steps) --answer-weight 10 --lr 3e-3 --warmup 50
    --batch-size 8 --seed 0 --held-out 0.05

and each row changes one thing (``ROWS``; add a row there, e.g. a router variant registered by a plugin:
``Row("my_router", "router scores ...", ["--set", 'components={"router": "my_router"}'])`` with
``--plugin my_router.py``):

| row | what changes |
|---|---|
| baseline | nothing: J = 16, local window 64, Gumbel-noise routing, write rate η = 0.05, θ = 0.3, γ = 1 |
| no_local | Tier-0 local attention off (``local_window = 0``) |
| J64, J256 | memory slots J = 64, 256 (the baseline is J = 16) |
| hard_routing | no Gumbel noise while training (``--routing hard``: the eval-mode top-κ reads) |
| write_rate_0.2 | write rate η = 0.2 (``write_rate``: m_j += η·g·w, how far one write moves a slot; 4x) |
| theta_0.6 | novelty threshold θ = 0.6 (``novelty_theta``: how often a write is novel rather than a refine) |
| gamma_0.9995 | the spec's decay γ = 0.9995 (``memory_decay``) instead of 1 |
| unit_keys | the router variant ``unit_keys`` (scores by the slot's unit row, docs/MEMORY.md) |
| unit_keys_protect | ``unit_keys`` and λ_u = −1 (``underuse_weight``: a never-read slot is evicted last) |

"Write rate" has two readings in the spec's writer: how strongly a write moves a slot (η, the field named
``write_rate``) and how often the writer opens a slot instead of refining one (θ); both get a row.

Measured for each row (the trained model of its last checkpoint):

- held-out bits per byte on the held-out part of the data (the last ``--held-out`` of the stream, never
  trained on): ``carried``, the run's own final evaluation (every held-out byte in 4 contiguous lanes, the
  state carried through each, as the shipped model's card reports it); ``fresh``, the first ``--bpb-bytes``
  held-out bytes in lanes of 1,024 bytes each from an empty state (the longest training window: with γ = 1
  the two can differ a lot, docs/MEMORY.md);
- passkey retrieval (``thl-np eval --passkey``'s defaults: a haystack of real Python source, thl-np's own
  sources, never trained on; the key at a random depth in [0.1, 0.9]) at ``--lengths``, ``--trials`` trials
  with ``--eval-seed`` (its generators are not the training's; thl_np/training/haystack.py): greedy accuracy, and the
  key's teacher-forced bits per digit against a control prompt holding another key (equal: the key did not
  reach the question).

Writes into ``--out`` (checked before any work): ``runs/ROW`` (the training run, resumable), ``logs/ROW.log``
(its output), ``rows/ROW.json`` (the row's figures: a row that has one is skipped, so an interrupted
ablation resumes where it stopped, and a half-trained row resumes its run), ``ablation.md`` (the table, the
settings and the command), ``ablation.json`` and ``ablation.png`` (when matplotlib is installed; ``--plot``
requires it).

The full ablation (the lead's; about the budget of retr1 per row, 8 rows):

    STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
    python benchmarks/ablation.py --data "$STDLIB" --out docs/ablation --steps 1500 \\
        --lengths 256,1024,4096 --trials 20 --eval-seed 1000

(``--include '*.py'`` and the shipped model card's ``--exclude`` list are the defaults.) A check of the
script end to end in seconds, figures meaningless: ``python benchmarks/ablation.py --data FILE --out DIR --quick``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


@dataclass(frozen=True)
class Row:
    """One ablation: its name (a file name), what it changes, and the `thl-np train` flags that change it
    (given after the base recipe's, so they override it)."""

    name: str
    what: str
    flags: list = field(default_factory=list)


ROWS = [
    Row("baseline", "retr1's recipe: J = 16, local window 64, Gumbel routing, η = 0.05, θ = 0.3, γ = 1"),
    Row("no_local", "Tier-0 local attention off", ["--set", "local_window=0"]),
    Row("J64", "J = 64 memory slots", ["--memory-slots", "64"]),
    Row("J256", "J = 256 memory slots", ["--memory-slots", "256"]),
    Row("hard_routing", "no Gumbel noise in training: the eval-mode top-κ reads", ["--routing", "hard"]),
    Row("write_rate_0.2", "write rate η = 0.2 (4x the step of a write)", ["--write-rate", "0.2"]),
    Row("theta_0.6", "novelty threshold θ = 0.6 (fewer novel writes)", ["--set", "novelty_theta=0.6"]),
    Row("gamma_0.9995", "memory decay γ = 0.9995 (the spec's)", ["--set", "memory_decay=0.9995"]),
    Row("unit_keys", "router variant unit_keys: scores by the slot's unit row",
        ["--set", 'components={"router": "unit_keys"}']),
    Row("unit_keys_protect", "unit_keys and λ_u = -1 (a never-read slot is evicted last)",
        ["--set", 'components={"router": "unit_keys"}', "--set", "underuse_weight=-1"]),
]

#: The shipped model card's data filters (CPython's standard library, its tests and generated tables left out).
INCLUDE = ["*.py"]
EXCLUDE = ["test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data"]
FRESH_LANE = 1024


def base_flags(args) -> list[str]:
    """The base recipe's `thl-np train` flags (module docstring), sized by ``args``."""
    ramp = max(1, int(0.8 * args.steps))
    return ["--dim", str(args.dim), "--memory-slots", "16", "--set", "memory_decay=1.0", "--task-mix", "0.9",
            "--tasks", "passkey,recall,copy", "--filler", "mixed", "--seq-len", args.seq_len,
            "--seq-len-ramp", str(ramp), "--answer-weight", "10", "--lr", "3e-3", "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--held-out", str(args.held_out),
            "--steps", str(args.steps), "--eval-every", "0", "--checkpoint-every", str(args.checkpoint_every),
            "--log-every", "50"]


def data_flags(args) -> list[str]:
    out = ["--data", args.data]
    for pat in args.include:
        out += ["--include", pat]
    for pat in args.exclude:
        out += ["--exclude", pat]
    return out


def train_argv(args, row: Row, run_dir: str) -> list[str]:
    return ["train", *data_flags(args), "--out", run_dir, *base_flags(args), *row.flags]


def run_row(args, row: Row, held, say) -> dict:
    """Train ``row`` (resuming its run if one was started), then measure it; the row's figures."""
    import numpy as np

    from thl_np.checks import NON_FINITE_OUTPUT, check_metric
    from thl_np.cli import main
    from thl_np.errors import WeightsError
    from thl_np.eval.long_context import passkey_eval
    from thl_np.model import THLModel
    from thl_np.training import checkpoint as ckpt
    from thl_np.training.trainer import evaluate

    run_dir = os.path.join(args.out, "runs", row.name)
    argv = train_argv(args, row, run_dir)
    resume = ckpt.latest_checkpoint(run_dir) is not None if os.path.isdir(run_dir) else False
    say(f"[{row.name}] {'resuming' if resume else 'training'}: thl-np {shlex.join(argv)}")
    log_path = os.path.join(args.out, "logs", f"{row.name}.log")
    t0 = time.perf_counter()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = main(argv + (["--resume"] if resume else []))
    if rc != 0:
        raise SystemExit(f"error: row {row.name}: thl-np train exited with {rc}; see {log_path}")
    latest = ckpt.latest_checkpoint(run_dir)
    trainer = ckpt.read_json(os.path.join(latest, "trainer.json"))
    history = ckpt.read_csv(os.path.join(latest, "log.csv"))
    losses = [float(r["loss"]) for r in history[-20:]]
    model = THLModel.from_pretrained(os.path.join(latest, "model"))
    c = model.config
    say(f"[{row.name}] trained {trainer['step']} steps in {trainer['elapsed_s']:.0f} s; evaluating")
    # carried: the trainer's own final evaluation (every held-out byte, 4 lanes, the state carried)
    final = [r for r in ckpt.read_csv(os.path.join(latest, "eval.csv")) if int(r["step"]) == int(trainer["step"])]
    carried = {"bits_per_byte": float(final[-1]["bits_per_byte"]), "bytes": len(held)} if final else \
        evaluate(model, held, seq_len=128, lanes=4)
    n = min(len(held), args.bpb_bytes)
    fresh = evaluate(model, held[:n], seq_len=512, lanes=max(1, n // FRESH_LANE), max_bytes=n)
    for name, res in (("carried", carried), ("fresh", fresh)):
        check_metric(f"row {row.name}: held-out bits per byte ({name})", res["bits_per_byte"], NON_FINITE_OUTPUT,
                     WeightsError)
    passkey = passkey_eval(model, args.lengths, trials=args.trials, depth=(0.1, 0.9), seed=args.eval_seed,
                           filler="source")
    pk = {str(r["length"]): {k: r[k] for k in ("accuracy", "correct", "trials", "digit_accuracy",
                                               "forced_digit_accuracy", "key_bits_per_digit",
                                               "control_bits_per_digit", "key_depths")}
          for r in passkey["results"]}
    return {
        "row": row.name, "what": row.what, "flags": row.flags, "command": "thl-np " + shlex.join(argv),
        "config": {"dim": c.embedding_dim, "memory_slots": c.memory_slots, "local_window": c.local_window,
                   "write_rate": c.write_rate, "novelty_theta": c.novelty_theta, "memory_decay": c.memory_decay,
                   "components": c.components or {}},
        "parameters": int(model.num_parameters()), "steps": int(trainer["step"]),
        "train_wall_s": float(trainer["elapsed_s"]), "row_wall_s": time.perf_counter() - t0,
        "train_loss": float(np.mean(losses)) if losses else None,
        "bpb_carried": carried["bits_per_byte"], "bpb_fresh": fresh["bits_per_byte"],
        "bpb_carried_bytes": int(carried["bytes"]), "bpb_fresh_bytes": int(fresh["bytes"]), "passkey": pk,
        "haystack": passkey["haystack"],
    }


def table(args, results: list[dict]) -> list[str]:
    """The markdown page: settings, the command, one table row per ablation row."""
    lengths = [str(n) for n in args.lengths]
    head = ["row", "what changes", "params", "steps", "train time", "train loss", "bpb carried", "bpb fresh",
            *[f"passkey {n}" for n in lengths], *[f"bits/digit {n} (key / control)" for n in lengths]]
    out = ["# Memory ablations", "",
           f"Each row: a fresh model trained with `thl-np train` for {args.steps} steps (seed {args.seed}) on "
           f"`{args.data}` (include {args.include}, exclude {args.exclude}, the last {args.held_out} held out), "
           "the base recipe below plus the row's flags. Held-out bits per byte: *carried* over every held-out "
           f"byte in 4 lanes with the state carried (the run's final evaluation), *fresh* over the first "
           f"{args.bpb_bytes:,} held-out bytes in lanes of {FRESH_LANE:,} bytes from an empty state. Passkey: "
           "`thl-np eval --passkey` (Python source haystack: thl-np's own sources; key at a random depth in "
           f"[0.1, 0.9]), {args.trials} trials per length, seed "
           f"{args.eval_seed}, greedy exact answers; bits/digit: the key's teacher-forced bits per digit and a "
           "control prompt's (chance 3.32; equal: the key did not reach the question).", "",
           "Base recipe: `thl-np train " + shlex.join(data_flags(args) + base_flags(args)) + " --out runs/ROW`", "",
           "Made by: `python benchmarks/ablation.py " + shlex.join(args.argv) + "`", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        pk = r["passkey"]
        cells = [r["row"], f"{r['what']} (`{shlex.join(r['flags'])}`)" if r["flags"] else r["what"],
                 f"{r['parameters']:,}", str(r["steps"]), f"{r['train_wall_s'] / 60:.1f} min",
                 "n/a" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
                 f"{r['bpb_carried']:.3f}", f"{r['bpb_fresh']:.3f}",
                 *[f"{pk[n]['correct']}/{pk[n]['trials']}" for n in lengths],
                 *[f"{pk[n]['key_bits_per_digit']:.2f} / {pk[n]['control_bits_per_digit']:.2f}" for n in lengths]]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Train time: the run's own `elapsed_s` (training, checkpoints and its final held-out "
            "evaluation, summed over resumes); the machine may have been shared. Train loss: mean of the last 20 "
            "steps, nats per byte, over the task mix (not comparable with held-out bits per byte)."]
    return out


def plot(results: list[dict], args, path: str) -> str:
    from thl_np.checks import require_matplotlib

    Figure, FigureCanvasAgg = require_matplotlib("the ablation plot")
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = [r["row"] for r in results]
    for r in results:
        ax1.plot(args.lengths, [r["passkey"][str(n)]["accuracy"] for n in args.lengths], "o-", label=r["row"])
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_xlabel("context length (bytes)")
    ax1.set_ylabel("passkey accuracy (greedy, exact)")
    ax1.set_title(f"passkey, source haystack, depth 0.1-0.9, {args.trials} trials", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    x = range(len(results))
    ax2.bar([i - 0.2 for i in x], [r["bpb_carried"] for r in results], width=0.4, label="state carried")
    ax2.bar([i + 0.2 for i in x], [r["bpb_fresh"] for r in results], width=0.4, label=f"fresh every {FRESH_LANE}")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("held-out bits per byte")
    ax2.set_title(f"held-out bits per byte ({args.steps} steps a row)", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Training text: a file or folder (the CPython stdlib above).")
    p.add_argument("--out", required=True, help="Output folder (runs, logs, rows, ablation.md/json/png).")
    p.add_argument("--include", action="append", help=f"Data filter (repeatable).  [default: {INCLUDE}]")
    p.add_argument("--exclude", action="append", help=f"Data filter (repeatable).  [default: {EXCLUDE}]")
    p.add_argument("--rows", help=f"Comma-separated rows to run.  [default: all: {','.join(r.name for r in ROWS)}]")
    p.add_argument("--steps", type=int, default=1500, help="Training steps of every row.  [default: 1500]")
    p.add_argument("--dim", type=int, default=64, help="Model width.  [default: 64]")
    p.add_argument("--seq-len", default="128:1024", help="Window schedule.  [default: 128:1024]")
    p.add_argument("--batch-size", type=int, default=8, help="[default: 8]")
    p.add_argument("--warmup", type=int, default=50, help="[default: 50]")
    p.add_argument("--seed", type=int, default=0, help="Training seed of every row.  [default: 0]")
    p.add_argument("--held-out", type=float, default=0.05, help="Held-out fraction.  [default: 0.05]")
    p.add_argument("--checkpoint-every", type=int, default=250, help="[default: 250]")
    p.add_argument("--bpb-bytes", type=int, default=100_000, help="Held-out bytes measured.  [default: 100000]")
    p.add_argument("--lengths", default="256,1024,4096", help="Passkey lengths.  [default: 256,1024,4096]")
    p.add_argument("--trials", type=int, default=20, help="Passkey trials per length.  [default: 20]")
    p.add_argument("--eval-seed", type=int, default=1000, help="Passkey seed.  [default: 1000]")
    p.add_argument("--plugin", action="append", default=[], help="Module or file registering component variants.")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="Draw ablation.png (--plot requires matplotlib).  [default: when matplotlib is installed]")
    p.add_argument("--quick", action="store_true",
                   help="A check of the script end to end: tiny model, 2 steps, one short length, 2 trials.")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.include = args.include or list(INCLUDE)
    args.exclude = args.exclude or list(EXCLUDE)
    if args.quick:
        args.steps, args.dim, args.seq_len, args.batch_size, args.warmup = 2, 8, "64:128", 2, 1
        args.bpb_bytes, args.lengths, args.trials, args.checkpoint_every = 2 * FRESH_LANE, "200", 2, 1
    try:
        args.lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    except ValueError:
        p.error(f"--lengths {args.lengths!r} is not a comma-separated list of integers")
    known = {r.name: r for r in ROWS}
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows else list(known)
    bad = [n for n in names if n not in known]
    if bad or not names:
        p.error(f"--rows {args.rows!r}: unknown {bad}; rows are {', '.join(known)}")
    args.row_list = [known[n] for n in names]
    for name in ("steps", "dim", "batch_size", "bpb_bytes", "trials"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None, say=print) -> int:
    args = parse_args(argv)
    from thl_np.checks import check_output_dir, require_matplotlib
    from thl_np.components.registry import load_plugin
    from thl_np.errors import InputError, THLError
    from thl_np.training.data import load_bytes, split_bytes
    from thl_np.training.haystack import Haystack

    try:   # everything the rows need, checked before the first one trains
        check_output_dir(args.out, "--out")
        if args.plot:
            require_matplotlib("the ablation plot")
        for source in args.plugin:
            load_plugin(source)
        hay = Haystack("source")
        for n in args.lengths:
            hay.check_prompt(n, "--lengths")
        held = split_bytes(load_bytes(args.data, args.include, args.exclude), args.held_out)[1]
        if len(held) < 2 * FRESH_LANE:
            raise InputError(f"--data holds {len(held):,} held-out bytes: too few to measure (at least "
                           f"{2 * FRESH_LANE:,}); use more data or a larger --held-out")
    except THLError as exc:
        say(f"error: {exc}")
        return 1
    if args.plot is None:
        try:
            require_matplotlib()
            args.plot = True
        except THLError:
            args.plot = False
            say("note: matplotlib is not installed: no ablation.png (pip install thl-np[plot])")
    for sub in ("runs", "logs", "rows"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    results = []
    for row in args.row_list:
        done = os.path.join(args.out, "rows", f"{row.name}.json")
        if os.path.exists(done):
            with open(done) as f:
                results.append(json.load(f))
            say(f"[{row.name}] done before: skipped ({done})")
            continue
        try:
            res = run_row(args, row, held, say)
        except THLError as exc:
            say(f"error: row {row.name}: {exc}")
            return 1
        with open(done + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(done + ".tmp", done)   # a row is done only once its figures are whole
        results.append(res)
        pk = ", ".join(f"{n}: {v['correct']}/{v['trials']}" for n, v in res["passkey"].items())
        say(f"[{row.name}] bpb carried {res['bpb_carried']:.3f}, fresh {res['bpb_fresh']:.3f}; passkey {pk}")
    for r in results:   # a row read back from disk is checked too
        for name in ("bpb_carried", "bpb_fresh"):
            if not math.isfinite(r[name]):
                say(f"error: row {r['row']}: {name} is {r[name]}")
                return 1
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write("\n".join(table(args, results)) + "\n")
    settings = {k: v for k, v in vars(args).items() if k not in ("row_list",)}
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"settings": settings, "rows": results}, f, indent=1)
    if args.plot:
        say(f"wrote {plot(results, args, os.path.join(args.out, 'ablation.png'))}")
    say(f"wrote {os.path.join(args.out, 'ablation.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
