"""Does a long prompt cost memory? Peak RSS of a generation with a small and a large prompt, both paths.

Each measurement runs in a fresh Python process: it loads the model, generates a few tokens after a prompt
of N bytes (THLModel.prompt: the last position's logits only) and prints its peak resident memory
(ru_maxrss). The prefill must keep only what it needs, so the large prompt's peak should stay within
``--budget-mb`` (50 MB) of the small one's on each path (issue 24, item 16). Figures are printed; the exit
status is 1 when a path is over budget.

    python benchmarks/bench_prompt_memory.py                          # 10 KB vs 1 MB, the packaged model
    python benchmarks/bench_prompt_memory.py --model DIR --small 1000 --large 20000 --paths plain
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from thl_np import THLModel, generate_text
from thl_np.io.folder import resolve_model_dir
model = THLModel.from_pretrained(resolve_model_dir(sys.argv[2] or None))
n, path = int(sys.argv[3]), sys.argv[4]
line = b"def f(x):\n    return x + 1\n"
prompt = (line * (n // len(line) + 1))[:n]
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
generate_text(model, None, prompt, max_length=4, temperature=0, path=path)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"bytes": n, "path": path, "peak_mb": peak / 1024, "before_mb": rss_before / 1024}))
"""


def measure(model: str | None, n: int, path: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), model or "", str(n), path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {path} run with {n} bytes failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Model folder (default: the packaged model).")
    ap.add_argument("--small", type=int, default=10_000, help="Bytes of the small prompt.")
    ap.add_argument("--large", type=int, default=1_000_000, help="Bytes of the large prompt.")
    ap.add_argument("--paths", default="fast,plain", help="Comma-separated: fast, plain.")
    ap.add_argument("--budget-mb", type=float, default=50.0, help="Allowed growth of the peak RSS.")
    args = ap.parse_args(argv)
    over = []
    for path in args.paths.split(","):
        small, large = measure(args.model, args.small, path), measure(args.model, args.large, path)
        growth = large["peak_mb"] - small["peak_mb"]
        verdict = "OK" if growth <= args.budget_mb else "OVER"
        print(f"{path:5s}  peak RSS {small['peak_mb']:8.1f} MB ({args.small:,} bytes)  "
              f"{large['peak_mb']:8.1f} MB ({args.large:,} bytes)  growth {growth:+7.1f} MB  "
              f"(budget {args.budget_mb:g} MB)  {verdict}")
        if verdict != "OK":
            over.append(path)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
