"""Router kernels (thl_np.fast.router), each alone against thl_np.components.router (spec §4.3-4.4): the
helpers both paths share (``pick_slots``: scores, top-κ, softmax; ``capacity_walk``; ``read_meta``),
``route`` / ``route_parallel`` (decode) and ``route_forward`` / ``route_backward`` (training) on random inputs
in the layouts the fast paths give them, with exact ties (identical rows rank by lower index), empty slots,
slot capacity (a head left with nothing keeps its weights), Gumbel noise and the load-balance record; with
each key rule against its router: the spec's, ``unit_keys`` (thl_np.components.router_unit_keys) and
``empty_last`` (router_empty_last)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DTYPES, assert_close, assert_equal, memory_bank, scatter_add, tier_offsets

from thl_np.components.registry import KEY_RULES
from thl_np.components.router import (
    DOT,
    apply_slot_capacity,
    gumbel_noise,
    read_meta_backward,
    read_meta_forward,
    router_backward,
    router_forward,
    slot_scores,
)
from thl_np.components.router_empty_last import EMPTY_LAST, empty_last_backward, empty_last_forward
from thl_np.components.router_unit_keys import UNIT_KEYS, unit_keys_backward, unit_keys_forward
from thl_np.components.router_unit_rows import unit_rows, unit_rows_forward, unit_rows_router_backward
from thl_np.fast import router as fast_router
from thl_np.fast.primitives import row_dots

C = np.ascontiguousarray
ROUTERS = ("spec", "unit_keys", "empty_last", "unit_rows")
RULES = {"spec": DOT, "unit_keys": UNIT_KEYS, "empty_last": EMPTY_LAST, "unit_rows": UNIT_KEYS}
PLAIN = {"spec": (router_forward, router_backward), "unit_keys": (unit_keys_forward, unit_keys_backward),
         "empty_last": (empty_last_forward, empty_last_backward),
         "unit_rows": (unit_rows_forward, unit_rows_router_backward)}


def router_case(seed, dtype="float64", *, B=2, J=7, d_m=4, H=3, d_h=2, dvh=2, kappa=2, capacity=0, empty=1,
                duplicates=1, scale=0.8, load_penalty=0.3, rho=0.9, t=5, dims=(3, 2, 4), d_e=3, gumbel=False,
                router="spec"):
    """Plain inputs of one router step and the fast paths' view of them (the stored bank, the tier layout)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    stored, memory, _, same = memory_bank(rng, B, J, d_m, dt, scale=scale, empty=empty, duplicates=duplicates)
    read_ema = rng.uniform(0.05, 1.0, (B, J))
    for b, slots in enumerate(same):
        read_ema[b, slots] = read_ema[b, slots[:1]]   # identical rows and read_ema: scores tie exactly
    offs = tier_offsets(dims)
    d0, dK, off0, offK = dims[0], dims[-1], 0, offs[-2]
    tiers = rng.standard_normal((B, offs[-1])).astype(dt)
    e = rng.standard_normal((B, d_e)).astype(dt)
    u = np.concatenate([e, tiers[:, off0:off0 + d0], tiers[:, offK:offK + dK]], axis=1)
    Q, d_u = H * d_h, u.shape[1]
    W_q = (rng.standard_normal((Q, d_u)) / math.sqrt(d_u)).astype(dt)
    W_k = (rng.standard_normal((Q, d_m)) / math.sqrt(d_m)).astype(dt)
    W_v = (rng.standard_normal((H * dvh, d_m)) / math.sqrt(d_m)).astype(dt)
    G = gumbel_noise(rng.random((B, H, J)), dt) if gumbel else None
    return SimpleNamespace(rng=rng, dt=dt, B=B, J=J, d_m=d_m, H=H, d_h=d_h, dvh=dvh, kappa=kappa, capacity=capacity,
                           scale=scale, load_penalty=load_penalty, rho=rho, t=t, d_e=d_e, dims=dims, d0=d0, dK=dK,
                           off0=off0, offK=offK, stored=stored, memory=memory, same=same,
                           read_ema=read_ema.astype(dt), last_read=rng.integers(0, t, (B, J)).astype(np.int64),
                           e=e, tiers=tiers, u=u, W_q=W_q, W_k=W_k, W_v=W_v, G=G, inv_sqrt=1.0 / math.sqrt(d_h),
                           router=router, key_rule=KEY_RULES[router], rule=RULES[router])


def plain_router(c):
    """The plain definition the kernels mirror: the case's router's forward and backward."""
    return PLAIN[c.router]


def plain_read(c):
    """router_forward + read_meta_forward, and the parts of the forward the kernels record."""
    kw = dict(num_heads=c.H, head_dim=c.d_h, topk=c.kappa, load_penalty=c.load_penalty, gumbel=c.G)
    forward = plain_router(c)[0]
    r, alpha, idx, cache = forward(c.u, c.memory, c.read_ema, c.W_q, c.W_k, c.W_v, capacity=c.capacity or None, **kw)
    _, alpha_soft, idx_soft, _ = forward(c.u, c.memory, c.read_ema, c.W_q, c.W_k, c.W_v, **kw)
    assert np.array_equal(idx, idx_soft)
    if c.capacity:
        _, mask, used = apply_slot_capacity(alpha_soft, idx, c.capacity)
    else:
        mask, used = np.ones_like(alpha_soft), np.ones(idx.shape[:2], bool)
    q = (c.u @ c.W_q.T).reshape(c.B, c.H, c.d_h)
    q_mem, _ = slot_scores(c.memory, q, c.W_k, c.read_ema, c.load_penalty, c.rule)
    new_ema, new_last, A = read_meta_forward(c.read_ema, c.last_read, alpha, idx, c.t, c.rho)
    m_sel = c.memory[np.arange(c.B)[:, None, None], idx]
    values_from = unit_rows(m_sel) if c.router == "unit_rows" else m_sel   # the rows whose values are read
    return SimpleNamespace(r=r, alpha=alpha, idx=idx, cache=cache, alpha_soft=alpha_soft, mask=mask, used=used, q=q,
                           q_mem=q_mem, new_ema=new_ema, new_last=new_last, A=A, m_sel=m_sel,
                           mix=np.einsum("bhr,bhrm->bhm", alpha, values_from))


def assert_ties_to_lower_index(idx, same, what):
    """Identical rows (``same[b]``) appear among the picks in index order."""
    for b, slots in enumerate(same):
        for h in range(idx.shape[1]):
            order = [j for j in idx[b, h] if j in set(slots.tolist())]
            assert order == sorted(order), f"{what}: identical rows picked out of index order: {order}"


@st.composite
def router_sizes(draw):
    J = draw(st.integers(2, 9))
    empty = draw(st.integers(0, J - 1))
    return dict(B=draw(st.integers(1, 3)), J=J, d_m=draw(st.integers(1, 5)), H=draw(st.integers(1, 6)),
                d_h=draw(st.integers(1, 3)), dvh=draw(st.integers(1, 2)), kappa=draw(st.integers(1, J)),
                capacity=draw(st.integers(0, 2)), empty=empty, duplicates=draw(st.integers(0, J - 1 - empty)),
                scale=draw(st.sampled_from([1.0, 0.37, 3.0])), load_penalty=draw(st.sampled_from([0.0, 0.3])),
                dims=draw(st.sampled_from([(3,), (3, 2), (2, 3, 4)])), router=draw(st.sampled_from(ROUTERS)))


# ---------------------------------------------------------------------------------------------------
# The shared helpers, one sequence at a time
# ---------------------------------------------------------------------------------------------------
def check_pick_slots(c):
    """pick_slots per sequence and head on the stored bank's dot products m_j·q_mem_h, against slot_scores
    (+ the Gumbel term), the top-κ and the softmax of router_forward."""
    want = plain_read(c)
    _, scores = slot_scores(c.memory, want.q, c.W_k, c.read_ema, c.load_penalty, c.rule)
    if c.G is not None:
        scores = scores + c.G
    key_scale, empty_w = np.empty(c.J), np.empty(c.J)
    for b in range(c.B):
        fast_router.key_scales(c.stored[b], c.scale, c.key_rule, key_scale, empty_w)
        for h in range(c.H):
            dots = np.empty(c.J, c.dt)
            row_dots(c.stored[b], C(want.q_mem[b, h]), dots)
            got = np.full(c.J, np.nan)
            idx = np.full(c.kappa, -1, np.int64)
            alpha = np.full(c.kappa, np.nan, c.dt)
            noise = C(c.G[b, h]) if c.G is not None else dots   # not read without noise
            q_pen = fast_router.empty_penalty(c.key_rule, C(want.q_mem[b, h]))
            fast_router.pick_slots(dots, key_scale, empty_w, q_pen, c.inv_sqrt, c.load_penalty, c.read_ema[b], noise,
                                   c.G is not None, c.kappa, got, idx, alpha)
            assert_close(got, scores[b, h], c.dt, f"pick_slots: scores of sequence {b}, head {h}")
            assert_equal(idx, want.idx[b, h], f"pick_slots: picks of sequence {b}, head {h}")
            assert_close(alpha, want.alpha_soft[b, h], c.dt, f"pick_slots: softmax of sequence {b}, head {h}")


@settings(max_examples=examples(30), deadline=None)
@given(sizes=router_sizes(), seed=st.integers(0, 2**31), gumbel=st.booleans())
def test_pick_slots_matches_slot_scores_top_k_and_softmax(sizes, seed, gumbel):
    check_pick_slots(router_case(seed, gumbel=gumbel, **sizes))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pick_slots_ranks_identical_rows_by_lower_index(dtype):
    check_pick_slots(router_case(3, dtype, J=8, kappa=8, H=4, empty=3, duplicates=2, load_penalty=0.0))


def check_capacity_walk(c, in_place):
    """capacity_walk per sequence on router_forward's picks and softmax, against apply_slot_capacity;
    ``in_place``: alpha is alpha_soft itself (as the decode kernel calls it)."""
    want = plain_read(c)
    capped, mask, used = apply_slot_capacity(want.alpha_soft, want.idx, c.capacity)
    got_alpha = want.alpha_soft.astype(c.dt)
    got_mask = np.full(want.idx.shape, np.nan, c.dt)
    got_used = np.zeros(want.idx.shape[:2], np.bool_)
    served = np.full(c.J, 99, np.int64)
    for b in range(c.B):
        soft = got_alpha[b] if in_place else C(want.alpha_soft[b].astype(c.dt))
        fast_router.capacity_walk(C(want.idx[b]), soft, c.capacity, served, got_alpha[b], got_mask[b], got_used[b])
    assert_close(got_alpha, capped, c.dt, "capacity_walk: α")
    assert_equal(got_mask, mask, "capacity_walk: mask")
    assert_equal(got_used, used, "capacity_walk: heads renormalised")


@settings(max_examples=examples(30), deadline=None)
@given(sizes=router_sizes(), seed=st.integers(0, 2**31), capacity=st.integers(1, 3), in_place=st.booleans())
def test_capacity_walk_matches_apply_slot_capacity(sizes, seed, capacity, in_place):
    check_capacity_walk(router_case(seed, **dict(sizes, capacity=capacity)), in_place)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_capacity_walk_head_left_without_picks_keeps_its_weights(dtype, in_place):
    c = capacity_case(dtype)
    assert not plain_read(c).used[:, 1].any()   # the branch is taken
    check_capacity_walk(c, in_place)
    check_capacity_walk(router_case(7, dtype, J=4, H=3, kappa=3, capacity=1, empty=0, duplicates=0), in_place)


@settings(max_examples=examples(30), deadline=None)
@given(sizes=router_sizes(), seed=st.integers(0, 2**31))
def test_read_meta_matches_read_meta_forward(sizes, seed):
    c = router_case(seed, **sizes)
    want = plain_read(c)
    read_ema, last_read = c.read_ema.copy(), c.last_read.copy()
    A = np.full((c.B, c.J), np.nan)
    for b in range(c.B):
        fast_router.read_meta(C(want.idx[b]), C(want.alpha[b]), c.t, c.rho, A[b], read_ema[b], last_read[b])
    assert_close(A, want.A, c.dt, "read_meta: A (read weight per slot)")
    assert_close(read_ema, want.new_ema, c.dt, "read_meta: read_ema")
    assert_equal(last_read, want.new_last, "read_meta: last_read")


# ---------------------------------------------------------------------------------------------------
# Decode: route / route_parallel
# ---------------------------------------------------------------------------------------------------
def run_route(kernel, c, want):
    """The kernel on the decoder's layout: the stored bank, q_mem per sequence and head (as FastDecoder
    gets it from per_head_linear), read_ema / last_read updated in place."""
    mem, read_ema, last_read = c.stored.copy(), c.read_ema.copy(), c.last_read.copy()
    mix = np.empty((c.B, c.H, c.d_m), c.dt)
    idx = np.empty((c.B, c.H, c.kappa), np.int64)
    alpha = np.empty((c.B, c.H, c.kappa), c.dt)
    kernel(C(want.q_mem), c.scale, read_ema, last_read, mem, c.t, c.load_penalty, c.inv_sqrt, c.kappa, c.capacity,
           c.rho, c.key_rule, mix, idx, alpha)
    assert_equal(mem, c.stored, "route: the bank is read, never written")
    return SimpleNamespace(mix=mix, idx=idx, alpha=alpha, read_ema=read_ema, last_read=last_read)


def check_route(kernel, c):
    want = plain_read(c)
    got = run_route(kernel, c, want)
    name = kernel.__name__
    assert_equal(got.idx, want.idx, f"{name}: picks")
    assert_ties_to_lower_index(got.idx, c.same, name)
    assert_close(got.alpha, want.alpha, c.dt, f"{name}: alpha")
    assert_close(got.mix, want.mix, c.dt, f"{name}: α-mix of the rows read")
    r = np.einsum("bhm,hvm->bhv", got.mix, c.W_v.reshape(c.H, c.dvh, c.d_m)).reshape(c.B, -1)
    assert_close(r, want.r, c.dt, f"{name}: r = W_v,h mix_h")
    assert_close(got.read_ema, want.new_ema, c.dt, f"{name}: read_ema")
    assert_equal(got.last_read, want.new_last, f"{name}: last_read")


ROUTE_KERNELS = [fast_router.route, fast_router.route_parallel]


@pytest.mark.parametrize("kernel", ROUTE_KERNELS, ids=lambda k: k.__name__)
@settings(max_examples=examples(30), deadline=None)
@given(sizes=router_sizes(), seed=st.integers(0, 2**31))
def test_route_matches_router_forward(kernel, sizes, seed):
    check_route(kernel, router_case(seed, **sizes))


@pytest.mark.parametrize("kernel", ROUTE_KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("seed", range(8))
def test_route_matches_router_forward_float32(kernel, seed):
    check_route(kernel, router_case(seed, "float32", B=3, J=9, H=5, kappa=3, capacity=seed % 3, empty=2,
                                    duplicates=2, scale=0.6, router=ROUTERS[seed // 2]))


@pytest.mark.parametrize("kernel", ROUTE_KERNELS, ids=lambda k: k.__name__)
def test_route_ranks_identical_and_empty_rows_by_lower_index(kernel):
    """Every slot picked (κ = J): three identical rows and three empty rows each keep index order."""
    c = router_case(3, J=8, kappa=8, H=4, empty=3, duplicates=2, load_penalty=0.0)
    check_route(kernel, c)
    got = run_route(kernel, c, plain_read(c))
    empty = [np.flatnonzero(np.abs(c.stored[b]).sum(axis=1) == 0) for b in range(c.B)]
    assert_ties_to_lower_index(got.idx, empty, "empty rows")


def capacity_case(dtype="float64", **kw):
    """Two heads with the same query: head 1 picks what head 0 took, and with capacity 1 and κ = 1 it is left
    with weight 0, so it keeps its uncapped weight (spec §4.3)."""
    c = router_case(5, dtype, H=2, kappa=1, capacity=1, duplicates=0, **kw)
    for W in (c.W_q, c.W_k):
        W[c.d_h:] = W[:c.d_h]
    return c


@pytest.mark.parametrize("kernel", ROUTE_KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_capacity_head_left_without_picks_keeps_its_weights(kernel, dtype):
    c = capacity_case(dtype)
    want = plain_read(c)
    assert not want.used[:, 1].any() and np.array_equal(want.idx[:, 0], want.idx[:, 1])  # the branch is taken
    check_route(kernel, c)
    assert np.all(run_route(kernel, c, want).alpha == 1.0)


@pytest.mark.parametrize("kernel", ROUTE_KERNELS, ids=lambda k: k.__name__)
def test_route_capacity_masks_repeated_picks(kernel):
    """Capacity 1, κ = 3 of J = 4 slots, three heads: later heads lose some of their picks, not all."""
    c = router_case(7, J=4, H=3, kappa=3, capacity=1, empty=0, duplicates=0)
    want = plain_read(c)
    kept = want.mask.sum(axis=-1)
    assert ((kept > 0) & (kept < c.kappa)).any()
    check_route(kernel, c)


# ---------------------------------------------------------------------------------------------------
# Training: route_forward / route_backward
# ---------------------------------------------------------------------------------------------------
T_STEPS, STEP = 3, 1   # the kernels write step STEP of a 3-step tape


def training_layout(c):
    """The weights as fast_grad._Weights lays them out, the e-part of u W_q^T and the tier states S (step
    STEP's are u's state part)."""
    Q = c.H * c.d_h
    W_q_s = C(c.W_q[:, c.d_e:])
    QE = np.zeros((T_STEPS, c.B, Q), c.dt)
    QE[STEP] = c.e @ C(c.W_q[:, :c.d_e]).T
    S = np.random.default_rng(0).standard_normal((T_STEPS + 1, c.B, c.tiers.shape[1])).astype(c.dt)
    S[STEP] = c.tiers
    return SimpleNamespace(W_q_s=W_q_s, WqsT=C(W_q_s.T), QE=QE, S=S,
                           Wk_heads=C(c.W_k.reshape(c.H, c.d_h, c.d_m)),
                           WkT_heads=C(c.W_k.reshape(c.H, c.d_h, c.d_m).transpose(0, 2, 1)),
                           Wv_heads=C(c.W_v.reshape(c.H, c.dvh, c.d_m)),
                           WvT_heads=C(c.W_v.reshape(c.H, c.dvh, c.d_m).transpose(0, 2, 1)))


def forward_record(c):
    z = lambda *shape, dtype=c.dt: np.zeros(shape, dtype)   # noqa: E731
    T, B, H, k, J = T_STEPS, c.B, c.H, c.kappa, c.J
    return dict(QV=z(T, B, H, c.d_h), QK=z(T, B, H, c.d_m), IDX=z(T, B, H, k, dtype=np.int64), ASOFT=z(T, B, H, k),
                ALPHA=z(T, B, H, k), CAPM=z(T, B, H, k), CAPU=z(T, B, H, dtype=np.bool_), MSEL=z(T, B, H, k, c.d_m),
                MIX=z(T, H, B, c.d_m), AW=z(T, B, J), R=z(T, B, H * c.dvh))


def check_route_forward(c, record_A=True):
    want = plain_read(c)
    L = training_layout(c)
    rec = forward_record(c)
    mem, read_ema, last_read = c.stored.copy(), c.read_ema.copy(), c.last_read.copy()
    G = np.zeros((T_STEPS, c.B, c.H, c.J), c.dt)
    if c.G is not None:
        G[STEP] = c.G
    fast_router.route_forward(STEP, c.t, L.QE, L.S, c.off0, c.d0, c.offK, c.dK, L.WqsT, c.scale, read_ema,
                              last_read, mem, G, c.G is not None, c.load_penalty, c.inv_sqrt, c.kappa, c.capacity,
                              c.rho, c.key_rule, L.Wk_heads, L.WvT_heads, record_A, *rec.values())
    assert_equal(mem, c.stored, "route_forward: the bank is read, never written")
    i = STEP
    assert_close(rec["QV"][i], want.q, c.dt, "route_forward: q")
    assert_close(rec["QK"][i], want.q_mem, c.dt, "route_forward: q_mem")
    assert_equal(rec["IDX"][i], want.idx, "route_forward: picks")
    if c.G is None:   # (noise breaks the ties)
        assert_ties_to_lower_index(rec["IDX"][i], c.same, "route_forward")
    assert_close(rec["ASOFT"][i], want.alpha_soft, c.dt, "route_forward: α before the capacity mask")
    assert_close(rec["ALPHA"][i], want.alpha, c.dt, "route_forward: α")
    assert_equal(rec["CAPM"][i], want.mask, "route_forward: capacity mask")
    assert_equal(rec["CAPU"][i], want.used, "route_forward: heads the mask renormalised")
    assert_close(rec["MSEL"][i], want.m_sel, c.dt, "route_forward: rows read")
    assert_close(rec["MIX"][i], want.mix.transpose(1, 0, 2), c.dt, "route_forward: α-mix")
    assert_close(rec["R"][i], want.r, c.dt, "route_forward: r")
    assert_close(rec["AW"][i], want.A if record_A else 0 * want.A, c.dt, "route_forward: A (load balance)")
    assert_close(read_ema, want.new_ema, c.dt, "route_forward: read_ema")
    assert_equal(last_read, want.new_last, "route_forward: last_read")
    for name, X in rec.items():
        assert not X[[0, 2]].any(), f"route_forward wrote {name} outside step {i}"


@settings(max_examples=examples(30), deadline=None)
@given(sizes=router_sizes(), seed=st.integers(0, 2**31), gumbel=st.booleans(), record_A=st.booleans())
def test_route_forward_matches_router_forward(sizes, seed, gumbel, record_A):
    check_route_forward(router_case(seed, gumbel=gumbel, **sizes), record_A)


@pytest.mark.parametrize("seed", range(8))
def test_route_forward_matches_router_forward_float32(seed):
    check_route_forward(router_case(seed, "float32", B=3, J=9, H=5, kappa=3, capacity=seed % 3, empty=2,
                                    duplicates=2, scale=0.6, gumbel=seed % 2 == 0, router=ROUTERS[seed // 2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_forward_capacity_head_left_without_picks_keeps_its_weights(dtype):
    check_route_forward(capacity_case(dtype))


def check_route_backward(c, use_DA=True, c_scale=0.6):
    """route_backward on a tape made of the plain forward's values, against router_backward after
    read_meta_backward: the rows read go into D = dM / c, read_ema's gradient is updated in place, d q into
    DQ (checked through d u = d q W_q and dW_q), d q_mem into MK (checked through dW_k), d u's state part into
    the tier gradients DS."""
    want = plain_read(c)
    L = training_layout(c)
    rng, i, T, B, H = c.rng, STEP, T_STEPS, c.B, c.H
    rec = forward_record(c)
    rec["IDX"][i], rec["ASOFT"][i], rec["ALPHA"][i] = want.idx, want.alpha_soft, want.alpha
    rec["CAPM"][i], rec["CAPU"][i], rec["MSEL"][i], rec["QK"][i] = want.mask, want.used, want.m_sel, want.q_mem
    DR = rng.standard_normal((T, B, H * c.dvh)).astype(c.dt)
    d_ema0 = rng.standard_normal((B, c.J)).astype(c.dt)
    DA = rng.standard_normal((T, B, c.J)).astype(c.dt) if use_DA else np.zeros((1, 1, 1), c.dt)
    D0 = rng.standard_normal((B, c.J, c.d_m)).astype(c.dt)
    DS0 = rng.standard_normal((B, c.tiers.shape[1])).astype(c.dt)
    d_ema, D, DS = d_ema0.copy(), D0.copy(), DS0.copy()
    DQ = np.zeros((T, B, H * c.d_h), c.dt)
    MK = np.zeros((T, H, B, c.d_m), c.dt)
    fast_router.route_backward(i, DR, d_ema, DA, use_DA, c.rho, c.load_penalty, c.inv_sqrt, c.capacity, c.key_rule,
                               L.Wv_heads, L.WkT_heads, rec["IDX"], rec["ASOFT"], rec["ALPHA"], rec["CAPM"],
                               rec["CAPU"], rec["MSEL"], rec["QK"], D, c_scale, DQ, MK, L.W_q_s, DS, c.off0, c.d0,
                               c.offK, c.dK)
    d_prev_ema, d_alpha = read_meta_backward(d_ema0, DA[i] if use_DA else None, want.idx, c.rho)
    d_u, d_m_sel, d_ema_sel, dW_q, dW_k, _ = plain_router(c)[1](DR[i], d_alpha, want.cache, c.W_q, c.W_k, c.W_v,
                                                                num_heads=H, head_dim=c.d_h,
                                                                load_penalty=c.load_penalty)
    assert_close(d_ema, d_prev_ema + scatter_add((B, c.J), want.idx, d_ema_sel), c.dt,
                 "route_backward: read_ema gradient")
    assert_close((D - D0) * c_scale, scatter_add((B, c.J, c.d_m), want.idx, d_m_sel), c.dt,
                 "route_backward: memory gradient at the rows read", factor=10)
    assert_close(DQ[i] @ c.W_q, d_u, c.dt, "route_backward: d u = d q W_q")
    assert_close(DQ[i].T @ c.u, dW_q, c.dt, "route_backward: dW_q from d q")
    dW_k_fast = np.einsum("hbd,hbm->hdm", want.q.transpose(1, 0, 2), MK[i]).reshape(dW_k.shape)
    assert_close(dW_k_fast, dW_k, c.dt, "route_backward: dW_k from d q_mem")
    want_DS = DS0.astype(np.float64)
    want_DS[:, c.off0:c.off0 + c.d0] += d_u[:, c.d_e:c.d_e + c.d0]
    want_DS[:, c.offK:c.offK + c.dK] += d_u[:, c.d_e + c.d0:]
    assert_close(DS, want_DS, c.dt, "route_backward: d u's state part into the tier gradients")
    assert not DQ[[0, 2]].any() and not MK[[0, 2]].any(), "route_backward wrote outside step i"


@settings(max_examples=examples(30), deadline=None)
@given(sizes=router_sizes(), seed=st.integers(0, 2**31), gumbel=st.booleans(), use_DA=st.booleans(),
       c_scale=st.sampled_from([1.0, 0.6, 4.0]))
def test_route_backward_matches_router_backward(sizes, seed, gumbel, use_DA, c_scale):
    check_route_backward(router_case(seed, gumbel=gumbel, **sizes), use_DA, c_scale)


@pytest.mark.parametrize("seed", range(8))
def test_route_backward_matches_router_backward_float32(seed):
    check_route_backward(router_case(seed, "float32", B=3, J=9, H=5, kappa=3, capacity=seed % 3, empty=2,
                                     duplicates=2, scale=0.6, gumbel=seed % 2 == 0, router=ROUTERS[seed // 2]),
                         use_DA=seed % 2 == 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_backward_capacity_head_left_without_picks(dtype):
    check_route_backward(capacity_case(dtype))


def test_route_backward_capacity_masks_repeated_picks():
    check_route_backward(router_case(7, J=4, H=3, kappa=3, capacity=1, empty=0, duplicates=0))
