"""Hostile input to the library (issue 12): every value a validator accepts is served alike by the plain,
fast and layered paths; every value none can serve is refused with a THLError naming the field, the value
and the fix; never a NaN that one path makes and another does not, never an IndexError or a traceback.

The CLI, the files and the processes (read-only folders, full disks, kill -9) are in test_hostile_files.py.
"""
import dataclasses
import json
import math

import numpy as np
import pytest
from helpers import examples, random_params, random_state
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from thl_np import InferenceState, THLConfig, THLModel, generate_text, value_and_grad
from thl_np.checks import MAX_COEFFICIENT, RULES
from thl_np.engines.layered import LayeredInferenceEngine
from thl_np.errors import ConfigError, InputError, StateError, THLError, WeightsError
from thl_np.generation import generate_ids
from thl_np.io.safetensors import write_safetensors
from thl_np.training.trainer import TrainConfig, evaluate

FLOAT_FIELDS = ("load_penalty", "read_ema_decay", "router_load_balance_lambda", "memory_decay", "write_rate",
                "write_clip_max", "write_ema_decay", "novelty_beta", "novelty_theta", "stale_weight",
                "underuse_weight")
NOT_FINITE = [float("nan"), float("inf"), -float("inf"), 10**400, True, "0.5", None, 1j]


def raises(cls, match, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises exactly ``cls`` (a THLError) and its message matches ``match``."""
    with pytest.raises(THLError) as e:
        fn(*args, **kwargs)
    assert type(e.value) is cls, f"expected {cls.__name__}, got {type(e.value).__name__}: {e.value}"
    assert e.match(match), str(e.value)
    return e.value


def tiny(**kw):
    base = dict(vocab_size=13, embedding_dim=6, hidden_dim=6, num_tiers=2, tier_dims=[5, 4], tier_timescales=[1, 2],
                local_window=3, memory_slots=5, memory_dim=4, query_dim=3, value_dim=4, num_heads=2, head_dim=3,
                read_topk=2, write_rate=0.5, dtype="float64")
    base.update(kw)
    return THLConfig(**base)


# ---------------------------------------------------------------------------------------------------
# One rule per number (defect 3)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", NOT_FINITE, ids=["nan", "inf", "-inf", "huge-int", "bool", "str", "none", "complex"])
def test_config_refuses_what_is_not_a_finite_number(field, bad):
    """NaN, ±inf (config.json's 1e999 parses as inf), an int too large for a float, bools, strings: a
    ConfigError naming the field, whatever the field (the check used to be ``v != v``, which passes inf)."""
    raises(ConfigError, rf"^{field} = .* must be a finite number", tiny, **{field: bad})


def test_config_bounds_and_json():
    """Decays in [0, 1], coefficients within ±MAX_COEFFICIENT, write_clip_max > 0; config.json never holds
    Infinity, and a config.json that does is refused on load."""
    for field in ("memory_decay", "read_ema_decay", "write_ema_decay"):
        raises(ConfigError, rf"{field} = 1.5 must be a finite number in \[0, 1\]", tiny, **{field: 1.5})
        raises(ConfigError, rf"{field} = -0.1", tiny, **{field: -0.1})
    raises(ConfigError, r"write_rate = 2000000.0 must be a finite number in \[-1e\+06, 1e\+06\]", tiny,
           write_rate=2 * MAX_COEFFICIENT)
    raises(ConfigError, r"write_clip_max = 0.0 must be a finite number in \(0, 1e\+06\]", tiny, write_clip_max=0.0)
    raises(ConfigError, r"vocab_size = 4294967296 must be an integer in \[1, 2147483647\]", tiny, vocab_size=2**32)
    raises(ConfigError, r"num_tiers = 5000", THLConfig, num_tiers=5000)
    assert "Infinity" not in tiny(load_penalty=1e6).to_json()
    data = tiny().to_dict()
    text = json.dumps(dict(data, load_penalty=float("inf")))
    assert "Infinity" in text
    with pytest.raises(ConfigError, match="load_penalty = inf"):
        THLConfig.from_dict(json.loads(text))


def test_every_validator_uses_the_one_rule_table():
    """THLConfig, TrainConfig, the generation arguments, the state counters and the CLI flags all ask
    thl_np.checks.RULES: each numeric field has a rule, and each CLI flag holding a field has that very rule."""
    from thl_np.cli import cli
    from thl_np.cli.params import Number

    for f in dataclasses.fields(THLConfig):
        if f.name not in ("dtype", "device", "components", "quantization", "task", "id2label", "label2id"):
            assert f.name in RULES, f.name
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("carry_state", "resume", "path", "full_bptt", "tasks", "filler", "routing", "freeze",
                          "read_through", "read_match"):
            assert f.name in RULES, f.name
    for name in ("temperature", "top_k", "top_p", "seed", "max_length", "timestep"):
        assert name in RULES
    flags = {}
    for command in cli.commands.values():
        for param in command.params:
            if isinstance(param.type, Number):
                flags[(command.name, param.opts[0])] = param.type.rule
    assert flags[("train", "--grad-clip")] is RULES["grad_clip"]
    assert flags[("train", "--weight-decay")] is RULES["weight_decay"]
    assert flags[("train", "--lr")] is RULES["lr"]
    assert flags[("train", "--read-weight")] is RULES["read_weight"]
    assert flags[("train", "--write-rate")] is RULES["write_rate"]
    assert flags[("generate", "--temperature")] is RULES["temperature"]
    assert flags[("generate", "--seed")] is RULES["seed"]
    assert len(flags) >= 20
    for (command, flag), rule in flags.items():
        assert any(rule is r for r in RULES.values()), (command, flag)


@pytest.mark.parametrize("field, bad", [("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("inf")),
                                        ("grad_clip", float("nan")), ("eps", float("nan")), ("beta1", float("nan")),
                                        ("held_out_fraction", float("nan")), ("min_lr_ratio", float("inf")),
                                        ("seed", -1), ("steps", 2.0), ("carry_state", "yes")])
def test_train_config_refuses_non_finite(field, bad):
    raises(InputError, rf"{field} = ", TrainConfig, **{field: bad})


# ---------------------------------------------------------------------------------------------------
# Extreme accepted configs: the plain, fast and layered paths agree (defect 1)
# ---------------------------------------------------------------------------------------------------
EXTREMES = dict(
    memory_decay=[0.0, 1e-300, 1e-7, 1e-6, 3e-6, 1e-4, 0.5, 1.0, 1.5, float("nan")],
    read_ema_decay=[0.0, 1.0, 0.99],
    write_ema_decay=[0.0, 1.0, 0.99],
    write_rate=[1e-300, 1e-9, 0.05, 1.0, 100.0, MAX_COEFFICIENT, -0.5, float("inf"), 1e7],
    write_clip_max=[1e-6, 1.0, MAX_COEFFICIENT],
    load_penalty=[0.0, 1e3, -1.0],
    novelty_beta=[0.0, 8.0, 1e3],
    novelty_theta=[-0.5, 0.3, 1.2],
    stale_weight=[0.0, 1.0, 1e4],
    underuse_weight=[0.0, 1.0, 1e4],
)


@st.composite
def extreme_configs(draw, dtype="float64"):
    """Small configs with extreme values, some beyond what the validator accepts: a dict of fields."""
    J = draw(st.integers(1, 5))
    K = draw(st.integers(1, 2))
    H = draw(st.integers(1, 2))
    kw = dict(vocab_size=draw(st.integers(3, 12)), embedding_dim=draw(st.integers(2, 5)), hidden_dim=4, num_tiers=K,
              tier_dims=[draw(st.integers(2, 5)) for _ in range(K)],
              tier_timescales=[1] + [draw(st.integers(1, 3)) for _ in range(K - 1)],
              local_window=draw(st.integers(0, 3)), memory_slots=J, memory_dim=draw(st.integers(2, 5)),
              query_dim=draw(st.integers(1, 3)), value_dim=H * draw(st.integers(1, 2)), num_heads=H,
              head_dim=draw(st.integers(1, 3)), read_topk=draw(st.integers(1, J)),
              read_slot_capacity=draw(st.sampled_from([None, 1])),
              write_slots=draw(st.sampled_from([1, J])), dtype=dtype)
    for name, values in EXTREMES.items():
        kw[name] = draw(st.sampled_from(values))
    return kw


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0)) if a.size else 0.0


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=extreme_configs(), seed=st.integers(0, 2**16), B=st.integers(1, 2), T=st.integers(1, 7))
def test_extreme_configs_plain_fast_layered_agree_or_are_refused(kw, seed, B, T):
    """For configs with decays 0 and 1, γ = 1e-300, tiny and large write rates, capacity 1, W_w = J (and
    values beyond the rules): either THLConfig refuses it with a ConfigError, or the plain path, the fast
    path and the layered engine give the same logits and states, all finite, and the plain and fast
    gradients agree."""
    try:
        cfg = THLConfig(**kw)
    except ConfigError as exc:
        event("refused")
        bad = [k for k, v in kw.items() if k in EXTREMES and not _accepted(k, v)]
        assert bad, f"refused a config whose values are all within the rules: {exc}"
        assert any(k in str(exc) for k in bad), str(exc)
        return
    assert all(_accepted(k, v) for k, v in kw.items() if k in EXTREMES)
    event("accepted")
    rng = np.random.default_rng(seed)
    model = THLModel(cfg, params=random_params(cfg, rng))
    ids = rng.integers(0, cfg.vocab_size, size=(B, T))
    lp, sp = model(ids, path="plain")
    lf, sf = model(ids, path="fast")
    assert np.isfinite(lp).all() and np.isfinite(lf).all()
    assert max_rel(lf, lp) < 1e-9
    for key, want in sp.arrays().items():
        assert max_rel(sf.arrays()[key], want) < 1e-9, key
    with LayeredInferenceEngine(model, batch_size=B) as engine:
        state = None
        for t in range(T):
            logits, state = engine.step(ids[:, t], state)
            assert max_rel(logits, lp[:, t]) < 1e-9
    for key, want in sp.arrays().items():
        assert max_rel(engine.state_to_host(state).arrays()[key], want) < 1e-9, key
    loss_p, grads_p = value_and_grad(model, ids, ids, path="plain")
    loss_f, grads_f = value_and_grad(model, ids, ids, path="fast")
    assert math.isfinite(loss_p) and abs(loss_f - loss_p) <= 1e-9 * max(1.0, abs(loss_p))
    for name, g in grads_p.items():
        assert np.isfinite(grads_f[name]).all(), name
        assert np.abs(grads_f[name] - g).max() <= 1e-7 * max(1.0, np.abs(g).max()), name


def _accepted(field, value):
    try:
        RULES[field].check(field, value)
        return True
    except InputError:
        return False


@pytest.mark.parametrize("gamma", [0.0, 1e-300, 1e-30, 1e-7, 1e-5])
def test_tiny_decays_float32(gamma):
    """The reproduction of defect 1 in float32: γ = 0 raised ZeroDivisionError and γ = 1e-300 gave NaN
    logits on the fast path; now both paths serve every accepted γ alike (the decay is applied eagerly
    below MIN_DECAY)."""
    cfg = tiny(memory_decay=gamma, dtype="float32", vocab_size=40)
    model = THLModel(cfg, seed=1)
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 30))
    lp, sp = model(ids, path="plain")
    lf, sf = model(ids, path="fast")
    assert np.isfinite(lf).all() and np.abs(lf - lp).max() < 1e-5
    assert np.abs(sf.memory - sp.memory).max() < 1e-5
    single = model.decoder(batch_size=1)  # the one-sequence kernel too
    assert np.abs(single.prompt(ids[:1]) - lp[:1]).max() < 1e-5


# ---------------------------------------------------------------------------------------------------
# Bad states: refused with a StateError by every path (defects 5, 9, 10)
# ---------------------------------------------------------------------------------------------------
CFG = tiny(vocab_size=20)
MODEL = THLModel(CFG, seed=0)
FLOAT_KEYS = ["tier_state_0", "tier_state_1", "memory", "read_ema", "write_ema", "local_buffer"]


def _set(state, key, value):
    if key.startswith("tier_state_"):
        state.tiers[int(key[-1])] = value
    else:
        setattr(state, key, value)


def _get(state, key):
    return state.tiers[int(key[-1])] if key.startswith("tier_state_") else getattr(state, key)


@st.composite
def bad_states(draw, batch_size=1):
    """A valid random state with one thing broken, and the key the error must name."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    s = random_state(CFG, batch_size, rng, timestep=draw(st.integers(1, 20)), local_valid=draw(st.integers(0, 3)))
    kind = draw(st.sampled_from(["non-finite", "float-dtype", "int-dtype", "step-range", "timestep", "local_valid",
                                 "not-an-array", "shape"]))
    if kind == "non-finite":
        key = draw(st.sampled_from(FLOAT_KEYS if CFG.local_window and s.local_valid else FLOAT_KEYS[:-1]))
        a = np.array(_get(s, key))
        index = tuple(draw(st.integers(0, n - 1)) for n in a.shape)
        a[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        _set(s, key, a)
    elif kind == "float-dtype":
        key = draw(st.sampled_from(FLOAT_KEYS))
        _set(s, key, np.asarray(_get(s, key)).astype(draw(st.sampled_from([np.int64, np.complex128, np.bool_,
                                                                            object]))))
    elif kind == "int-dtype":
        key = draw(st.sampled_from(["last_read", "last_write"]))
        _set(s, key, np.asarray(_get(s, key)).astype(draw(st.sampled_from([np.float64, np.float32]))))
    elif kind == "step-range":
        key = draw(st.sampled_from(["last_read", "last_write"]))
        a = np.array(_get(s, key))
        a[0, draw(st.integers(0, CFG.memory_slots - 1))] = draw(st.sampled_from([-1, s.timestep + 1, 2**62]))
        _set(s, key, a)
    elif kind == "timestep":
        key = "timestep"
        s.timestep = draw(st.sampled_from([-1, 2.7, 3.0, "3", 2**63 - 1, 2**62 + 1, None, True, np.array([1, 2]),
                                           np.float64(4.0)]))
    elif kind == "local_valid":
        key = "local_valid"
        s.local_valid = draw(st.sampled_from([-1, CFG.local_window + 1, 1.5, None, "2"]))
    elif kind == "not-an-array":
        key = draw(st.sampled_from(FLOAT_KEYS + ["last_read", "last_write"]))
        _set(s, key, draw(st.sampled_from([None, 0.0, "memory"])))
    else:
        key = draw(st.sampled_from(FLOAT_KEYS + ["last_read", "last_write"]))
        a = np.asarray(_get(s, key))
        _set(s, key, a[..., :-1] if draw(st.booleans()) else a[None])
    return s, key


PATHS = {
    "plain": lambda s, ids: MODEL(ids, state=s, path="plain"),
    "fast": lambda s, ids: MODEL(ids, state=s, path="fast"),
    "forward_step/plain": lambda s, ids: MODEL.forward_step(ids[:, 0], s, path="plain"),
    "forward_step/fast": lambda s, ids: MODEL.forward_step(ids[:, 0], s, path="fast"),
    "decoder": lambda s, ids: MODEL.decoder(s).step(ids[:, 0]),
    "value_and_grad/plain": lambda s, ids: value_and_grad(MODEL, ids, ids, state=s, path="plain"),
    "value_and_grad/fast": lambda s, ids: value_and_grad(MODEL, ids, ids, state=s, path="fast"),
    "layered": lambda s, ids: LayeredInferenceEngine(MODEL, batch_size=ids.shape[0]).step(ids[:, 0], s),
    "generate": lambda s, ids: generate_ids(MODEL, ids[0], max_length=2, state=s, temperature=0),
}


@settings(max_examples=examples(40), deadline=None)
@given(bad=bad_states())
def test_bad_states_are_refused_by_every_path(bad):
    """A state with a NaN, an infinity, a wrong dtype (int, complex, bool, object floats; float step
    numbers), a step number outside [0, timestep], a timestep that is not an integer in [0, 2**62], a bad
    local_valid, a missing array or a wrong shape: every path raises a StateError naming the key; none
    accepts it and none mangles it."""
    state, key = bad
    ids = np.array([[1, 2]])
    for name, run in PATHS.items():
        snapshot = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
                    for k, v in vars(state).items() if k != "tiers"}
        with pytest.raises(StateError) as e:
            run(state, ids)
        assert key in str(e.value) or key.replace("tier_state_", "tier") in str(e.value), (name, str(e.value))
        for k, v in snapshot.items():  # the input state is not modified by the refusal
            if isinstance(v, np.ndarray):
                assert np.array_equal(getattr(state, k), v, equal_nan=v.dtype.kind in "fc"), (name, k)


@settings(max_examples=examples(25), deadline=None)
@given(bad=bad_states())
def test_bad_state_files_are_refused_on_load(bad, tmp_path_factory):
    """The same damage written to a state .npz (where the format can hold it) is a StateError on load:
    a NaN state given to --state-in is named as such, not reported as 'the model diverged'."""
    state, key = bad
    arrays = {}
    for k in ["timestep", "local_valid"]:
        arrays[k] = getattr(state, k)
    for k in FLOAT_KEYS + ["last_read", "last_write"]:
        arrays[k] = _get(state, k)
    try:
        data = {k: np.asarray(v) for k, v in arrays.items()}
    except (ValueError, TypeError):
        return
    if any(a.dtype == object for a in data.values()):
        return  # the .npz format (no pickles) cannot hold it
    path = tmp_path_factory.mktemp("states") / "bad.npz"
    np.savez(path, **data)
    try:
        loaded = InferenceState.load(path)
    except StateError as exc:
        assert str(path) in str(exc)
        return
    # what a file cannot express (a shape this config does not fit) is refused when the state is used
    with pytest.raises(StateError):
        loaded.check(CFG, 1)


def test_valid_states_from_files_and_paths_still_work(tmp_path):
    """The checks refuse nothing a model produced: a saved state loads and continues on every path."""
    rng = np.random.default_rng(3)
    s = random_state(CFG, 1, rng, timestep=9, local_valid=2)
    s.save(tmp_path / "s.npz")
    loaded = InferenceState.load(tmp_path / "s.npz")
    ids = np.array([[1, 2, 3]])
    lp, sp = MODEL(ids, state=loaded, path="plain")
    lf, sf = MODEL(ids, state=loaded, path="fast")
    assert np.abs(lp - lf).max() < 1e-10 and sp.timestep == sf.timestep == 12


def test_state_counters_are_not_truncated():
    """timestep 2.7 was truncated to 2 and int / complex arrays were cast; now each is a StateError."""
    s = MODEL.init_state(1)
    s.timestep = 2.7
    raises(StateError, r"timestep = 2.7 must be an integer", MODEL.forward_step, [1], s, path="plain")
    s = MODEL.init_state(1)
    s.memory = s.memory.astype(complex)
    raises(StateError, r"memory has dtype complex128", MODEL.forward_step, [1], s, path="plain")
    s = MODEL.init_state(1)
    s.memory = None
    raises(StateError, r"memory is NoneType, not an array", MODEL.forward_step, [1], s)
    s = MODEL.init_state(1)
    s.timestep = 2**63 - 1
    raises(StateError, r"timestep = 9223372036854775807 must be an integer in \[0, 4611686018427387904\]",
           MODEL.forward_step, [1], s, path="plain")


def test_state_files_with_bad_scalars(tmp_path):
    """A state .npz whose timestep is a string or a vector: a StateError naming the file and the key."""
    arrays = MODEL.init_state(1).arrays()
    np.savez(tmp_path / "str.npz", **dict(arrays, timestep=np.array("abc")))
    raises(StateError, r"str.npz: state timestep has dtype <U3", InferenceState.load, tmp_path / "str.npz")
    np.savez(tmp_path / "vec.npz", **dict(arrays, timestep=np.arange(3)))
    raises(StateError, r"vec.npz: state timestep = array", InferenceState.load, tmp_path / "vec.npz")
    np.savez(tmp_path / "f.npz", **dict(arrays, timestep=np.array(2.7)))
    raises(StateError, r"f.npz: state timestep has dtype float64", InferenceState.load, tmp_path / "f.npz")
    np.savez(tmp_path / "c.npz", **dict(arrays, memory=arrays["memory"].astype(complex)))
    raises(StateError, r"c.npz: state memory has dtype complex128", InferenceState.load, tmp_path / "c.npz")


# ---------------------------------------------------------------------------------------------------
# The public decoding session validates its ids (defect 7)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, bad, match", [
    ("step", [-1], r"token id -1, outside \[0, 19\]"),
    ("step", [-20], r"token id -20"),
    ("step", [20], r"token id 20, outside"),
    ("step", np.array([1.7]), r"integer token ids, got dtype float64"),
    ("step", [], r"token_ids is empty"),
    ("step", [1, 2], r"holds 2 sequence\(s\) but this decoding session steps 1"),
    ("prompt", np.zeros((2, 3), int), r"holds 2 sequence\(s\)"),
    ("prompt", [[1, 2, 20]], r"token id 20"),
    ("prompt", [1, 2], r"shape \[B, T\]"),
])
def test_decoder_step_and_prompt_validate_ids(call, bad, match):
    """model.decoder() is public: -1 used to give id V-1's logits, 1.7 was truncated, V raised IndexError
    and a batch mismatch a broadcasting ValueError. The session is unchanged by a refused call."""
    dec = MODEL.decoder()
    before = dec.state()
    raises(InputError, match, getattr(dec, call), bad)
    after = dec.state()
    assert all(np.array_equal(a, after.arrays()[k]) for k, a in before.arrays().items())
    assert dec.step([3]).shape == (1, CFG.vocab_size)


def test_forward_step_empty_says_empty():
    raises(InputError, r"token_ids is empty", MODEL.forward_step, [])
    raises(InputError, r"input_ids is empty", MODEL, [[]])


# ---------------------------------------------------------------------------------------------------
# Weights, seeds, dtypes, paths (defects 6, 9)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.int64])
def test_weights_must_be_floating_point(tmp_path, dtype):
    """A safetensors header that relabels a float tensor as I32 (same bytes) used to load as ~1.2e9 floats;
    U8 / BOOL weights too. Now a WeightsError naming the tensor and the dtypes allowed."""
    model = THLModel(CFG, seed=0)
    model.save_pretrained(tmp_path)
    params = dict(model.params)
    params["embedding.weight"] = params["embedding.weight"].view(np.int64).astype(dtype)
    write_safetensors(tmp_path / "model.safetensors", params)
    raises(WeightsError, rf"embedding.weight has dtype {np.dtype(dtype)}, but weights are floating point",
           THLModel.from_pretrained, tmp_path)
    raises(WeightsError, r"embedding.weight has dtype", THLModel, CFG, params=params)


def test_relabelled_header_is_refused(tmp_path):
    """The reproduction itself: F32 relabelled I32 in the header, same byte count."""
    THLModel(CFG.replace(dtype="float32"), seed=0).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["embedding.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])
    raises(WeightsError, r"embedding.weight has dtype int32", THLModel.from_pretrained, tmp_path)


@pytest.mark.parametrize("seed", [-1, 1.5, "a", 2**64, True])
def test_bad_seeds_are_input_errors(seed):
    raises(InputError, r"seed = .* must be an integer in \[0, 9223372036854775807\]", THLModel, CFG, seed=seed)
    byte_model = THLModel(tiny(vocab_size=259), seed=0)
    raises(InputError, r"seed = ", generate_text, byte_model, None, "hi", max_length=2, seed=seed)


def test_impossible_state_size_is_estimated_first():
    raises(StateError, r"a state of 1,000,000,000,000 sequence\(s\) needs about .* TiB of memory",
           InferenceState.init, 10**12, CFG)


def test_bad_dtypes_and_paths_are_input_errors():
    raises(InputError, r"dtype 'bogus' is not a dtype", THLModel, CFG, dtype="bogus")
    raises(InputError, r"from_pretrained's directory must be a path.*NoneType", THLModel.from_pretrained, None)
    raises(StateError, r"dtype = 'bogus'", InferenceState.init, 1, CFG, dtype="bogus")


def test_impossible_model_size_is_estimated_first(monkeypatch):
    """init --dim 100000 raised numpy's MemoryError; the bytes are estimated and refused before allocating."""
    import thl_np.checks as checks

    monkeypatch.setattr(checks, "available_memory", lambda: 1 << 20)
    raises(InputError, r"a model of 1,003,583 parameters needs about 8.7 MiB of memory, but only 1.0 MiB is available",
           THLModel, tiny(vocab_size=259, embedding_dim=256, tier_dims=[256, 256]))


@pytest.mark.parametrize("content, match", [
    ('{"vocab_size": ' + "9" * 5000 + "}", r"not a valid config.json \(Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, r"not a valid config.json \(nested too deeply\)"),
    ('{"vocab_size": ' + "9" * 1000 + "}", r"vocab_size = 9999.* must be an integer in \[1, 2147483647\]"),
    ('{"memory_decay": NaN}', r"memory_decay = nan"),
    ('{"load_penalty": 1e999}', r"load_penalty = inf"),
])
def test_damaged_config_json(tmp_path, content, match):
    (tmp_path / "config.json").write_text(content)
    raises(ConfigError, match, THLConfig.load, str(tmp_path))


def test_config_json_that_is_a_folder(tmp_path):
    (tmp_path / "config.json").mkdir()
    raises(ConfigError, r"config.json is not a file", THLConfig.load, str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# A non-finite metric is an error (defect 2)
# ---------------------------------------------------------------------------------------------------
def test_non_finite_metric_is_an_error():
    """evaluate() (thl-np eval, the trainer's held-out evaluations) and the passkey evaluation raise on a
    NaN weight instead of reporting bits_per_byte = nan."""
    from thl_np.eval.long_context import passkey_eval

    cfg = tiny(vocab_size=259, dtype="float32")
    model = THLModel(cfg, seed=0)
    text = np.frombuffer(b"hello world, " * 20, np.uint8)
    assert math.isfinite(evaluate(model, text, seq_len=16, lanes=2)["bits_per_byte"])
    model.params["output_head.bias"] = model.params["output_head.bias"].copy()
    model.params["output_head.bias"][7] = np.nan
    raises(WeightsError, r"bits per byte is nan, not a finite number: the model's logits are not finite", evaluate,
           model, text, seq_len=16, lanes=2)
    raises(WeightsError, r"passkey: the model's logits are not finite", passkey_eval, model, [256], trials=1)
    model.params["output_head.bias"][7] = 0.0
    model.params["output_head.bias"][ord("3")] = np.inf  # an infinite logit is refused as well
    with pytest.raises(WeightsError, match=r"passkey: the model's logits are not finite"):
        passkey_eval(model, [256], trials=1)


def test_state_check_is_cheap_for_a_decoders_own_state():
    """A state a fast session handed out (frozen arrays, carrying the session) is not rescanned each step;
    a copy of it is, and a NaN written into the copy is refused."""
    _, s = MODEL([[1, 2]], path="fast")
    assert s.decoder is not None
    MODEL.forward_step([3], s)
    s2 = s.copy()
    s2.read_ema[0, 0] = np.inf
    raises(StateError, r"read_ema holds a non-finite value", MODEL.forward_step, [3], s2)


def test_extreme_values_are_mostly_accepted():
    """The property test above is not vacuous: most of its extreme values are accepted (and served by every
    path), a few are refused."""
    share = math.prod(sum(_accepted(k, v) for v in values) / len(values) for k, values in EXTREMES.items())
    assert 0.3 < share < 0.9
