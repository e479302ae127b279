"""Linear-algebra kernels (thl_np.fast.linalg), each alone against x @ W.T + b
(thl_np.components.output.linear_forward) or its per-head form: gemv, small_batch_linear (every tile
remainder), per_head_linear, pack_rows + packed_linear (a partial tile, an odd number of tiles), and the
``linear`` dispatcher's three routes."""
import numpy as np
import pytest
from kernel_helpers import DTYPES, assert_close, assert_equal

from thl_np.components.output import linear_forward
from thl_np.fast import linalg


def weights(V, D, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((V, D)).astype(dtype), rng.standard_normal(V).astype(dtype), rng


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V, D", [(1, 1), (13, 7), (101, 33)])
def test_gemv_matches_linear_forward(V, D, dtype):
    W, b, rng = weights(V, D, dtype)
    x = rng.standard_normal(D).astype(dtype)
    out = np.full(V, np.nan, dtype)
    linalg.gemv(W, b, x, out)
    assert_close(out, linear_forward(x[None], W, b)[0], dtype, "gemv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("V", [5, 6, 13])
def test_small_batch_linear_matches_linear_forward(V, rows, dtype):
    """6-row tiles of W × 4 sequences: V = 5 (no full tile), 6 (one), 13 (two and a remainder); every
    remainder of sequences."""
    W, b, rng = weights(V, 11, dtype)
    x = rng.standard_normal((rows, 11)).astype(dtype)
    out = np.full((rows, V), np.nan, dtype)
    linalg.small_batch_linear(W, b, x, out)
    assert_close(out, linear_forward(x, W, b), dtype, "small_batch_linear")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, R, B, D", [(1, 3, 1, 4), (3, 2, 5, 6), (4, 5, 2, 1)])
def test_per_head_linear_matches_linear_forward_per_head(H, R, B, D, dtype):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((H, R, D)).astype(dtype)
    X = rng.standard_normal((H, B, D)).astype(dtype)
    out = np.full((H, B, R), np.nan, dtype)
    linalg.per_head_linear(X, W, out)
    want = np.stack([linear_forward(X[h], W[h], 0.0) for h in range(H)])
    assert_close(out, want, dtype, "per_head_linear")


def packed(W):
    lanes = linalg.lanes(W.dtype)
    Wp = np.full((-(-W.shape[0] // lanes), W.shape[1], lanes), np.nan, W.dtype)
    linalg.pack_rows(W, lanes, Wp)
    return Wp, lanes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 8, 17, 40])
def test_pack_rows_layout(V, dtype):
    """Wp[t, k, l] = W[t·lanes + l, k], zeros past the last row."""
    W, _, _ = weights(V, 5, dtype)
    Wp, lanes = packed(W)
    assert lanes * np.dtype(dtype).itemsize == 64
    flat = Wp.transpose(0, 2, 1).reshape(-1, W.shape[1])
    assert_equal(flat[:V], W, "pack_rows")
    assert not flat[V:].any(), "pack_rows: padding rows are zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [3, 16, 40, 57])
def test_packed_linear_matches_linear_forward(V, dtype):
    """A partial tile (V not a multiple of the lanes), one tile, an odd and an even number of tiles."""
    W, _, rng = weights(V, 9, dtype)
    Wp, lanes = packed(W)
    h = np.ascontiguousarray(rng.standard_normal((linalg.PACK_ROWS, 9)).astype(dtype))
    out = np.full((linalg.PACK_ROWS, Wp.shape[0] * lanes), np.nan, dtype)
    linalg.packed_linear(Wp, h, out)
    assert_close(out[:, :V], linear_forward(h, W, 0.0), dtype, "packed_linear")
    assert not out[:, V:].any(), "packed_linear: the padding rows give zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, linalg.SMALL_BATCH, linalg.SMALL_BATCH + 1])
def test_linear_matches_linear_forward(rows, dtype):
    """One row: gemv; up to SMALL_BATCH: small_batch_linear; more rows or a non-contiguous W: BLAS."""
    W, b, rng = weights(19, 6, dtype)
    x = rng.standard_normal((rows, 6)).astype(dtype)
    want = linear_forward(x, W, b)
    assert_close(linalg.linear(x, W, b), want, dtype, "linear")
    assert_close(linalg.linear(x, np.asfortranarray(W), b), want, dtype, "linear (W not C-contiguous)")
    out = np.empty((rows, 19), dtype)
    assert linalg.linear(x, W, b, out=out) is out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V, D", [(1, 1), (5, 3), (17, 9), (130, 40)])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 19])
def test_packed_rows_linear_matches_linear_forward_and_each_row_alone(V, D, B, dtype):
    """Any number of rows (8, 4, 2, 1 at a time), tile counts that leave every remainder, an input wider than
    W's columns (a scratch buffer): within rounding of x @ W.T + b, and each row's output the bits it
    gets alone; nothing written past the output's columns."""
    W, b, rng = weights(V, D, dtype)
    Wp = linalg.packed(W)
    assert_equal(Wp, packed(W)[0], "packed")
    x = np.ascontiguousarray(rng.standard_normal((B, D + 3)).astype(dtype))
    scratch = np.empty((B, Wp.shape[0] * Wp.shape[2]), dtype)
    out = np.full((B, V + 2), np.nan, dtype)
    linalg.packed_rows_linear(Wp, b, x, scratch, out[:, :V])
    assert_close(out[:, :V], linear_forward(x[:, :D], W, b), dtype, "packed_rows_linear")
    assert np.isnan(out[:, V:]).all(), "packed_rows_linear wrote past its output"
    for r in range(B):
        alone = np.empty((1, V), dtype)
        linalg.packed_rows_linear(Wp, b, x[r:r + 1], np.empty((1, scratch.shape[1]), dtype), alone)
        assert_equal(alone[0], out[r, :V], f"row {r} alone")
