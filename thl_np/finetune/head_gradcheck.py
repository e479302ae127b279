"""Finite-difference checks of a task model's ``value_and_grad``, in float64: the head, the pooling and the
whole body (BPTT), on the path asked for, against central differences of the plain forward.

    >>> report = check_task_gradients(model, ids, labels, dropout=keep_mask)   # model in float64
    >>> print(report); assert report.ok

The same harness as ``thl_np.gradcheck.check_gradients`` (one random unit direction per parameter, retried
where a perturbation moves one of the forward's discrete choices); the loss is the head's (H.6, plus the
router load-balance term when its weight is non-zero), with the dropout mask held fixed.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..gradcheck import GradCheckReport, directional_report, tape_choices
from ..step import add_load_balance, read_weights, run_sequence


def check_task_gradients(model, input_ids, labels, *, dropout=None, gumbel_uniform=None, path: str = "plain",
                         eps: float = 1e-6, tolerance: float = 1e-5, tries: int = 4, seed: int = 0,
                         names=None) -> GradCheckReport:
    """Check ``model.value_and_grad(input_ids, labels, dropout=..., path=path)`` parameter by parameter
    (``names``: a subset; default: the trainable ones). ``dropout``: None or a bool keep-mask (a Generator
    would draw a new mask per evaluation, which a finite difference cannot use)."""
    if model.dtype != np.float64:
        raise InputError(f"check_task_gradients needs a float64 model (got {model.dtype}): "
                         "from_pretrained(folder, dtype='float64') or pass dtype='float64'")
    if isinstance(dropout, np.random.Generator):
        raise InputError("check_task_gradients needs a fixed dropout keep-mask, not a Generator: draw one with "
                         "thl_np.components.heads.draw_dropout(rng, shape, p)")
    ids, lead = model._flat_ids(input_ids)
    last = model._check_rows(ids)
    y = model._check_labels(labels, ids, lead)
    U = model.body._check_gumbel(gumbel_uniform, *ids.shape)
    keep = model._check_dropout(dropout, model._features_shape(ids))
    # the rows exactly as given (padding=False): the finite differences below run them so
    _, grads = model.value_and_grad(input_ids, labels, dropout=keep, gumbel_uniform=U, path=path, padding=False)
    body = model.body

    def loss_and_choices():
        S, _, tape = run_sequence(body.params, body.config, ids, body.init_state(ids.shape[0]), U, record=True)
        logits, _ = model._head_forward(S, ids, last, keep)
        loss, _ = model._loss(model._shape_logits(logits, lead), y, ids)
        loss, _ = add_load_balance(body.config, loss, read_weights(body.config, tape))
        return float(loss), tape_choices(tape)

    return directional_report(model.params, grads, loss_and_choices, names or model.trainable_names(), eps=eps,
                              tolerance=tolerance, tries=tries, seed=seed)


__all__ = ["check_task_gradients"]
