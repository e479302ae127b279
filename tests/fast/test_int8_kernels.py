"""Int8 kernels (thl_np.fast.int8, and thl_np.fast.linalg's kernels given int8 values and their scales), each
alone against x @ W.T + b (thl_np.components.output.linear_forward) with W = s·q dequantized by the plain
definition (thl_np.quant.scheme.dequantize), for per-row scales, blocks of 32 columns and a block size that
leaves a partial group: gemv_q8, linalg.small_batch_linear (every tile remainder), per_head_q8,
per_head_transposed_q8, gather_rows_q8 and dequantize_rows_q8 (bit for bit), linalg.pack_rows of values and
scales + packed_linear_q8 / packed_gemv_q8, and Q8Matrix.linear's four routes."""
import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DTYPES, assert_close, assert_equal

from thl_np.components.output import linear_forward
from thl_np.fast import int8 as fq
from thl_np.fast import linalg
from thl_np.quant.scheme import dequantize, group_size, quantize_matrix

BLOCKS = [None, 32, 5]  # per row, Q8_0's 32, and 5 (C = 7 or 33 or 70 leaves a partial last group)


def quantized(V, C, block, dtype, seed=0):
    """(q, s, group, W = s·q in dtype, bias, rng)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, C)) * rng.uniform(0.1, 3.0, size=(V, 1))
    q, s = quantize_matrix(W, block)
    return q, s, group_size(block, C), dequantize(q, s, block, dtype), rng.standard_normal(V).astype(dtype), rng


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("V, C", [(1, 1), (13, 7), (101, 70)])
def test_gemv_q8_matches_linear_forward(V, C, block, dtype):
    q, s, group, W, b, rng = quantized(V, C, block, dtype)
    x = rng.standard_normal(C).astype(dtype)
    out = np.full(V, np.nan, dtype)
    fq.gemv_q8(q, s, group, b, x, out)
    assert_close(out, linear_forward(x[None], W, b)[0], dtype, "gemv_q8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("V", [3, 4, 9])
def test_small_batch_linear_int8_matches_linear_forward(V, rows, block, dtype):
    """4-row tiles × 4 sequences: V = 3 (no full tile), 4 (one), 9 (two and a remainder); every remainder of
    sequences; groups (partial ones included) scaled into the totals."""
    q, s, group, W, b, rng = quantized(V, 33, block, dtype)
    x = rng.standard_normal((rows, 33)).astype(dtype)
    out = np.full((rows, V), np.nan, dtype)
    linalg.small_batch_linear(q, b, x, out, s, group)
    assert_close(out, linear_forward(x, W, b), dtype, "small_batch_linear (int8)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("H, R, B, C", [(1, 3, 1, 4), (3, 2, 5, 37), (4, 5, 2, 1)])
def test_per_head_q8_matches_linear_forward_per_head(H, R, B, C, block, dtype):
    """r_h = W_v,h mix_h: W [H·R, C] seen as [H, R, C]."""
    q, s, group, W, _, rng = quantized(H * R, C, block, dtype, seed=1)
    X = rng.standard_normal((H, B, C)).astype(dtype)
    out = np.full((H, B, R), np.nan, dtype)
    fq.per_head_q8(X, q.reshape(H, R, C), s.reshape(H, R, -1), group, out)
    want = np.stack([linear_forward(X[h], W.reshape(H, R, C)[h], 0.0) for h in range(H)])
    assert_close(out, want, dtype, "per_head_q8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("H, d_h, B, C", [(1, 3, 1, 4), (4, 5, 3, 70), (2, 1, 2, 33)])
def test_per_head_transposed_q8_matches_the_transposed_product(H, d_h, B, C, block, dtype):
    """q_mem_h = W_k,h^T q_h from W_k's own rows: out[h, b] = X[h, b] @ W[h] with W [H, d_h, C]."""
    q, s, group, W, _, rng = quantized(H * d_h, C, block, dtype, seed=2)
    X = rng.standard_normal((H, B, d_h)).astype(dtype)
    out = np.full((H, B, C), np.nan, dtype)
    fq.per_head_transposed_q8(X, q.reshape(H, d_h, C), s.reshape(H, d_h, -1), group, out)
    want = np.stack([linear_forward(X[h], W.reshape(H, d_h, C)[h].T, 0.0) for h in range(H)])
    assert_close(out, want, dtype, "per_head_transposed_q8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_gather_rows_q8_is_the_dequantized_rows_exactly(block, dtype):
    """The embedding's rows: s·q rounded once in the dtype, as the plain path's dequantize (bit for bit)."""
    q, s, group, W, _, _ = quantized(17, 33, block, dtype)
    ids = np.array([3, 0, 16, 3], np.int64)
    out = np.full((4, 33), np.nan, dtype)
    fq.gather_rows_q8(q, s, group, ids, out)
    assert_equal(out, W[ids], "gather_rows_q8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_dequantize_rows_q8_is_the_plain_dequantization_exactly(block, dtype):
    """A block of rows for a prompt's GEMM: bit for bit thl_np.quant.scheme.dequantize's."""
    q, s, group, W, _, _ = quantized(17, 70, block, dtype)
    out = np.full((5, 70), np.nan, dtype)
    fq.dequantize_rows_q8(q, s, group, 9, out)
    assert_equal(out, W[9:14], "dequantize_rows_q8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 16, 17, 40])
def test_pack_rows_int8_layout(V, dtype):
    """Qp[t, k, l] = q[t·L + l, k], Sp[t, g, l] = s[t·L + l, g]; zeros past the last row."""
    q, s, group, _, _, _ = quantized(V, 70, 32, dtype)
    L = linalg.lanes(dtype)
    T = -(-V // L)
    Qp = np.full((T, 70, L), 99, np.int8)
    Sp = np.full((T, s.shape[1], L), np.nan, np.float32)
    linalg.pack_rows(q, L, Qp)
    linalg.pack_rows(s, L, Sp)
    assert_equal(Qp.transpose(0, 2, 1).reshape(-1, 70)[:V], q, "pack_rows: int8 values")
    assert_equal(Sp.transpose(0, 2, 1).reshape(-1, s.shape[1])[:V], s, "pack_rows: scales")
    assert not Qp.transpose(0, 2, 1).reshape(-1, 70)[V:].any() and not Sp.transpose(0, 2, 1).reshape(
        -1, s.shape[1])[V:].any(), "padding rows are zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("V", [3, 16, 57])
def test_packed_linear_q8_matches_linear_forward(V, block, dtype):
    """A partial tile, one tile, several; one group per row or many (a partial last one for block 5)."""
    q, s, group, W, _, rng = quantized(V, 33, block, dtype)
    L = linalg.lanes(dtype)
    T = -(-V // L)
    Qp = np.empty((T, 33, L), np.int8)
    Sp = np.empty((T, s.shape[1], L), np.float32)
    linalg.pack_rows(q, L, Qp)
    linalg.pack_rows(s, L, Sp)
    h = np.ascontiguousarray(rng.standard_normal((linalg.PACK_ROWS, 33)).astype(dtype))
    out = np.full((linalg.PACK_ROWS, T * L), np.nan, dtype)
    fq.packed_linear_q8(Qp, Sp, group, h, out)
    assert_close(out[:, :V], linear_forward(h, W, 0.0), dtype, "packed_linear_q8")
    assert not out[:, V:].any(), "padding rows give zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [3, 16, 57, 64, 65, 130])
def test_packed_gemv_q8_matches_linear_forward(V, dtype):
    """One sequence over the packed tiles, per-row scales: partial tiles, four tiles an iteration and a tail."""
    q, s, group, W, _, rng = quantized(V, 33, None, dtype)
    L = linalg.lanes(dtype)
    T = -(-V // L)
    Qp = np.empty((T, 33, L), np.int8)
    Sp = np.empty((T, 1, L), np.float32)
    linalg.pack_rows(q, L, Qp)
    linalg.pack_rows(s, L, Sp)
    h = np.ascontiguousarray(rng.standard_normal((1, 33)).astype(dtype))
    out = np.full((1, T * L), np.nan, dtype)
    fq.packed_gemv_q8(Qp, Sp, h, out)
    assert_close(out[:, :V], linear_forward(h, W, 0.0), dtype, "packed_gemv_q8")
    assert not out[:, V:].any(), "padding rows give zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 32])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 8, 9, 64, 65, 200])
def test_q8_matrix_linear_routes(rows, packed, block, dtype, monkeypatch):
    """Q8Matrix.linear: one row (gemv_q8, or packed_gemv_q8 for a packed per-row matrix), up to SMALL_BATCH
    (linalg.small_batch_linear, or packed_linear_q8 in chunks of PACK_ROWS), more (blocks of rows dequantized
    into BLAS; a small block size makes several blocks)."""
    monkeypatch.setattr(fq, "DENSE_BLOCK_BYTES", 7 * 40 * np.dtype(dtype).itemsize)
    q, s, group, W, b, rng = quantized(45, 40, block, dtype)
    M = fq.Q8Matrix(q, s, group, packed=packed)
    x = rng.standard_normal((rows, 40)).astype(dtype)
    assert_close(M.linear(x, b), linear_forward(x, W, b), dtype, "Q8Matrix.linear")
    assert_equal(M.rows(np.array([44, 2]), dtype), W[[44, 2]], "Q8Matrix.rows")
    assert_equal(M.dense(dtype), W, "Q8Matrix.dense")


def test_packed_copy_is_built_once_and_shared():
    """The head's packed copy is kept on its QuantizedTensor: two decoders' wrappers share it."""
    from thl_np.quant import QuantizedTensor

    q, s, _, _, b, rng = quantized(40, 16, None, "float32")
    t = QuantizedTensor(q, s, None)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    fq.Q8Matrix.of(t, packed=True).linear(x, b)
    (key, first), = t.derived.items()
    fq.Q8Matrix.of(t, packed=True).linear(x, b)
    assert t.derived[key] is first


@settings(max_examples=examples(40))
@given(V=st.integers(1, 70), C=st.integers(1, 90), rows=st.integers(1, 80), block=st.sampled_from([None, 1, 7, 32]),
       packed=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_q8_linear_matches_linear_forward_for_any_shape(V, C, rows, block, packed, dtype, seed):
    """Any matrix, any group size (partial groups included), any number of rows through every route."""
    q, s, group, W, b, rng = quantized(V, C, block, dtype, seed)
    x = rng.standard_normal((rows, C)).astype(dtype)
    got = fq.Q8Matrix(q, s, group, packed=packed).linear(x, b)
    assert_close(got, linear_forward(x, W, b), dtype, "Q8Matrix.linear", factor=max(1.0, C / 64))
