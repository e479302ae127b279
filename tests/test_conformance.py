"""The PyTorch THL's conformance cases (../shared/conformance, beside the repository): logits, final state,
loss and every gradient, via the cases' own runner in a subprocess, in float64 (with and without
gradients) and float32. Skipped when the shared folder is not there."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

CONFORMANCE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance").resolve()
RUNNER = CONFORMANCE / "run_conformance.py"


@pytest.mark.parametrize("args", [
    ["--dtype", "float64"],
    ["--no-grad", "--dtype", "float64"],
    ["--dtype", "float32"],
], ids=["float64-grad", "float64-nograd", "float32-grad"])
def test_conformance_cases(args):
    """Spec §4 and §5 against the PyTorch THL: every case passes (the runner's own tolerances)."""
    if not RUNNER.is_file():
        pytest.skip(f"no conformance runner at {RUNNER} (the shared folder is not beside this checkout)")
    cases = [p.parent for p in (CONFORMANCE / "cases").rglob("config.json")
             if (p.parent / "expected.npz").exists()]
    proc = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    out = proc.stdout + proc.stderr
    m = re.search(r"^(\d+) passed, (\d+) failed$", proc.stdout, re.MULTILINE)
    assert m, f"the runner printed no summary line:\n{out}"
    passed, failed = int(m.group(1)), int(m.group(2))
    assert proc.returncode == 0 and failed == 0, f"conformance failed (exit {proc.returncode}):\n{out}"
    assert passed == len(cases) and passed > 0, f"{passed} passed but {len(cases)} cases exist:\n{out}"
