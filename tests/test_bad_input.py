"""Bad input raises the right THLError subclass with a message naming the problem (DESIGN.md, Errors),
never an IndexError or a NumPy broadcasting error from deep inside. The error classes also subclass
ValueError, so every check here asserts the exact class."""
import numpy as np
import pytest
from helpers import tiny_config

from thl_np.errors import InputError, StateError, THLError
from thl_np.model import THLModel, value_and_grad
from thl_np.state import InferenceState

CFG = tiny_config()
MODEL = THLModel(CFG, seed=0)
V, H, J = CFG.vocab_size, CFG.num_heads, CFG.memory_slots
IDS = np.array([[1, 2, 3], [4, 5, 6]])


def raises(cls, match, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises exactly ``cls`` and its message matches ``match``."""
    with pytest.raises(THLError) as e:
        fn(*args, **kwargs)
    assert type(e.value) is cls, f"expected {cls.__name__}, got {type(e.value).__name__}: {e.value}"
    assert e.match(match), str(e.value)
    return e.value


CALLS = {
    "model/plain": lambda ids, **kw: MODEL(ids, path="plain", **kw),
    "model/auto": lambda ids, **kw: MODEL(ids, **kw),
    "value_and_grad": lambda ids, **kw: value_and_grad(MODEL, ids, ids, **kw),
}
calls = pytest.mark.parametrize("call", list(CALLS))


# ---------------------------------------------------------------------------------------------------
# token ids
# ---------------------------------------------------------------------------------------------------
@calls
@pytest.mark.parametrize("bad, match", [
    (np.array([[1, V]]), rf"token id {V}\b.*vocab_size"),
    (np.array([[1, 10**6, 2]]), r"token id 1000000"),
    (np.array([[-1, 2]]), r"token id -1"),
])
def test_token_ids_out_of_range(call, bad, match):
    """Ids outside [0, V-1] (too large or negative) are an InputError naming the id and the vocabulary."""
    raises(InputError, match, CALLS[call], bad)


@calls
@pytest.mark.parametrize("bad", [
    np.array([[1.0, 2.0]]), np.array([[1.5, 2.0]]), np.array([[True, False]]), np.array([["a", "b"]]),
    [[1, 2], [3]], None,
], ids=["float-integral", "float", "bool", "str", "ragged", "none"])
def test_token_ids_not_integers(call, bad):
    """Float, bool, string, ragged or missing ids are an InputError asking for integer token ids."""
    raises(InputError, r"input_ids", CALLS[call], bad)


@calls
@pytest.mark.parametrize("bad, match", [
    (np.array([1, 2, 3]), r"\[B, T\].*ids\[None, :\]"),
    (np.zeros((1, 2, 3), np.int64), r"\[B, T\].*\[1, 2, 3\]"),
    (np.array(3), r"\[B, T\]"),
])
def test_token_ids_wrong_rank(call, bad, match):
    """input_ids must be [B, T]: 0-D, 1-D (with a hint to wrap it) and 3-D are InputErrors naming it."""
    raises(InputError, match, CALLS[call], bad)


@calls
@pytest.mark.parametrize("shape", [(1, 0), (0, 3), (0, 0)])
def test_empty_sequence(call, shape):
    """An empty batch or sequence is an InputError saying it is empty."""
    raises(InputError, r"empty", CALLS[call], np.zeros(shape, np.int64))


@pytest.mark.parametrize("path", ["plain", "auto"])
def test_forward_step_ids(path):
    """forward_step takes [B], [B, 1] or a scalar id; anything else is an InputError."""
    raises(InputError, r"\[B\]", MODEL.forward_step, np.array([[1, 2]]), path=path)
    raises(InputError, r"token id", MODEL.forward_step, np.array([V]), path=path)
    raises(InputError, r"integer", MODEL.forward_step, np.array([0.5]), path=path)
    logits, _ = MODEL.forward_step(3, path=path)
    assert logits.shape == (1, V)


def test_targets():
    """value_and_grad: targets of another shape, out of range, or not integers are InputErrors."""
    raises(InputError, r"targets have shape \[2, 2\].*\[2, 3\]", value_and_grad, MODEL, IDS, IDS[:, :2])
    raises(InputError, r"targets.*\[B, T\]", value_and_grad, MODEL, IDS, IDS[0])
    raises(InputError, rf"targets holds token id {V}", value_and_grad, MODEL, IDS, np.full_like(IDS, V))
    raises(InputError, r"targets must hold integer", value_and_grad, MODEL, IDS, IDS * 1.0)


# ---------------------------------------------------------------------------------------------------
# the state
# ---------------------------------------------------------------------------------------------------
@calls
def test_state_for_another_config(call):
    """A state made for another config (other J, d_m, widths, tier count or window) is a StateError."""
    for change in (dict(memory_slots=J + 1), dict(memory_dim=7), dict(tier_dims=[4, 5]),
                   dict(num_tiers=1, tier_dims=[4], tier_timescales=[1]), dict(local_window=5),
                   dict(embedding_dim=6)):
        other = InferenceState.init(2, tiny_config(**change))
        raises(StateError, r"another config|tier", CALLS[call], IDS, state=other)


@calls
def test_state_for_another_batch_size(call):
    """A state for B = 1 with input of B = 2 is a StateError naming both sizes."""
    raises(StateError, r"1 sequence.*batch size 2", CALLS[call], IDS, state=MODEL.init_state(1))


@calls
def test_state_not_a_state(call):
    """A dict or an array in place of an InferenceState is a StateError."""
    raises(StateError, r"InferenceState", CALLS[call], IDS, state={"memory": np.zeros((2, J, 4))})
    raises(StateError, r"InferenceState", CALLS[call], IDS, state=np.zeros(3))


@calls
def test_state_bad_counters(call):
    """local_valid outside [0, W_loc] or a negative timestep is a StateError."""
    s = MODEL.init_state(2)
    s.local_valid = CFG.local_window + 1
    raises(StateError, r"local_valid", CALLS[call], IDS, state=s)
    s = MODEL.init_state(2)
    s.timestep = -3
    raises(StateError, r"timestep", CALLS[call], IDS, state=s)


def test_forward_step_state():
    """forward_step with a state for another batch size or config is a StateError."""
    raises(StateError, r"batch size 1", MODEL.forward_step, np.array([1]), state=MODEL.init_state(2))
    raises(StateError, r"another config", MODEL.forward_step, np.array([1]),
           state=InferenceState.init(1, tiny_config(memory_slots=3)))


def test_state_files(tmp_path):
    """InferenceState.load: a missing, corrupt, or incomplete file is a StateError."""
    raises(StateError, r"no state file", InferenceState.load, tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    raises(StateError, r"not a readable state", InferenceState.load, tmp_path / "junk.npz")
    np.savez(tmp_path / "part.npz", memory=np.zeros((1, 2, 3)))
    raises(StateError, r"lacks state key", InferenceState.load, tmp_path / "part.npz")


# ---------------------------------------------------------------------------------------------------
# training-mode noise
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["model/auto", "value_and_grad"])
def test_gumbel_uniform(call):
    """gumbel_uniform must be [T, B, H, J] floats in [0, 1): wrong shape, out of range, NaN or integer
    noise is an InputError."""
    f = CALLS[call]
    T, B = IDS.shape[1], IDS.shape[0]
    good = np.full((T, B, H, J), 0.5)
    f(IDS, gumbel_uniform=good)
    raises(InputError, r"\[T, B, H, J\]", f, IDS, gumbel_uniform=good[:, :, :, :-1])
    raises(InputError, r"\[T, B, H, J\]", f, IDS, gumbel_uniform=good.transpose(1, 0, 2, 3))
    raises(InputError, r"\[T, B, H, J\]", f, IDS, gumbel_uniform=good[0])
    for bad_value in (1.0, -0.1, 7.0, np.inf, np.nan):
        U = good.copy()
        U[1, 0, 0, 2] = bad_value
        raises(InputError, r"\[0, 1\)", f, IDS, gumbel_uniform=U)
    raises(InputError, r"\[0, 1\)", f, IDS, gumbel_uniform=np.zeros((T, B, H, J), np.int64))


def test_bad_path_and_model_arguments():
    """path must be auto/fast/plain; THLModel needs a THLConfig and a float32/float64 dtype."""
    raises(InputError, r"path", MODEL, IDS, path="gpu")
    raises(InputError, r"gumbel", MODEL, IDS, path="fast", gumbel_uniform=np.full((3, 2, H, J), 0.5))
    raises(InputError, r"THLConfig", THLModel, {"vocab_size": 5})
    raises(InputError, r"float16", THLModel, CFG, dtype="float16")


# ---------------------------------------------------------------------------------------------------
# array-likes that must work
# ---------------------------------------------------------------------------------------------------
class ArrayLike:
    """Anything with __array__ (e.g. a CPU torch tensor or a JAX array)."""

    def __init__(self, a):
        self.a = np.asarray(a)

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


class FakeTorchTensor:
    """The torch tensor protocol the model recognises (detach → cpu → numpy), without importing torch."""

    def __init__(self, a):
        self.a = np.asarray(a)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


@pytest.mark.parametrize("wrap", [ArrayLike, FakeTorchTensor, lambda a: a.tolist(),
                                  lambda a: a.astype(np.int32), lambda a: a.astype(np.uint8)],
                         ids=["__array__", "torch-like", "list", "int32", "uint8"])
def test_array_likes_work(wrap):
    """Token ids as any integer array-like give the same logits as an int64 array."""
    ref, _ = MODEL(IDS)
    logits, _ = MODEL(wrap(IDS))
    np.testing.assert_array_equal(logits, ref)
    loss, _ = value_and_grad(MODEL, wrap(IDS), wrap(IDS))
    assert loss == value_and_grad(MODEL, IDS, IDS)[0]
    step, _ = MODEL.forward_step(wrap(IDS[:, 0]))
    np.testing.assert_array_equal(step, MODEL.forward_step(IDS[:, 0])[0])
