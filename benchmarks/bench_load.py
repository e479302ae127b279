"""How long does opening a default-size THL model take, and how much memory does it cost?

Builds THLConfig() (174M parameters, ~700 MB float32) with init_params, writes it with write_safetensors,
then, in a fresh Python process (so nothing is already imported or cached in the heap), times:

  read_safetensors        header parse + one mmap: should be well under 1 s and grow RSS < 64 MB
  THLModel.from_pretrained (when thl_np.model exists) which also checks every weight is finite, so it
                          reads the whole file: its RSS growth is the mapped file pages (RssFile), not heap

Figures are printed, not asserted. The file was just written, so the page cache is warm: a first load
from a cold disk adds the disk's read time to from_pretrained (not to read_safetensors).

    python benchmarks/bench_load.py            # build in a temp folder, measure, delete
    python benchmarks/bench_load.py --dir D    # reuse / keep the model folder D
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
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def memory_mb() -> dict[str, float]:
    """VmRSS and its split into anonymous (heap) and file-backed (mapped file) pages, in MB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def growth(before, after) -> str:
    return ", ".join(f"{k} +{after[k] - before[k]:.1f} MB" for k in ("VmRSS", "RssAnon", "RssFile"))


def build(folder: Path) -> None:
    from thl_np.config import THLConfig
    from thl_np.io.safetensors import write_safetensors
    from thl_np.params import init_params, num_parameters

    config = THLConfig()
    start = time.perf_counter()
    params = init_params(config, seed=0, dtype="float32")
    made = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_safetensors(folder / "model.safetensors", params,
                      metadata={"format": "thl-np", "format_version": "1", "config": config.to_json()})
    config.save(str(folder / "config.json"))
    written = time.perf_counter() - start
    size = (folder / "model.safetensors").stat().st_size
    print(f"built {num_parameters(config):,} parameters in {made:.1f} s; wrote {size / 1e6:.0f} MB in "
          f"{written:.1f} s")


def child(folder: str) -> None:
    """Runs in a fresh interpreter: measure the loads, print one JSON line per measurement."""
    import numpy as np  # noqa: F401  (imported before the baseline so it is not counted as load cost)

    from thl_np.io.safetensors import read_safetensors

    path = os.path.join(folder, "model.safetensors")
    before = memory_mb()
    start = time.perf_counter()
    tensors, _ = read_safetensors(path)
    seconds = time.perf_counter() - start
    print(json.dumps({"what": "read_safetensors", "seconds": seconds, "tensors": len(tensors),
                      "growth": growth(before, memory_mb())}))
    del tensors
    try:
        from thl_np.model import THLModel
    except ImportError as exc:
        print(json.dumps({"what": "THLModel.from_pretrained", "skipped": str(exc)}))
        return
    before = memory_mb()
    start = time.perf_counter()
    model = THLModel.from_pretrained(folder)
    seconds = time.perf_counter() - start
    print(json.dumps({"what": "THLModel.from_pretrained", "seconds": seconds,
                      "parameters": model.num_parameters(), "growth": growth(before, memory_mb())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="model folder to (re)use and keep; built there if missing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="thl-bench-load-") as scratch:
        folder = Path(args.dir) if args.dir else Path(scratch) / "model"
        if not (folder / "model.safetensors").exists():
            build(folder)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        result = subprocess.run([sys.executable, __file__, "--child", str(folder)], env=env,
                                capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"the measuring process failed:\n{result.stderr}")
        for line in result.stdout.splitlines():
            record = json.loads(line)
            if "skipped" in record:
                print(f"{record['what']:<26} skipped ({record['skipped']})")
            else:
                print(f"{record['what']:<26} {record['seconds']:.3f} s   RSS growth: {record['growth']}")
        print("targets for read_safetensors: < 1 s and < 64 MB VmRSS growth (page cache warm)")


if __name__ == "__main__":
    main()
