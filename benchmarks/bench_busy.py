"""Decode throughput alone and beside one busy CPU-bound process (issue 22: threads that fit the machine).

Not a test: it prints what it measured. For the shipped model (thl_np/assets/default_model) and the
default config (``THLConfig()``, 174M parameters, float32, random weights), at batch 1 and 8:

- ``model.forward_step`` in a chain (the public functional API), tokens/s;
- ``generate_text`` (batch 1, greedy), bytes/s;
- ``thl-np generate`` in a fresh process (the shipped model; ``--cli-default-config`` also saves the
  default config to a temporary folder and runs it), wall seconds for the whole command;

each measured quiet and then beside ``python -c "while True: pass"`` (started before, killed after),
alternating quiet/busy ``--repeats`` times (medians), and prints busy/quiet (target: >= 0.4 each) with
the kernel thread count each run used and how many other runnable threads the machine had at its start
(a "quiet" run on a shared machine is not quiet: read that column).

    python benchmarks/bench_busy.py                 # ~2 minutes on a quiet 2-core machine, ~4 on a busy one
    python benchmarks/bench_busy.py --quick         # fewer steps, one repeat (~20 s)
    python benchmarks/bench_busy.py --models shipped --batches 1 --json out.json
    THL_NP_THREADS=2 python benchmarks/bench_busy.py   # a fixed thread count, for comparison
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's thl_np, not an installed one

import numpy as np  # noqa: E402

from thl_np import THLConfig, THLModel, _threads, generate_text  # noqa: E402

SHIPPED = ROOT / "thl_np" / "assets" / "default_model"
SPIN = "while True: pass"
PROMPT = "def fibonacci(n):\n    "


class Busy:
    """One CPU-bound process for the duration of a ``with`` block (or nothing, for a quiet run)."""

    def __init__(self, busy: bool):
        self.busy, self.proc = busy, None

    def __enter__(self):
        if self.busy:
            self.proc = subprocess.Popen([sys.executable, "-c", SPIN])
            time.sleep(0.3)  # running, and seen as running
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            time.sleep(0.3)


def forward_step_rate(model, B: int, steps: int) -> tuple[float, int]:
    """Tokens/s of ``logits, state = model.forward_step(ids, state)`` over ``steps`` steps (after 3 untimed),
    and the kernel threads the last step used."""
    ids = np.arange(B) % model.config.vocab_size
    _, state = model.forward_step(ids, model.init_state(B))
    for _ in range(2):
        _, state = model.forward_step(ids, state)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, state = model.forward_step(ids, state)
    dt = time.perf_counter() - t0
    threads = getattr(getattr(state.decoder, "threads", None), "count", 0)
    return B * steps / dt, threads


def generate_rate(model, steps: int) -> tuple[float, int]:
    """Bytes/s of ``generate_text`` (greedy, ``steps`` new tokens)."""
    generate_text(model, None, PROMPT, max_length=2, temperature=0)
    t0 = time.perf_counter()
    text = generate_text(model, None, PROMPT, max_length=steps, temperature=0)
    dt = time.perf_counter() - t0
    return len(text.encode("utf-8", "surrogateescape")) / dt, None


def cli_seconds(model_dir, steps: int) -> tuple[float, int]:
    """Wall seconds of ``thl-np generate`` (greedy, ``steps`` new tokens) in a fresh process."""
    cmd = [sys.executable, "-m", "thl_np.cli", "generate", PROMPT, "--max-length", str(steps), "--temperature", "0"]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0, None


def measure(name, fn, repeats: int, higher_is_better: bool = True) -> dict:
    """fn() → (figure, threads), quiet and busy alternately ``repeats`` times; medians and busy/quiet."""
    runs = {"quiet": [], "busy": []}
    threads = {"quiet": [], "busy": []}
    others = {"quiet": [], "busy": []}
    for _ in range(repeats):
        for mode in ("quiet", "busy"):
            with Busy(mode == "busy"):
                others[mode].append(_threads.others_running())
                value, n = fn()
            runs[mode].append(value)
            threads[mode].append(n)
    q, b = float(np.median(runs["quiet"])), float(np.median(runs["busy"]))
    ratio = b / q if higher_is_better else q / b
    row = {"name": name, "quiet": q, "busy": b, "busy_over_quiet": ratio, "threads_quiet": threads["quiet"],
           "threads_busy": threads["busy"], "others_quiet": others["quiet"], "others_busy": others["busy"]}
    unit = "" if higher_is_better else " s"
    shown = {mode: "-" if None in n else n for mode, n in threads.items()}  # not known outside forward_step
    print(f"{name:44s} quiet {q:9.1f}{unit}  busy {b:9.1f}{unit}  busy/quiet {ratio:5.2f} "
          f"{'ok' if ratio >= 0.4 else 'LOW'}   threads {shown['quiet']}/{shown['busy']}   "
          f"others running {others['quiet']}/{others['busy']}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="shipped,default", help="shipped, default or both (comma-separated)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps-shipped", type=int, default=2000, help="forward_step steps per run, shipped model")
    ap.add_argument("--steps-default", type=int, default=80, help="forward_step steps per run, default config")
    ap.add_argument("--gen-bytes", type=int, default=500, help="bytes generated per generate_text / CLI run "
                                                                "(the default config: a tenth)")
    ap.add_argument("--repeats", type=int, default=3, help="quiet/busy pairs per figure (medians)")
    ap.add_argument("--no-cli", action="store_true", help="skip thl-np generate in a fresh process")
    ap.add_argument("--cli-default-config", action="store_true",
                    help="also run thl-np generate on the default config (saves ~700 MB to a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="a quarter of the steps, one repeat")
    ap.add_argument("--json", metavar="FILE", help="write every row to this JSON file")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps_shipped, a.steps_default, a.gen_bytes, a.repeats = 300, 8, 100, 1
    batches = [int(b) for b in a.batches.split(",")]
    print(f"{_threads.cores()} cores; threads {_threads.requested() or 'auto'}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; "
          f"{_threads.others_running()} other runnable thread(s) now; "
          f"thl_np from {Path(sys.modules['thl_np'].__file__).parent}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for which in a.models.split(","):
        t0 = time.perf_counter()
        if which == "shipped":
            model, steps, gen = THLModel.from_pretrained(str(SHIPPED)), a.steps_shipped, a.gen_bytes
        elif which == "default":
            model, steps, gen = THLModel(THLConfig(), seed=0), a.steps_default, max(4, a.gen_bytes // 10)
        else:
            raise SystemExit(f"--models: unknown model {which!r} (use shipped, default)")
        print(f"{which}: {model!r} ({time.perf_counter() - t0:.1f}s to build)", flush=True)
        for B in batches:
            rows.append(measure(f"{which} forward_step batch {B} (tok/s)",
                                lambda m=model, B=B, s=steps: forward_step_rate(m, B, s), a.repeats))
        rows.append(measure(f"{which} generate_text {gen} bytes (bytes/s)", lambda m=model, n=gen: generate_rate(m, n),
                            a.repeats))
        if not a.no_cli and which == "shipped":
            rows.append(measure(f"shipped thl-np generate {gen} bytes (wall)", lambda n=gen: cli_seconds(None, n),
                                a.repeats, higher_is_better=False))
        if not a.no_cli and which == "default" and a.cli_default_config:
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                rows.append(measure(f"default thl-np generate {gen} bytes (wall)",
                                    lambda d=tmp, n=gen: cli_seconds(d, n), a.repeats, higher_is_better=False))
        del model
    low = [r["name"] for r in rows if r["busy_over_quiet"] < 0.4]
    print(f"{len(rows) - len(low)}/{len(rows)} at >= 0.4 of their quiet figure"
          + (f"; below: {low}" if low else "") + f"   ({time.perf_counter() - t_start:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
