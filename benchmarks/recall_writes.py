"""Where a recall value goes in the memory, and whether the question reads it (docs/MEMORY.md, issue 23).

For a model and each novelty threshold θ given (the writer opens a slot when 1 − max affinity > θ, else it
refines the closest slot; a config field, so the same weights run with another θ), traces the first trial
of a ``thl-np eval --recall`` cell for each seed and prints: how the value's bytes were written (novel into an
empty slot / refine / novel evicting), at how many question steps a slot holding a value byte was read,
the best rank any key-line slot reached, and the greedy answer against the value.

    python benchmarks/recall_writes.py MODEL_DIR --theta 0.3,0.1,-1 --seeds 100,101 --cell trained --length 1024
"""
from __future__ import annotations

import argparse

from thl_np import THLModel
from thl_np.eval.recall import CELLS, recall_trace
from thl_np.io.folder import resolve_model_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model folder, training run folder or 'default'")
    ap.add_argument("--theta", default="", help="comma-separated novelty thresholds (default: the model's)")
    ap.add_argument("--seeds", default="100,101", help="comma-separated trial seeds")
    ap.add_argument("--cell", default="trained", choices=sorted(CELLS))
    ap.add_argument("--length", type=int, default=1024)
    args = ap.parse_args(argv)
    model = THLModel.from_pretrained(resolve_model_dir(args.model))
    thetas = [float(t) for t in args.theta.split(",") if t] or [model.config.novelty_theta]
    for theta in thetas:
        m = THLModel(model.config.replace(novelty_theta=theta), params=model.params)
        for seed in (int(s) for s in args.seeds.split(",")):
            tr = recall_trace(m, args.cell, seed=seed, length=args.length)
            branches = [w["branch"] for w in tr["written"] if w["digit"]]
            q = tr["question"]
            reads = sum(bool(step["picked_digit_slots"]) for step in q)
            best = min((min(r) for step in q for r in step["ranks"].values()), default=None)
            print(f"theta {theta:g} seed {seed}: value bytes {branches.count('novel_empty')} novel-empty / "
                  f"{branches.count('refine')} refine / {branches.count('novel_evict')} evicting; a value slot read "
                  f"at {reads}/{len(q)} question steps; best key-line slot rank {best}; answer {tr['answer']!r}, "
                  f"value {tr['key'] + tr['stop']!r}", flush=True)


if __name__ == "__main__":
    main()
