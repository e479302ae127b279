"""AdamW with decoupled weight decay, and global gradient-norm clipping.

Choices, and why:

- **Decoupled decay** (Loshchilov & Hutter): ``p ← p − lr·wd·p`` is applied to the weight directly,
  not folded into the gradient, so it is not rescaled by Adam's per-coordinate step size.
- **What is not decayed**: biases (``*.bias``), the LayerNorm's gain and shift (``layer_norm.*``) and the
  embedding (``embedding.weight``). Shrinking a bias or a LayerNorm gain towards 0 is not a useful prior
  (it changes the function's offset/scale, not its complexity); the embedding's rows are only updated
  when their byte occurs, so decay would erode rare bytes' rows on every step they are absent.
  Every other matrix (the linear weights) is decayed. Pass ``no_decay=`` to change the rule.
- **Moment precision**: ``m`` and ``v`` are kept in the parameter's dtype (float32 or float64). The
  float64 reference path keeps its exactness end to end (a resumed run is bit-identical), and float32
  moments are what float32 training usually uses (PyTorch does the same); the bias corrections and the
  learning rate are Python floats.
- **Frozen parameters** (``frozen=``) are left exactly as they are: no step, no decay, moments kept at 0 (so a
  checkpoint has the same layout whatever is frozen, and a run can be resumed with another set frozen).
  They need no gradient. ``frozen_names`` turns glob patterns into that set.
- The update follows PyTorch's ``torch.optim.AdamW`` line by line, so numbers can be compared with it.

Parameters are replaced by new arrays (``params[name] = new``), never modified in place, so a model that
caches anything derived from a weight array by identity sees the change.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Mapping, MutableMapping

import numpy as np

from ..errors import InputError


def default_no_decay(name: str) -> bool:
    """True for the parameters AdamW leaves undecayed: biases, LayerNorm parameters, the embedding."""
    return name.endswith(".bias") or name.startswith("layer_norm.") or name == "embedding.weight"


def frozen_names(names: Collection[str], patterns: str) -> frozenset[str]:
    """The parameter names matched by ``patterns``, comma-separated globs (``writer.*,tiers.0.*``).

    Every pattern must match a name (a typo must not silently train everything), and something must be left
    to train.
    """
    names = list(names)
    globs = [g.strip() for g in patterns.split(",") if g.strip()]
    chosen: set[str] = set()
    for glob in globs:
        hits = fnmatch.filter(names, glob)
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise InputError(f"freeze pattern {glob!r} matches no parameter; the model's are: {shown}")
        chosen.update(hits)
    if names and len(chosen) == len(names):
        raise InputError(f"freeze = {patterns!r} freezes every parameter: nothing would train")
    return frozenset(chosen)


class AdamW:
    """AdamW over a dict of named NumPy arrays (the model's ``params``).

    ``step(params, grads, lr)`` updates ``params`` (replacing its arrays) and the moments. The learning
    rate is given per step by the caller (the schedule lives outside the optimiser, as a pure function).
    The names in ``frozen`` are never updated (module docstring).
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        no_decay: Callable[[str], bool] = default_no_decay,
        frozen: Collection[str] = (),
    ):
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise InputError(f"AdamW betas = {betas!r} must both lie in [0, 1)")
        if eps <= 0 or weight_decay < 0:
            raise InputError(f"AdamW needs eps > 0 and weight_decay >= 0 (got {eps}, {weight_decay})")
        self.beta1, self.beta2, self.eps = b1, b2, float(eps)
        self.weight_decay = float(weight_decay)
        unknown = sorted(set(frozen) - set(params))
        if unknown:
            raise InputError(f"AdamW: frozen names {unknown[:5]} are not parameters")
        self.frozen = frozenset(frozen)
        self.decay = {name: not no_decay(name) for name in params}
        self.t = 0
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, params: MutableMapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
             lr: float) -> None:
        """One AdamW update with learning rate ``lr`` (every parameter not frozen must have a gradient)."""
        missing = [name for name in self.m if name not in grads and name not in self.frozen]
        if missing:
            raise InputError(f"AdamW.step: no gradient for {missing[:5]} ({len(missing)} missing)")
        self.t += 1
        lr = float(lr)
        bias1 = 1.0 - self.beta1**self.t
        bias2_sqrt = np.sqrt(1.0 - self.beta2**self.t)
        step_size = lr / bias1
        for name, p in params.items():
            if name in self.frozen:
                continue
            g = np.asarray(grads[name], dtype=p.dtype)
            m = self.beta1 * self.m[name] + (1.0 - self.beta1) * g
            v = self.beta2 * self.v[name] + (1.0 - self.beta2) * (g * g)
            if self.decay[name] and self.weight_decay:
                p = p * (1.0 - lr * self.weight_decay)
            denom = np.sqrt(v) / bias2_sqrt + self.eps
            params[name] = (p - step_size * (m / denom)).astype(p.dtype, copy=False)
            self.m[name], self.v[name] = m, v

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays: ``step`` (int64 scalar), ``m/<name>`` and ``v/<name>`` for every parameter."""
        state = {"step": np.array(self.t, dtype=np.int64)}
        for name in self.m:
            state[f"m/{name}"] = self.m[name]
            state[f"v/{name}"] = self.v[name]
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned; shapes and names must match the parameters."""
        problems = []
        for kind, store in (("m", self.m), ("v", self.v)):
            for name, current in store.items():
                key = f"{kind}/{name}"
                if key not in state:
                    problems.append(f"missing {key}")
                elif np.shape(state[key]) != current.shape:
                    got = list(np.shape(state[key]))
                    problems.append(f"{key} has shape {got}, expected {list(current.shape)}")
        if "step" not in state:
            problems.append("missing step")
        if problems:
            raise InputError("optimiser state does not match the model: " + "; ".join(problems[:8]))
        self.t = int(state["step"])
        for kind, store in (("m", self.m), ("v", self.v)):
            for name, current in store.items():
                store[name] = np.array(state[f"{kind}/{name}"], dtype=current.dtype)


def global_grad_norm(grads: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all gradients taken together, accumulated in float64 in dict order."""
    total = 0.0
    for g in grads.values():
        g64 = np.asarray(g, dtype=np.float64).ravel()
        total += float(np.dot(g64, g64))
    return float(np.sqrt(total))


def clip_grad_norm(grads: MutableMapping[str, np.ndarray], max_norm: float | None) -> float:
    """Scale every gradient by ``max_norm / (norm + 1e-6)`` when the global norm exceeds ``max_norm``.

    Returns the norm *before* clipping (what a training log wants to show). ``max_norm`` None or <= 0
    disables clipping. A non-finite norm leaves the gradients untouched: the caller decides what to do
    with a step that diverged (the trainer skips it).
    """
    norm = global_grad_norm(grads)
    if max_norm is None or max_norm <= 0 or not np.isfinite(norm) or norm <= max_norm:
        return norm
    scale = float(max_norm) / (norm + 1e-6)
    for name, g in grads.items():
        grads[name] = (np.asarray(g) * scale).astype(np.asarray(g).dtype, copy=False)
    return norm
