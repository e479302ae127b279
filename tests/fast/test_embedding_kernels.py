"""The embedding kernel (thl_np.fast.embedding.scatter_rows) against
thl_np.components.embedding.embedding_backward (spec §4.1), repeated ids included."""
import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DTYPES, assert_close

from thl_np.components.embedding import embedding_backward
from thl_np.fast.embedding import scatter_rows


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31), V=st.integers(1, 6), n=st.integers(1, 20), d=st.integers(1, 4))
def test_scatter_rows_matches_embedding_backward(seed, V, n, d, dtype):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, n)                       # few ids, many repeats
    d_e = rng.standard_normal((n, d)).astype(dtype)
    dW = np.zeros((V, d), dtype)
    scatter_rows(dW, ids, d_e)
    assert_close(dW, embedding_backward(d_e, ids, V), dtype, "scatter_rows")
