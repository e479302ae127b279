"""How the training gradient grows with the window, lane by lane, in float64 (docs/MEMORY.md, round eleven).

A training run stopped with "the loss is finite and its gradient is not" (``thl-np train``'s divergence
error) overflowed in its backward. This script takes the run's checkpoint, the batch the run would train on
next (the run restored exactly as ``--resume`` restores it: same lanes, same routing noise) and, in float64,
prints for each lane and each prefix length T of the window the loss and the gradient norm, with the
writer on and off (``write_rate = 0``: the memory stays empty), with the memory decays given, with the
memory's gradient cut every N steps (``--memory-bptt``, the trainer's option) and with other routers on the same
weights (``--routers unit_rows``: values read from unit rows). A gradient
that grows by a steady factor a step once T passes some length, and not with the writer off, grows through
the memory's loop. For the longest T it also checks that the growth is the model's and not a path's: the
fast and plain paths' loss and gradient, and the plain path's loss with every weight multiplied by
(1 + 1e-13·noise): on a chaotic lane the perturbation moves the loss as much as the path does.

    python benchmarks/gradient_growth.py runs/m5wsL2/step-000261 --data /usr/lib/python3.11 --include '*.py' \\
        --exclude test --exclude tests --held-out 0.05 --lengths 512,1024,1536,2048 --gammas 0.9999
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from thl_np import THLModel
from thl_np.model import value_and_grad
from thl_np.training import distributed
from thl_np.training.data import load_bytes, split_bytes
from thl_np.training.trainer import _restore, saved_train_config


def next_batch(checkpoint: str, data: np.ndarray, held_out: float | None):
    """(model, inputs, targets, loss weights, routing uniforms) of the step after ``checkpoint``."""
    tc = saved_train_config(os.path.dirname(os.path.abspath(checkpoint)))
    if tc is None:
        raise SystemExit(f"{checkpoint!r} is not a checkpoint of a training run (step-NNNNNN in a run folder)")
    if held_out is not None:
        tc = tc.replace(held_out_fraction=held_out)
    train_bytes, _ = split_bytes(data, tc.held_out_fraction)
    if not tc.windows:
        raise SystemExit("the run trains on lanes whose state is carried from chunk to chunk: this script measures "
                         "window runs (--task-mix > 0, --full-bptt or a --seq-len schedule), whose rows start empty")
    run = _restore(checkpoint, tc, train_bytes, THLModel, lambda event: None)
    batch = run.batches.next_batch()
    cfg = run.model.config
    T = batch.inputs.shape[1]
    # the trainer's own draw (one process), so the noise is the step's
    uniforms = None if tc.routing == "hard" else \
        distributed.SINGLE.draw_uniforms(run.rng, (T, tc.batch_size, cfg.num_heads, cfg.memory_slots))
    return run.model, batch.inputs, batch.targets, batch.weights, uniforms


def loss_and_norm(model, inputs, targets, weights, uniforms, path="fast", memory_bptt=None):
    loss, grads = value_and_grad(model, inputs, targets, gumbel_uniform=uniforms, loss_weights=weights, path=path,
                                 memory_bptt=memory_bptt)
    return float(loss), grads, float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a training run's step-NNNNNN folder")
    ap.add_argument("--data", required=True, help="the run's --data")
    ap.add_argument("--include", action="append", default=None)
    ap.add_argument("--exclude", action="append", default=None)
    ap.add_argument("--held-out", type=float, default=None, help="the run's --held-out (default: the saved one)")
    ap.add_argument("--lengths", default="512,1024,2048", help="comma-separated prefix lengths T")
    ap.add_argument("--gammas", default="", help="comma-separated memory decays to run as well")
    ap.add_argument("--routers", default="", help="comma-separated router variants to run as well, same weights")
    ap.add_argument("--memory-bptt", default="", help="comma-separated cuts of the memory's gradient (every N steps) "
                                                      "to run as well")
    args = ap.parse_args(argv)
    data = load_bytes(args.data, args.include, args.exclude)
    model, inputs, targets, weights, uniforms = next_batch(args.checkpoint, data, args.held_out)
    lengths = [min(int(t), inputs.shape[1]) for t in args.lengths.split(",")]
    settings = [("as trained", {}, None), ("writer off", {"write_rate": 0.0}, None)]
    settings += [(f"decay {g}", {"memory_decay": float(g)}, None) for g in args.gammas.split(",") if g]
    settings += [(f"cut every {n}", {}, int(n)) for n in args.memory_bptt.split(",") if n]
    settings += [(f"router {n}", {"components": {**model.config.components, "router": n}}, None)
                 for n in args.routers.split(",") if n]
    params64 = {k: v.astype(np.float64) for k, v in model.params.items()}

    def sliced(b, T):
        return (inputs[b:b + 1, :T], targets[b:b + 1, :T], None if weights is None else weights[b:b + 1, :T],
                None if uniforms is None else uniforms[:T, b:b + 1])

    print(f"{args.checkpoint}: the next batch, {inputs.shape[0]} lanes x {inputs.shape[1]} bytes, float64")
    for name, change, cut in settings:
        m = THLModel(model.config.replace(dtype="float64", **change), params=params64)
        for b in range(inputs.shape[0]):
            cells = []
            for T in lengths:
                loss, _, norm = loss_and_norm(m, *sliced(b, T), memory_bptt=cut)
                cells.append(f"T {T}: {loss:.4f} / {norm:.2e}")
            print(f"  {name:12s} lane {b}: loss / gradient norm  " + ";  ".join(cells))
    m = THLModel(model.config.replace(dtype="float64"), params=params64)
    rng = np.random.default_rng(0)
    nudged = THLModel(m.config, params={k: v * (1 + 1e-13 * rng.standard_normal(v.shape)) for k, v in params64.items()})
    T = lengths[-1]
    for b in range(inputs.shape[0]):
        lf, gf, _ = loss_and_norm(m, *sliced(b, T), path="fast")
        lp, gp, _ = loss_and_norm(m, *sliced(b, T), path="plain")
        ln, _, _ = loss_and_norm(nudged, *sliced(b, T), path="plain")
        rel = max(float(np.abs(gf[k] - gp[k]).max() / (np.abs(gp[k]).max() + 1e-300)) for k in gp)
        print(f"  lane {b}, T {T}: fast - plain loss {abs(lf - lp):.1e}, gradient (relative) {rel:.1e}; "
              f"plain with weights x(1 + 1e-13 noise): loss moves {abs(ln - lp):.1e}")


if __name__ == "__main__":
    main()
