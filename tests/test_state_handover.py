"""The functional API hands its state over instead of copying it (thl_np.state): a chain of
``forward_step`` calls equals a decoding session bit for bit, a state keeps its value whatever is stepped
from it, and stepping from one state twice gives two independent futures."""
import copy
import dataclasses
import pickle

import numpy as np
import pytest
from helpers import state_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fast_decode import configs, small_config

from thl_np import InferenceState, StateError, THLModel
from thl_np.engines.decoder import FastDecoder


def _chain(model, ids, state=None):
    """forward_step over ids [B, T], each state dropped once the next is made → (logits [T, B, V], the
    last state)."""
    out = []
    for t in range(ids.shape[1]):
        logits, state = model.forward_step(ids[:, t], state)
        out.append(logits)
    return np.stack(out), state


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), B=st.integers(1, 3), seed=st.integers(0, 2**16), keep=st.sampled_from(["none", "all", "odd"]))
def test_chain_equals_the_session_bit_for_bit(cfg, B, seed, keep):
    """The sessions behind a chain are brought up to date by copying one step's changes (sync_from): the
    logits and every state equal one FastDecoder's, bit for bit, whichever states the caller keeps (kept
    ones force copies, dropped ones let the two sessions alternate)."""
    model = THLModel(cfg, seed=seed % 7)
    rng = np.random.default_rng(seed)
    T = 14
    ids = rng.integers(0, cfg.vocab_size, size=(B, T))
    session = FastDecoder(model, batch_size=B)
    state, kept, want = None, [], []
    for t in range(T):
        logits, state = model.forward_step(ids[:, t], state)
        ref = session.step(ids[:, t])
        assert np.array_equal(logits, ref)
        want.append(session.state())
        if keep == "all" or (keep == "odd" and t % 2):
            kept.append((t, state))
    assert state_equal(state, want[-1])
    for t, s in kept:  # later steps never changed a state the caller kept
        assert state_equal(s, want[t])


@pytest.mark.parametrize("kw", [dict(memory_decay=0.5), dict(memory_decay=0.0), dict(local_window=0),
                                dict(write_slots=3, memory_slots=5), dict(dtype="float32")])
def test_chain_through_renormalisation_and_eager_decay(kw):
    """A renormalised bank (γ = 0.5 falls below the threshold every ~20 steps) or an eager decay (γ = 0)
    changes every row: the successor then copies the whole state, and still equals the session."""
    model = THLModel(small_config(**kw), seed=3)
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 50))
    session = FastDecoder(model, batch_size=2)
    want = np.stack([session.step(ids[:, t]) for t in range(50)])
    got, state = _chain(model, ids)
    assert np.array_equal(got, want)
    assert state_equal(state, session.state())


def test_a_chain_copies_the_state_once():
    """``state = forward_step(ids, state)``: the first step from a held state clones its session, every
    later one reuses the spare (no copy of the bank, the state's fields never read out)."""
    model = THLModel(small_config(), seed=0)
    calls = []
    original = FastDecoder.clone

    def counted(self):
        calls.append(1)
        return original(self)

    FastDecoder.clone = counted
    try:
        state = None
        for t in range(20):
            _, state = model.forward_step([t % 37], state)
            assert "memory" not in state.__dict__  # handed over, not copied out
    finally:
        FastDecoder.clone = original
    assert len(calls) == 1
    assert state.timestep == 20 and not state.memory.flags.writeable


def test_two_futures_from_one_state():
    """Step A then B from s0: s0 keeps its value, A's future is unaffected by B, and each equals a session
    cloned at s0; a state stepped from twice with the same token gives the same logits and state."""
    model = THLModel(small_config(), seed=1)
    ids = np.random.default_rng(1).integers(0, 37, size=(1, 12))
    session = FastDecoder(model)
    session.prompt(ids, logits="none")
    _, s0 = model(ids)
    before = s0.copy()
    la, sa = model.forward_step([3], s0)
    lb, sb = model.forward_step([4], s0)
    assert state_equal(s0, before)
    ref_a, ref_b = session.clone(), session.clone()
    assert np.array_equal(la, ref_a.step([3])) and np.array_equal(lb, ref_b.step([4]))
    assert state_equal(sa, ref_a.state()) and state_equal(sb, ref_b.state())
    # go on from A and B, interleaved: neither changes the other
    for t in range(6):
        la, sa = model.forward_step([t], sa)
        lb, sb = model.forward_step([t + 1], sb)
        assert np.array_equal(la, ref_a.step([t])) and np.array_equal(lb, ref_b.step([t + 1]))
    assert state_equal(s0, before)
    # s1 reused twice
    l1, s1 = model.forward_step([7], s0)
    x, sx = model.forward_step([9], s1)
    y, sy = model.forward_step([9], s1)
    assert np.array_equal(x, y) and state_equal(sx, sy)
    assert sx.decoder is not sy.decoder


def test_state_round_trips_through_save_and_load_and_equals_the_session(tmp_path):
    model = THLModel(small_config(), seed=2)
    ids = np.random.default_rng(2).integers(0, 37, size=(2, 9))
    session = FastDecoder(model, batch_size=2)
    session.prompt(ids, logits="none")
    _, state = _chain(model, ids)
    state.save(tmp_path / "s.npz")
    loaded = InferenceState.load(tmp_path / "s.npz")
    assert state_equal(loaded, session.state()) and state_equal(state, session.state())
    a, _ = model.forward_step([1, 2], state)
    b, _ = model.forward_step([1, 2], loaded)
    assert np.abs(a - session.step([1, 2])).max() == 0
    assert np.abs(a - b).max() < 1e-12  # the loaded state applies the decay scalar: rounding only


def test_copies_pickles_and_edits():
    model = THLModel(small_config(), seed=0)
    _, s = model(np.arange(6)[None] % 37)
    want = s.copy()
    for other in (copy.deepcopy(s), pickle.loads(pickle.dumps(s)), copy.copy(s)):
        assert other.decoder is None and state_equal(other, want)
    assert state_equal(s, want) and s.decoder is not None
    with pytest.raises(ValueError):  # read-only while it holds its session
        s.memory[0, 0, 0] = 1.0
    # an assigned field detaches the session; the state is validated when next used
    s.read_ema = np.full_like(s.read_ema, np.inf)
    assert s.decoder is None and state_equal(dataclasses.replace(s, read_ema=want.read_ema), want)
    with pytest.raises(StateError, match="read_ema holds a non-finite value"):
        model.forward_step([1], s)


def test_states_of_another_batch_or_model_are_refused_or_rebuilt():
    model = THLModel(small_config(), seed=0)
    other = THLModel(small_config(), seed=1)
    _, s = model(np.zeros((2, 3), np.int64))
    with pytest.raises(StateError, match="holds 2 sequence"):
        model.forward_step([1], s)
    a, _ = other.forward_step([1, 2], s)           # another model: rebuilt from the state's values
    b, _ = other.forward_step([1, 2], s.copy())
    assert np.array_equal(a, b)


def test_plain_path_states_are_frozen_and_not_copied():
    model = THLModel(small_config(), seed=0)
    ids = np.random.default_rng(4).integers(0, 37, size=(1, 8))
    want, _ = model(ids, path="fast")
    state = None
    for t in range(8):
        logits, state = model.forward_step(ids[:, t], state, path="plain")
        assert np.abs(logits - want[:, t]).max() < 1e-12
    assert not state.memory.flags.writeable
    assert model._prepare_state(state, 1) is state  # validated when made, not copied
    fresh = state.copy()
    fresh.memory[0, 0, 0] = np.nan
    with pytest.raises(StateError, match="memory holds a non-finite value"):
        model.forward_step([1], fresh, path="plain")
