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
CASES = CONFORMANCE / "cases"


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


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_value_and_grad_paths_match_recorded_gradients(path):
    """Both gradient paths, in-process, against the recorded PyTorch THL runs (float64): the runner above
    goes through the default path only."""
    import json

    import numpy as np

    import thl_np

    cases = sorted(p.parent for p in CASES.glob("*/expected.npz")) if CASES.is_dir() else []
    if not cases:
        pytest.skip(f"no conformance cases at {CASES}")
    for case in cases:
        inp, exp = np.load(case / "inputs.npz"), np.load(case / "expected.npz")
        kw = {"gumbel_uniform": inp["gumbel_uniform"]} if "gumbel_uniform" in inp else {}
        model = thl_np.THLModel.from_pretrained(case, dtype="float64")
        state = thl_np.InferenceState.load(case / "state_in.npz")
        loss, grads, out = thl_np.value_and_grad(model, inp["input_ids"], inp["targets"], state=state,
                                                 return_state=True, path=path, **kw)
        assert abs(loss - float(exp["loss"])) < 1e-12, case.name
        for key in exp.files:
            if key.startswith("grad."):
                ref = exp[key]
                rel = np.abs(grads[key[5:]] - ref).max() / max(np.abs(ref).max(), 1e-12)
                assert rel < 1e-12, (case.name, key, rel)
        skip = json.loads((case / "meta.json").read_text()).get("tie_sensitive_state", [])
        for key, value in out.arrays().items():
            if key not in skip and f"state_out.{key}" in exp.files:
                assert np.abs(np.asarray(value, float) - exp[f"state_out.{key}"]).max() < 1e-12, (case.name, key)
