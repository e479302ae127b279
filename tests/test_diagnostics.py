"""Memory diagnostics (thl_np.eval.diagnostics) and the passkey trace (thl_np.eval.trace): every statistic defined once,
the fast and the plain path feeding it the same choices, in decoding and in training."""
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fast_decode import configs, small_config

from thl_np import THLConfig, THLModel
from thl_np.engines.decoder import FastDecoder
from thl_np.engines.plain_decoder import PlainDecoder
from thl_np.errors import InputError
from thl_np.eval.diagnostics import MemoryStats, observe_decoder, plot_diagnostics, summary_lines
from thl_np.eval.trace import passkey_trace, passkey_trial, trace_lines
from thl_np.memory_steps import NOVEL_EVICT, REFINE, MemoryObserver, MemorySteps, empty_slots, track_empty
from thl_np.model import value_and_grad


def observed(decoder, ids):
    """Every step's MemorySteps of a run, and the summary with the final state."""
    obs = MemoryObserver(decoder)
    steps = [obs.step(ids[:, t])[1] for t in range(ids.shape[1])]
    stats = MemoryStats(decoder.config.memory_slots)
    for s in steps:
        stats.add(s)
    return steps, stats.summary(decoder.state())


def assert_same_summary(a, b, tol=1e-9):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert a[key] == pytest.approx(b[key], abs=tol), key
        elif isinstance(a[key], list):
            assert np.allclose(a[key], b[key], rtol=0, atol=tol), key
        elif a[key] is None or isinstance(a[key], int):
            assert a[key] == b[key], key
        else:
            assert a[key] == pytest.approx(b[key], abs=tol), key


# ---------------------------------------------------------------------------------------------------
# the two decoding paths give the same choices and the same figures
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2**16), B=st.integers(1, 2), T=st.integers(1, 40))
def test_fast_and_plain_sessions_give_the_same_steps_and_figures(cfg, seed, B, T):
    model = THLModel(cfg, seed=seed)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
    fast_steps, fast = observed(FastDecoder(model, batch_size=B), ids)
    plain_steps, plain = observed(PlainDecoder(model, batch_size=B), ids)
    for f, p in zip(fast_steps, plain_steps, strict=True):
        assert f.t0 == p.t0
        for name in ("idx", "targets", "novel", "had_empty"):
            assert np.array_equal(getattr(f, name), getattr(p, name)), name
        assert np.allclose(f.alpha, p.alpha, rtol=0, atol=1e-10)
        assert np.allclose(f.g, p.g, rtol=0, atol=1e-10)
    assert_same_summary(fast, plain)


def test_empty_test_is_the_writers_and_tracking_it_agrees_with_the_bank():
    """had_empty read off the bank (decoding) equals had_empty followed from the writes (a training tape)."""
    model = THLModel(small_config(memory_slots=8, novelty_theta=-0.5), seed=3)   # every write novel
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 30))
    steps, _ = observed(FastDecoder(model, batch_size=2), ids)
    targets = np.concatenate([s.targets for s in steps])
    exact = np.concatenate([s.had_empty for s in steps])
    assert exact[:8].all() and not exact[8:].any()   # 8 novel writes fill the 8 slots, then evictions
    assert np.array_equal(track_empty(np.ones((2, 8), bool), targets), exact)
    assert empty_slots(np.zeros((1, 3, 4))).all()
    assert not empty_slots(np.full((1, 1, 4), 1e-6)).any()   # norm 2e-6 > 1e-6


@pytest.mark.parametrize("gumbel", [False, True])
def test_training_tapes_fast_and_plain_give_the_same_figures(gumbel):
    cfg = small_config(write_slots=2, read_slot_capacity=1, router_load_balance_lambda=0.2)
    model = THLModel(cfg, seed=5)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 25))
    U = rng.random((25, 2, cfg.num_heads, cfg.memory_slots)) if gumbel else None
    got = {}
    for path in ("fast", "plain"):
        stats = MemoryStats(cfg.memory_slots)
        _, _, state = value_and_grad(model, ids, ids, gumbel_uniform=U, return_state=True, path=path,
                                     observe=stats.add)
        got[path] = stats.summary(state)
    assert_same_summary(got["fast"], got["plain"])
    if not gumbel:   # without noise the training forward makes the decoding session's choices
        assert_same_summary(got["fast"], observed(FastDecoder(model, batch_size=2), ids)[1])


# ---------------------------------------------------------------------------------------------------
# each statistic on choices worked out by hand
# ---------------------------------------------------------------------------------------------------
def test_statistics_by_hand():
    # 2 steps, 1 sequence, 2 heads, κ = 2, J = 4
    idx = np.array([[[[0, 1], [0, 2]]], [[[3, 1], [1, 0]]]])
    alpha = np.array([[[[0.5, 0.5], [1.0, 0.0]]], [[[0.75, 0.25], [0.5, 0.5]]]])
    steps = MemorySteps(t0=10, idx=idx, alpha=alpha, targets=np.array([[[2]], [[2]]]), g=np.array([[0.6], [1.0]]),
                        novel=np.array([[True], [False]]), had_empty=np.array([[False], [False]]))
    assert steps.branch.tolist() == [[NOVEL_EVICT], [REFINE]]
    stats = MemoryStats(4, keep_series=True)
    stats.add(steps)
    s = stats.summary()
    ln2 = np.log(2)
    h = lambda p: -sum(x * np.log(x) for x in p if x > 0)   # noqa: E731
    assert s["read_entropy_per_head"] == pytest.approx([(ln2 + h([0.75, 0.25])) / 2, ln2 / 2])
    assert s["read_entropy"] == pytest.approx((ln2 + h([0.75, 0.25]) + ln2) / 4)
    assert s["top1_mass"] == pytest.approx((0.5 + 1.0 + 0.75 + 0.5) / 4)
    assert s["slots_read"] == pytest.approx((3 + 3) / 2)
    mass = np.array([0.5 + 1.0 + 0.5, 0.5 + 0.25 + 0.5, 0.0, 0.75])   # A summed over the window
    assert s["effective_slots"] == pytest.approx(np.exp(h(mass / mass.sum())))
    assert s["read_count_hist"] == {"0": 0.0, "1": 0.5, "2-9": 0.5, "10-99": 0.0, "100+": 0.0}
    assert (s["share_refine"], s["share_novel_empty"], s["share_novel_evict"]) == (0.5, 0.0, 0.5)
    assert s["mean_gate"] == pytest.approx(0.8) and s["mean_gate_novel"] == pytest.approx(0.6)
    assert (s["overwrites"], s["overwrites_max"], s["slots_written"]) == (1.0, 1, 1.0)
    series = stats.series_arrays()
    assert series["t"].tolist() == [10, 11] and series["branch"].tolist() == [NOVEL_EVICT, REFINE]
    assert np.allclose(series["A"][1], [0.5, 0.75, 0.0, 0.75])


def test_state_figures_and_errors():
    cfg = small_config(memory_slots=3)
    state = THLModel(cfg, seed=0).init_state(1)
    state.memory[0, 0] = [3.0, 4.0] + [0.0] * 5   # norm 5, written at t = 2
    state.last_write[0, 0] = 2
    state.timestep = 10
    steps = MemorySteps(t0=9, idx=np.zeros((1, 1, 2, 2), int), alpha=np.full((1, 1, 2, 2), 0.5),
                        targets=np.zeros((1, 1, 1), int), g=np.ones((1, 1)), novel=np.zeros((1, 1), bool),
                        had_empty=np.ones((1, 1), bool))
    stats = MemoryStats(3)
    with pytest.raises(InputError, match="no memory steps"):
        stats.summary()
    stats.add(steps)
    s = stats.summary(state)
    assert (s["slot_norm_max"], s["empty_slots"], s["slot_age_max"]) == (5.0, 2.0, 7)
    assert any("bank at the end" in line for line in summary_lines(s))
    with pytest.raises(InputError, match="one MemoryStats per run"):
        stats.add(MemorySteps(0, np.zeros((1, 2, 2, 2), int), np.ones((1, 2, 2, 2)), np.zeros((1, 2, 1), int),
                              np.ones((1, 2)), np.zeros((1, 2), bool), np.zeros((1, 2), bool)))
    state.memory[0, 1, 0] = np.nan
    with pytest.raises(InputError, match="not finite"):
        stats.summary(state)


def test_plot_needs_matplotlib_or_draws(tmp_path, monkeypatch):
    model = THLModel(small_config(), seed=1)
    stats = observe_decoder(model.decoder(), np.arange(30)[None, :] % 37, MemoryStats(6, keep_series=True))
    out = tmp_path / "slots.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match=r"thl-np\[plot\]"):
            plot_diagnostics(stats.series_arrays(), out, 6)
        return
    assert plot_diagnostics(stats.series_arrays(), out, 6) == str(out) and out.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(InputError, match=r"thl-np\[plot\]"):
        plot_diagnostics(stats.series_arrays(), tmp_path / "again.png", 6)


# ---------------------------------------------------------------------------------------------------
# the passkey trace
# ---------------------------------------------------------------------------------------------------
def byte_model(seed=2, router="spec"):
    cfg = THLConfig(vocab_size=259, dim=8, num_tiers=2, tier_dims=[8, 8], tier_timescales=[1, 4], local_window=4,
                    memory_slots=8, head_dim=4, query_dim=4, num_heads=2, read_topk=2, dtype="float64",
                    components={"router": router})
    return THLModel(cfg, seed=seed)


@pytest.mark.parametrize("router", ["spec", "unit_keys"])
def test_trace_fast_equals_plain_and_follows_the_key(router):
    model = byte_model(router=router)
    tr = {path: passkey_trace(model, 200, seed=3, path=path) for path in ("fast", "plain")}
    f, p = tr["fast"], tr["plain"]
    trial = passkey_trial(200, seed=3)
    assert f["key"] == trial["key"] and trial["prompt"][f["key_start"]:f["key_end"]].count(f["key"].encode()) == 2
    assert (f["path"], p["path"]) == ("fast", "plain")
    assert len(f["written"]) == f["key_end"] - f["key_start"]   # one write per byte of the key line
    assert sum(w["digit"] for w in f["written"]) == 10           # the key, twice
    assert f["answer"] == p["answer"]
    assert_close_tree(f["written"], p["written"])
    assert_close_tree(f["question"], p["question"])
    assert_close_tree(f["key_slots"], p["key_slots"])
    # each question step's ranks agree with what the router read: a key slot is picked iff some head ranks it < κ
    kappa = model.config.read_topk
    for step in f["question"]:
        assert step["picked"] == sorted(j for j, r in step["ranks"].items() if min(r) < kappa)
        assert set(step["picked_digit_slots"]) <= set(step["picked"])
    # the key slots are exactly the slots written during the key line; their events come after it
    assert {s["slot"] for s in f["key_slots"]} == {j for w in f["written"] for j in w["slots"]}
    for s in f["key_slots"]:
        for e in s["refines"] + s["fills"] + s["evictions"] + s["reads"]:
            assert f["key_end"] <= e["step"] < 200
        assert s["decay_alone"] == pytest.approx(model.config.memory_decay ** (199 - (f["key_end"] - 1)))
    text = "\n".join(trace_lines(f))
    assert "key line:" in text and "question (steps" in text and f"slot {f['key_slots'][0]['slot']:>3}" in text


def assert_close_tree(a, b, tol=1e-9, where="trace"):
    """Equal nested dicts/lists, floats within tol."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close_tree(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_tree(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=tol), where
    else:
        assert a == b, where


def test_trace_follows_the_decay_of_the_chosen_memory_write():
    """Under ``decay_on_write`` a slot decays only when written, by γ^(steps since its last write): a key slot
    never written after the key line keeps decay 1, one written again at steps t_1 < ... < t_n has decayed
    by γ^(t_n − its last key-line write). The spec's decay is γ^(steps since the key line) for every slot."""
    base = byte_model().config.replace(memory_decay=0.97)
    for choice in (None, {"memory_write": "decay_on_write"}):
        model = THLModel(base.replace(components=choice), seed=5)
        tr = passkey_trace(model, 200, seed=3, path="plain")
        gamma, k1 = model.config.memory_decay, tr["key_end"]
        rewritten = 0
        for s in tr["key_slots"]:
            steps = [e["step"] for e in s["refines"] + s["fills"] + s["evictions"]]
            if choice is None:
                want = gamma ** (199 - (k1 - 1))
            else:
                want = gamma ** (max(steps) - s["last_key_write"]) if steps else 1.0
            rewritten += bool(steps)
            assert s["decay_alone"] == pytest.approx(want, rel=1e-12), (choice, s["slot"])
            # the figure says what happened to the row: with nothing written into it after the key line,
            # the row's norm moved by exactly its decay alone
            if not steps:
                assert s["norm_at_end"] == pytest.approx(s["decay_alone"] * s["norm_after_key_line"], rel=1e-9)
        assert rewritten and rewritten < len(tr["key_slots"])    # both kinds of slot were checked


def test_trace_key_share_is_one_for_slots_only_the_key_line_wrote():
    """Every write novel (θ < 0) into a bank larger than the prompt: each byte fills a fresh slot, so a key slot
    holds exactly its key-line write (share 1; its digits' share 1 at a digit's slot, 0 elsewhere)."""
    cfg = byte_model().config.replace(memory_slots=256, novelty_theta=-0.5)
    model = THLModel(cfg, seed=4)
    tr = passkey_trace(model, 200, seed=1, path="fast")
    assert all(w["branch"] == "novel_empty" for w in tr["written"])
    digit_slots = {j for w in tr["written"] if w["digit"] for j in w["slots"]}
    for s in tr["key_slots"]:
        assert s["writes_in_key_line"] == 1 and not (s["refines"] or s["evictions"] or s["fills"])
        assert s["key_share_at_end"] == pytest.approx(1.0, abs=1e-9)
        assert s["digit_share_at_end"] == pytest.approx(1.0 if s["slot"] in digit_slots else 0.0, abs=1e-9)
