"""Check a port against the reference vectors (``thl-np check-port``): the whole rule in one file.

A reference folder (``thl-np golden --out DIR``; the repository keeps one in ``reference/``) holds, for
every case, ``<case>/outputs_float64.npz`` and ``<case>/outputs_float32.npz``, and a ``manifest.json``
that lists, per case, every output key with its ``kind`` and whether it is ``required``. A port writes
``RESULTS_DIR/<case>/outputs_<dtype>.npz`` with the same keys; ``compare_results`` reads both and
compares them tensor by tensor, ``format_report`` prints the OK / NOT OK listing.

The pass rule depends on the key's kind (``KIND_DOC``): a value passes when max|port − ref| ≤ atol, a
gradient when max|port − ref| / max|ref| ≤ rtol (relative to the tensor's largest entry, so an entry tiny
next to the largest gets the same absolute room), an integer (index, branch, counter) when every entry is
equal. Optional (diagnostic) keys are compared when the results hold them and skipped otherwise.

This file needs NumPy and the standard library only (and thl-np's ``InputError`` for its messages): a
porter can read it in one sitting, or copy the idea into another language.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

DTYPES = ("float64", "float32")

#: Tolerances, the same as the shared conformance runner's. ``atol`` bounds max|port − reference| of a
#: value (logits, loss, states, forward outputs, weights); ``rtol`` bounds max|port − reference| divided by
#: the reference tensor's largest |entry| (gradients). Integer tensors must match exactly.
TOLERANCES = {
    "float64": {"atol": 1e-9, "rtol": 1e-8},
    "float32": {"atol": 2e-3, "rtol": 3e-2},
}

#: What each manifest ``kind`` means (written into manifest.json).
KIND_DOC = {
    "value": "a forward value: passes when max|port - ref| <= atol",
    "grad": "a gradient: passes when max|port - ref| / max|ref| <= rtol (relative to the tensor's largest "
            "entry)",
    "exact": "an integer (index, branch, counter): must be equal",
}


def load_npz(path) -> dict:
    """Every array of an .npz file (plain NumPy .npz: a zip of .npy files), read eagerly."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def default_reference_dir() -> str:
    """The repository's reference/ folder: beside the thl_np package (a checkout installed with
    ``pip install -e .``), else ``reference/`` in the working directory (the checkout's root after a plain
    ``pip install .``, which copies the package away from it); the first when neither holds a manifest."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))       # thl_np/
    beside = os.path.join(os.path.dirname(package), "reference")
    for folder in (beside, os.path.abspath("reference")):
        if os.path.isfile(os.path.join(folder, "manifest.json")):
            return folder
    return beside


@dataclass
class TensorCheck:
    """One tensor's comparison. ``status`` is OK, NOT OK, MISSING or SKIPPED (optional, not provided)."""

    case: str
    key: str
    kind: str
    status: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tol: float = float("nan")
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("OK", "SKIPPED")


@dataclass
class CheckReport:
    dtype: str
    results_dir: str
    reference_dir: str
    checks: list = field(default_factory=list)
    missing_files: list = field(default_factory=list)   # (case, expected path)

    @property
    def passed(self) -> int:
        return sum(c.status == "OK" for c in self.checks)

    @property
    def failed(self) -> int:
        return sum(c.status in ("NOT OK", "MISSING") for c in self.checks)

    @property
    def skipped(self) -> int:
        return sum(c.status == "SKIPPED" for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def failures(self) -> list:
        return [c for c in self.checks if not c.ok]


def compare_arrays(got, ref, kind: str, atol: float, rtol: float) -> tuple[bool, float, float, str]:
    """Compare one port tensor with the reference → (ok, max abs diff, max diff / max|ref|, message).

    ``kind`` "value": ok when max abs ≤ atol; "grad": ok when max abs / max|ref| ≤ rtol; "exact": equal.
    """
    ref = np.asarray(ref)
    try:
        got = np.asarray(got)
    except Exception as exc:  # pragma: no cover - np.load gives arrays
        return False, np.nan, np.nan, f"unreadable ({exc})"
    if got.shape != ref.shape and not (got.size == ref.size == 1):
        return False, np.nan, np.nan, f"shape {list(got.shape)}, expected {list(ref.shape)}"
    if got.dtype.kind not in "biuf":
        return False, np.nan, np.nan, f"dtype {got.dtype} is not numeric"
    g = got.astype(np.float64).reshape(ref.shape)
    r = ref.astype(np.float64)
    if not np.all(np.isfinite(g)):
        return False, np.nan, np.nan, f"{int((~np.isfinite(g)).sum())} non-finite value(s)"
    diff = float(np.abs(g - r).max()) if r.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    rel = diff / max(scale, 1e-12)
    if kind == "exact":
        bad = int((g != r).sum())
        return bad == 0, diff, rel, (f"{bad} of {r.size} entries differ" if bad else "")
    if kind == "grad":
        return rel <= rtol, diff, rel, ""
    return diff <= atol, diff, rel, ""


def load_manifest(reference_dir: str) -> dict:
    path = os.path.join(reference_dir, "manifest.json")
    if not os.path.isfile(path):
        raise InputError(f"no manifest.json in {reference_dir}: pass --reference DIR, a folder written by "
                         "`thl-np golden --out DIR`")
    with open(path) as f:
        return json.load(f)


def select_cases(manifest: dict, patterns=None) -> list:
    """Case ids matching any pattern: a full id ("components/router"), its last part ("router"), or a glob
    ("components/writer_*"). Raises InputError naming the known cases when a pattern matches none."""
    ids = list(manifest["cases"])
    if not patterns:
        return ids
    chosen = []
    for p in patterns:
        hits = [c for c in ids if c == p or c.split("/", 1)[1] == p or fnmatch.fnmatch(c, p)
                or fnmatch.fnmatch(c.split("/", 1)[1], p)]
        if not hits:
            raise InputError(f"no reference case matches {p!r}; the cases are: {', '.join(ids)}")
        chosen += [h for h in hits if h not in chosen]
    return [c for c in ids if c in chosen]


def compare_results(results_dir, reference_dir=None, cases=None, dtype="float64", atol=None, rtol=None
                    ) -> CheckReport:
    """Compare a port's RESULTS_DIR (laid out like the reference folder) with the reference.

    For every selected case, reads ``RESULTS_DIR/<case>/outputs_<dtype>.npz`` and compares each key the
    manifest lists: required keys must be present; optional (diagnostic) keys are compared when present.
    ``atol`` / ``rtol`` override the manifest's tolerances for values / gradients.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: use float64 or float32")
    reference_dir = os.fspath(reference_dir or default_reference_dir())
    results_dir = os.fspath(results_dir)
    manifest = load_manifest(reference_dir)
    if not os.path.isdir(results_dir):
        expected = os.path.join(results_dir, "<case>", f"outputs_{dtype}.npz")
        raise InputError(f"results folder {results_dir} does not exist: a port writes {expected} for each "
                         "case it runs")
    tol = dict(manifest.get("tolerances", TOLERANCES)[dtype])
    if atol is not None:
        tol["atol"] = float(atol)
    if rtol is not None:
        tol["rtol"] = float(rtol)
    report = CheckReport(dtype, results_dir, reference_dir)
    fname = f"outputs_{dtype}.npz"
    for case in select_cases(manifest, cases):
        keys = manifest["cases"][case]["outputs"]
        ref = load_npz(os.path.join(reference_dir, case, fname))
        path = os.path.join(results_dir, case, fname)
        if not os.path.isfile(path):
            report.missing_files.append((case, path))
            for key, info in keys.items():
                if info.get("required", True):
                    report.checks.append(TensorCheck(case, key, info["kind"], "MISSING",
                                                     message=f"file {path} does not exist"))
            continue
        try:
            got = load_npz(path)
        except Exception as exc:
            report.missing_files.append((case, path))
            why = f"{path} is not a readable .npz ({type(exc).__name__}: {exc})"
            report.checks.append(TensorCheck(case, fname, "file", "NOT OK", message=why))
            continue
        for key, info in keys.items():
            kind = info["kind"]
            limit = tol["rtol"] if kind == "grad" else (0.0 if kind == "exact" else tol["atol"])
            if key not in got:
                if info.get("required", True):
                    report.checks.append(TensorCheck(case, key, kind, "MISSING", tol=limit,
                                                     message=f"key {key!r} not in {path}"))
                else:
                    report.checks.append(TensorCheck(case, key, kind, "SKIPPED", tol=limit,
                                                     message="optional, not in the results"))
                continue
            ok, d_abs, d_rel, msg = compare_arrays(got[key], ref[key], kind, tol["atol"], tol["rtol"])
            status = "OK" if ok else "NOT OK"
            report.checks.append(TensorCheck(case, key, kind, status, d_abs, d_rel, limit, msg))
    return report


def _fmt(x: float) -> str:
    return "      -" if not np.isfinite(x) else f"{x:7.1e}"


def format_report(report: CheckReport, verbose: bool = True) -> str:
    """The check-port listing: per case, one line per tensor (OK / NOT OK with max abs and max rel
    difference), then ``N passed, M failed``."""
    lines = [f"reference {report.reference_dir}", f"results   {report.results_dir}   [{report.dtype}]"]
    by_case = {}
    for c in report.checks:
        by_case.setdefault(c.case, []).append(c)
    missing = dict(report.missing_files)
    width = max([len(c.key) for c in report.checks] + [20])
    for case, checks in by_case.items():
        lines.append("")
        lines.append(case)
        if case in missing and all(c.status == "MISSING" for c in checks):
            lines.append(f"  NOT OK  missing file: expected {missing[case]} ({len(checks)} required tensors)")
            continue
        if not verbose and all(c.ok for c in checks):
            n_ok = sum(c.status == "OK" for c in checks)
            lines.append(f"  all {n_ok} OK")
            continue
        for c in checks:
            if c.status == "SKIPPED":
                if verbose:
                    lines.append(f"  --      {c.key:<{width}}  (optional, not provided)")
                continue
            if c.status == "OK" and not verbose:
                continue
            label = "OK    " if c.status == "OK" else "NOT OK"
            tol = "exact" if c.kind == "exact" else (f"rel <= {c.tol:.0e}" if c.kind == "grad" else
                                                       f"abs <= {c.tol:.0e}")
            line = (f"  {label}  {c.key:<{width}}  max abs {_fmt(c.max_abs)}  max rel {_fmt(c.max_rel)}"
                    f"  ({tol})")
            if c.message:
                line += f"  {c.message}"
            lines.append(line)
    lines.append("")
    if report.skipped:
        lines.append(f"{report.skipped} optional tensors not provided (skipped)")
    if report.missing_files:
        lines.append(f"{len(report.missing_files)} result file(s) missing or unreadable:")
        lines += [f"  {p}" for _, p in report.missing_files]
    lines.append(f"{report.passed} passed, {report.failed} failed")
    return "\n".join(lines)
