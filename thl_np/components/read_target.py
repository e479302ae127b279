"""The read-target term: a training loss on the router's scores (not part of the spec's step or loss).

Where a training row states a value and later asks for it, the steps that read the value's bytes
(*sources*) write it into some slots, and the steps that answer (*asks*: the input bytes whose targets are
the answer's) should read those slots. The spec's gradient (§5) holds the picks fixed, so a slot that the
router never picks at a question gets no gradient to be picked (docs/MEMORY.md, round eight: at the
held-out ``xml`` form the question reads a value slot at 0 of 42-50 steps). This term gives the router
that gradient, over every slot:

    T_{t,b}   = the slots written at a source step s < t of the same call (any of the W_w write targets)
                whose source id is the ask's (ids: any value byte → one id, or byte k → id k, so that answer
                step k reads the slot of the byte it writes)
    p_{h,j}   = softmax_j(score_{h,j})   over all J slots, score as the router ranks it (§4.3, no noise)
    ℓ_{t,b}   = −log( (1/H) Σ_h Σ_{j∈T_{t,b}} p_{h,j} )       (one head reading the value is enough)
    loss     += μ · (Σ over asked (t, b) with T_{t,b} non-empty of ℓ_{t,b}) / N,   N = the number of such (t, b)

The score is the config's ``ScoreRule`` content term minus λ_load·read_ema_j, so the gradient reaches the
query (W_q, the token's embedding, the tier states s^0 and s^{K-1}), W_k, every slot's row and read_ema.
Both training paths call ``read_target_rows`` with the step's memory, read_ema and query: the plain path
(``thl_np.step.loss_and_grads``) from the state it holds, the fast path (``thl_np.engines.gradient``) from
a copy of its bank taken at each asked step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .router import slot_scores

THROUGH = ("all", "query", "router")


@dataclass(frozen=True)
class ReadTargets:
    """Where a call's rows state and ask their values: ``sources`` and ``asks`` [B, T] (input positions), bool
    or integer ids >= 0 (True = 1; 0: not a source / not asked; an ask with id k reads toward the slots the
    sources with id k wrote),
    ``weight`` μ > 0 (the term's coefficient); ``through``: "all" (the gradient reaches everything the scores
    depend on), "query" (not the memory or read_ema the step read: the term moves the query, never what was
    written) or "router" (W_q and W_k alone); ``report`` (optional) is called with the mean ℓ over the N
    asked (step, row) pairs with a target and N, once per call (the term is μ times that mean)."""

    sources: np.ndarray
    asks: np.ndarray
    weight: float
    report: object = None
    through: str = "all"

    def checked(self, B: int, T: int) -> ReadTargets:
        """A copy with int64 id arrays of shape [B, T] and a finite μ > 0; InputError otherwise."""
        s, a = np.asarray(self.sources), np.asarray(self.asks)
        for name, x in (("sources", s), ("asks", a)):
            if x.shape != (B, T):
                raise InputError(f"read targets: {name} must have the shape of the inputs [B, T] = {[B, T]}, "
                                 f"got {list(x.shape)}")
            if not (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer)) or (x.size and x.min() < 0):
                raise InputError(f"read targets: {name} must be a bool array or integer ids >= 0, got {x.dtype}")
        mu = float(self.weight)
        if not (math.isfinite(mu) and mu > 0):
            raise InputError(f"read targets: weight = {self.weight} must be a finite number > 0")
        if self.report is not None and not callable(self.report):
            raise InputError("read targets: report must be a callable (mean ℓ, N) or None")
        if self.through not in THROUGH:
            raise InputError(f"read targets: through = {self.through!r}: use one of {', '.join(THROUGH)}")
        return ReadTargets(sources=s.astype(np.int64), asks=a.astype(np.int64), weight=mu, report=self.report,
                           through=self.through)


def target_slots(write_targets, sources, asks, num_slots):
    """T_{t,b} for every step: write_targets [T, B, W_w] (the slots each step wrote), sources and asks [B, T]
    ids → [T, B, J] bool, row (t, b) the slots that a source step s < t with id asks[b, t] wrote (none where
    asks[b, t] = 0: id 0 is never written)."""
    T, B, _ = write_targets.shape
    out = np.zeros((T, B, num_slots), bool)
    written = np.zeros((B, int(max(sources.max(initial=0), asks.max(initial=0))) + 1, num_slots), bool)
    rows = np.arange(B)
    for t in range(T):
        out[t] = written[rows, asks[:, t]]
        src = sources[:, t] > 0
        if src.any():
            written[rows[src][:, None], sources[src, t][:, None], write_targets[t][src]] = True
    return out


def read_target_rows(memory, read_ema, q, W_k, load_penalty, rule, target):
    """ℓ of one step for B rows and its gradient, unscaled: memory [B, J, d_m], read_ema [B, J], the router's
    query q [B, H, d_h], target [B, J] bool (the rows with no target give 0 and no gradient).
    → (ℓ [B], d memory [B, J, d_m], d read_ema [B, J], d q [B, H, d_h], d q_mem [B, H, d_m]) where q_mem_h =
    W_k,h^T q_h (its gradient is W_k's: dW_k,h = Σ_b q_h^T d q_mem_h)."""
    B, H, d_h = q.shape
    scale = 1.0 / math.sqrt(d_h)
    q_mem, scores = slot_scores(memory, q, W_k, read_ema, load_penalty, rule)      # [B, H, J]
    on = target[:, None, :]
    has = target.any(axis=-1)
    # in logs, so a target far below the best slot gives a large finite ℓ, not log 0
    lse_all = _logsumexp(scores, np.ones_like(on))                                   # [B, H]
    lse_T = _logsumexp(scores, np.broadcast_to(on | ~has[:, None, None], scores.shape))
    log_P = lse_T - lse_all                                                          # log P_h
    top = log_P.max(axis=-1, keepdims=True)
    log_mean = top[:, 0] + np.log(np.exp(log_P - top).mean(axis=-1))                # log (1/H) Σ_h P_h
    loss = np.where(has, -log_mean, 0.0)
    # dℓ/d score_{h,j} = w_h·(p_{h,j} − [j ∈ T]·p_{h,j}/P_h), w_h = P_h / Σ_h' P_h' (the heads nearest the
    # value take the gradient: one head reading it is enough)
    w = np.exp(log_P - top)
    w /= w.sum(axis=-1, keepdims=True)
    p = np.exp(scores - lse_all[..., None])
    p_in_T = np.where(on, np.exp(scores - lse_T[..., None]), 0.0)
    d_scores = np.where(has[:, None, None], w[..., None] * (p - p_in_T), 0.0).astype(q.dtype)
    m_all = np.broadcast_to(memory[:, None], (B, H) + memory.shape[1:])             # every slot, per head
    d_q_mem, d_m_all = rule.content_backward(d_scores, m_all, q_mem, scale)
    d_memory = d_m_all.sum(axis=1)
    d_read_ema = -load_penalty * d_scores.sum(axis=1)
    d_q = np.einsum("bhm,hdm->bhd", d_q_mem, W_k.reshape(H, d_h, memory.shape[2]))
    return loss, d_memory, d_read_ema, d_q, d_q_mem


def _logsumexp(x, mask):
    """log Σ_{mask} exp(x) over the last axis (mask [..., J] bool, at least one True per row)."""
    top = np.where(mask, x, -np.inf).max(axis=-1, keepdims=True)
    return (top + np.log(np.where(mask, np.exp(x - top), 0.0).sum(axis=-1, keepdims=True)))[..., 0]


def read_target_term(read_targets: ReadTargets, write_targets, asked, W_k, load_penalty, rule):
    """The term over a call: ``asked`` maps each asked step t to (memory [B, J, d_m], read_ema [B, J], query q
    [B, H, d_h]) as that step read them; ``write_targets`` [T, B, W_w] the slots every step wrote.
    → (μ·Σℓ/N, {t: (d memory, d read_ema, d q, d q_mem)} already scaled by μ/N); (0.0, {}) when N = 0.
    The caller applies what ``read_targets.through`` lets through."""
    J = next(iter(asked.values()))[0].shape[1] if asked else 0
    slots = target_slots(write_targets, read_targets.sources, read_targets.asks, J)
    rows, total, count = {}, 0.0, 0
    for t, (memory, read_ema, q) in sorted(asked.items()):
        target = slots[t]
        ell, *grads = read_target_rows(memory, read_ema, q, W_k, load_penalty, rule, target)
        total += float(ell.sum())
        count += int(target.any(axis=-1).sum())
        rows[t] = grads
    if read_targets.report is not None:
        read_targets.report(total / count if count else 0.0, count)
    if count == 0:
        return 0.0, {}
    k = read_targets.weight / count
    return k * total, {t: tuple(k * g for g in grads) for t, grads in rows.items()}
