"""Whole-model finite differences (spec §5) through ``value_and_grad`` in float64.

Hypothesis draws small configs (K = 1..3 with varied widths and clocks, 1..3 heads, κ and W_w up to J,
local_window 0..4, slot capacity, η ∈ {0.05, 1}, the load-balance term, novelty thresholds giving both
writer branches, clip limits that do and do not clip), random mid-run states (memory with empty rows,
read_ema, last_write, timestep, a partly or fully filled local buffer) or the zero state, sequences of
1..8 tokens, batch 1..2, with and without Gumbel noise. For a random subset of parameter coordinates and
of initial-state coordinates the analytic gradient is compared with central differences of the loss;
a probe whose ±eps forward changes any discrete choice spec §5 holds fixed (top-κ idx, capacity mask,
write targets, novel/refine branch, j*, clip branch) is skipped and counted.
"""
import numpy as np
import pytest
from helpers import (
    FDReport,
    configs,
    examples,
    fd_check,
    loss_and_choices,
    random_params,
    random_state,
    tiny_config,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from thl_np.components.registry import has_fast_path
from thl_np.model import THLModel, value_and_grad
from thl_np.step import run_sequence

EPS = 1e-6
RTOL = 1e-6
ATOL = 1e-6          # × the largest analytic gradient entry of the group checked
MAX_PARAM_PROBES = 40
MAX_STATE_PROBES = 30
MIN_CHECKED = 0.6    # per example; the pooled fraction over the fixed cases must be higher


def _choose(rng, sizes: dict, budget: int) -> dict:
    """At least one flat index per tensor (while the budget lasts), the rest spread at random."""
    names = list(sizes)
    rng.shuffle(names)
    chosen = {n: set() for n in names}
    for n in names[:budget]:
        chosen[n].add(int(rng.integers(sizes[n])))
    pool = [(n, i) for n in names for i in range(sizes[n]) if i not in chosen[n]]
    left = budget - sum(len(v) for v in chosen.values())
    for k in rng.permutation(len(pool))[:max(left, 0)]:
        n, i = pool[k]
        chosen[n].add(i)
    return {n: sorted(v) for n, v in chosen.items() if v}


def _branches(model, ids, state, U):
    """Which rarely-reached branches one run takes (for hypothesis' statistics and the coverage test)."""
    c = model.config
    _, _, tape = run_sequence(model.params, c, ids, state.copy(), U, record=True)
    out = set()
    for rec in tape:
        out.add("novel" if rec.writer.novel.any() else "refine")
        if (~rec.writer.novel).any():
            out.add("refine")
        if rec.writer.clipped.any():
            out.add("clipped")
        if (~rec.writer.clipped).any():
            out.add("unclipped")
        if rec.router.cap_mask is not None and (rec.router.cap_mask == 0).any():
            out.add("capacity-masked")
    n0 = int(state.local_valid)
    if c.local_window and n0 + ids.shape[1] > c.local_window:
        out.add("buffer-rollover")
    return out


def check_model_gradients(model, ids, targets, state, U, rng, reports=None):
    """Compare value_and_grad's parameter and initial-state gradients with central differences (the plain
    path, the spec), and the fast path's (the default) with the plain path's."""
    c = model.config
    loss, grads, d_state = value_and_grad(model, ids, targets, state=state, gumbel_uniform=U,
                                          return_state_grad=True, path="plain")
    fast_path = "fast" if has_fast_path(c) else "plain"   # a variant without kernels: plain against itself
    loss_f, grads_f, d_state_f = value_and_grad(model, ids, targets, state=state, gumbel_uniform=U,
                                                return_state_grad=True, path=fast_path)
    assert abs(loss_f - loss) <= 1e-12 * max(1.0, abs(loss))
    for plain, fast in ((grads, grads_f), (d_state, d_state_f)):
        scale = max([float(np.abs(g).max()) for g in plain.values() if g.size] + [1e-300])
        for name, g in plain.items():
            assert fast[name].shape == g.shape, name
            if g.size:
                assert np.abs(fast[name] - g).max() <= 1e-9 * scale, f"fast path differs from plain at {name}"
    loss0, _ = loss_and_choices(model.params, c, ids, targets, state, U)
    assert abs(loss - loss0) <= 1e-12 * max(1.0, abs(loss)), (loss, loss0)
    assert set(grads) == set(model.params)
    for name, p in model.params.items():
        assert grads[name].shape == p.shape and grads[name].dtype == p.dtype, name
    assert np.all(grads["writer.W_r.weight"] == 0), "writer.W_r is unused by the step: its gradient is 0"
    K = c.num_tiers
    assert set(d_state) == {"memory", "read_ema", "local_buffer"} | {f"tier_state_{k}" for k in range(K)}

    def f(_):
        return loss_and_choices(model.params, c, ids, targets, state, U)

    # parameters
    coords = _choose(rng, {n: p.size for n, p in model.params.items()}, MAX_PARAM_PROBES)
    inputs = {n: model.params[n] for n in coords}
    scale = max(float(np.abs(g).max()) for g in grads.values())
    rep_p = fd_check(f, inputs, grads, coords=coords, eps=EPS, rtol=RTOL, atol=ATOL, scale=scale)

    # the initial state: an empty memory row (‖m‖ = 0, the norm's kink, and an emptiness test) is left out
    arrays = {"memory": state.memory, "read_ema": state.read_ema, "local_buffer": state.local_buffer}
    arrays.update({f"tier_state_{k}": state.tiers[k] for k in range(K)})
    full = np.linalg.norm(state.memory, axis=2) > 1e-6
    mem_ok = np.flatnonzero(np.repeat(full[..., None], c.memory_dim, axis=2))
    sizes = {n: a.size for n, a in arrays.items() if a.size and n != "memory"}
    if not state.read_ema.any():  # the zero state: every slot ties at read_ema = 0, any probe reorders them
        del sizes["read_ema"]
    if mem_ok.size:
        sizes["memory"] = mem_ok.size
    s_coords = _choose(rng, sizes, MAX_STATE_PROBES)
    if "memory" in s_coords:
        s_coords["memory"] = [int(mem_ok[i]) for i in s_coords["memory"]]
    s_inputs = {n: arrays[n] for n in s_coords}
    s_grads = {n: d_state[n] for n in s_coords}
    # the scale: every state gradient but the empty rows' (whose 1/(‖m‖ + 1e-8) factor is ~1e8)
    s_scale = max([float(np.abs(d_state[n]).max()) for n in sizes if n != "memory"]
                  + [float(np.abs(d_state["memory"][full]).max()) if full.any() else 0.0, 1e-12])
    rep_s = fd_check(f, s_inputs, s_grads, coords=s_coords, eps=EPS, rtol=RTOL, atol=ATOL, scale=s_scale)
    # a local buffer row not yet filled is never read: no gradient
    n0 = int(state.local_valid)
    assert np.all(d_state["local_buffer"][:, n0:] == 0)
    if reports is not None:
        reports.extend([rep_p, rep_s])
    return rep_p, rep_s


def _draw_run(data, cfg, rng):
    B = data.draw(st.integers(1, 2), label="B")
    T = data.draw(st.integers(1, 8), label="T")
    fresh = data.draw(st.booleans(), label="zero state")
    noise = data.draw(st.booleans(), label="gumbel")
    model = THLModel(cfg, params=random_params(cfg, rng))
    state = model.init_state(B) if fresh else random_state(cfg, B, rng)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    U = rng.random((T, B, cfg.num_heads, cfg.memory_slots)) if noise else None
    return model, ids, targets, state, U


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=configs(), data=st.data())
def test_value_and_grad_matches_finite_differences(cfg, data):
    """Spec §5: value_and_grad is the exact derivative of the loss (mean cross-entropy + λ·mean KL load
    balance) with every discrete choice held, w.r.t. every parameter and the initial state (memory,
    read_ema, tier states, local buffer)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    model, ids, targets, state, U = _draw_run(data, cfg, rng)
    for b in sorted(_branches(model, ids, state, U)):
        event(b)
    rep_p, rep_s = check_model_gradients(model, ids, targets, state, U, rng)
    rep_p.assert_ok(MIN_CHECKED, slack=1)
    if rep_s.total:
        rep_s.assert_ok(MIN_CHECKED, min_checked=0, slack=1)


# ---------------------------------------------------------------------------------------------------
# Fixed cases: every branch the conformance cases never reach, guaranteed to be taken
# ---------------------------------------------------------------------------------------------------
FIXED = {
    # K = 1: s^0 and s^{K-1} are the same tensor, used twice by the router and the writer
    "one_tier": dict(num_tiers=1, tier_dims=[4], tier_timescales=[1], local_window=2, novelty_theta=0.3),
    # full buffer roll-over, slot capacity, W_w > 1, η ≠ 1, load balance, clipping
    "capacity_rollover": dict(local_window=2, read_slot_capacity=1, num_heads=2, read_topk=2, write_slots=2,
                              write_rate=0.05, router_load_balance_lambda=0.5, write_clip_max=0.3),
    # no local attention, three tiers with uneven clocks, refinement (θ high), no clip
    "no_local_refine": dict(local_window=0, num_tiers=3, tier_dims=[3, 4, 2], tier_timescales=[1, 3, 2],
                            novelty_theta=1.2, write_clip_max=100.0, write_slots=3),
    # novel writes into a full memory (targets by staleness + underuse), noise, capacity 2
    "novel_full": dict(novelty_theta=-0.5, read_slot_capacity=2, num_heads=3, value_dim=6, read_topk=3,
                       memory_slots=5, load_penalty=1.0),
    # the built-in router variant (scores by the slot's unit row), with capacity and noise
    "unit_keys": dict(components={"router": "unit_keys"}, read_slot_capacity=1, num_heads=2, read_topk=2,
                      novelty_theta=-0.5),
    # the router variant in which an empty slot ranks below every written one (empty slots left to be
    # picked: κ = 3 of 4 slots with 40% of them empty), with capacity and noise
    "empty_last": dict(components={"router": "empty_last"}, read_slot_capacity=1, num_heads=2, read_topk=3,
                       memory_slots=4, novelty_theta=-0.5),
    # the router variant that reads unit rows for scores and values (plain path only), capacity and noise
    "unit_rows": dict(components={"router": "unit_rows"}, read_slot_capacity=1, num_heads=2, read_topk=2,
                      novelty_theta=-0.5),
    # the built-in memory-write variant: a slot decays by the steps since its last write (γ far from 1)
    "decay_on_write": dict(components={"memory_write": "decay_on_write"}, memory_decay=0.7, write_slots=2,
                           novelty_theta=0.3),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_cases(name):
    """Spec §5 on hand-picked configs that force the branches listed in FIXED (and assert they were taken)."""
    cfg = tiny_config(**FIXED[name])
    reports, seen = [], set()
    for seed in range(3):
        rng = np.random.default_rng([seed, len(name)])
        B, T = 2, 7
        model = THLModel(cfg, params=random_params(cfg, rng))
        empty = 0.0 if name == "novel_full" else 0.4
        state = random_state(cfg, B, rng, empty_fraction=empty, local_valid=min(1, cfg.local_window))
        ids = rng.integers(0, cfg.vocab_size, (B, T))
        targets = rng.integers(0, cfg.vocab_size, (B, T))
        U = rng.random((T, B, cfg.num_heads, cfg.memory_slots)) if seed != 1 else None
        seen |= _branches(model, ids, state, U)
        for rep in check_model_gradients(model, ids, targets, state, U, rng, reports):
            rep.assert_ok(MIN_CHECKED)
    pooled = FDReport(checked=sum(r.checked for r in reports), skipped=sum(r.skipped for r in reports))
    pooled.assert_ok(0.9)
    want = {
        "one_tier": {"novel"},
        "capacity_rollover": {"capacity-masked", "buffer-rollover", "clipped"},
        "no_local_refine": {"refine", "unclipped"},
        "novel_full": {"novel", "capacity-masked"},
        "unit_keys": {"novel", "capacity-masked"},
        "empty_last": {"novel", "capacity-masked"},
        "unit_rows": {"novel", "capacity-masked"},
        "decay_on_write": {"novel", "refine"},
    }[name]
    assert want <= seen, f"{name} was meant to take {sorted(want)}, took {sorted(seen)}"


def test_gradcheck_catches_a_broken_backward():
    """The check itself: a 1% error in one backward (the GRU's update-gate bias), registered as a GRU
    variant and chosen by the config, is caught."""
    from thl_np.components.gru import gru_backward, gru_forward
    from thl_np.components.registry import register

    def broken(*a, **k):
        d_s, d_x, g = gru_backward(*a, **k)
        g["b_z"] = g["b_z"] * 1.01
        return d_s, d_x, g

    register("gru", "test_broken_b_z", gru_forward, broken, replace=True)
    cfg = tiny_config(components={"gru": "test_broken_b_z"})
    rng = np.random.default_rng(5)
    model = THLModel(cfg, params=random_params(cfg, rng))
    state = random_state(cfg, 1, rng)
    ids = rng.integers(0, cfg.vocab_size, (1, 4))
    loss, grads = value_and_grad(model, ids, ids, state=state, path="plain")

    def f(_):
        return loss_and_choices(model.params, cfg, ids, ids, state)

    name = "tiers.cells.0.W_z.bias"
    rep = fd_check(f, {name: model.params[name]}, grads, eps=EPS, rtol=RTOL, atol=ATOL)
    assert rep.failures
