"""What a reference case writes: npz and JSON files that regenerate byte for byte, and the table of a
case's outputs (arrays per dtype, plus the manifest's description of each key)."""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .check import DTYPES


def save_npz(path, arrays: dict) -> None:
    """Write an uncompressed .npz deterministically (fixed zip timestamps, keys in the given order), so
    regenerating a file gives the same bytes. ``np.load`` reads it like any .npz."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def _json_text(data, indent=0) -> str:
    """JSON with one key per line, but short lists and flat objects on one line: short and diff-friendly."""
    pad = " " * (indent + 1)
    flat = json.dumps(data, ensure_ascii=False)
    if len(flat) <= 160 and not (isinstance(data, dict) and any(isinstance(v, dict) for v in data.values())):
        return flat
    if isinstance(data, dict) and data:
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_json_text(v, indent + 1)}"
                 for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        return "[\n" + ",\n".join(pad + _json_text(v, indent + 1) for v in data) + "\n" + " " * indent + "]"
    return json.dumps(data, ensure_ascii=False)


def write_json(path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(_json_text(data) + "\n")


def round_sig(x, digits=3):
    """A float rounded to ``digits`` significant digits, for the manifest (stable across machines)."""
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return x if math.isfinite(x) else None
    return float(f"{x:.{digits}g}")


@dataclass
class CaseOutputs:
    """Collects a case's output tensors for both dtypes and their manifest description."""

    keys: dict = field(default_factory=dict)          # key -> {"kind", "required", "spec", "doc"}
    arrays: dict = field(default_factory=lambda: {d: {} for d in DTYPES})

    def add(self, key, values: dict, kind: str, spec: str, doc: str = "", required: bool = True):
        """``values``: dtype name -> array (float arrays stored in that dtype, integers as int64)."""
        self.keys[key] = {"kind": kind, "required": required, "spec": spec, **({"doc": doc} if doc else {})}
        for dt in DTYPES:
            a = np.asarray(values[dt])
            if kind == "exact":
                a = a.astype(np.int64)
            elif a.dtype.kind == "f":
                a = a.astype(dt)
            self.arrays[dt][key] = a

    def manifest(self) -> dict:
        out = {}
        for key, info in self.keys.items():
            a = self.arrays["float64"][key]
            out[key] = {"shape": list(a.shape), "dtype": "int64" if info["kind"] == "exact" else "float",
                        **info}
        return out


def describe_arrays(arrays: dict) -> dict:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in arrays.items()}
