"""A task model over a data set: class probabilities, and held-out loss and accuracy."""
from __future__ import annotations

import math
import time

import numpy as np

from ..components.output import log_softmax
from ..errors import THLError
from ..task_fields import TOKEN
from .examples import IGNORE, TaskData, batch


def predict_batches(model, data: TaskData, batch_size: int = 16, max_len: int | None = None, path: str = "auto"):
    """Yield (example indices, input_ids, log-probabilities) batch by batch, in evaluation mode: the
    log-probabilities are [n, L] per sequence, [n, T, L] per token, [n, C] per choice (float64)."""
    n = len(data)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(n, start + batch_size))
        ids, _ = batch(data, index, model.config, max_len)
        logits, _ = model(ids, path=path)
        yield index, ids, log_softmax(np.asarray(logits, dtype=np.float64))


def evaluate_task(model, data: TaskData, batch_size: int = 16, max_len: int | None = None, limit: int | None = None,
                  path: str = "auto") -> dict:
    """Mean cross-entropy (nats) and accuracy over the labelled items of ``data`` (its first ``limit``
    examples): examples, or for tokens the labelled non-pad bytes within ``max_len``. Evaluation mode.
    Returns {"loss", "accuracy", "count", "examples", "seconds"}; a non-finite loss is an error."""
    t0 = time.perf_counter()
    if limit is not None and limit < len(data):
        data = data.subset(range(limit))
    total, correct, count = 0.0, 0, 0
    for index, ids, logp in predict_batches(model, data, batch_size, max_len, path):
        if data.task == TOKEN:
            y = np.full(ids.shape, IGNORE, np.int64)
            for row, i in enumerate(index):
                lab = data.examples[i].label[:ids.shape[1]]
                y[row, :len(lab)] = lab
        else:
            y = np.array([data.examples[i].label for i in index], np.int64)
        counted = y != IGNORE
        safe = np.where(counted, y, 0)
        picked = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        total -= float(picked[counted].sum())
        correct += int((logp.argmax(axis=-1) == y)[counted].sum())
        count += int(counted.sum())
    if count == 0:
        return {"loss": None, "accuracy": None, "count": 0, "examples": len(data),
                "seconds": time.perf_counter() - t0}
    loss = total / count
    if not math.isfinite(loss):
        raise THLError(f"the held-out loss is {loss}: the model's outputs are not finite (it diverged); lower the "
                       "learning rate and start again")
    return {"loss": loss, "accuracy": correct / count, "count": count, "examples": len(data),
            "seconds": time.perf_counter() - t0}
