"""Task heads on the THL body: sequence classification, token classification, multiple choice.

The spec (THL_SPEC.md) defines the body: T steps of §4 give the tier states ``S`` [N, T, D] with
D = Σ d_k, the concatenated new tier states of every step (the LayerNorm's input). A head reads them; this
file defines the heads (docs/TASKS.md lists the same equations as "H.1-H.6") the way the PyTorch THL's
``THLForSequenceClassification``, ``THLForTokenClassification`` and ``THLForMultipleChoice`` compute them,
with padding handled through ``pad_token_id``:

- **H.1 last position**: ``last_n`` = the last t with ``x_{n,t} ≠ pad`` (T − 1 when ``pad_token_id`` is
  None). Rows are independent, so a row padded on the right pools exactly what it would unpadded.
- **H.2 pooling** (sequence classification, multiple choice): ``p_n = S[n, last_n, D − d_{K-1}:]``, the top
  tier's state after step ``last_n`` (the PyTorch THL's ``state.tier_states[-1]``).
- **H.3 token features**: ``h = LayerNorm(S)`` (spec §4.8's h, the PyTorch THL's
  ``forward_features_step`` output; its head reads the LayerNorm's output, not its input).
- **H.4 dropout**: ``f̃ = f ⊙ m / (1 − p)``, ``m`` Bernoulli(1 − p) drawn in training; ``f̃ = f`` in evaluation.
- **H.5 classifier**: ``logits = f̃ W_c^T + b_c`` (``classifier.weight`` [L, width], ``classifier.bias`` [L]);
  multiple choice scores each of the C choices of an example with L = 1 and reads the B·C scores as [B, C].
- **H.6 loss**: mean cross-entropy over the counted positions: every row whose label is not −100
  (sequence, multiple choice); every position whose label is not −100 and whose input is not the pad
  (tokens). With no counted position the loss is 0 and so is every gradient.

Forward and backward of each piece side by side; the backward of a head returns the gradient of S, which
the body's BPTT (``thl_np.step.sequence_backward`` or ``thl_np.engines.gradient.fast_backward``) takes from
there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .output import LayerNormCache, layer_norm_backward, layer_norm_forward, linear_backward, linear_forward
from .output import log_softmax as _log_softmax

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ H.1, H.2
def last_positions(input_ids, pad_token_id):
    """H.1: [N, T] ids → [N] index of each row's last non-pad token (T − 1 without a pad id). A row made
    only of pads gets −1 (the caller refuses it)."""
    N, T = input_ids.shape
    if pad_token_id is None:
        return np.full(N, T - 1, dtype=np.int64)
    real = input_ids != pad_token_id
    last = T - 1 - np.argmax(real[:, ::-1], axis=1)
    return np.where(real.any(axis=1), last, -1).astype(np.int64)


def pool_last_forward(S, last, width):
    """H.2: S [N, T, D], last [N] → the last ``width`` features of S at each row's last position [N, width]."""
    return S[np.arange(S.shape[0]), last, S.shape[2] - width:]


def pool_last_backward(d_pooled, last, shape):
    """The gradient of H.2: d_pooled [N, width] → dS of ``shape`` [N, T, D], zero except at the pooled entries."""
    dS = np.zeros(shape, dtype=d_pooled.dtype)
    dS[np.arange(shape[0]), last, shape[2] - d_pooled.shape[1]:] = d_pooled
    return dS


# ------------------------------------------------------------------------------------------ H.4
def dropout_forward(x, keep, p):
    """H.4: x ⊙ keep / (1 − p); ``keep`` None (evaluation) or p = 0 → x itself."""
    if keep is None or p == 0:
        return x
    return x * keep * (1.0 / (1.0 - p))


def dropout_backward(d_y, keep, p):
    """The gradient of H.4 (the same mask and scale)."""
    return dropout_forward(d_y, keep, p)


def draw_dropout(rng: np.random.Generator, shape, p):
    """A keep-mask for H.4: True with probability 1 − p (None when p = 0, so no draw is made)."""
    return None if p == 0 else rng.random(shape) >= p


# ------------------------------------------------------------------------------------------ H.6
def masked_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    """H.6: mean over the positions whose label is not ``ignore_index`` of −log softmax(logits)[label].
    logits [..., L], labels [...] → (loss, d_logits) with zero gradient at ignored positions; (0, 0) when
    nothing counts."""
    counted = labels != ignore_index
    n = int(counted.sum())
    d_logits = np.zeros_like(logits)
    if n == 0:
        return logits.dtype.type(0.0), d_logits
    safe = np.where(counted, labels, 0)[..., None]
    logp = _log_softmax(logits)
    picked = np.take_along_axis(logp, safe, axis=-1)[..., 0]
    loss = -(picked * counted).sum() / n
    d_logits = np.exp(logp)
    np.put_along_axis(d_logits, safe, np.take_along_axis(d_logits, safe, axis=-1) - 1.0, axis=-1)
    d_logits *= counted[..., None] / n
    return loss, d_logits


# ------------------------------------------------------------------------------------------ the heads
@dataclass
class PooledHeadCache:
    """What ``pooled_head_backward`` needs: the pooled positions, the dropped features and the mask."""

    last: np.ndarray     # [N] the pooled step of each row
    features: np.ndarray  # [N, width] after dropout (the classifier's input)
    keep: object         # [N, width] bool, or None
    p: float
    shape: tuple         # S's shape


def pooled_head_forward(S, last, W_c, b_c, keep=None, p=0.0):
    """H.2, H.4, H.5 (sequence classification, and multiple choice with L = 1): S [N, T, D] → logits [N, L]."""
    pooled = pool_last_forward(S, last, W_c.shape[1])
    features = dropout_forward(pooled, keep, p)
    return linear_forward(features, W_c, b_c), PooledHeadCache(last, features, keep, p, S.shape)


def pooled_head_backward(d_logits, cache: PooledHeadCache, W_c):
    """d_logits [N, L] → (dS [N, T, D], d classifier.weight, d classifier.bias)."""
    d_features, dW, db = linear_backward(d_logits, cache.features, W_c)
    d_pooled = dropout_backward(d_features, cache.keep, cache.p)
    return pool_last_backward(d_pooled, cache.last, cache.shape), dW, db


@dataclass
class TokenHeadCache:
    """What ``token_head_backward`` needs."""

    ln: LayerNormCache
    features: np.ndarray  # [N, T, D] LayerNorm output after dropout
    keep: object
    p: float


def token_head_forward(S, ln_w, ln_b, W_c, b_c, keep=None, p=0.0):
    """H.3, H.4, H.5 (token classification): S [N, T, D] → logits [N, T, L]."""
    h, ln_cache = layer_norm_forward(S, ln_w, ln_b)
    features = dropout_forward(h, keep, p)
    return linear_forward(features, W_c, b_c), TokenHeadCache(ln_cache, features, keep, p)


def token_head_backward(d_logits, cache: TokenHeadCache, ln_w, W_c):
    """d_logits [N, T, L] → (dS, d layer_norm.weight, d layer_norm.bias, d classifier.weight, d classifier.bias)."""
    d_features, dW, db = linear_backward(d_logits, cache.features, W_c)
    d_h = dropout_backward(d_features, cache.keep, cache.p)
    dS, d_ln_w, d_ln_b = layer_norm_backward(d_h, cache.ln, ln_w)
    return dS, d_ln_w, d_ln_b, dW, db


def token_labels(labels, input_ids, pad_token_id):
    """H.6 for tokens: the labels with every pad position set to −100 (not counted)."""
    if pad_token_id is None:
        return labels
    return np.where(input_ids == pad_token_id, IGNORE_INDEX, labels)
