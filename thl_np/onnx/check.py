"""``thl-np check-port FILE.onnx``: an ONNX step export (thl-np's or a porter's own, laid out as
docs/DEPLOY.md says) against thl-np's plain step on the same model, step by step.

Both run from the zero state on the same token ids, each on its own state (so errors compound as they would
in use), and every step compares, in this order, the slots read, every next-state array (spec §3 order),
the slots written and the logits. The first entry past the tolerance (an integer entry that differs, a
float entry off by more than ``atol``) is the divergence reported: step and array.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

ATOL = 1e-5


@dataclass
class ExportCheck:
    path: str
    model_dir: str
    steps: int
    batch: int
    atol: float
    worst: dict = field(default_factory=dict)        # array → largest |onnx − thl-np| over every step
    logit_scale: float = 1.0                           # max(1, max|logit|) seen: the logits' tolerance factor
    first: tuple | None = None                         # (step, array, max abs diff or "ids differ")

    @property
    def ok(self) -> bool:
        return self.first is None


def _config_differences(a, b) -> list:
    da, db = a.to_dict(), b.to_dict()
    return [k for k in sorted(set(da) | set(db)) if k != "dtype" and da.get(k) != db.get(k)]


def check_export(path, model_dir=None, steps: int = 64, batch: int = 3, atol: float = ATOL, seed: int = 0,
                 token_ids=None, progress=None) -> ExportCheck:
    """Run ``steps`` steps of the export at ``path`` and of the model folder ``model_dir`` (the shipped model
    by default) from the zero state on ``token_ids`` [batch, steps] (seeded ids below V by default).
    ``progress(done, total)`` is called after each step."""
    from ..io.folder import resolve_model_dir
    from ..model import THLModel
    from ..state import InferenceState
    from ..step import output_forward, thl_step
    from .runtime import OnnxStep

    if steps < 1 or batch < 1:
        raise InputError(f"steps = {steps} and batch = {batch} must be at least 1")
    src = resolve_model_dir(model_dir)
    step = OnnxStep(path)
    model = THLModel.from_pretrained(src, dtype="float32")
    c = model.config
    diff = _config_differences(step.config, c)
    if diff:
        raise InputError(f"{path} was exported from another model: its config differs from {src}'s in {diff}")
    if token_ids is None:
        token_ids = np.random.default_rng(seed).integers(0, c.vocab_size, (batch, steps))
    token_ids = np.asarray(token_ids, dtype=np.int64)
    batch, steps = token_ids.shape
    report = ExportCheck(str(path), str(src), steps, batch, atol)
    st_ref = InferenceState.init(batch, c)
    st_onnx = step.zero_state(batch)
    for t in range(steps):
        ids = token_ids[:, t]
        tiers, st_ref, rec = thl_step(model.params, c, ids, st_ref, record=True)
        logits_ref, _, _ = output_forward(model.params, tiers)
        logits, st_onnx, trace = step.step(ids, st_onnx)
        pairs = [("trace.read_slots", trace["trace.read_slots"], rec.idx)]
        ref_arrays, got_arrays = st_ref.arrays(), st_onnx.arrays()
        pairs += [("next_state." + k, got_arrays[k], ref_arrays[k]) for k in ref_arrays]
        pairs += [("trace.write_slots", trace["trace.write_slots"], rec.targets), ("logits", logits, logits_ref)]
        for name, got, ref in pairs:
            got, ref = np.asarray(got), np.asarray(ref)
            if got.shape != ref.shape:
                report.first = report.first or (t, name, f"shape {list(got.shape)}, expected {list(ref.shape)}")
                continue
            exact = ref.dtype.kind in "iub"
            d = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
            report.worst[name] = max(report.worst.get(name, 0.0), d)
            limit = atol
            if name == "logits":
                report.logit_scale = max(report.logit_scale, float(np.abs(ref).max()))
                limit = atol * report.logit_scale
            bad = (d != 0) if exact else not (d <= limit)
            if bad and report.first is None:
                report.first = (t, name, "entries differ" if exact else d)
        if progress is not None:
            progress(t + 1, steps)
        if report.first is not None:
            break
    return report


def format_check(r: ExportCheck) -> str:
    lines = [f"export    {r.path}", f"model     {r.model_dir}",
             f"run       {r.steps} steps from the zero state, batch {r.batch}, float32, atol {r.atol:.0e}", ""]
    for name, d in r.worst.items():
        integer = name.startswith("trace.") or name.split(".")[-1] in ("timestep", "local_valid", "last_read",
                                                                      "last_write")
        limit = r.atol * (r.logit_scale if name == "logits" else 1.0)
        ok = d == 0 if integer else d <= limit
        tol = "exact" if integer else f"abs <= {limit:.1e}"
        lines.append(f"  {'OK    ' if ok else 'NOT OK'}  {name:<26} max abs {d:7.1e}  ({tol})")
    lines.append("")
    if r.ok:
        lines.append(f"OK: the export equals thl-np over {r.steps} steps")
    else:
        step, name, what = r.first
        limit = r.atol * (r.logit_scale if name == "logits" else 1.0)
        how = f"max abs {what:.3g} > {limit:.1e}" if isinstance(what, float) else what
        lines.append(f"NOT OK: first divergence at step {step}, array {name} ({how})")
    return "\n".join(lines)
