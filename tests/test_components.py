"""Per-component finite differences (float64): each ``*_backward`` in ``thl_np.components`` against its own
``*_forward``, by central differences of a random linear functional of the outputs.

Every probe also compares the forward's discrete choices (top-κ idx, capacity mask, writer targets,
branch, j*, clip branch, the picked set of the load-balance term) at x ± eps with those at x; a probe
that flips one is skipped and counted, and each test asserts that most probes were checked.
"""
import zlib

import numpy as np
import pytest
from helpers import FDReport, fd_check

from thl_np.components.embedding import embedding_backward, embedding_forward
from thl_np.components.gru import gru_backward, gru_forward
from thl_np.components.local_attention import local_attention_backward, local_attention_forward
from thl_np.components.memory_write_on_write import decay_on_write_backward, decay_on_write_forward
from thl_np.components.output import (
    cross_entropy_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    load_balance_forward,
)
from thl_np.components.router import (
    apply_slot_capacity,
    gumbel_noise,
    read_meta_backward,
    read_meta_forward,
    router_backward,
    router_forward,
)
from thl_np.components.writer import memory_write_backward, memory_write_forward, writer_backward, writer_forward

SEEDS = [0, 1, 2]


def rng_for(*key):
    """A generator seeded by a tuple of ints / strings, the same in every process."""
    return np.random.default_rng([zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key])


# ---------------------------------------------------------------------------------------------------
# §4.1 embedding
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_embedding(seed):
    """Spec §4.1 `e = embedding.weight[x_t]`: dW accumulates every position holding a token (repeats add)."""
    rng = rng_for(seed)
    W = rng.standard_normal((7, 3))
    ids = np.array([[1, 4, 1, 0], [4, 4, 6, 1]])
    R = rng.standard_normal((2, 4, 3))

    def f(x):
        return float((embedding_forward(x["W"], ids) * R).sum()), ()

    fd_check(f, {"W": W}, {"W": embedding_backward(R, ids, 7)}).assert_ok(1.0)


# ---------------------------------------------------------------------------------------------------
# §4.2 local attention
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 4])
def test_local_attention(seed, n):
    """Spec §4.2 `q = e Wq^T, k = E Wk^T, a = softmax(k·q/√d_lq), ℓ = Σ_i a_i (E_i Wv^T)`: gradients
    w.r.t. the embedding, the buffer rows read, and Wq/Wk/Wv."""
    rng = rng_for(seed, n)
    B, d_e, d_lq, d_v = 2, 4, 3, 5
    x = {"e": rng.standard_normal((B, d_e)), "buffer": rng.standard_normal((B, n, d_e)),
         "Wq": rng.standard_normal((d_lq, d_e)), "Wk": rng.standard_normal((d_lq, d_e)),
         "Wv": rng.standard_normal((d_v, d_e))}
    R = rng.standard_normal((B, d_v))

    def f(x):
        out, _ = local_attention_forward(x["e"], x["buffer"], x["Wq"], x["Wk"], x["Wv"])
        return float((out * R).sum()), ()

    _, cache = local_attention_forward(x["e"], x["buffer"], x["Wq"], x["Wk"], x["Wv"])
    d_e, d_buf, dWq, dWk, dWv = local_attention_backward(R, cache, x["Wq"], x["Wk"], x["Wv"])
    fd_check(f, x, {"e": d_e, "buffer": d_buf, "Wq": dWq, "Wk": dWk, "Wv": dWv}).assert_ok(1.0)


# ---------------------------------------------------------------------------------------------------
# §4.3 router read
# ---------------------------------------------------------------------------------------------------
def _router_inputs(rng, B=2, J=6, d_m=4, H=3, d_h=2, d_u=5, d_v=6):
    return {"u": rng.standard_normal((B, d_u)), "memory": rng.standard_normal((B, J, d_m)),
            "read_ema": rng.uniform(0.0, 1.0, (B, J)), "W_q": rng.standard_normal((H * d_h, d_u)),
            "W_k": rng.standard_normal((H * d_h, d_m)), "W_v": rng.standard_normal((d_v, d_m))}


def _route(x, kw):
    return router_forward(x["u"], x["memory"], x["read_ema"], x["W_q"], x["W_k"], x["W_v"], **kw)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("noise", [False, True], ids=["eval", "gumbel"])
@pytest.mark.parametrize("capacity", [None, 1, 2], ids=["nocap", "cap1", "cap2"])
def test_router(seed, noise, capacity):
    """Spec §4.3 `score = k·q/√d_h − λ_load·read_ema (+ Gumbel)`, top-κ, `α = softmax`, capacity mask and
    renormalisation, `r_h = Σ α v`: gradients w.r.t. u, the memory rows read (through the keys AND the
    values), read_ema (the load penalty), W_q, W_k, W_v; d_alpha_extra (the read_ema / load-balance
    path) enters α after the capacity step. With a capacity the inputs make it mask picks."""
    rng = rng_for(seed, int(noise), capacity or 0)
    H, kappa, J, lam = 3, 2, 6, 0.8
    x = _router_inputs(rng, J=J, H=H)
    if capacity is not None:
        # a strong load penalty on all but two slots: every head wants the same two slots
        x["read_ema"] = np.where(np.arange(J) < 2, 0.0, 3.0) + 0.1 * rng.random((2, J))
        lam = 4.0
    gumbel = gumbel_noise(rng.random((2, H, J)), np.float64) * 0.3 if noise else None
    B = x["u"].shape[0]
    R_r = rng.standard_normal((B, x["W_v"].shape[0]))
    R_a = rng.standard_normal((B, H, kappa))
    kw = dict(num_heads=H, head_dim=2, topk=kappa, load_penalty=lam, capacity=capacity, gumbel=gumbel)

    def f(x):
        r, alpha, idx, cache = _route(x, kw)
        mask = cache.cap_mask
        return float((r * R_r).sum() + (alpha * R_a).sum()), (idx, None if mask is None else mask != 0)

    r, alpha, idx, cache = _route(x, kw)
    if capacity is not None:
        assert (cache.cap_mask == 0).any(), "the inputs were meant to make the capacity mask a pick"
    d_u, d_m_sel, d_ema_sel, dWq, dWk, dWv = router_backward(
        R_r, R_a, cache, x["W_q"], x["W_k"], x["W_v"], num_heads=H, head_dim=2, load_penalty=lam)
    rows = np.arange(B)[:, None, None]
    dM = np.zeros_like(x["memory"])
    np.add.at(dM, (rows, idx), d_m_sel)
    d_ema = np.zeros_like(x["read_ema"])
    np.add.at(d_ema, (rows, idx), d_ema_sel)
    grads = {"u": d_u, "memory": dM, "read_ema": d_ema, "W_q": dWq, "W_k": dWk, "W_v": dWv}
    fd_check(f, x, grads).assert_ok(0.8)
    # rows never read get no gradient, and the rows read get some through both keys and values
    unread = np.ones((B, J), bool)
    unread[rows[..., 0], idx.reshape(B, -1)] = False
    assert np.all(dM[unread] == 0) and np.all(d_ema[unread] == 0)


def test_router_capacity_whole_head_masked():
    """Spec §4.3 capacity: a head all of whose picks are masked keeps its uncapped α (sum 0 → uncapped);
    the gradient follows that choice."""
    rng = rng_for(7)
    H, J = 3, 5
    x = _router_inputs(rng, J=J, H=H)
    x["read_ema"] = np.where(np.arange(J) == 3, 0.0, 5.0) + 0.01 * rng.random((2, J))
    kw = dict(num_heads=H, head_dim=2, topk=1, load_penalty=4.0, capacity=1, gumbel=None)
    R_r = rng.standard_normal((2, x["W_v"].shape[0]))
    R_a = rng.standard_normal((2, H, 1))

    def f(x):
        r, alpha, idx, cache = _route(x, kw)
        return float((r * R_r).sum() + (alpha * R_a).sum()), (idx, cache.cap_mask != 0)

    r, alpha, idx, cache = _route(x, kw)
    assert np.all(idx == 3) and not cache.cap_used[:, 1:].any() and cache.cap_used[:, 0].all()
    np.testing.assert_array_equal(alpha, np.ones_like(alpha))
    d_u, d_m_sel, d_ema_sel, dWq, dWk, dWv = router_backward(
        R_r, R_a, cache, x["W_q"], x["W_k"], x["W_v"], num_heads=H, head_dim=2, load_penalty=4.0)
    rows = np.arange(2)[:, None, None]
    dM = np.zeros_like(x["memory"])
    np.add.at(dM, (rows, idx), d_m_sel)
    d_ema = np.zeros_like(x["read_ema"])
    np.add.at(d_ema, (rows, idx), d_ema_sel)
    grads = {"u": d_u, "memory": dM, "read_ema": d_ema, "W_q": dWq, "W_k": dWk, "W_v": dWv}
    fd_check(f, x, grads).assert_ok(0.9)


def test_identical_rows_tie_to_the_lower_index():
    """Spec §4.3 [decision]: equal scores are ranked by lower slot index. Identical memory rows (as W_w > 1
    writes of the same g·w into empty slots make them) have equal scores, so the lowest of them must
    come first, whatever BLAS does with the rows' positions."""
    rng = rng_for(11)
    broken = []
    for _ in range(300):
        J, d_m, H, d_h = (int(rng.integers(2, 40)), int(rng.integers(1, 40)), int(rng.integers(1, 4)),
                          int(rng.integers(1, 9)))
        memory = rng.standard_normal((1, J, d_m))
        same = np.sort(rng.choice(J, size=min(J, 5), replace=False))
        memory[:, same] = rng.standard_normal(d_m)
        u = rng.standard_normal((1, 3))
        W_q, W_k, W_v = rng.standard_normal((H * d_h, 3)), rng.standard_normal((H * d_h, d_m)), np.eye(H, d_m)
        _, _, idx, _ = router_forward(u, memory, np.zeros((1, J)), W_q, W_k, W_v, num_heads=H, head_dim=d_h,
                                      topk=J, load_penalty=0.0)
        for h in range(H):
            order = [j for j in idx[0, h] if j in same]
            if order != sorted(order):
                broken.append((J, d_m, H, d_h, order))
    assert not broken, f"{len(broken)} of 300 runs rank identical rows out of index order, e.g. {broken[:3]}"


def test_identical_rows_tie_to_the_lower_index_fast_kernel():
    """The same rule in the fast path's route kernel (thl_np.fast.router.route)."""
    from thl_np.fast.router import route

    rng = rng_for(12)
    broken = 0
    for _ in range(300):
        J, d_m, H = int(rng.integers(2, 40)), int(rng.integers(1, 40)), int(rng.integers(1, 4))
        memory = rng.standard_normal((1, J, d_m))
        same = np.sort(rng.choice(J, size=min(J, 5), replace=False))
        memory[:, same] = rng.standard_normal(d_m)
        q_mem = rng.standard_normal((1, H, d_m))
        idx = np.empty((1, H, J), np.int64)
        route(q_mem, 1.0, np.zeros((1, J)), np.zeros((1, J), np.int64), memory, 0, 0.0, 1.0, J, 0, 0.99, False,
              np.empty((1, H, d_m)), idx, np.empty((1, H, J)))
        for h in range(H):
            order = [j for j in idx[0, h] if j in same]
            broken += order != sorted(order)
    assert broken == 0


def test_slot_capacity_walk():
    """Spec §4.3: walk heads 0..H-1, ranks 0..κ-1; a pick of a slot that already served c picks gets
    weight 0; each head is renormalised; a head with nothing left keeps its uncapped α."""
    alpha = np.array([[[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]]])
    idx = np.array([[[3, 1], [3, 2], [1, 3]]])
    out, mask, used = apply_slot_capacity(alpha, idx, 1)
    np.testing.assert_array_equal(mask, [[[1, 1], [0, 1], [0, 0]]])
    np.testing.assert_allclose(out, [[[0.6, 0.4], [0.0, 1.0], [0.9, 0.1]]])
    np.testing.assert_array_equal(used, [[True, True, False]])
    out, mask, _ = apply_slot_capacity(alpha, idx, 2)
    np.testing.assert_array_equal(mask, [[[1, 1], [1, 1], [1, 0]]])
    np.testing.assert_allclose(out, [[[0.6, 0.4], [0.7, 0.3], [1.0, 0.0]]])


def test_gumbel_noise_formula():
    """Spec §4.3 training noise: `−log(−log(U + 1e-9) + 1e-9)`, finite at U = 0."""
    U = np.array([0.0, 0.25, 0.5, 0.999999])
    np.testing.assert_allclose(gumbel_noise(U, np.float64), -np.log(-np.log(U + 1e-9) + 1e-9), rtol=0, atol=0)
    assert np.isfinite(gumbel_noise(U, np.float32)).all()


# ---------------------------------------------------------------------------------------------------
# §4.4 read metadata
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_read_metadata(seed):
    """Spec §4.4 `read_ema ← ρ_r·read_ema + (1−ρ_r)·A`, `A_j = Σ α over every pick of j`, `last_read_j ← t`:
    gradients w.r.t. the old read_ema and α (slots picked by several heads accumulate), with the
    load-balance term's d_A added."""
    rng = rng_for(seed)
    idx = np.array([[[0, 2], [2, 4]], [[1, 3], [1, 0]]])        # slot 2 (row 0) and 1 (row 1) twice
    x = {"ema": rng.uniform(0, 1, (2, 5)), "alpha": rng.uniform(0, 1, (2, 2, 2))}
    R_e, R_A = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    last = np.zeros((2, 5), np.int64)

    def f(x):
        new, _, A = read_meta_forward(x["ema"], last, x["alpha"], idx, 9, 0.7)
        return float((new * R_e).sum() + (A * R_A).sum()), ()

    new, new_last, A = read_meta_forward(x["ema"], last, x["alpha"], idx, 9, 0.7)
    a = x["alpha"]
    np.testing.assert_allclose(A[0], [a[0, 0, 0], 0, a[0, 0, 1] + a[0, 1, 0], 0, a[0, 1, 1]])
    np.testing.assert_array_equal(new_last, [[9, 0, 9, 0, 9], [9, 9, 0, 9, 0]])
    assert np.all(last == 0)
    d_ema, d_alpha = read_meta_backward(R_e, R_A, idx, 0.7)
    fd_check(f, x, {"ema": d_ema, "alpha": d_alpha}).assert_ok(1.0)


# ---------------------------------------------------------------------------------------------------
# §4.5 GRU cell
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_gru_cell(seed):
    """Spec §4.5 `z = σ(p W_z^T + b_z)`, `r_g = σ(p W_r^T + b_r)`, `s̃ = tanh([r_g ⊙ s_prev; x] W_h^T + b_h)`,
    `s_new = (1−z) ⊙ s_prev + z ⊙ s̃`: gradients w.r.t. s_prev, x and all six weights and biases."""
    rng = rng_for(seed)
    B, d, n_x = 2, 3, 4
    x = {"s": rng.standard_normal((B, d)), "x": rng.standard_normal((B, n_x))}
    for gate in ("z", "r", "h"):
        x["W_" + gate] = rng.standard_normal((d, d + n_x))
        x["b_" + gate] = rng.standard_normal(d)
    R = rng.standard_normal((B, d))

    def run(x):
        return gru_forward(x["s"], x["x"], x["W_z"], x["b_z"], x["W_r"], x["b_r"], x["W_h"], x["b_h"])

    def f(x):
        return float((run(x)[0] * R).sum()), ()

    d_s, d_x, g = gru_backward(R, run(x)[1], x["W_z"], x["W_r"], x["W_h"])
    fd_check(f, x, {"s": d_s, "x": d_x, **g}).assert_ok(1.0)


# ---------------------------------------------------------------------------------------------------
# §4.6 writer
# ---------------------------------------------------------------------------------------------------
def _writer_case(branch, clip, seed):
    rng = rng_for(branch, clip, seed)
    B, J, d_m, d_in = 2, 6, 4, 5
    x = {"x_w": rng.standard_normal((B, d_in)), "W_w": rng.standard_normal((d_m, d_in)) * 0.5,
         "b_w": 0.3 * rng.standard_normal(d_m), "memory": rng.standard_normal((B, J, d_m))}
    clip_max = 0.2 if clip else 100.0
    if branch == "novel_empty":
        x["memory"][:, [1, 4]] = 0.0
    if branch == "refine":
        w_raw = x["x_w"] @ x["W_w"].T + x["b_w"]
        x["memory"][:, 2] = 1.7 * w_raw + 0.05 * rng.standard_normal((B, d_m))   # aff ≈ 1 → novelty ≈ 0
        x["memory"][:, 5] = 0.9 * w_raw + 0.6 * rng.standard_normal((B, d_m))
    kw = dict(write_slots=2, clip_max=clip_max, beta=3.0, stale_weight=1.0, underuse_weight=0.5)
    read_ema = rng.uniform(0.05, 1.0, (B, J))
    last_write = rng.integers(0, 6, (B, J))
    if branch == "refine":
        theta = 0.3
    else:  # just under each row's novelty so the gate σ(β(novelty − θ)) is far from saturation
        _, _, _, cache = writer_forward(x["x_w"], x["memory"], read_ema, last_write, 7, x["W_w"], x["b_w"],
                                        theta=0.0, **kw)
        nov = 1.0 - cache.dot_star / ((cache.n_w + 1e-8) * (cache.n_m_star + 1e-8))
        theta = float(nov.min()) - 0.2
    kw["theta"] = theta
    return x, read_ema, last_write, kw, rng


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("branch", ["novel_empty", "novel_full", "refine"])
def test_writer(branch, clip, seed):
    """Spec §4.6 `w = w_raw·min(1, Δ_max/(‖w_raw‖+1e-6))`, `aff_j = m_j·w/((‖w‖+1e-8)(‖m_j‖+1e-8))`,
    novel: `g = σ(β(novelty − θ))` (targets: empty slots first, else stale/underused), refine: `g = 1`
    (targets: top aff): gradients of w and g w.r.t. the writer input, W_w, b_w, and the old memory at
    the max-affinity row j*. Probes of empty rows (norm at its kink, ‖m‖ = 0) are left out."""
    x, read_ema, last_write, kw, rng = _writer_case(branch, clip, seed)
    B, J = x["memory"].shape[:2]
    R_w, R_g = rng.standard_normal((B, x["W_w"].shape[0])), rng.standard_normal(B)

    def run(x):
        return writer_forward(x["x_w"], x["memory"], read_ema, last_write, 7, x["W_w"], x["b_w"], **kw)

    def f(x):
        w, g, targets, c = run(x)
        return float((w * R_w).sum() + (g * R_g).sum()), (targets, c.novel, c.j_star, c.clipped)

    w, g, targets, cache = run(x)
    empty = np.linalg.norm(x["memory"], axis=2) <= 1e-6
    assert cache.clipped.all() == clip and (~cache.clipped).all() == (not clip)
    if branch == "refine":
        assert not cache.novel.any() and np.all(g == 1.0)
        assert np.all(targets[:, 0] == 2) and np.all(cache.j_star == 2)
    else:
        assert cache.novel.all() and np.all((g > 0.05) & (g < 0.95))
        if branch == "novel_empty":
            np.testing.assert_array_equal(targets, [[1, 4], [1, 4]])
        else:
            assert not empty.any()
    d_x, d_m_star, dW, db = writer_backward(R_w, R_g, cache, x["W_w"])
    dM = np.zeros_like(x["memory"])
    dM[np.arange(B), cache.j_star] += d_m_star
    coords = {"memory": np.flatnonzero(np.repeat(~empty[..., None], x["memory"].shape[2], axis=2))}
    rep = fd_check(f, x, {"x_w": d_x, "W_w": dW, "b_w": db, "memory": dM}, coords=coords)
    rep.assert_ok(0.8)
    if branch == "refine":  # g is constant 1: the old memory gets nothing from the writer
        assert np.all(dM == 0)
    else:
        assert np.abs(d_m_star).max() > 0


def test_writer_targets_rules():
    """Spec §4.6 target rules, ties to the lower index: empty slots by index then the others by index;
    with no empty slot the W_w largest `λ_s·staleness + λ_u·underuse`; refine: the W_w largest aff."""
    w_dir = np.array([[1.0, 0.0]])
    W_w, b_w = np.eye(2), np.zeros(2)
    mem = np.array([[[0.0, 1.0], [0.0, 0.0], [0.0, -1.0], [0.0, 0.0]]])
    kw = dict(clip_max=10.0, beta=8.0, theta=0.3, stale_weight=1.0, underuse_weight=0.0)
    ema, last = np.full((1, 4), 0.5), np.array([[3, 1, 1, 0]])
    _, g, targets, c = writer_forward(w_dir, mem, ema, last, 5, W_w, b_w, write_slots=3, **kw)
    assert c.novel[0]
    np.testing.assert_array_equal(targets, [[1, 3, 0]])
    full = mem + np.array([0.0, 1e-3])[None, None] * (np.linalg.norm(mem, axis=2, keepdims=True) == 0)
    full[0, 1] = [0.0, 2.0]
    _, _, targets, _ = writer_forward(w_dir, full, ema, last, 5, W_w, b_w, write_slots=2, **kw)
    np.testing.assert_array_equal(targets, [[3, 1]])   # staleness 5 - last: [2, 4, 4, 5]; tie 1 vs 2 → 1
    near = np.array([[[1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [1.0, 0.5]]])
    _, g, targets, c = writer_forward(w_dir, near, ema, last, 5, W_w, b_w, write_slots=2, **kw)
    assert not c.novel[0] and g[0] == 1.0
    np.testing.assert_array_equal(targets, [[0, 1]])   # aff tie between rows 0 and 1 → lower index first


# ---------------------------------------------------------------------------------------------------
# §4.7 memory decay and write
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("write_rate", [0.05, 1.0])
def test_memory_write(seed, write_rate):
    """Spec §4.7 `M ← γ·M`, then `m_j += η·g·w` for every target (W_w = 3 here): gradients w.r.t. the old
    memory, g and w; write_ema and last_write bookkeeping."""
    rng = rng_for(seed, int(write_rate * 100))
    B, J, d_m = 2, 6, 3
    targets = np.array([[4, 0, 2], [1, 5, 3]])
    x = {"memory": rng.standard_normal((B, J, d_m)), "g": rng.uniform(0, 1, B),
         "w": rng.standard_normal((B, d_m))}
    R = rng.standard_normal((B, J, d_m))
    kw = dict(decay=0.9, write_rate=write_rate)
    wema, last = rng.uniform(0, 1, (B, J)), np.zeros((B, J), np.int64)

    def f(x):
        m, _, _ = memory_write_forward(x["memory"], wema, last, targets, x["g"], x["w"], 4, ema_decay=0.8,
                                       **kw)
        return float((m * R).sum()), ()

    m, new_wema, new_last = memory_write_forward(x["memory"], wema, last, targets, x["g"], x["w"], 4,
                                                 ema_decay=0.8, **kw)
    is_t = np.zeros((B, J))
    is_t[np.arange(B)[:, None], targets] = 1
    np.testing.assert_allclose(new_wema, 0.8 * wema + 0.2 * is_t, rtol=1e-15)
    np.testing.assert_array_equal(new_last, 4 * is_t)
    np.testing.assert_allclose(m[1, 5], 0.9 * x["memory"][1, 5] + write_rate * x["g"][1] * x["w"][1],
                               rtol=1e-14)
    dM, d_w, d_g = memory_write_backward(R, targets, x["g"], x["w"], **kw)
    fd_check(f, x, {"memory": dM, "g": d_g, "w": d_w}).assert_ok(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_decay_on_write(seed):
    """The ``decay_on_write`` variant of §4.7: a target j becomes γ^(t − last_write_j)·m_j + η·g·w, every
    other slot keeps its value exactly; the bookkeeping is the spec's; gradients w.r.t. the old memory, g and
    w by finite differences."""
    rng = rng_for(seed, 77)
    B, J, d_m, t = 2, 6, 3, 9
    targets = np.array([[4, 0, 2], [1, 5, 3]])
    last = rng.integers(0, t, (B, J)).astype(np.int64)
    x = {"memory": rng.standard_normal((B, J, d_m)), "g": rng.uniform(0, 1, B), "w": rng.standard_normal((B, d_m))}
    R = rng.standard_normal((B, J, d_m))
    wema = rng.uniform(0, 1, (B, J))
    kw = dict(decay=0.8, write_rate=0.3)
    m, new_wema, new_last = decay_on_write_forward(x["memory"], wema, last, targets, x["g"], x["w"], t,
                                                   ema_decay=0.7, **kw)
    want_m, want_wema, want_last = memory_write_forward(x["memory"], wema, last, targets, x["g"], x["w"], t,
                                                        ema_decay=0.7, **kw)
    np.testing.assert_array_equal(new_wema, want_wema)
    np.testing.assert_array_equal(new_last, want_last)
    for b in range(B):
        for j in range(J):
            if j in targets[b]:
                want = 0.8 ** (t - last[b, j]) * x["memory"][b, j] + 0.3 * x["g"][b] * x["w"][b]
                np.testing.assert_allclose(m[b, j], want, rtol=1e-14, atol=1e-15)
            else:
                np.testing.assert_array_equal(m[b, j], x["memory"][b, j])

    def f(x):
        out, _, _ = decay_on_write_forward(x["memory"], wema, last, targets, x["g"], x["w"], t, ema_decay=0.7,
                                           **kw)
        return float((out * R).sum()), ()

    dM, d_w, d_g = decay_on_write_backward(R, targets, x["g"], x["w"], last_write=last, t=t, **kw)
    fd_check(f, x, {"memory": dM, "g": d_g, "w": d_w}).assert_ok(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_decay_on_write_is_the_spec_when_every_slot_is_written_every_step(seed):
    """With W_w = J and every slot written at the step before, γ^(t − last_write) = γ for every slot: the
    variant's forward and backward equal the spec's bit for bit."""
    rng = rng_for(seed, 78)
    B, J, d_m, t = 3, 4, 5, 12
    targets = np.stack([rng.permutation(J) for _ in range(B)])
    last = np.full((B, J), t - 1, np.int64)
    memory, g, w = rng.standard_normal((B, J, d_m)), rng.uniform(0, 1, B), rng.standard_normal((B, d_m))
    wema = rng.uniform(0, 1, (B, J))
    kw = dict(decay=0.97, write_rate=0.5)
    for have, want in zip(decay_on_write_forward(memory, wema, last, targets, g, w, t, ema_decay=0.9, **kw),
                          memory_write_forward(memory, wema, last, targets, g, w, t, ema_decay=0.9, **kw),
                          strict=True):
        np.testing.assert_array_equal(have, want)
    R = rng.standard_normal((B, J, d_m))
    for have, want in zip(decay_on_write_backward(R, targets, g, w, last_write=last, t=t, **kw),
                          memory_write_backward(R, targets, g, w, **kw), strict=True):
        np.testing.assert_array_equal(have, want)


# ---------------------------------------------------------------------------------------------------
# §4.8 output, §5 losses
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_layer_norm(seed):
    """Spec §4.8 `h = LayerNorm(x)` (biased variance, eps 1e-5, affine) over a [B, T, D] input."""
    rng = rng_for(seed)
    x = {"x": rng.standard_normal((2, 3, 5)) * 2 + 1, "gamma": rng.standard_normal(5),
         "beta": rng.standard_normal(5)}
    R = rng.standard_normal((2, 3, 5))

    def f(x):
        return float((layer_norm_forward(x["x"], x["gamma"], x["beta"])[0] * R).sum()), ()

    y, cache = layer_norm_forward(x["x"], x["gamma"], x["beta"])
    ref = (x["x"] - x["x"].mean(-1, keepdims=True)) / np.sqrt(x["x"].var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref * x["gamma"] + x["beta"], rtol=1e-13, atol=1e-13)
    d_x, d_g, d_b = layer_norm_backward(R, cache, x["gamma"])
    fd_check(f, x, {"x": d_x, "gamma": d_g, "beta": d_b}).assert_ok(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_head(seed):
    """Spec §4.8 `logits = h W_o^T + b_o` over a [B, T, D] input: gradients summed over leading axes."""
    rng = rng_for(seed)
    x = {"x": rng.standard_normal((2, 3, 4)), "W": rng.standard_normal((5, 4)), "b": rng.standard_normal(5)}
    R = rng.standard_normal((2, 3, 5))

    def f(x):
        return float((linear_forward(x["x"], x["W"], x["b"]) * R).sum()), ()

    d_x, d_W, d_b = linear_backward(R, x["x"], x["W"])
    fd_check(f, x, {"x": d_x, "W": d_W, "b": d_b}).assert_ok(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_cross_entropy(seed):
    """Spec §5 training loss: mean over all B·T positions of −log softmax(logits)[target]."""
    rng = rng_for(seed)
    x = {"logits": rng.standard_normal((2, 3, 6)) * 3}
    targets = rng.integers(0, 6, (2, 3))

    def f(x):
        return float(cross_entropy_forward(x["logits"], targets)[0]), ()

    loss, d = cross_entropy_forward(x["logits"], targets)
    lp = x["logits"] - np.log(np.exp(x["logits"]).sum(-1, keepdims=True))
    assert abs(loss + np.take_along_axis(lp, targets[..., None], -1).mean()) < 1e-14
    fd_check(f, x, {"logits": d}).assert_ok(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_load_balance(seed):
    """Spec §5 load-balance term `KL(p ‖ uniform)`, `p_j ∝ A_j`: gradient w.r.t. A. Slots never picked
    (A_j = 0, where p log p has no derivative) are part of the discrete picked set: their probes are
    skipped."""
    rng = rng_for(seed)
    A = rng.uniform(0.1, 1.0, (2, 6))
    A[0, [1, 4]] = 0.0
    A[1, 2] = 0.0
    x = {"A": A}
    R = rng.standard_normal(2)

    def f(x):
        kl, _ = load_balance_forward(x["A"])
        return float((kl * R).sum()), (x["A"] > 0,)

    kl, d_A = load_balance_forward(A)
    p = A / A.sum(-1, keepdims=True)
    ref = np.where(p > 0, p * np.log(np.where(p > 0, p, 1) * 6), 0).sum(-1)
    np.testing.assert_allclose(kl, ref, rtol=1e-14)
    rep = fd_check(f, x, {"A": d_A * R[:, None]})
    rep.assert_ok(0.7)
    assert rep.skipped == 3


def test_fd_check_catches_a_wrong_gradient():
    """The checker itself: a gradient off by 1e-4 of its scale fails, and a flipped choice is skipped."""
    x = {"a": np.array([1.0, 2.0, -3.0])}

    def f(x):
        return float((x["a"] ** 2).sum()), ()

    bad = FDReport()
    fd_check(f, x, {"a": 2 * x["a"] + np.array([0.0, 6e-4, 0.0])}, report=bad)
    assert len(bad.failures) == 1

    y = {"a": np.array([0.0, 1.0])}

    def g(x):
        return float(np.abs(x["a"]).sum()), (x["a"] > 0,)

    rep = fd_check(g, y, {"a": np.array([0.0, 1.0])})
    assert rep.skipped == 1 and rep.checked == 1 and not rep.failures
