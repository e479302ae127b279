"""Training forward + backward throughput and memory: the plain ``value_and_grad`` against
``thl_np.value_and_grad(..., path="fast")`` (``thl_np.engines.gradient.loss_and_grads``).

Issue config: ``THLConfig(dim=128, memory_slots=64, vocab_size=259)`` (3 tiers, timescales 1/8/64, 4 heads ×
64, κ = 4, local window 64), B = 8 sequences of T = 128 tokens, float32, Gumbel noise (training routing).
Each path runs in its own fresh process (so peak RSS is its own): the plain path with the default BLAS
threads and with BLAS limited to one thread (the fast path always runs single-threaded BLAS, see
``fast_grad.BLAS_THREADS``), the fast path after one warm-up call (Numba compilation / cache load).
Several runs each: best and median are printed (the machine may be shared).

Memory: the bytes the fast tape records per step (measured: ``Tape.nbytes / T``) and the documented formula
``training_memory_bytes``; for the plain path the bytes its StepRecords hold per step (measured over a few
steps, every distinct array counted once). Both are also given for the issue's large target, J = 1024,
d = 768 (THLConfig() defaults otherwise, V = 50257), T = 512, B = 1, which must train in 4 GB; ``--big``
also runs the fast path there once and reports its peak RSS.

    python benchmarks/bench_train.py                 # issue config, 3 plain runs per setting, 10 fast runs
    python benchmarks/bench_train.py --plain-runs 1 --fast-runs 20 --big
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

ISSUE = dict(dim=128, memory_slots=64, vocab_size=259)
BIG = dict(dim=768, memory_slots=1024)


def plain_value_and_grad(model, ids, targets, state=None, gumbel_uniform=None):
    """The plain path (spec §4 step by step, BPTT over its StepRecords), from its own pieces, so this stays
    the plain path whatever ``thl_np.model.value_and_grad`` dispatches to."""
    from thl_np.components.output import cross_entropy_forward, layer_norm_backward, linear_backward
    from thl_np.step import output_forward, run_sequence, sequence_backward

    B, T = ids.shape
    P, c = model.params, model.config
    state0 = model._prepare_state(state, B)
    tier_states, _, tape = run_sequence(P, c, ids, state0, gumbel_uniform, record=True)
    logits, ln_cache, h = output_forward(P, tier_states)
    loss, d_logits = cross_entropy_forward(logits, targets)
    assert not c.router_load_balance_lambda
    d_h, dW_o, db_o = linear_backward(d_logits, h, P["output_head.weight"])
    d_tiers, _, _ = layer_norm_backward(d_h, ln_cache, P["layer_norm.weight"])
    grads, _ = sequence_backward(P, c, tape, d_tiers, None, ids, state0)
    return float(loss), grads


def make(cfg_kw, B, T, seed=0):
    from thl_np.config import THLConfig
    from thl_np.model import THLModel

    config = THLConfig(**cfg_kw)
    model = THLModel(config, seed=seed, dtype="float32")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (B, T))
    tg = rng.integers(0, config.vocab_size, (B, T))
    U = rng.random((T, B, config.num_heads, config.memory_slots))
    return model, ids, tg, U


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_record_bytes(model, ids, U) -> int:
    """Bytes held by the plain path's StepRecords for these steps (each distinct array once, views count
    their whole base array, as that is what they keep alive)."""
    from thl_np.step import run_sequence

    _, _, tape = run_sequence(model.params, model.config, ids, model.init_state(ids.shape[0]), U, record=True)
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, np.ndarray):
            base = x
            while base.base is not None and isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
        elif hasattr(x, "__dataclass_fields__"):
            for name in x.__dataclass_fields__:
                walk(getattr(x, name))

    walk(tape)
    return total


# ---------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------
def child(args) -> dict:
    from thl_np.engines import gradient as fast_grad
    from thl_np.model import value_and_grad

    B, T = args.batch, args.seq_len
    cfg = BIG if args.config == "big" else ISSUE
    t0 = time.perf_counter()
    model, ids, tg, U = make(cfg, B, T)
    out = {"setup_s": time.perf_counter() - t0, "rss_after_setup_mb": maxrss_mb()}
    times = []
    if args.child == "fast":
        t0 = time.perf_counter()
        value_and_grad(model, ids, tg, gumbel_uniform=U, path="fast")
        out["first_call_s"] = time.perf_counter() - t0
        for _ in range(args.runs):
            t0 = time.perf_counter()
            value_and_grad(model, ids, tg, gumbel_uniform=U, path="fast")
            times.append(time.perf_counter() - t0)
        with fast_grad.blas_threads(1):
            _, _, tape = fast_grad.fast_forward(model.params, model.config, ids, model.init_state(B), U)
        out["tape_bytes_per_step"] = tape.nbytes / T
        out["formula_bytes"] = fast_grad.training_memory_bytes(model.config, B, T, dtype="float32")
    else:
        threads = None if args.threads == "default" else int(args.threads)
        for _ in range(args.runs):
            with fast_grad.blas_threads(threads):
                t0 = time.perf_counter()
                plain_value_and_grad(model, ids, tg, gumbel_uniform=U)
                times.append(time.perf_counter() - t0)
    out["times_s"] = times
    out["maxrss_mb"] = maxrss_mb()
    return out


def run_child(kind, runs, config="issue", B=8, T=128, threads="default") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--runs", str(runs), "--config", config,
           "--batch", str(B), "--seq-len", str(T), "--threads", threads]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if res.returncode:
        sys.exit(f"child {kind} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summary(times, tokens):
    ts = sorted(times)
    best, med = ts[0], ts[len(ts) // 2]
    return best, med, tokens / best, tokens / med


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plain-runs", type=int, default=3)
    ap.add_argument("--fast-runs", type=int, default=10)
    ap.add_argument("--big", action="store_true", help="also run the fast path at J=1024, d=768, T=512, B=1")
    ap.add_argument("--child", choices=["plain", "fast"], help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--config", default="issue", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    from thl_np.config import THLConfig
    from thl_np.engines.gradient import training_memory_bytes

    B, T = 8, 128
    tokens = B * T
    print(f"issue config {ISSUE}, B={B}, T={T}, float32, Gumbel noise; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    for threads in ("default", "1"):
        if args.plain_runs:
            r = run_child("plain", args.plain_runs, threads=threads)
            rows.append((f"plain (BLAS threads {threads})", r))
    fast = run_child("fast", args.fast_runs)
    rows.append(("fast", fast))
    print(f"{'path':<28}{'best ms':>10}{'median ms':>11}{'best tok/s':>12}{'median tok/s':>14}{'peak RSS MB':>13}")
    for name, r in rows:
        best, med, tb, tm = summary(r["times_s"], tokens)
        print(f"{name:<28}{best * 1e3:>10.1f}{med * 1e3:>11.1f}{tb:>12.0f}{tm:>14.0f}{r['maxrss_mb']:>13.0f}")
    if args.plain_runs:
        plain_best = min(min(r["times_s"]) for n, r in rows if n.startswith("plain"))
        plain_med = min(summary(r["times_s"], tokens)[1] for n, r in rows if n.startswith("plain"))
        fb, fm = summary(fast["times_s"], tokens)[:2]
        print(f"speed-up (fast vs the faster plain setting): best {plain_best / fb:.1f}x, median {plain_med / fm:.1f}x")
    print(f"fast first call (compile or cache load): {fast['first_call_s']:.2f} s")
    print(f"fast tape: {fast['tape_bytes_per_step'] / 1e3:.1f} kB per step (B={B}), "
          f"{fast['tape_bytes_per_step'] / B / 1e3:.1f} kB per step and sequence; "
          f"formula for the whole call {fast['formula_bytes'] / 2**20:.1f} MiB")

    # the issue's large target: J = 1024, d = 768, T = 512, B = 1
    from thl_np.engines.gradient import fast_forward
    from thl_np.model import THLModel

    cfg = THLConfig(**BIG)
    parts = training_memory_bytes(cfg, 1, 512, dtype="float32", breakdown=True)
    print(f"\nlarge target {BIG} (V={cfg.vocab_size}), T=512, B=1, float32 (formula, MiB): "
          + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in parts.items()))
    small = THLModel(cfg.replace(vocab_size=256), seed=0, dtype="float32")   # the tape does not depend on V
    Tm = 24
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (1, Tm))
    U = rng.random((Tm, 1, cfg.num_heads, cfg.memory_slots))
    per_step_plain = plain_record_bytes(small, ids, U) / Tm
    _, _, tape = fast_forward(small.params, small.config, ids, small.init_state(1), U)
    per_step_fast = tape.nbytes / Tm
    head = 4 * 512 * cfg.vocab_size * 4
    print(f"  recorded per step (B=1), measured over {Tm} steps: plain StepRecords {per_step_plain / 2**20:.2f} MiB, "
          f"fast tape {per_step_fast / 2**10:.1f} KiB")
    print(f"  x 512 steps: plain {per_step_plain * 512 / 2**30:.2f} GiB, fast {per_step_fast * 512 / 2**20:.1f} MiB; "
          f"both add parameters + gradients ({2 * parts['params'] / 2**30:.2f} GiB) and the head's "
          f"[T, V] arrays (~{head / 2**20:.0f} MiB)")
    if args.big:
        r = run_child("fast", 1, config="big", B=1, T=512)
        print(f"  fast, measured: {r['times_s'][0]:.1f} s for one call (first call {r['first_call_s']:.1f} s), "
              f"peak RSS {r['maxrss_mb'] / 1024:.2f} GiB (after building the model: "
              f"{r['rss_after_setup_mb'] / 1024:.2f} GiB)")


if __name__ == "__main__":
    main()
