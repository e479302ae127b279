"""Finite-difference checks of a sequence case's gradients, run before anything is written: for the
parameters of each component, and for each differentiable key of the initial state, the central
difference of the spec §5 loss along one direction against the gradient's inner product with it."""
from __future__ import annotations

import math

import numpy as np

from ..errors import THLError
from ..step import read_weights, run_sequence, sequence_loss


def _loss_only(params, config, ids, targets, state, U) -> float:
    """Spec §5's loss (``thl_np.step.sequence_loss``) of the plain forward, for finite differences."""
    tier_states, _, tape = run_sequence(params, config, ids, state.copy(), U, record=True)
    return float(sequence_loss(params, config, tier_states.reshape(ids.size, -1), targets.reshape(-1),
                               read_weights(config, tape))[0])


def _param_group(name: str) -> str:
    """The component a parameter belongs to (one finite-difference check per component)."""
    if name.startswith("tiers.cells."):
        return ".".join(name.split(".")[:3])
    if name.startswith(("layer_norm.", "output_head.")):
        return "output"
    return name.split(".")[0]


def directional_checks(params, config, ids, targets, state, U, grads, d_state, rng, eps=1e-5) -> dict:
    """For the parameters of every component and for every differentiable state key: the central
    difference of the loss along a unit direction against the gradient's inner product with it. Each
    tensor's share of the direction is half its gradient's own direction, half random, normalised, so
    every tensor of a group weighs alike. Raises THLError naming the group if they disagree; returns the
    relative errors. The step (norm 1e-5) is far below every choice margin: no discrete choice moves."""
    errors = {}

    def unit(g, mask=1.0):
        v = rng.normal(0.0, 1.0, g.shape) * mask
        v /= max(np.linalg.norm(v), 1e-300)
        n = np.linalg.norm(g)
        v = v + (g / n if n > 0 else 0.0)
        return v / max(np.linalg.norm(v), 1e-300)

    def check(name, pairs, loss_at):
        """``pairs``: [(gradient, direction)]; ``loss_at(sign · eps)`` moves along the directions."""
        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        predicted = sum(float((g * v).sum()) for g, v in pairs)
        err = abs(numeric - predicted) / max(abs(predicted), 1e-6)
        errors[name] = err
        if not err < 1e-6:
            raise THLError(f"reference case: the gradient of {name} fails a finite-difference check "
                           f"(difference {numeric!r}, gradient {predicted!r}, relative error {err:.1e})")

    groups = {}
    for name in grads:
        groups.setdefault(_param_group(name), []).append(name)
    for group, names in groups.items():
        dirs = {n: unit(grads[n]) / math.sqrt(len(names)) for n in names}
        check(f"grad.{group}.*", [(grads[n], dirs[n]) for n in names], lambda step, dirs=dirs: _loss_only(
            {**params, **{n: params[n] + step * v for n, v in dirs.items()}}, config, ids, targets, state, U))
    for key, g in d_state.items():
        if np.size(g) == 0:
            continue
        # keep empty slots empty (their norm decides the write branch)
        mask = (np.abs(state.memory).sum(axis=2, keepdims=True) > 0) if key == "memory" else 1.0
        v = unit(g * mask, mask)

        def loss_at(step, key=key, v=v):
            s = state.copy()
            if key.startswith("tier_state_"):
                k = int(key[len("tier_state_"):])
                s.tiers[k] = s.tiers[k] + step * v
            else:
                setattr(s, key, getattr(s, key) + step * v)
            return _loss_only(params, config, ids, targets, s, U)

        check(f"grad_state.{key}", [(g * mask, v)], loss_at)
    return errors
