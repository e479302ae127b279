"""Memory-write variant ``decay_on_write``: the spec's decay (§4.7), applied to a slot when it is written.

    spec:            M ← γ·M,  m_j += η·g·w for every target j
    decay_on_write:  m_j ← γ^(t − last_write_j)·m_j + η·g·w for every target j; other slots keep their value

A slot written at every step decays exactly as the spec's; a slot decays only by the steps between two
of its writes, caught up at the second one. A slot that is written once and never again (a key that
opened an empty slot) keeps its value for as long as the bank holds it, while a slot that text refines
stays bounded as in the spec (at a write interval n: η·g·‖w‖ / (1 − γ^n)). A stale slot chosen for
eviction has decayed by its staleness, as in the spec, before the new write lands.

Why: at 262,144 bytes the shipped model keeps and reads a passkey's slots but γ^143,464 has faded them
to 0.24 of the write (docs/MEMORY.md, *The horizon*); γ = 1 recovers the key and breaks long text (slot
norms grow without bound). This variant separates the two roles of the one scalar.

Chosen by ``components = {"memory_write": "decay_on_write"}``; ``memory_decay`` keeps its meaning (per
step), so the spec's configs and weights run unchanged. The plain path, training and the layered engine
compose it; the fast path's kernels do not (such a model runs on the plain path).

Backward (t and last_write are the step's and the state's before the write): d m_j(before) =
γ^(t − last_write_j)·d m_j(after) for a target, d m_j(after) for any other slot; d w and d g as the spec's.
"""
from __future__ import annotations

from .primitives import array_module
from .writer import write_bookkeeping

NAME = "decay_on_write"


def write_decay(decay, last_write, targets, t, dtype):
    """γ^(t − last_write_j) for each row's targets → [B, W_w] (the steps since the slot's last write)."""
    xp = array_module(last_write)
    rows = xp.arange(last_write.shape[0])[:, None]
    steps = (t - last_write[rows, targets]).astype(xp.float64)
    return (decay ** steps).astype(dtype)


def decay_on_write_forward(memory, write_ema, last_write, targets, g, w, t, *, decay, write_rate, ema_decay):
    """memory [B, J, d_m], write_ema [B, J], last_write [B, J] (before this step's write), targets [B, W_w],
    g [B], w [B, d_m] → (memory, write_ema, last_write) after the write; the bookkeeping is the spec's."""
    xp = array_module(memory)
    rows = xp.arange(memory.shape[0])[:, None]
    factor = write_decay(decay, last_write, targets, t, memory.dtype)                # [B, W_w]
    new_memory = memory.copy()
    new_memory[rows, targets] = (factor[..., None] * memory[rows, targets]
                                 + (write_rate * g)[:, None, None] * w[:, None, :])
    return (new_memory, *write_bookkeeping(write_ema, last_write, targets, t, ema_decay=ema_decay))


def decay_on_write_backward(d_new_memory, targets, g, w, *, decay, write_rate, last_write, t):
    """→ (d_memory_before [B, J, d_m], d_w [B, d_m], d_g [B])."""
    xp = array_module(d_new_memory)
    rows = xp.arange(d_new_memory.shape[0])[:, None]
    d_rows = d_new_memory[rows, targets]                                               # [B, W_w, d_m]
    d_sum = d_rows.sum(axis=1)
    d_w = (write_rate * g)[:, None] * d_sum
    d_g = write_rate * (d_sum * w).sum(axis=1)
    d_before = d_new_memory.copy()
    d_before[rows, targets] = write_decay(decay, last_write, targets, t, d_rows.dtype)[..., None] * d_rows
    return d_before, d_w, d_g
