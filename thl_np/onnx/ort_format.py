"""``thl-np export --format ort``: the export converted to ONNX Runtime's ORT format (for the mobile and minimal
builds of onnxruntime) by onnxruntime's own converter ("Fixed" optimisation, arm target: phones), with the
required-operators config that a minimal onnxruntime build takes (``--include_ops_by_config``)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from ..errors import InputError


def convert_to_ort(onnx_path: str, out: str) -> dict:
    """Convert ``onnx_path`` to ``out`` (.ort) and ``out``.required_operators.config. Returns the paths."""
    folder = os.path.dirname(os.path.abspath(out))
    with tempfile.TemporaryDirectory(prefix=".thl-np-ort-", dir=folder) as tmp:
        src = os.path.join(tmp, "thl_step.onnx")
        shutil.copyfile(onnx_path, src)
        if os.path.exists(onnx_path + ".data"):
            raise InputError("the ORT format holds the weights in the file itself: export without --external-data")
        done = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", src,
                               "--output_dir", os.path.join(tmp, "ort"), "--optimization_style", "Fixed",
                               "--target_platform", "arm"],
                              capture_output=True, text=True)
        made = glob.glob(os.path.join(tmp, "ort", "**", "*.ort"), recursive=True)
        configs = glob.glob(os.path.join(tmp, "ort", "**", "*.config"), recursive=True)
        if done.returncode != 0 or not made:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(f"onnxruntime's ORT-format converter failed: {tail[0][:300]}")
        ops = None
        if configs:
            ops = out + ".required_operators.config"
            os.replace(configs[0], ops)
        os.replace(made[0], out)
    return {"ort": out, "operators": ops}
