"""`thl-np serve`'s engine alone, no HTTP: tokens/s of one request, then of 8 at once, on one engine, back to
back, several times (the ratio's ceiling for bench_serve.py's 8-client figure). Not a test: it prints.

    python benchmarks/bench_serve_engine.py                    # shipped model, greedy, 5 repeats
    python benchmarks/bench_serve_engine.py --temperature 0.8 --tokens 1024 --repeats 7
    python benchmarks/bench_serve_engine.py --steps            # also FastDecoder.step alone, batch 1 and 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's thl_np, not an installed one

import numpy as np  # noqa: E402

from thl_np._blas import blas_threads  # noqa: E402
from thl_np.serve.engine import Job, Request, load_engine  # noqa: E402

SHIPPED = ROOT / "thl_np" / "assets" / "default_model"


def run(engine, prompt, rows, n, temperature):
    """tokens/s of ``rows`` requests of ``n`` tokens submitted at once."""
    done = threading.Semaphore(0)

    def emit(kind, payload):
        if kind != "text":
            done.release()
    t0 = time.perf_counter()
    for i in range(rows):
        engine.submit(Job(Request(prompt, max_tokens=n, temperature=temperature, seed=i), emit))
    for _ in range(rows):
        if not done.acquire(timeout=600):
            raise SystemExit("the engine did not finish in 10 minutes")
    return rows * n / (time.perf_counter() - t0)


def step_times(model, repeats=7, n=200):
    """Best µs of one FastDecoder.step at batch 1 and 8 (a full local window), OpenBLAS on one thread as in
    the engine."""
    out = {}
    with blas_threads(1):
        for B in (1, 8):
            d = model.decoder(None, B)
            d.prompt(np.zeros((B, 2 * model.config.local_window + 8), np.int64), logits="last")
            ids = np.zeros(B, np.int64)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(n):
                    d.step(ids)
                best = min(best, (time.perf_counter() - t0) / n * 1e6)
            out[B] = best
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHIPPED))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", action="store_true", help="also time FastDecoder.step at batch 1 and 8")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as sessions:
        model, tok, engine = load_engine(args.model, sessions, max_batch=8)
        try:
            prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
            run(engine, prompt, 8, 16, args.temperature)  # warm: the prefix cache, a batch of 8
            ratios = []
            for _ in range(args.repeats):
                one = run(engine, prompt, 1, args.tokens, args.temperature)
                many = run(engine, prompt, 8, args.tokens, args.temperature)
                ratios.append(many / one)
                print(f"1 request {one:.0f} tokens/s, 8 requests {many:.0f} tokens/s, ratio {many / one:.2f}",
                      flush=True)
            print(f"ratio median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
            if args.steps:
                t = step_times(model)
                print(f"FastDecoder.step: batch 1 {t[1]:.0f} us, batch 8 {t[8]:.0f} us ({t[8] / t[1]:.2f}x)")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
