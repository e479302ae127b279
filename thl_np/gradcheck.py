"""Finite-difference checks of ``value_and_grad``: the harness a researcher runs on a changed component.

For every parameter, a random unit direction v: the analytic directional derivative ⟨∇L, v⟩ against the
central difference (L(θ + εv) − L(θ − εv)) / 2ε, in float64. THL's forward makes discrete choices (the
slots read, the write targets and branch, the clip); where a perturbation flips one, the loss is not
differentiable along v there, so that parameter is retried with another direction and reported as
skipped if every try flips a choice.

    >>> report = check_gradients(model, ids, targets)      # model in float64
    >>> print(report); assert report.ok

With ``memory_bptt`` N the analytic side is the truncated backward (``thl_np.step.cut_memory_gradient``) and
the finite differences are of the loss it is the gradient of: the forward whose bank, entering every N-th
step, is held at the value the unperturbed forward had there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .step import cut_memory_gradient, read_weights, run_sequence, sequence_loss


@dataclass
class GradCheckRow:
    name: str
    analytic: float
    numeric: float
    error: float          # |analytic − numeric| / max(|analytic|, |numeric|, scale)
    ok: bool | None       # None: every direction tried flipped a discrete choice (skipped)


@dataclass
class GradCheckReport:
    rows: list = field(default_factory=list)
    tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        """No parameter failed, and at least half of them were checked (not skipped)."""
        checked = [r for r in self.rows if r.ok is not None]
        return all(r.ok for r in checked) and 2 * len(checked) >= len(self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if r.ok is False]

    def __str__(self) -> str:
        lines = [f"{'parameter':34s} {'analytic':>14s} {'finite diff.':>14s} {'rel. error':>10s}"]
        for r in self.rows:
            verdict = "skipped (choice flipped)" if r.ok is None else ("OK" if r.ok else "NOT OK")
            lines.append(f"{r.name:34s} {r.analytic:14.6e} {r.numeric:14.6e} {r.error:10.2e}  {verdict}")
        n_ok = sum(r.ok is True for r in self.rows)
        lines.append(f"{n_ok} OK, {len(self.failures)} NOT OK, "
                     f"{sum(r.ok is None for r in self.rows)} skipped (tolerance {self.tolerance:g})")
        return "\n".join(lines)


def _loss_and_choices(params, config, ids, targets, state, gumbel_uniform, held=None):
    """Spec §5's loss from the plain forward, and the discrete choices its steps made. ``held`` ({t: bank}):
    the bank each step t starts from is set to the given value (``held_banks``)."""
    def hold(t, st):
        if t in held:
            st.memory[...] = held[t]

    tier_states, _, tape = run_sequence(params, config, ids, state.copy(), gumbel_uniform, record=True,
                                        before_step=hold if held else None)
    loss = sequence_loss(params, config, tier_states.reshape(ids.size, -1), targets.reshape(-1),
                         read_weights(config, tape))[0]
    return float(loss), tape_choices(tape)


def held_banks(params, config, ids, state, gumbel_uniform, memory_bptt) -> dict:
    """{t: the bank step t starts from} for every step where ``memory_bptt`` cuts the bank's gradient."""
    held = {}

    def keep(t, st):
        if cut_memory_gradient(t, memory_bptt):
            held[t] = st.memory.copy()

    run_sequence(params, config, ids, state.copy(), gumbel_uniform, before_step=keep)
    return held


def tape_choices(tape) -> list:
    """Every discrete choice the recorded steps made (slots read and written, capacity mask, write branch,
    novelty arg-max, clip): a finite difference is valid only where none of them moved."""
    choices = []
    for rec in tape:
        choices += [rec.idx, rec.targets]
        for cache, names in ((rec.router, ("cap_mask",)), (rec.writer, ("novel", "j_star", "clipped"))):
            choices += [np.asarray(getattr(cache, n)) for n in names if getattr(cache, n, None) is not None]
    return choices


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def check_gradients(model, input_ids, targets, state=None, gumbel_uniform=None, *, path: str = "plain",
                    eps: float = 1e-6, tolerance: float = 1e-5, tries: int = 4, seed: int = 0,
                    names=None, memory_bptt=None) -> GradCheckReport:
    """Check ``value_and_grad(model, ..., path=path)`` against central differences of the plain forward,
    one random direction per parameter (``names``: a subset). The model must be float64 (rounding in
    float32 swamps a finite difference). A parameter passes when the relative error is below
    ``tolerance``, relative to max(|analytic|, |numeric|, 1e-3 · the largest |analytic| seen). ``memory_bptt``:
    the truncated backward against the loss with held banks (module docstring)."""
    from .model import value_and_grad

    if model.dtype != np.float64:
        raise InputError(f"check_gradients needs a float64 model (got {model.dtype}): "
                         "THLModel(config, dtype='float64') or from_pretrained(folder, dtype='float64')")
    ids = model._check_ids(input_ids)
    tg = model._check_ids(targets, name="targets")
    state0 = model._prepare_state(state, ids.shape[0])
    U = model._check_gumbel(gumbel_uniform, *ids.shape)
    _, grads = value_and_grad(model, ids, tg, state=state0, gumbel_uniform=U, path=path, memory_bptt=memory_bptt)
    held = held_banks(model.params, model.config, ids, state0, U, memory_bptt) if memory_bptt else None
    return directional_report(model.params, grads, lambda: _loss_and_choices(model.params, model.config, ids, tg,
                                                                             state0, U, held),
                              names, eps=eps, tolerance=tolerance, tries=tries, seed=seed)


def directional_report(P, grads, loss_and_choices, names=None, *, eps=1e-6, tolerance=1e-5, tries=4,
                       seed=0) -> GradCheckReport:
    """The check itself, for any loss: for each name of ``P`` (or ``names``), ⟨grads[name], v⟩ against the
    central difference of ``loss_and_choices()`` (→ (loss, choices), reading ``P``) along a random unit v,
    retried while a perturbation moves a discrete choice."""
    rng = np.random.default_rng(seed)
    _, choices0 = loss_and_choices()
    measured = []
    for name in (names or list(P)):
        x = P[name]
        for _ in range(tries):
            v = rng.standard_normal(x.shape)
            v /= np.linalg.norm(v) or 1.0
            P[name] = x + eps * v
            lp, cp = loss_and_choices()
            P[name] = x - eps * v
            lm, cm = loss_and_choices()
            P[name] = x
            if _same(cp, choices0) and _same(cm, choices0):
                measured.append((name, float((grads[name] * v).sum()), (lp - lm) / (2 * eps)))
                break
        else:
            measured.append((name, float("nan"), float("nan")))
    scale = 1e-3 * max([abs(a) for _, a, _ in measured if a == a] + [1e-12])
    report = GradCheckReport(tolerance=tolerance)
    for name, a, n in measured:
        if a != a:
            report.rows.append(GradCheckRow(name, a, n, float("nan"), None))
            continue
        err = abs(a - n) / max(abs(a), abs(n), scale)
        report.rows.append(GradCheckRow(name, a, n, err, err <= tolerance))
    return report
