"""The helpers every kernel shares (thl_np.fast.primitives), each alone: top-κ with the lower-index tie rule
against thl_np.components.router.top_k_desc, the sigmoid against thl_np.components.gru.sigmoid, the
per-row dot products, which must give identical rows identical numbers (the tie rule depends on it), and
[s^0; s^{K-1}] read from the tier states and its gradient added back (as thl_np.step builds u and x_w)."""
import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DTYPES, assert_close, assert_equal

from thl_np.components.gru import sigmoid as plain_sigmoid
from thl_np.components.router import top_k_desc as plain_top_k_desc
from thl_np.fast import primitives


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(60), deadline=None)
@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=12), data=st.data())
def test_top_k_desc_matches_router_top_k_desc(values, data, dtype):
    """Few distinct values, so most rankings have ties; every k from 1 to all."""
    v = np.array(values, dtype=dtype) / 2
    k = data.draw(st.integers(1, len(values)))
    out = np.full(k, -1, np.int64)
    primitives.top_k_desc(v, k, out)
    assert_equal(out, plain_top_k_desc(v, k), f"top_k_desc of {v.tolist()}, k = {k}")


def test_top_k_desc_ties_go_to_the_lower_index():
    out = np.empty(4, np.int64)
    primitives.top_k_desc(np.array([1.0, 2.0, 2.0, 0.0, 2.0, 1.0]), 4, out)
    assert out.tolist() == [1, 2, 4, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_matches_gru_sigmoid(dtype):
    """Both branches, and arguments whose exp overflows."""
    x = np.array([-1000.0, -80.0, -30.0, -1.5, -1e-9, 0.0, 1e-9, 0.7, 30.0, 80.0, 1000.0], dtype=dtype)
    want = plain_sigmoid(x)
    got = np.array([primitives.sigmoid(v) for v in x])
    assert np.isfinite(got).all()
    assert_close(got, want, dtype, "sigmoid")


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31), J=st.integers(1, 9), n=st.integers(1, 9), H=st.integers(1, 9))
def test_row_dots_match_numpy_and_tie_exactly(seed, J, n, H, dtype):
    """dot, row_dots, multi_row_dots (every head count: blocks of four and the rest), row_norms2, axpy
    against NumPy; identical rows give bit-identical dot products."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((J, n)).astype(dtype)
    rows[J // 2:] = rows[0]                          # identical rows
    vs = rng.standard_normal((H, n)).astype(dtype)
    want = rows.astype(np.float64) @ vs.T.astype(np.float64)
    assert_close(primitives.dot(rows[0], vs[0]), want[0, 0], dtype, "dot")
    out = np.empty(J, dtype)
    primitives.row_dots(rows, vs[0], out)
    assert_close(out, want[:, 0], dtype, "row_dots")
    assert len(set(out[J // 2:].tolist() + [out[0]])) == 1, "row_dots: identical rows, different dots"
    multi = np.empty((H, J), dtype)
    primitives.multi_row_dots(rows, vs, multi)
    assert_close(multi, want.T, dtype, "multi_row_dots")
    for h in range(H):
        assert len(set(multi[h, J // 2:].tolist() + [multi[h, 0]])) == 1, "multi_row_dots: identical rows"
    bank = np.stack([rows, 2 * rows])
    norms = np.empty((2, J), dtype)
    primitives.row_norms2(bank, norms)
    assert_close(norms, (bank.astype(np.float64) ** 2).sum(axis=2), dtype, "row_norms2")
    y = vs[0].copy()
    primitives.axpy(0.37, rows[0], y)
    assert_close(y, vs[0].astype(np.float64) + 0.37 * rows[0], dtype, "axpy")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(5,), (3, 2), (2, 3, 4)], ids=["K=1", "K=2", "K=3"])
def test_gather_ends_and_its_gradient(dims, dtype):
    """gather_ends gives [s^0; s^{K-1}] as thl_np.step concatenates it; scatter_add_ends adds a gradient back
    where it was read (K = 1: both halves into Tier 0's columns)."""
    rng = np.random.default_rng(4)
    offs = np.cumsum([0] + list(dims)).tolist()
    S = rng.standard_normal((3, offs[-1])).astype(dtype)
    tiers = [S[:, offs[k]:offs[k + 1]] for k in range(len(dims))]
    args = (offs[0], dims[0], offs[-2], dims[-1])
    x = np.full((3, dims[0] + dims[-1]), np.nan, dtype)
    primitives.gather_ends(S, *args, x)
    assert_equal(x, np.concatenate([tiers[0], tiers[-1]], axis=1), "gather_ends")
    dx = rng.standard_normal(x.shape).astype(dtype)
    DS0 = rng.standard_normal(S.shape).astype(dtype)
    DS = DS0.copy()
    primitives.scatter_add_ends(DS, dx, *args)
    want = DS0.astype(np.float64)
    want[:, offs[0]:offs[0] + dims[0]] += dx[:, :dims[0]]
    want[:, offs[-2]:offs[-1]] += dx[:, dims[0]:]
    assert_close(DS, want, dtype, "scatter_add_ends")
