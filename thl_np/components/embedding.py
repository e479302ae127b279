"""Spec §4.1, embedding: ``e = embedding.weight[x_t]``."""
import numpy as np


def embedding_forward(weight: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """e[..., :] = weight[ids[...]]."""
    return weight[ids]


def embedding_backward(d_e: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """dW[v] = Σ over positions with id v of d_e (repeated ids accumulate)."""
    dW = np.zeros((vocab_size, d_e.shape[-1]), dtype=d_e.dtype)
    np.add.at(dW, ids.reshape(-1), d_e.reshape(-1, d_e.shape[-1]))
    return dW
