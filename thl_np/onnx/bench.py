"""``thl-np bench --onnx``: onnxruntime (CPU) decode tokens/s of an export beside thl-np's fast path on the same
weights, measured in the same rounds (``thl_np.eval.bench.bench_decode_and_bandwidth``), B = 1 and 8."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np


class OnnxDecoder:
    """A decoding session on an onnxruntime session: the state stays as the arrays the last step returned."""

    def __init__(self, step, batch_size: int):
        self.step_fn = step
        self.names = [row["input"] for row in step.layout]
        self.outs = [row["output"] for row in step.layout]
        self.feeds = step.feeds(np.zeros(batch_size, np.int64), step.zero_state(batch_size))

    def step(self, ids):
        self.feeds["token_ids"] = np.asarray(ids, dtype=np.int64)
        out = dict(zip(self.step_fn.output_names, self.step_fn.session.run(None, self.feeds), strict=True))
        for i, o in zip(self.names, self.outs, strict=True):
            self.feeds[i] = out[o]
        return out["logits"]


class OnnxBenchModel:
    """What ``bench_decode_and_bandwidth`` steps: ``config`` and ``decoder(batch_size=B)``."""

    def __init__(self, step):
        self.step, self.config = step, step.config

    def decoder(self, batch_size: int = 1):
        return OnnxDecoder(self.step, batch_size)


def bench_onnx(model, echo=print, decode_steps: int = 64, threads: int | None = None) -> dict:
    """Export ``model`` to a temporary file, then decode it and thl-np's fast path in the same rounds.
    → {"thl-np_b1": tok/s, "onnxruntime_b1": …, "ratio_b1": onnxruntime / thl-np, … b8}."""
    from ..eval.bench import bench_decode_and_bandwidth
    from .export import build_model, save
    from .runtime import OnnxStep

    with tempfile.TemporaryDirectory(prefix="thl-np-bench-onnx-") as tmp:
        path = os.path.join(tmp, "step.onnx")
        save(build_model(model), path)
        step = OnnxStep(path, threads=threads)
        rounds = max(1, decode_steps // 8)
        tok, _ = bench_decode_and_bandwidth({"thl-np": model, "onnxruntime": OnnxBenchModel(step)},
                                            batch_sizes=(1, 8), rounds=rounds, steps=8)
        figures = {}
        for B in (1, 8):
            ours, theirs = tok[("thl-np", B)], tok[("onnxruntime", B)]
            figures.update({f"thl-np_b{B}": ours, f"onnxruntime_b{B}": theirs, f"ratio_b{B}": theirs / ours})
            echo(f"decode B={B}: thl-np fast path {ours:,.0f} tok/s, onnxruntime CPU {theirs:,.0f} tok/s "
                 f"(onnxruntime / thl-np = {theirs / ours:.2f})")
        wasm = node_wasm_decode(path, steps=max(50, 4 * decode_steps))
        if wasm is None:
            echo("WASM (onnxruntime-web in Node): not measured (needs node and, in a checkout, npm ci in web/)")
        else:
            figures.update(wasm_b1=wasm["tokens_per_s"], wasm_ratio_b1=wasm["tokens_per_s"] / figures["thl-np_b1"],
                           wasm_cpu_ms_per_step=wasm["cpu_ms_per_step"])
            echo(f"decode B=1: onnxruntime-web WASM in Node {wasm['tokens_per_s']:,.0f} tok/s "
                 f"({wasm['cpu_ms_per_step']:.2f} ms CPU a step; WASM / thl-np = {figures['wasm_ratio_b1']:.3f}), "
                 "right after the rounds above")
    return figures


# web/bench.mjs in a checkout (the package installed from PyPI has no web/ folder)
WEB_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "web",
                         "bench.mjs")


def web_bench_script() -> str:
    """web/bench.mjs with its node_modules: beside the package (a checkout installed with ``pip install -e .``),
    else in the working directory (the checkout's root after a plain ``pip install .``); the first when
    neither has onnxruntime-web installed."""
    for script in (WEB_BENCH, os.path.abspath(os.path.join("web", "bench.mjs"))):
        if os.path.isdir(os.path.join(os.path.dirname(script), "node_modules", "onnxruntime-web")):
            return script
    return WEB_BENCH


def node_wasm_decode(path: str, steps: int = 200) -> dict | None:
    """Batch-1 greedy decode of the export at ``path`` (its .json beside it) in onnxruntime-web's WASM
    backend under Node (``web/bench.mjs --json``); None where Node or web/node_modules is missing."""
    node = shutil.which("node")
    script = web_bench_script()
    if node is None or not os.path.isdir(os.path.join(os.path.dirname(script), "node_modules", "onnxruntime-web")):
        return None
    done = subprocess.run([node, script, path, "--steps", str(steps), "--json"], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"node {script} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
