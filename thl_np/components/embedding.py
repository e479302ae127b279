"""Spec §4.1, embedding: ``e = embedding.weight[x_t]``."""
from .primitives import array_module, scatter_add


def embedding_forward(weight, ids):
    """e[..., :] = weight[ids[...]]."""
    return weight[ids]


def embedding_backward(d_e, ids, vocab_size: int):
    """dW[v] = Σ over positions with id v of d_e (repeated ids accumulate)."""
    dW = array_module(d_e).zeros((vocab_size, d_e.shape[-1]), dtype=d_e.dtype)
    scatter_add(dW, ids.reshape(-1), d_e.reshape(-1, d_e.shape[-1]))
    return dW
