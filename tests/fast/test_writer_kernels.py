"""Writer kernels (thl_np.fast.writer), each alone against thl_np.components.writer (spec §4.6-4.7): the
helpers both paths share (``clip_write``, ``is_empty``, ``choose_write``: branch, gate, targets;
``decay_and_write``), ``write`` / ``write_parallel`` (decode), ``write_forward`` /
``write_backward`` (training), on the stored bank (true memory = scale · stored) with its squared norms, in
every branch: refine, novel into empty slots, novel by staleness/underuse (LRU), the clip on and off, the
eager decay of the training path, and exact ties (identical rows, equal priorities) to the lower index."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    DTYPES,
    assert_close,
    assert_equal,
    memory_bank,
    scatter_add,
    tier_offsets,
    true_rows,
)

from thl_np.components.writer import (
    EMPTY_NORM,
    memory_write_backward,
    memory_write_forward,
    writer_backward,
    writer_forward,
)
from thl_np.fast import writer as fast_writer
from thl_np.fast.primitives import row_norms2

C = np.ascontiguousarray


def writer_case(seed, dtype="float64", *, B=2, J=6, d_m=4, dims=(3, 2, 4), write_slots=1, clip_max=100.0,
                theta=0.3, beta=4.0, stale_weight=1.0, underuse_weight=0.5, decay=0.9, write_rate=0.5,
                ema_decay=0.9, scale=0.8, empty=1, duplicates=1, align=False, lru_ties=0, t=7):
    """Plain inputs of one writer step and the stored bank. ``align``: the duplicated rows point along w_raw
    (they are then the best affinities, tied). ``lru_ties``: that many slots share the highest priority
    (never written, least read). ``theta`` "novel" / "refine": just below / above every sequence's novelty,
    so every sequence takes that branch with a gate away from saturation."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    offs = tier_offsets(dims)
    d0, dK, off0, offK = dims[0], dims[-1], 0, offs[-2]
    tiers = rng.standard_normal((B, offs[-1])).astype(dt)
    x_w = np.concatenate([tiers[:, off0:off0 + d0], tiers[:, offK:offK + dK]], axis=1)
    W_w = (rng.standard_normal((d_m, d0 + dK)) / math.sqrt(d0 + dK)).astype(dt)
    b_w = (0.2 * rng.standard_normal(d_m)).astype(dt)
    w_raw = x_w @ W_w.T + b_w
    stored, memory, norm2, same = memory_bank(rng, B, J, d_m, dt, scale=scale, empty=empty, duplicates=duplicates)
    if align:
        for b, slots in enumerate(same):
            stored[b, slots] = (0.5 * w_raw[b] / scale).astype(dt)
        memory = true_rows(stored, scale)
        row_norms2(stored, norm2)
    read_ema = rng.uniform(0.05, 1.0, (B, J))
    last_write = rng.integers(1, t, (B, J))
    for b in range(B):
        read_ema[b, same[b]] = read_ema[b, same[b][:1]]
        last_write[b, same[b]] = last_write[b, same[b][:1]]
        if lru_ties:
            slots = np.sort(rng.permutation(J)[:lru_ties])
            last_write[b, slots] = 0
            read_ema[b, slots] = 0.01
    c = SimpleNamespace(rng=rng, dt=dt, B=B, J=J, d_m=d_m, dims=dims, d0=d0, dK=dK, off0=off0, offK=offK,
                        tiers=tiers, x_w=x_w, W_w=W_w, b_w=b_w, w_raw=w_raw, stored=stored, memory=memory,
                        norm2=norm2, same=same, read_ema=read_ema.astype(dt), last_write=last_write.astype(np.int64),
                        write_ema=rng.uniform(0.0, 1.0, (B, J)).astype(dt), t=t, scale=scale, write_slots=write_slots,
                        clip_max=clip_max, beta=beta, theta=theta, stale_weight=stale_weight,
                        underuse_weight=underuse_weight, decay=decay, write_rate=write_rate, ema_decay=ema_decay)
    if isinstance(theta, str):
        c.theta = 0.0
        novelty = 1.0 - plain_write(c).aff_star
        c.theta = float(novelty.min() - 0.1) if theta == "novel" else float(novelty.max() + 0.1)
    return c


def plain_write(c):
    """writer_forward + memory_write_forward on the true memory."""
    w, g, targets, cache = writer_forward(c.x_w, c.memory, c.read_ema, c.last_write, c.t, c.W_w, c.b_w,
                                          write_slots=c.write_slots, clip_max=c.clip_max, beta=c.beta,
                                          theta=c.theta, stale_weight=c.stale_weight,
                                          underuse_weight=c.underuse_weight)
    new_memory, new_write_ema, new_last_write = memory_write_forward(
        c.memory, c.write_ema, c.last_write, targets, g, w, c.t, decay=c.decay, write_rate=c.write_rate,
        ema_decay=c.ema_decay)
    f = {name: getattr(cache, name) for name in ("w_raw", "n_raw", "clipped", "scale", "n_w", "j_star", "m_star",
                                                    "n_m_star", "dot_star", "novel")}
    aff_star = f["dot_star"] / ((f["n_w"] + 1e-8) * (f["n_m_star"] + 1e-8))
    return SimpleNamespace(w=w, g=g, targets=targets, cache=cache, new_memory=new_memory, new_write_ema=new_write_ema,
                           new_last_write=new_last_write, aff_star=aff_star, **f)


def assert_ties_to_lower_index(targets, groups, what):
    for b, slots in enumerate(groups):
        order = [j for j in targets[b] if j in set(np.asarray(slots).tolist())]
        assert order == sorted(order), f"{what}: tied slots chosen out of index order: {order}"


# ---------------------------------------------------------------------------------------------------
# clip_write, is_empty
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_max", [0.3, 100.0], ids=["clip", "no_clip"])
def test_clip_write_matches_writer_forward(clip_max, dtype):
    c = writer_case(21, dtype, B=3, clip_max=clip_max)
    want = plain_write(c)
    for b in range(c.B):
        w = np.full(c.d_m, np.nan, c.dt)
        n_raw, clipped, factor, n_w = fast_writer.clip_write(C(want.w_raw[b]), c.clip_max, w)
        assert_close(w, want.w[b], c.dt, "clip_write: w")
        assert_close([n_raw, factor, n_w], [want.n_raw[b], want.scale[b], want.n_w[b]], c.dt,
                     "clip_write: ‖w_raw‖, the factor, ‖w‖")
        assert clipped == want.clipped[b] == (clip_max < 1), "clip_write: whether it clipped"


@pytest.mark.parametrize("scale", [1.0, 0.37, 3.0])
def test_is_empty_is_the_writers_empty_norm(scale):
    """True exactly where the true row's norm is at most EMPTY_NORM, the writer's definition of an empty slot."""
    for norm in [0.0, 0.5 * EMPTY_NORM, EMPTY_NORM, 2.0 * EMPTY_NORM, 1.0]:
        stored2 = (norm / scale) ** 2
        assert fast_writer.is_empty(scale, stored2) == (scale * np.sqrt(stored2) <= EMPTY_NORM)
    assert fast_writer.is_empty(scale, 0.0) and not fast_writer.is_empty(scale, (2 * EMPTY_NORM / scale) ** 2)


# ---------------------------------------------------------------------------------------------------
# choose_write
# ---------------------------------------------------------------------------------------------------
def check_choose_write(c):
    want = plain_write(c)
    for b in range(c.B):
        w = C(want.w[b])
        n_w = w.dtype.type(np.sqrt(w @ w))
        aff, prio = np.empty(c.J), np.empty(c.J)
        dots = np.empty(c.J, c.dt)
        targets = np.empty(c.write_slots, np.int64)
        g, j_star, novel = fast_writer.choose_write(c.stored[b], c.norm2[b], w, n_w, c.scale, c.read_ema[b],
                                                    c.last_write[b], c.t, c.write_slots, c.beta, c.theta,
                                                    c.stale_weight, c.underuse_weight, aff, prio, dots, targets)
        assert bool(novel) == bool(want.novel[b]), f"choose_write: branch of sequence {b}"
        assert j_star == want.j_star[b], f"choose_write: arg-max slot j* {j_star} != {want.j_star[b]}"
        assert_equal(targets, want.targets[b], f"choose_write: targets of sequence {b}")
        assert_close(g, want.g[b], c.dt, f"choose_write: gate of sequence {b}")
    return want


@st.composite
def writer_sizes(draw):
    J = draw(st.integers(2, 8))
    empty = draw(st.integers(0, J - 1))
    return dict(B=draw(st.integers(1, 3)), J=J, d_m=draw(st.integers(2, 5)), write_slots=draw(st.integers(1, J)),
                empty=empty, duplicates=draw(st.integers(0, J - 1 - empty)), align=draw(st.booleans()),
                lru_ties=draw(st.integers(0, J)), clip_max=draw(st.sampled_from([0.3, 100.0])),
                theta=draw(st.sampled_from([-1.5, 0.3, 0.9, 2.5, "novel", "refine"])),
                scale=draw(st.sampled_from([1.0, 0.37, 3.0])), dims=draw(st.sampled_from([(3,), (3, 2), (2, 3, 4)])),
                decay=draw(st.sampled_from([0.9, 0.5])))


@settings(max_examples=examples(40), deadline=None)
@given(sizes=writer_sizes(), seed=st.integers(0, 2**31))
def test_choose_write_matches_writer_forward(sizes, seed):
    check_choose_write(writer_case(seed, **sizes))


BRANCHES = {
    # name: (case options, branch check on the plain result)
    "refine": (dict(theta="refine"), lambda c, w: not w.novel.any()),
    "novel_into_empty_slots": (dict(theta="novel", empty=2), lambda c, w: w.novel.all()),
    "novel_lru": (dict(theta="novel", empty=0), lambda c, w: w.novel.all()),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("clip_max", [0.3, 100.0], ids=["clip", "no_clip"])
def test_choose_write_every_branch(branch, clip_max, dtype):
    options, taken = BRANCHES[branch]
    c = writer_case(11, dtype, B=3, J=7, write_slots=3, clip_max=clip_max, **options)
    want = check_choose_write(c)
    assert taken(c, want)
    assert want.clipped.all() if clip_max < 1 else not want.clipped.any()


def test_choose_write_ties_go_to_the_lower_index():
    """Refine with three identical best rows; novel with more empty slots than targets; novel LRU with four
    slots sharing the highest priority: each chooses the tied slots in index order."""
    c = writer_case(1, J=8, write_slots=3, theta="refine", empty=0, duplicates=2, align=True)
    want = check_choose_write(c)
    assert all(set(want.targets[b]) == set(c.same[b]) for b in range(c.B))
    c = writer_case(2, J=8, write_slots=2, theta="novel", empty=4, duplicates=0)
    want = check_choose_write(c)
    empty = [np.flatnonzero(np.abs(c.stored[b]).sum(axis=1) == 0) for b in range(c.B)]
    assert all(list(want.targets[b]) == list(empty[b][:2]) for b in range(c.B))
    c = writer_case(3, J=8, write_slots=3, theta="novel", empty=0, duplicates=0, lru_ties=4)
    want = check_choose_write(c)
    tied = [np.flatnonzero(c.last_write[b] == 0) for b in range(c.B)]
    assert all(list(want.targets[b]) == list(tied[b][:3]) for b in range(c.B))
    assert_ties_to_lower_index(want.targets, tied, "LRU")


def test_choose_write_empty_slots_then_the_others_in_index_order():
    """More targets than empty slots: the empty ones, then the others in index order."""
    c = writer_case(4, J=6, write_slots=4, theta="novel", empty=2, duplicates=0)
    want = check_choose_write(c)
    for b in range(c.B):
        empty = np.flatnonzero(np.abs(c.stored[b]).sum(axis=1) == 0)
        rest = [j for j in range(c.J) if j not in empty]
        assert list(want.targets[b]) == list(empty) + rest[:2]


# ---------------------------------------------------------------------------------------------------
# decay_and_write
# ---------------------------------------------------------------------------------------------------
def check_decay_and_write(c):
    """decay_and_write per sequence with the plain writer's targets, gate and w, against memory_write_forward:
    lazy (the decay is the new scale) or eager (γ < MIN_DECAY: applied to the rows, the scale unchanged)."""
    want = plain_write(c)
    eager = c.decay < fast_writer.MIN_DECAY
    new_scale = c.scale if eager else c.scale * c.decay
    mem, norm2 = c.stored.copy(), c.norm2.copy()
    write_ema, last_write = c.write_ema.copy(), c.last_write.copy()
    for b in range(c.B):
        fast_writer.decay_and_write(mem[b], norm2[b], write_ema[b], last_write[b], C(want.targets[b]), want.g[b],
                                    C(want.w[b]), c.t, eager, c.decay, new_scale, c.write_rate, c.ema_decay)
    assert_close(true_rows(mem, new_scale), want.new_memory, c.dt, "decay_and_write: memory after decay and write")
    assert_close(norm2, (mem.astype(np.float64) ** 2).sum(axis=2), c.dt, "decay_and_write: squared norms")
    assert_close(write_ema, want.new_write_ema, c.dt, "decay_and_write: write_ema")
    assert_equal(last_write, want.new_last_write, "decay_and_write: last_write")


@settings(max_examples=examples(30), deadline=None)
@given(sizes=writer_sizes(), seed=st.integers(0, 2**31), eager_decay=st.sampled_from([None, 0.0, 1e-7]))
def test_decay_and_write_matches_memory_write_forward(sizes, seed, eager_decay):
    if eager_decay is not None:
        sizes["decay"] = eager_decay
    check_decay_and_write(writer_case(seed, **sizes))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.9, 0.0], ids=["lazy_decay", "eager_decay"])
def test_decay_and_write_several_targets(decay, dtype):
    check_decay_and_write(writer_case(15, dtype, B=3, J=7, write_slots=3, decay=decay, theta="novel"))


# ---------------------------------------------------------------------------------------------------
# Decode: write / write_parallel
# ---------------------------------------------------------------------------------------------------
WRITE_KERNELS = [fast_writer.write, fast_writer.write_parallel]


def check_write(kernel, c):
    want = plain_write(c)
    mem, norm2, read_ema = c.stored.copy(), c.norm2.copy(), c.read_ema.copy()
    write_ema, last_write = c.write_ema.copy(), c.last_write.copy()
    targets = np.empty((c.B, c.write_slots), np.int64)
    g = np.empty(c.B, c.dt)
    novel = np.empty(c.B, np.bool_)
    name = kernel.__name__
    new_scale = kernel(C(want.w_raw), mem, norm2, c.scale, read_ema, write_ema, last_write, c.t, c.write_slots,
                       c.clip_max, c.beta, c.theta, c.stale_weight, c.underuse_weight, c.decay, c.write_rate,
                       c.ema_decay, targets, g, novel)
    assert new_scale == c.scale * c.decay, f"{name}: the decay is the scale's"
    assert_equal(targets, want.targets, f"{name}: targets")
    assert_close(g, want.g, c.dt, f"{name}: gate")
    assert_equal(novel, want.novel, f"{name}: branch")
    assert_close(true_rows(mem, new_scale), want.new_memory, c.dt, f"{name}: memory after decay and write")
    assert_close(norm2, (mem.astype(np.float64) ** 2).sum(axis=2), c.dt, f"{name}: squared norms of the stored rows")
    assert_close(write_ema, want.new_write_ema, c.dt, f"{name}: write_ema")
    assert_equal(last_write, want.new_last_write, f"{name}: last_write")
    assert_equal(read_ema, c.read_ema, f"{name}: read_ema is read, never written")


@pytest.mark.parametrize("kernel", WRITE_KERNELS, ids=lambda k: k.__name__)
@settings(max_examples=examples(30), deadline=None)
@given(sizes=writer_sizes(), seed=st.integers(0, 2**31))
def test_write_matches_writer_and_memory_write_forward(kernel, sizes, seed):
    check_write(kernel, writer_case(seed, **sizes))


@pytest.mark.parametrize("kernel", WRITE_KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("clip_max", [0.3, 100.0], ids=["clip", "no_clip"])
def test_write_every_branch(kernel, branch, clip_max, dtype):
    c = writer_case(12, dtype, B=3, J=7, write_slots=2, clip_max=clip_max, duplicates=0, **BRANCHES[branch][0])
    assert BRANCHES[branch][1](c, plain_write(c))
    check_write(kernel, c)


# ---------------------------------------------------------------------------------------------------
# Training: write_forward / write_backward
# ---------------------------------------------------------------------------------------------------
T_STEPS, STEP = 3, 1


def record(c):
    z = lambda *shape, dtype=c.dt: np.zeros(shape, dtype)   # noqa: E731
    T, B = T_STEPS, c.B
    return dict(TGT=z(T, B, c.write_slots, dtype=np.int64), GG=z(T, B), WRAW=z(T, B, c.d_m), WCL=z(T, B, c.d_m),
                NRAW=z(T, B), CLIP=z(T, B, dtype=np.bool_), SC=z(T, B), NW=z(T, B),
                JSTAR=z(T, B, dtype=np.int64), MSTAR=z(T, B, c.d_m), NMSTAR=z(T, B), DOTSTAR=z(T, B),
                NOVEL=z(T, B, dtype=np.bool_))


def check_write_forward(c):
    want = plain_write(c)
    i = STEP
    S = c.rng.standard_normal((T_STEPS + 1, c.B, c.tiers.shape[1])).astype(c.dt)
    S[i + 1] = c.tiers
    XW = np.zeros((T_STEPS, c.B, c.d0 + c.dK), c.dt)
    mem, norm2, read_ema = c.stored.copy(), c.norm2.copy(), c.read_ema.copy()
    write_ema, last_write = c.write_ema.copy(), c.last_write.copy()
    rec = record(c)
    eager = c.decay < 1e-6
    new_scale = fast_writer.write_forward(i, c.t, S, c.off0, c.d0, c.offK, c.dK, C(c.W_w.T), c.b_w, XW, mem, norm2,
                                          c.scale, read_ema, write_ema, last_write, c.write_slots, c.clip_max, c.beta,
                                          c.theta, c.stale_weight, c.underuse_weight, c.decay, c.write_rate,
                                          c.ema_decay, eager, *rec.values())
    assert new_scale == (c.scale if eager else c.scale * c.decay), "write_forward: the returned scale"
    assert_equal(XW[i], c.x_w, "write_forward: x_w = [s^0; s^{K-1}]")
    checks = dict(WRAW=want.w_raw, WCL=want.w, NRAW=want.n_raw, SC=want.scale, NW=want.n_w, MSTAR=want.m_star,
                  NMSTAR=want.n_m_star, DOTSTAR=want.dot_star, GG=want.g)
    for name, value in checks.items():
        assert_close(rec[name][i], value, c.dt, f"write_forward: {name}")
    for name, value in dict(CLIP=want.clipped, JSTAR=want.j_star, NOVEL=want.novel, TGT=want.targets).items():
        assert_equal(rec[name][i], value, f"write_forward: {name}")
    assert_close(true_rows(mem, new_scale), want.new_memory, c.dt, "write_forward: memory after decay and write")
    assert_close(norm2, (mem.astype(np.float64) ** 2).sum(axis=2), c.dt, "write_forward: squared norms")
    assert_close(write_ema, want.new_write_ema, c.dt, "write_forward: write_ema")
    assert_equal(last_write, want.new_last_write, "write_forward: last_write")
    for name, X in rec.items():
        assert not X[[0, 2]].any(), f"write_forward wrote {name} outside step {i}"


@settings(max_examples=examples(30), deadline=None)
@given(sizes=writer_sizes(), seed=st.integers(0, 2**31), eager_decay=st.sampled_from([None, 0.0, 1e-7]))
def test_write_forward_matches_writer_and_memory_write_forward(sizes, seed, eager_decay):
    if eager_decay is not None:
        sizes["decay"] = eager_decay
    check_write_forward(writer_case(seed, **sizes))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("clip_max", [0.3, 100.0], ids=["clip", "no_clip"])
@pytest.mark.parametrize("decay", [0.9, 0.0], ids=["lazy_decay", "eager_decay"])
def test_write_forward_every_branch(branch, clip_max, decay, dtype):
    c = writer_case(13, dtype, B=3, J=7, write_slots=2, clip_max=clip_max, decay=decay, **BRANCHES[branch][0])
    assert BRANCHES[branch][1](c, plain_write(c))
    check_write_forward(c)


def check_write_backward(c, c_old=0.7):
    """write_backward on a tape of the plain forward's values, against memory_write_backward then
    writer_backward: dM after the write is c_old·D; after the kernel c_new·D is dM before the decay plus d m_j*;
    d w_raw in DWR (checked through d x_w, dW_w, db_w); d x_w into DS."""
    want = plain_write(c)
    i, rng = STEP, c.rng
    rec = record(c)
    for name, value in dict(TGT=want.targets, GG=want.g, WCL=want.w, WRAW=want.w_raw, NRAW=want.n_raw,
                            CLIP=want.clipped, SC=want.scale, NW=want.n_w, JSTAR=want.j_star, MSTAR=want.m_star,
                            NMSTAR=want.n_m_star, DOTSTAR=want.dot_star, NOVEL=want.novel).items():
        rec[name][i] = value
    DS0 = rng.standard_normal((c.B, c.tiers.shape[1])).astype(c.dt)
    D0 = rng.standard_normal((c.B, c.J, c.d_m)).astype(c.dt)
    DS, D = DS0.copy(), D0.copy()
    DWR = np.zeros((T_STEPS, c.B, c.d_m), c.dt)
    eager = c.decay < 1e-6
    c_new = c_old if eager else c_old * c.decay
    r = rec
    fast_writer.write_backward(i, DS, D, c_old, c_new, r["TGT"], r["GG"], r["WCL"], r["WRAW"], r["NRAW"],
                               r["CLIP"], r["SC"], r["NW"], r["JSTAR"], r["MSTAR"], r["NMSTAR"], r["DOTSTAR"],
                               r["NOVEL"], c.write_rate, c.beta, c.clip_max, c.W_w, DWR, c.off0, c.d0, c.offK, c.dK,
                               eager, c.decay)
    d_before, d_w, d_g = memory_write_backward(c_old * D0.astype(np.float64), want.targets, want.g, want.w,
                                               decay=c.decay, write_rate=c.write_rate)
    d_x_w, d_m_star, dW_w, db_w = writer_backward(d_w, d_g, want.cache, c.W_w)
    want_dM = d_before + scatter_add((c.B, c.J, c.d_m), want.j_star[:, None], d_m_star[:, None, :])
    assert_close(c_new * D.astype(np.float64), want_dM, c.dt, "write_backward: dM before the step", factor=10)
    assert_close(DWR[i] @ c.W_w, d_x_w, c.dt, "write_backward: d x_w = d w_raw W_w")
    assert_close(DWR[i].T @ c.x_w, dW_w, c.dt, "write_backward: dW_w from d w_raw")
    assert_close(DWR[i].sum(axis=0), db_w, c.dt, "write_backward: db_w from d w_raw")
    want_DS = DS0.astype(np.float64)
    want_DS[:, c.off0:c.off0 + c.d0] += d_x_w[:, :c.d0]
    want_DS[:, c.offK:c.offK + c.dK] += d_x_w[:, c.d0:]
    assert_close(DS, want_DS, c.dt, "write_backward: the tier gradients")
    assert not DWR[[0, 2]].any(), "write_backward wrote DWR outside step i"


@settings(max_examples=examples(30), deadline=None)
@given(sizes=writer_sizes(), seed=st.integers(0, 2**31), eager_decay=st.sampled_from([None, 0.0, 1e-7]),
       c_old=st.sampled_from([1.0, 0.7, 5.0]))
def test_write_backward_matches_memory_write_and_writer_backward(sizes, seed, eager_decay, c_old):
    if eager_decay is not None:
        sizes["decay"] = eager_decay
    check_write_backward(writer_case(seed, **sizes), c_old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("clip_max", [0.3, 100.0], ids=["clip", "no_clip"])
@pytest.mark.parametrize("decay", [0.9, 0.0], ids=["lazy_decay", "eager_decay"])
def test_write_backward_every_branch(branch, clip_max, decay, dtype):
    c = writer_case(14, dtype, B=3, J=7, write_slots=2, clip_max=clip_max, decay=decay, **BRANCHES[branch][0])
    want = plain_write(c)
    assert BRANCHES[branch][1](c, want)
    if branch != "refine":   # the novelty gate's gradient is really there
        assert np.all((want.g > 0.05) & (want.g < 0.95))
    check_write_backward(c)
