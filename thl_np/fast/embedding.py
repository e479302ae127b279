"""Spec §4.1, the embedding's backward as a Numba kernel mirroring
``thl_np.components.embedding.embedding_backward``. Tested in tests/fast/test_embedding_kernels.py.
"""
from numba import njit


@njit(cache=True)
def scatter_rows(dW, ids, rows):
    """Mirrors thl_np.components.embedding.embedding_backward: dW[ids[n]] += rows[n] (repeated ids
    accumulate)."""
    for n in range(ids.shape[0]):
        dW[ids[n]] += rows[n]
