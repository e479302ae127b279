"""A PyTorch THL task-model checkpoint (``THLForSequenceClassification`` & co., saved with
``torch.save(model.state_dict())`` beside its config.json) → the body under its spec §2 names (the PyTorch
models keep it under ``thl.``) and the head (``classifier.weight``, ``classifier.bias``), with the task
fields the config then needs. ``thl_np.io.convert`` calls this; it reads the weights without torch."""
from __future__ import annotations

from ..errors import WeightsError
from ..task_fields import CHOICE, SEQUENCE, TASKS, TOKEN
from .models import HEAD_NAMES

BODY_PREFIX = "thl."


def split_head_checkpoint(tensors: dict, config, task: str | None = None, say=None):
    """→ (body tensors, head tensors, config). A language-model checkpoint (no ``classifier.*``, no ``thl.``
    prefix) comes back unchanged with an empty head. The task is read from config.json's ``task`` when it
    has one, else from ``task``, else inferred from the classifier's shape (an error where that is
    ambiguous: one tier, so both heads read the same width)."""
    say = say or (lambda line: None)
    head = {name: tensors[name] for name in HEAD_NAMES if name in tensors}
    prefixed = [name for name in tensors if name.startswith(BODY_PREFIX)]
    if not head and not prefixed:
        if task is not None:
            raise WeightsError(f"task {task!r} was asked for, but the checkpoint has no classifier.weight: it is a "
                               "language model")
        return tensors, {}, config
    if len(head) != len(HEAD_NAMES):
        raise WeightsError(f"a task checkpoint needs {list(HEAD_NAMES)}; this one has {sorted(head) or 'neither'}")
    other = sorted(name for name in tensors if name not in head and not name.startswith(BODY_PREFIX))
    if other:
        raise WeightsError(f"a PyTorch THL task checkpoint keeps its body under '{BODY_PREFIX}'; these tensors are "
                           f"neither body nor head: {other[:5]}")
    body = {name[len(BODY_PREFIX):]: tensors[name] for name in prefixed}
    W = head["classifier.weight"]
    if W.ndim != 2 or head["classifier.bias"].shape != (W.shape[0],):
        raise WeightsError(f"classifier.weight {list(W.shape)} and classifier.bias "
                           f"{list(head['classifier.bias'].shape)} are not a linear layer's weight and bias")
    task = config.task or task or _infer_task(W.shape, config)
    if task not in TASKS:
        raise WeightsError(f"task {task!r} is not one of {list(TASKS)}")
    width = config.total_tier_dim if task == TOKEN else config.tier_dims[-1]
    labels = 1 if task == CHOICE else (config.num_labels or W.shape[0])
    if tuple(W.shape) != (labels, width):
        raise WeightsError(f"classifier.weight has shape {list(W.shape)}; a {task} head of this config has "
                           f"[{labels}, {width}] ({'Σ d_k' if task == TOKEN else 'd_{K-1}'} = {width})")
    if config.task is None:
        config = config.replace(task=task, **({} if task == CHOICE else {"num_labels": int(W.shape[0])}))
    say(f"note  a PyTorch THL {task} checkpoint: body '{BODY_PREFIX}*' -> spec names, head classifier "
        f"{list(W.shape)}" + ("" if task == CHOICE else f", labels {list(config.id2label.values())}"))
    return body, head, config


def _infer_task(shape, config) -> str:
    out, width = shape
    top, total = config.tier_dims[-1], config.total_tier_dim
    if width == total and width != top:
        return TOKEN
    if width == top and width != total:
        return CHOICE if out == 1 else SEQUENCE
    if width == top == total and out == 1:
        return CHOICE
    if width == top == total:
        raise WeightsError(f"classifier.weight {list(shape)} fits both a sequence- and a token-classification head "
                           "(one tier): say which with --task (convert_pytorch_checkpoint(task=...))")
    raise WeightsError(f"classifier.weight has {width} inputs: a head reads d_{{K-1}} = {top} (sequence "
                       f"classification, multiple choice) or Σ d_k = {total} (token classification)")
