"""Int8 weights at the default config (THLConfig(): 174M parameters, ~700 MB in float32): the figures of
issue 15 that `thl-np bench` does not print.

    python benchmarks/bench_int8.py                       # scheme int8 (per-row scales), temp folder
    python benchmarks/bench_int8.py --scheme int8-block32 --dir D --skip-layered

1. size: model.safetensors of the quantized model against the float32 one (target ≤ 0.3×);
2. load: THLModel.from_pretrained of the quantized folder in a fresh interpreter: seconds and resident
   memory growth (target < 1 s and < +64 MB: the int8 values stay memory-mapped);
3. accuracy of a random-init model: the logits' relative error max |int8 − float| / max |float| over a
   few steps (the fast path), against the float model with the same seed;
4. layered: the quantized model under a 64 MB budget equals the plain model on the same quantized weights
   (max |Δ logits| ≤ 1e-4), and the bytes it streams per step against the float32 model's plan.

Figures are printed, not asserted; times on a shared machine vary.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: str) -> None:
    """In a fresh interpreter: time from_pretrained and its RSS growth; print one JSON line."""
    import numpy  # noqa: F401  (imported before the baseline)

    import thl_np.model  # noqa: F401  (the package's own import cost is not the load's)

    before = rss_mb()
    t0 = time.perf_counter()
    model = thl_np.model.THLModel.from_pretrained(folder)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss_growth_MB": rss_mb() - before, "repr": repr(model)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--dir", help="keep the model folders here (default: a temp folder)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip-layered", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    from thl_np import THLConfig, THLModel
    from thl_np.engines.layered import LayeredInferenceEngine, plan_layers
    from thl_np.model import quantize_model

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="thl-np-int8-")
    root = Path(args.dir or tmp.name)
    t0 = time.perf_counter()
    model = THLModel(THLConfig(), seed=0)
    qmodel = quantize_model(model, args.scheme)
    print(f"built and quantized {model!r} in {time.perf_counter() - t0:.1f} s")
    model.save_pretrained(root / "float32")
    qmodel.save_pretrained(root / "int8")
    f_size = (root / "float32" / "model.safetensors").stat().st_size
    q_size = (root / "int8" / "model.safetensors").stat().st_size
    print(f"1. size: int8 {q_size / 1e6:.1f} MB, float32 {f_size / 1e6:.1f} MB: {q_size / f_size:.3f}x")

    out = subprocess.run([sys.executable, __file__, "--child", str(root / "int8")], capture_output=True, text=True,
                         check=True)
    load = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"2. load: from_pretrained {load['seconds']:.3f} s, resident memory +{load['rss_growth_MB']:.1f} MB "
          f"({load['repr']})")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(1, args.steps))
    lf, _ = model(ids)
    lq, _ = qmodel(ids)
    rel = float(np.abs(lq - lf).max() / np.abs(lf).max())
    print(f"3. random-init default config, {args.steps} positions: logits' relative error "
          f"max|int8 - float| / max|float| = {rel:.3e}")

    if not args.skip_layered:
        loaded = THLModel.from_pretrained(root / "int8")
        with LayeredInferenceEngine(loaded, vram_budget="64MB") as engine:
            s_ref = s = None
            worst = 0.0
            for t in range(4):
                tok = [int(ids[0, t])]
                ref, s_ref = loaded.forward_step(tok, s_ref, path="plain")
                logits, s = engine.step(tok, s)
                worst = max(worst, float(np.abs(logits - ref).max()))
            fplan = plan_layers(THLConfig(), engine.budget, 1, "float32")
            f_avg = sum(m.layout_bytes / m.every for m in fplan.modules if m.has_weights and not m.resident)
            q_avg = engine.plan().average_streamed_bytes(engine._stored)
            print(f"4. layered, 64 MB: max |engine - plain| = {worst:.2e} over 4 steps, peak "
                  f"{engine.peak_device_bytes / 1e6:.1f} MB; streams {q_avg / 1e6:.1f} MB/step on average "
                  f"against {f_avg / 1e6:.1f} MB for float32 ({q_avg / f_avg:.3f}x)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
