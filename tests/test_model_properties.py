"""Properties of the model as a recurrent function (spec §3, §4.9) and of THLConfig (spec §1), on tiny
float64 configs drawn by hypothesis: a bounded state, resumable runs, step/sequence equivalence,
untouched inputs, float32 ≈ float64, the InferenceState.init forms, config.json round trips and
validation errors that name the field."""
import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    configs,
    discrete_choices,
    examples,
    random_params,
    random_state,
    same_choices,
    state_equal,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from thl_np.config import THLConfig
from thl_np.errors import ConfigError, StateError
from thl_np.model import THLModel, value_and_grad
from thl_np.state import InferenceState
from thl_np.step import run_sequence

CONFORMANCE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance").resolve()
SETTINGS = settings(max_examples=examples(20), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


PATHS = pytest.mark.parametrize("path", ["plain", "auto"])
FAST_RTOL = 1e-10   # DESIGN.md: the fast path agrees with the plain one to 1e-10 in float64


def _setup(cfg, data, dtype=np.float64):
    """A model with random weights, a random or zero start state, and random ids [B, T] (T ≥ 2)."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    B = data.draw(st.integers(1, 2), label="B")
    T = data.draw(st.integers(2, 12), label="T")
    rng = np.random.default_rng(seed)
    model = THLModel(cfg, params=random_params(cfg, rng), dtype=dtype)
    state = model.init_state(B) if data.draw(st.booleans(), label="zero state") else random_state(cfg, B, rng)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    return model, state, ids, rng


def _layout(state):
    return {k: (a.shape, a.dtype) for k, a in state.arrays().items()}


EXACT, ROUNDING = 0.0, 1e-13   # bit for bit; the rounding of a matmul whose shape differs (the output head)


def _tol(path, plain_tol=EXACT):
    return plain_tol if path == "plain" else FAST_RTOL


def _same(a, b, tol, what=""):
    """Arrays equal to relative ``tol`` of their scale (0: bit for bit); integer arrays always exactly."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if tol == 0 or a.dtype.kind in "iub":
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        scale = max(1.0, float(np.abs(b).max(initial=0)))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)


def _same_state(a, b, tol):
    xa, xb = a.arrays(), b.arrays()
    assert xa.keys() == xb.keys()
    for k in xa:
        _same(xa[k], xb[k], tol, f"state {k}")


# ---------------------------------------------------------------------------------------------------
# Spec §3: a bounded state
# ---------------------------------------------------------------------------------------------------
@PATHS
@SETTINGS
@given(cfg=configs(), data=st.data())
def test_state_layout_never_grows(path, cfg, data):
    """Spec §3: the state's keys, shapes, dtypes and bytes are fixed by the config and batch, whatever
    the number of steps; local_valid ≤ W_loc; the timestep counts the steps."""
    model, state, ids, _ = _setup(cfg, data)
    B = ids.shape[0]
    layout, nbytes = _layout(state), state.nbytes
    assert layout == _layout(model.init_state(B)) and nbytes == model.init_state(B).nbytes
    t0, n0 = state.timestep, state.local_valid
    for chunk in (ids[:, :1], ids, ids[:, :3], ids):
        _, state = model(chunk, state=state, path=path)
        assert _layout(state) == layout and state.nbytes == nbytes
        assert 0 <= state.local_valid <= cfg.local_window
    _, state = model.forward_step(ids[:, 0], state=state, path=path)
    assert _layout(state) == layout and state.nbytes == nbytes
    steps = 2 + 2 * ids.shape[1] + min(3, ids.shape[1])
    assert state.timestep == t0 + steps
    assert state.local_valid == min(cfg.local_window, n0 + steps)


# ---------------------------------------------------------------------------------------------------
# Spec §4.9: a sequence is T steps, resumable anywhere
# ---------------------------------------------------------------------------------------------------
@PATHS
@SETTINGS
@given(cfg=configs(), data=st.data())
def test_save_load_continue_equals_uninterrupted(path, cfg, data):
    """Spec §3 (the state file): run, save the state to .npz, load it, continue — the same logits and final
    state as one uninterrupted run: bit for bit on the plain path, to 1e-10 on the fast path (whose
    caches are rebuilt from the loaded state)."""
    model, state, ids, _ = _setup(cfg, data)
    cut = data.draw(st.integers(1, ids.shape[1] - 1), label="cut")
    full_logits, full_state = model(ids, state=state, path=path)
    first, mid = model(ids[:, :cut], state=state, path=path)
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "state.npz")
        mid.save(file)
        loaded = InferenceState.load(file)
    assert state_equal(loaded, mid)
    second, end = model(ids[:, cut:], state=loaded, path=path)
    # the state bit for bit; the logits up to the rounding of the head's matmul over [B, T1] vs [B, T]
    _same(np.concatenate([first, second], axis=1), full_logits, _tol(path, ROUNDING), "logits")
    _same_state(end, full_state, _tol(path))


@PATHS
@SETTINGS
@given(cfg=configs(), data=st.data())
def test_sequence_equals_steps(path, cfg, data):
    """Spec §4: `model(ids)` over T equals T `forward_step` calls (the state bit for bit on the plain path;
    logits to the rounding of the output head's matmul shape)."""
    model, state, ids, _ = _setup(cfg, data)
    logits, final = model(ids, state=state, path=path)
    s = state
    for t in range(ids.shape[1]):
        step_logits, s = model.forward_step(ids[:, t], state=s, path=path)
        _same(step_logits, logits[:, t], _tol(path, ROUNDING), f"logits at t={t}")
    _same_state(s, final, _tol(path))
    # the [B, 1] and [B] token forms of forward_step
    a, sa = model.forward_step(ids[:, :1], state=state, path=path)
    b, sb = model.forward_step(ids[:, 0], state=state, path=path)
    _same(a, b, EXACT, "logits")
    _same_state(sa, sb, EXACT)


@PATHS
@SETTINGS
@given(cfg=configs(), data=st.data())
def test_split_calls_equal_one_call(path, cfg, data):
    """Spec §4: a sequence split into two calls with the state carried equals one call."""
    model, state, ids, _ = _setup(cfg, data)
    cut = data.draw(st.integers(1, ids.shape[1] - 1), label="cut")
    logits, final = model(ids, state=state, path=path)
    a, mid = model(ids[:, :cut], state=state, path=path)
    b, end = model(ids[:, cut:], state=mid, path=path)
    _same(np.concatenate([a, b], axis=1), logits, _tol(path, ROUNDING), "logits")
    _same_state(end, final, _tol(path))


@SETTINGS
@given(cfg=configs(), data=st.data())
def test_plain_and_fast_paths_agree(cfg, data):
    """DESIGN.md: the fast path computes the plain path's function (float64: 1e-10); value_and_grad's
    returned state is the plain forward's final state, bit for bit."""
    model, state, ids, _ = _setup(cfg, data)
    lp, sp = model(ids, state=state, path="plain")
    lf, sf = model(ids, state=state)
    _same(lf, lp, FAST_RTOL, "logits")
    _same_state(sf, sp, FAST_RTOL)
    _, _, vg_state = value_and_grad(model, ids, ids, state=state, return_state=True, path="plain")
    _same_state(vg_state, sp, EXACT)
    _, _, vg_fast = value_and_grad(model, ids, ids, state=state, return_state=True)
    _same_state(vg_fast, sp, FAST_RTOL)


@PATHS
@SETTINGS
@given(cfg=configs(), data=st.data())
def test_inputs_are_never_modified(path, cfg, data):
    """Spec §4 ("the input state is not modified"): model(...), forward_step, value_and_grad leave the
    state, the ids, the noise and the parameters exactly as they were; the same call twice gives the
    same answer, also from a state a previous call returned."""
    model, state, ids, rng = _setup(cfg, data)
    B, T = ids.shape
    U = rng.random((T, B, cfg.num_heads, cfg.memory_slots))
    keep_state, keep_ids, keep_U = copy.deepcopy(state), ids.copy(), U.copy()
    keep_params = {k: v.copy() for k, v in model.params.items()}
    _, returned = model(ids, state=state, path=path)
    keep_returned = returned.copy()
    model(ids, state=state, gumbel_uniform=U)
    model.forward_step(ids[:, 0], state=state, path=path)
    value_and_grad(model, ids, ids, state=state, gumbel_uniform=U, return_state=True, return_state_grad=True)
    assert state_equal(state, keep_state)
    np.testing.assert_array_equal(ids, keep_ids)
    np.testing.assert_array_equal(U, keep_U)
    for k, v in keep_params.items():
        np.testing.assert_array_equal(model.params[k], v, err_msg=k)
    l1, s1 = model(ids, state=returned, path=path)
    l2, s2 = model(ids, state=returned, path=path)
    assert state_equal(returned, keep_returned)
    _same(l1, l2, _tol(path), "logits of a second call")
    _same_state(s1, s2, _tol(path))
    l3, _ = model(ids, state=state, gumbel_uniform=U)
    l4, _ = model(ids, state=state, gumbel_uniform=U)
    np.testing.assert_array_equal(l3, l4)


@PATHS
@SETTINGS
@given(cfg=configs(), data=st.data())
def test_float32_matches_float64(path, cfg, data):
    """Spec §1 dtype: the same weights and state in float32 give the float64 logits to ~1e-4 on a short
    run (when both make the same discrete choices, which a near-tie may not allow)."""
    model64, state, ids, _ = _setup(cfg, data)
    ids = ids[:, :6]
    model32 = THLModel(cfg, params=model64.params, dtype=np.float32)
    assert all(p.dtype == np.float32 for p in model32.params.values())
    _, _, tape64 = run_sequence(model64.params, cfg, ids, state.copy(), record=True)
    _, _, tape32 = run_sequence(model32.params, cfg, ids, state.copy(dtype=np.float32), record=True)
    assume(same_choices(discrete_choices(tape64), discrete_choices(tape32)))
    l64, st64 = model64(ids, state=state, path=path)
    l32, st32 = model32(ids, state=state, path=path)
    assert l32.dtype == np.float32 and st32.memory.dtype == np.float32
    assert l64.dtype == np.float64 and st64.memory.dtype == np.float64
    np.testing.assert_allclose(l32, l64, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(l64).max())))
    np.testing.assert_allclose(st32.memory, st64.memory, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(st32.last_write, st64.last_write)


# ---------------------------------------------------------------------------------------------------
# InferenceState.init
# ---------------------------------------------------------------------------------------------------
def test_inference_state_init_forms():
    """Spec §3 and §6 (the README form): positional, keyword and (config, batch) forms give the same
    all-zero state; tiers / memory_bank that disagree with the config are refused."""
    cfg = THLConfig(vocab_size=13, dim=6, num_tiers=2, memory_slots=5, num_heads=2, head_dim=3, read_topk=2,
                    local_window=3, dtype="float64")
    model = THLModel(cfg, seed=0)
    forms = [
        InferenceState.init(2, cfg),
        InferenceState.init(batch_size=2, config=cfg),
        InferenceState.init(batch_size=2, config=cfg, tiers=model.tiers, memory_bank=model.memory_bank),
        InferenceState.init(cfg, 2),
        model.init_state(2),
    ]
    for s in forms:
        assert state_equal(s, forms[0])
        assert s.timestep == 0 and s.local_valid == 0 and not any(a.any() for a in s.arrays().values())
    assert forms[0].memory.shape == (2, 5, 6) and [t.shape for t in forms[0].tiers] == [(2, 6), (2, 6)]
    assert forms[0].local_buffer.shape == (2, 3, 6) and forms[0].last_write.dtype == np.int64
    one = InferenceState.init(batch_size=1, config=cfg, tiers=model.tiers, memory_bank=model.memory_bank)
    logits, _ = model(np.array([[1, 2, 3]]), state=one)
    assert logits.shape == (1, 3, 13)
    other = THLModel(cfg.replace(memory_slots=7), seed=0)
    with pytest.raises(StateError, match="memory_bank"):
        InferenceState.init(batch_size=1, config=cfg, memory_bank=other.memory_bank)
    wider = THLModel(cfg.replace(tier_dims=[6, 4]), seed=0)
    with pytest.raises(StateError, match="tiers"):
        InferenceState.init(batch_size=1, config=cfg, tiers=wider.tiers)


# ---------------------------------------------------------------------------------------------------
# Spec §1: THLConfig
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=examples(30), deadline=None)
@given(cfg=configs())
def test_config_json_round_trip(cfg):
    """Spec §1: save → load gives an equal config, every field unchanged, and the JSON is plain."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save(tmp)
        back = THLConfig.load(tmp)
        raw = json.load(open(os.path.join(tmp, "config.json")))
    assert back == cfg and back.to_dict() == cfg.to_dict() == raw
    assert THLConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_pytorch_config_json_loads_unchanged():
    """Spec §1: a config.json written by the PyTorch THL's save_pretrained loads unchanged (every key
    kept with its value, nothing added that changes the model)."""
    found = sorted(CONFORMANCE.glob("cases/*/config.json"))
    if not found:
        pytest.skip(f"no PyTorch config.json under {CONFORMANCE}")
    for path in found:
        raw = json.load(open(path))
        cfg = THLConfig.load(str(path))
        assert {k: cfg.to_dict()[k] for k in raw} == raw, path
        assert THLConfig.load(str(path.parent)) == cfg
        with tempfile.TemporaryDirectory() as tmp:
            cfg.save(tmp)
            assert json.load(open(os.path.join(tmp, "config.json"))) == {**cfg.to_dict(), **raw}


def test_readme_config_with_dim():
    """Spec §6: `THLConfig(num_tiers=3, memory_slots=1024, dim=768, vocab_size=50257)` works and sets every
    width to 768."""
    cfg = THLConfig(num_tiers=3, memory_slots=1024, dim=768, vocab_size=50257)
    assert cfg.tier_dims == [768, 768, 768] and cfg.tier_timescales == [1, 8, 64]
    assert (cfg.embedding_dim, cfg.hidden_dim, cfg.memory_dim, cfg.value_dim) == (768,) * 4
    assert cfg.memory_slots == 1024 and cfg.vocab_size == 50257 and cfg.num_tiers == 3
    assert THLConfig.from_dict(cfg.to_dict()) == cfg
    assert THLConfig(dim=16, num_tiers=2).tier_dims == [16, 16]


def test_unknown_config_keys_are_named():
    """Spec §1: an unknown field is a ConfigError naming it (from keywords, a dict, or config.json)."""
    with pytest.raises(ConfigError, match="hidden_size") as e:
        THLConfig(hidden_size=3, vocab_size=10)
    assert type(e.value) is ConfigError
    with pytest.raises(ConfigError, match="n_layers"):
        THLConfig.from_dict({"vocab_size": 10, "n_layers": 2, "flash": True})
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"vocab_size": 10, "bogus_key": 1}, f)
        with pytest.raises(ConfigError, match="bogus_key"):
            THLConfig.load(tmp)


SMALL = dict(vocab_size=10, embedding_dim=4, hidden_dim=4, num_tiers=2, tier_dims=[4, 4],
             tier_timescales=[1, 2], memory_slots=4, memory_dim=4, value_dim=4, num_heads=2, head_dim=2,
             read_topk=2, query_dim=2, local_window=2)


@pytest.mark.parametrize("change, field", [
    (dict(tier_dims=[4, 4, 4]), "tier_dims"),
    (dict(num_tiers=3), "tier_dims"),
    (dict(tier_timescales=[1]), "tier_timescales"),
    (dict(tier_timescales=[2, 4]), "tier_timescales"),
    (dict(value_dim=5), "value_dim"),
    (dict(num_heads=3), "value_dim"),
    (dict(read_topk=5), "read_topk"),
    (dict(write_slots=5), "write_slots"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(embedding_dim=-1), "embedding_dim"),
    (dict(memory_slots=0), "memory_slots"),
    (dict(memory_dim=0), "memory_dim"),
    (dict(query_dim=0), "query_dim"),
    (dict(head_dim=0), "head_dim"),
    (dict(num_heads=0), "num_heads"),
    (dict(read_topk=0), "read_topk"),
    (dict(write_slots=0), "write_slots"),
    (dict(num_tiers=0, tier_dims=[], tier_timescales=[]), "num_tiers"),
    (dict(tier_dims=[4, 0]), "tier_dims"),
    (dict(local_window=-1), "local_window"),
    (dict(read_slot_capacity=0), "read_slot_capacity"),
    (dict(dtype="float16"), "dtype"),
    (dict(vocab_size=2.5), "vocab_size"),
])
def test_validation_errors_name_the_field(change, field):
    """Spec §1: each invalid config raises ConfigError (exactly that class), its message naming the field."""
    with pytest.raises(ConfigError) as e:
        THLConfig(**{**SMALL, **change})
    assert type(e.value) is ConfigError
    assert field in str(e.value), str(e.value)
