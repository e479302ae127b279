"""Bits per byte and slot norms along one long stream, with the state carried, for several memory decays γ
on the same weights (docs/MEMORY.md, *The horizon*; issue 23).

The decay is a config field, so a model runs with another γ unchanged. The stream is the held-out split
of the shipped model's training data (the standard library's ``.py`` files minus tests, the last 5%:
``thl-np eval``'s default for that data) or any file/folder given with ``--data``. One line per γ: for
each block of ``--block`` bytes, its bits per byte and the largest and mean slot norm ‖m_j‖ at its end.
A slower decay keeps a write longer (retrieval further back) and lets the slot norms grow further.

    python benchmarks/decay_horizon.py default --gammas 0.99999,0.999995,1 --bytes 524288

``--set FIELD=VALUE`` changes other config fields for every row, e.g. the memory-write variant that decays a
slot only when it is written again (``components = {"router": "unit_keys", "memory_write":
"decay_on_write"}`` for the shipped model, whose router is ``unit_keys``); a variant without fast kernels
runs on the plain path.
"""
from __future__ import annotations

import argparse
import math
import sysconfig

import numpy as np

from thl_np import THLModel
from thl_np.components.output import log_softmax
from thl_np.config import parse_overrides
from thl_np.errors import InputError
from thl_np.io.folder import resolve_model_dir
from thl_np.training.data import load_bytes, split_bytes

STDLIB_EXCLUDES = ["test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data"]


def held_out_stdlib(fraction: float = 0.05) -> np.ndarray:
    """The shipped model's held-out split (MODEL_CARD.md's DATA flags)."""
    data = load_bytes(sysconfig.get_paths()["stdlib"], include=["*.py"], exclude=STDLIB_EXCLUDES)
    return split_bytes(data, fraction)[1]


def block_bits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean bits per byte of targets [T] under logits [T, V] (float64 log-softmax)."""
    log_p = log_softmax(logits.astype(np.float64))
    return float(-log_p[np.arange(len(targets)), targets].mean() / math.log(2))


def stream(model, ids: np.ndarray, block: int) -> list[dict]:
    """One sequence through a decoding session (fast where the components have kernels), block by block,
    the state carried throughout."""
    decoder = model.decoder(batch_size=1)
    rows = []
    for start in range(0, len(ids) - 1, block):
        y = ids[start + 1:start + block + 1]
        x = ids[start:start + len(y)]
        logits = decoder.prompt(x[None], logits="all")[0]
        bits = block_bits(logits, y)
        if not math.isfinite(bits):
            raise RuntimeError(f"bits per byte is not finite in the block at byte {start}")
        norms = np.linalg.norm(decoder.state().memory[0].astype(np.float64), axis=1)
        rows.append({"end": start + len(x), "bits_per_byte": bits, "norm_max": float(norms.max()),
                     "norm_mean": float(norms.mean())})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model folder, training run folder or 'default'")
    ap.add_argument("--gammas", default="", help="comma-separated memory decays (default: the model's)")
    ap.add_argument("--bytes", type=int, default=524288, help="stream length (at most the data's)")
    ap.add_argument("--block", type=int, default=65536, help="bytes per reported block")
    ap.add_argument("--data", default=None, help="a file or folder instead of the stdlib held-out split")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="config field for every row, VALUE as JSON (repeatable)")
    args = ap.parse_args(argv)
    if args.bytes < 2 or args.block < 1:
        raise InputError("--bytes must be at least 2 and --block at least 1")
    gammas = [float(g) for g in args.gammas.split(",") if g]
    if any(not 0.0 < g <= 1.0 for g in gammas):
        raise InputError(f"--gammas {args.gammas!r}: each decay must be in (0, 1]")
    base = THLModel.from_pretrained(resolve_model_dir(args.model))
    sets = parse_overrides(args.overrides)
    data = held_out_stdlib() if args.data is None else load_bytes(args.data)
    ids = np.asarray(data[:args.bytes], np.int64)
    print(f"stream: {len(ids):,} bytes, state carried; per block of {args.block:,} bytes: bits/byte "
          "(largest / mean slot norm at its end)")
    if sets:
        print(f"every row: {sets}")
    for g in gammas or [base.config.memory_decay]:
        model = THLModel(base.config.replace(**sets, memory_decay=g), params=base.params)
        rows = stream(model, ids, args.block)
        cells = " | ".join(f"{r['end'] // 1024}K {r['bits_per_byte']:.3f} ({r['norm_max']:.0f} / "
                           f"{r['norm_mean']:.0f})" for r in rows)
        print(f"γ = {g}: {cells}", flush=True)


if __name__ == "__main__":
    main()
