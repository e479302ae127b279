"""Several prompts as one batch against the same prompts one by one (thl_np.generation), on the shipped model.

Prints, for each batch size: the time of ``generate_text(model, None, prompts)`` (one lockstep batch), the
time of one call per prompt, and whether the texts are identical; and the single-prompt cost per token
(the generation loop's overhead included). Best of --repeat runs each. Run it on a quiet machine: on a
shared one the figures say little.

    python benchmarks/bench_generate_batch.py --sizes 1,4,16 --max-length 200 --path fast
"""
from __future__ import annotations

import argparse
import time

from thl_np import THLModel, generate_text

PROMPTS = ["def parse(line):", "import os", "class Config:", "for i in range(", "    return self.", "# read the",
           "if not self.", "with open(path) as f:"]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16", help="batch sizes (prompts cycle through a fixed list)")
    ap.add_argument("--max-length", type=int, default=200)
    ap.add_argument("--path", default="fast", choices=["fast", "plain"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = THLModel.from_pretrained("default")
    kw = dict(max_length=args.max_length, temperature=0.8, seed=1, path=args.path)
    generate_text(model, None, "warm-up", max_length=4, path=args.path)   # compile / load the fast path once
    single = best(lambda: generate_text(model, None, PROMPTS[0], **kw), args.repeat)
    print(f"one prompt: {single * 1e3 / args.max_length:.3f} ms per new token ({args.path} path)")
    for size in (int(x) for x in args.sizes.split(",")):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
        batch = best(lambda p=prompts: generate_text(model, None, p, **kw), args.repeat)
        one_by_one = best(lambda p=prompts: [generate_text(model, None, q, **kw) for q in p], args.repeat)
        same = generate_text(model, None, prompts, **kw) == [generate_text(model, None, q, **kw) for q in prompts]
        print(f"{size:3d} prompts: batch {batch:.3f} s, one by one {one_by_one:.3f} s "
              f"({one_by_one / batch:.2f}x), texts identical: {same}")


if __name__ == "__main__":
    main()
