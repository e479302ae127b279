"""The layered engine (thl_np.engines.layered): spec §4 steps within a device budget.

Spec §6: the PyTorch THL's layered engine skipped the LayerNorm and ran under autocast; here the engine's
logits and state must equal the plain model's ``forward_step`` (float64 1e-12, float32 1e-5) for every
budget, the smallest that works included, and ``peak_device_bytes`` must stay within the budget.
"""
import contextlib
import gc
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from thl_np import InferenceState, THLConfig, THLModel
from thl_np.components.router import read_meta_forward, router_forward
from thl_np.components.writer import memory_write_forward, writer_forward
from thl_np.engines.layered import DeviceBudgetError, LayeredInferenceEngine, parse_bytes, plan_layers
from thl_np.engines.layered.backends import cuda_available
from thl_np.errors import ConfigError, InputError, StateError, THLError

TOL = {"float64": 1e-12, "float32": 1e-5}
STEPS = 20


def small_config(dtype="float64", **overrides) -> THLConfig:
    kw = dict(vocab_size=97, embedding_dim=16, hidden_dim=16, num_tiers=3, tier_dims=[8, 12, 16],
              tier_timescales=[1, 2, 4], local_window=4, memory_slots=10, memory_dim=12, query_dim=6,
              value_dim=8, num_heads=2, head_dim=5, read_topk=3, write_rate=0.5, dtype=dtype)
    kw.update(overrides)
    return THLConfig(**kw)


def budget_for(model, kind, batch_size):
    """'unlimited' (None), 'minimal' (the smallest that works), 'mid' (half way to all-resident)."""
    if kind == "unlimited":
        return None
    lo = LayeredInferenceEngine.minimum_budget(model, batch_size=batch_size)
    if kind == "minimal":
        return lo
    plan = plan_layers(model.config, 1 << 60, batch_size, model.dtype)
    return (lo + plan.all_resident_budget) // 2


def assert_states_equal(a: InferenceState, b: InferenceState, tol):
    assert int(a.timestep) == int(b.timestep) and int(a.local_valid) == int(b.local_valid)
    for key, x in a.arrays().items():
        y = b.arrays()[key]
        assert np.shape(x) == np.shape(y), key
        if np.asarray(x).dtype.kind in "iu":
            np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=tol, err_msg=key)


def run_both(model, engine, steps=STEPS, batch_size=2, seed=0, token_shape="[B]"):
    """Step the plain model and the engine side by side; return the largest logits difference."""
    rng = np.random.default_rng(seed)
    tol = TOL[model.config.dtype]
    s_ref = None
    s = InferenceState.init(batch_size=batch_size, config=model.config, tiers=model.tiers,
                            memory_bank=model.memory_bank)
    worst = 0.0
    for _ in range(steps):
        tok = rng.integers(0, model.config.vocab_size, size=batch_size)
        logits_ref, s_ref = model.forward_step(tok, s_ref)
        before = s.copy()
        logits, s_next = engine.step(tok[:, None] if token_shape == "[B, 1]" else tok, s)
        assert_states_equal(before, s, 0.0)               # the input state is not modified
        s = s_next
        assert logits.shape == logits_ref.shape and isinstance(logits, np.ndarray)
        assert logits.dtype == logits_ref.dtype
        worst = max(worst, float(np.abs(logits - logits_ref).max()))
        assert_states_equal(s_ref, s, tol)
        assert engine.peak_device_bytes <= engine.budget
    assert worst <= tol, worst
    return worst


# ---------------------------------------------------------------------------------------------------
# Exactness and the budget
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["unlimited", "mid", "minimal"])
def test_engine_equals_plain_model(dtype, kind):
    """Spec §4 (LayerNorm included, spec §6): logits and state equal forward_step over 20 steps,
    and the peak stays within the budget."""
    model = THLModel(small_config(dtype), seed=1)
    budget = budget_for(model, kind, 2)
    with LayeredInferenceEngine(model, vram_budget=budget, batch_size=2) as engine:
        plan = engine.plan()
        if kind == "unlimited":
            assert plan.streamed == []
        elif kind == "minimal":
            assert engine.budget == plan.minimum_budget
            assert "output_head" in plan.streamed and len(plan.head_chunks) > 1
        else:
            resident = [m.name for m in plan.modules if m.resident and m.has_weights]
            assert plan.streamed and resident
        run_both(model, engine, token_shape="[B, 1]" if dtype == "float32" else "[B]")
        assert engine.peak_device_bytes <= engine.budget


@pytest.mark.parametrize("overrides", [
    dict(read_slot_capacity=1, write_slots=2, novelty_theta=-0.5),
    dict(local_window=0, num_tiers=1, tier_dims=[6], tier_timescales=[1], write_slots=3),
    dict(novelty_theta=1.2, load_penalty=0.0, memory_slots=4, read_topk=4),
    dict(components={"router": "unit_keys"}, read_slot_capacity=1),
    dict(components={"router": "empty_last"}, read_slot_capacity=1),
    dict(components={"router": "unit_rows"}, read_slot_capacity=1),
    dict(components={"memory_write": "decay_on_write"}, memory_decay=0.8, write_slots=2),
])
def test_branches(overrides):
    """Slot capacity, W_w > 1, no local window, one tier, both writer branches, the unit-key and empty-last
    routers, the decay-on-write memory, at the minimal budget, without the copy thread."""
    model = THLModel(small_config("float64", **overrides), seed=2)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=3)
    with LayeredInferenceEngine(model, vram_budget=budget, batch_size=3, overlap=False) as engine:
        run_both(model, engine, steps=12, batch_size=3, seed=5)


def test_memory_mapped_weights_stream_exactly(tmp_path):
    """Weights loaded with from_pretrained are memory-mapped; the engine streams them as they are."""
    THLModel(small_config("float32"), seed=3).save_pretrained(tmp_path)
    model = THLModel.from_pretrained(tmp_path)
    assert isinstance(model.params["output_head.weight"].base, np.memmap) or not model.params[
        "output_head.weight"].flags.owndata
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=1)
    with LayeredInferenceEngine(model, vram_budget=budget) as engine:
        run_both(model, engine, steps=10, batch_size=1)


def test_readme_form():
    """The README's low-VRAM example, NumPy form (its PyTorch original failed on these calls, spec §6)."""
    cfg = small_config("float32")
    model = THLModel(cfg, seed=0)
    engine = LayeredInferenceEngine(model, device="cpu", vram_budget="64KB")
    state = InferenceState.init(batch_size=1, config=cfg, tiers=model.tiers, memory_bank=model.memory_bank)
    token = np.array([[3]])
    logits, state = engine.step(token, state)
    assert logits.shape == (1, cfg.vocab_size) and state.timestep == 1
    logits_ref, _ = model.forward_step(token)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5, rtol=0)
    logits, state = engine.step([7], state)            # a plain list of ids works too
    assert engine.peak_device_bytes <= 64_000
    engine.close()


def test_docs_example_runs_as_written():
    """docs/LAYERED.md's low-VRAM example (the README's, NumPy form) runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "LAYERED.md").read_text()
    section = text.split("## The low-VRAM example", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "docs/LAYERED.md", "exec"), namespace)
    assert "streams" in out.getvalue()
    assert namespace["engine"].plan().streamed
    namespace["engine"].close()


def test_batch_growth_replans_and_states_interoperate():
    """A batch larger than the plan's re-plans; device states feed the plain model and back."""
    model = THLModel(small_config("float64"), seed=4)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=3)
    with LayeredInferenceEngine(model, vram_budget=budget, batch_size=1) as engine:
        assert engine.plan().batch_size == 1
        logits, s = engine.step([1, 2, 3], None)
        assert engine.plan().batch_size == 3
        ref, s_ref = model.forward_step([1, 2, 3])
        np.testing.assert_allclose(logits, ref, atol=1e-12, rtol=0)
        host = engine.state_to_host(s)
        assert isinstance(host.memory, np.ndarray) and not engine.backend.owns(host.memory)
        ref, s_ref = model.forward_step([4, 5, 6], s)    # the engine's state is a plain InferenceState on CPU
        del s                                            # (at the minimal budget one device state fits)
        logits, s = engine.step([4, 5, 6], host)         # and a host state goes back in
        np.testing.assert_allclose(logits, ref, atol=1e-12, rtol=0)
        assert_states_equal(s_ref, s, 1e-12)
        assert engine.peak_device_bytes <= engine.budget


def test_interleaved_sessions():
    """Two sequences at different timesteps through one engine: the prefetch made for one session's next
    step is the wrong piece for the other's, and is discarded (counted as wasted) without harm."""
    model = THLModel(small_config("float64"), seed=7)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=1, extra_states=1)
    with LayeredInferenceEngine(model, vram_budget=budget, extra_states=1) as engine:
        rng = np.random.default_rng(3)
        sessions = {"a": [None, None], "b": [None, None]}
        order = ["a", "a", "a"] + ["b", "a"] * 8
        for name in order:
            ref_state, state = sessions[name]
            tok = rng.integers(0, model.config.vocab_size, size=1)
            ref, ref_state = model.forward_step(tok, ref_state)
            logits, state = engine.step(tok, state)
            np.testing.assert_allclose(logits, ref, atol=1e-12, rtol=0)
            assert_states_equal(ref_state, state, 1e-12)
            sessions[name] = [ref_state, state]
        assert engine.stats["bytes_prefetch_wasted"] > 0
        assert engine.peak_device_bytes <= budget


def test_inactive_tiers_are_not_streamed():
    """Tier k's weights move only on steps where t mod τ_k = 0; local attention once the buffer holds rows."""
    model = THLModel(small_config("float32"), seed=0)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=1)
    with LayeredInferenceEngine(model, vram_budget=budget, overlap=False) as engine:
        plan = engine.plan()
        every = ["router", "tier.0", "tier.1", "tier.2", "writer", "layer_norm", "output_head"]
        assert plan.needed(0, 0) == every
        assert plan.needed(1, 1) == ["local_attn", "router", "tier.0", "writer", "layer_norm", "output_head"]
        assert plan.needed(2, 2)[:4] == ["local_attn", "router", "tier.0", "tier.1"]
        P = model.params
        per_step = [plan.streamed_bytes(t, min(t, 4), P) for t in range(4)]
        assert per_step[1] < per_step[2] < per_step[0] and per_step[1] == per_step[3]


# ---------------------------------------------------------------------------------------------------
# Planning and errors
# ---------------------------------------------------------------------------------------------------
def test_too_small_budget_names_the_minimum():
    model = THLModel(small_config("float32"), seed=0)
    minimum = LayeredInferenceEngine.minimum_budget(model, batch_size=2)
    with pytest.raises(DeviceBudgetError) as info:
        LayeredInferenceEngine(model, vram_budget=minimum - 1, batch_size=2)
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, THLError)
    assert err.minimum == minimum and f"{minimum:,}" in str(err)
    assert "batch size 2" in str(err)
    with pytest.raises(DeviceBudgetError, match="minimum budget"):
        LayeredInferenceEngine(model, vram_budget="1KB")
    LayeredInferenceEngine(model, vram_budget=minimum, batch_size=2).close()


def test_plan_describes_streaming():
    model = THLModel(small_config("float32"), seed=0)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=1)
    with LayeredInferenceEngine(model, vram_budget=budget) as engine:
        plan = engine.plan()
        text = str(plan)
        assert "streams" in text and "chunk" in text and "stream slots: 2 x" in text
        assert f"{budget:,}" in text and "host" in text
        assert "streamed per step" in engine.describe()
        assert plan.planned_peak <= budget
        # the head's chunks tile the vocabulary and every piece fits a slot
        assert plan.head_chunks[0][0] == 0 and plan.head_chunks[-1][1] == model.config.vocab_size
        assert all(a == b for (_, a), (b, _) in zip(plan.head_chunks[:-1], plan.head_chunks[1:], strict=True))
        for name in plan.streamed:
            for piece in plan.pieces(name, model.params):
                end = max(off + np.prod(shape) * model.dtype.itemsize for _, _, off, shape in piece.parts)
                assert end <= plan.slot_bytes
    with LayeredInferenceEngine(model) as engine:
        assert "nothing streams" in str(engine.plan())
        assert engine.plan(batch_size=4).batch_size == 4      # a hypothetical plan, not applied
        assert engine.plan().batch_size == 1


def test_default_size_plan_fits_64MB():
    """The issue's target: the default config (~174M parameters) plans within 64 MB (measured in
    benchmarks/bench_layered.py); the planner needs shapes only."""
    plan = plan_layers(THLConfig(), parse_bytes("64MB"), 1, "float32")
    assert plan.planned_peak <= 64_000_000 and plan.minimum_budget < 64_000_000
    assert "output_head" in plan.streamed and plan.module("router").resident


@pytest.mark.parametrize("text,expected", [
    ("64MB", 64_000_000), ("64 mb", 64_000_000), ("1.5GB", 1_500_000_000), ("512MiB", 512 << 20),
    ("4gb", 4_000_000_000), ("1000", 1000), ("2e6", 2_000_000), (12345, 12345), (" 3 KiB ", 3072),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "64 parsecs", "-5MB", "0", "", "MB", True, [64], float("nan"), 0,
                                 -3])
def test_parse_bytes_rejects_nonsense(bad):
    with pytest.raises(InputError, match="vram_budget"):
        parse_bytes(bad)
    model = THLModel(small_config(), seed=0)
    with pytest.raises(InputError):
        LayeredInferenceEngine(model, vram_budget=bad)


def test_bad_inputs():
    model = THLModel(small_config(), seed=0)
    with LayeredInferenceEngine(model) as engine:
        with pytest.raises(InputError, match=r"\[B\] or \[B, 1\]"):
            engine.step(np.zeros((2, 2), np.int64))
        with pytest.raises(InputError, match="outside"):
            engine.step([97])
        with pytest.raises(InputError, match="integer"):
            engine.step([1.5])
        with pytest.raises(StateError, match="batch size 2"):
            engine.step([1, 2], InferenceState.init(batch_size=1, config=model.config))
        with pytest.raises(StateError, match="InferenceState"):
            engine.step([1], {"memory": 0})
        other = small_config(memory_slots=7)
        with pytest.raises(StateError, match="another config"):
            engine.step([1], InferenceState.init(batch_size=1, config=other))
        logits, _ = engine.step([1])                   # still works after the errors
        assert logits.shape == (1, 97)
    with pytest.raises(InputError, match="device"):
        LayeredInferenceEngine(model, device="tpu")
    with pytest.raises(InputError, match="THLModel"):
        LayeredInferenceEngine("not a model")


def test_holding_extra_device_states_cannot_pass_the_budget():
    """peak_device_bytes never exceeds the budget: past it an allocation fails with DeviceBudgetError
    (like a GPU's out-of-memory), and the engine keeps working once the extra state is gone."""
    model = THLModel(small_config("float32"), seed=0)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=1)
    with LayeredInferenceEngine(model, vram_budget=budget) as engine:
        _, s1 = engine.step([1])
        _, s2 = engine.step([2], s1)                   # s1 is still held: three states would not fit
        raised = False
        try:
            engine.step([3], s2)
        except DeviceBudgetError as exc:
            raised = "earlier states" in str(exc)
        assert raised
        gc.collect()
        s1 = engine.state_to_host(s1)                  # a host copy does not count
        logits, s3 = engine.step([3], s2)
        assert engine.peak_device_bytes <= budget and s3.timestep == 3


# ---------------------------------------------------------------------------------------------------
# The accounting against real allocations
# ---------------------------------------------------------------------------------------------------
def test_workspace_bounds_cover_real_allocations():
    """Each module's planned workspace bounds what it really allocates (tracemalloc sees NumPy's
    allocations), and the whole engine allocates no more than its accounted peak plus the host logits."""
    cfg = small_config("float32", vocab_size=400, embedding_dim=40, tier_dims=[24, 32, 40], memory_slots=96,
                       memory_dim=48, value_dim=32, num_heads=4, head_dim=8, read_topk=4, local_window=6,
                       read_slot_capacity=2, write_slots=2)
    model = THLModel(cfg, seed=6)
    B = 4
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=B)
    state = InferenceState.init(batch_size=B, config=cfg)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, size=(10, B))
    measured = {}
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        engine = LayeredInferenceEngine(model, vram_budget=budget, batch_size=B, overlap=False)
        be = engine.backend
        reserve = be.workspace

        @contextlib.contextmanager
        def measuring(nbytes, what="workspace"):
            cur, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            with reserve(nbytes, what):
                yield
            measured.setdefault(nbytes, []).append(tracemalloc.get_traced_memory()[1] - cur)

        be.workspace = measuring
        tracemalloc.reset_peak()
        for tok in toks:
            _, state = engine.step(tok, state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    plan = engine.plan()
    for m in plan.modules:
        assert m.workspace in measured, m.name
        assert max(measured[m.workspace]) <= m.workspace, (m.name, max(measured[m.workspace]), m.workspace)
    host_logits = B * cfg.vocab_size * 4
    python_objects = 64 << 10
    assert peak - base <= engine.peak_device_bytes + host_logits + python_objects
    assert engine.peak_device_bytes <= budget
    engine.close()


# ---------------------------------------------------------------------------------------------------
# CUDA (CuPy): skipped without CuPy and a GPU
# ---------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not cuda_available(),
                                reason="needs CuPy and a CUDA device (pip install 'thl-np[cuda]')")


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("kind", ["unlimited", "minimal"])
def test_cuda_engine_equals_plain_model(dtype, tol, kind):
    model = THLModel(small_config(dtype), seed=1)
    budget = None if kind == "unlimited" else LayeredInferenceEngine.minimum_budget(model, 2, device="cuda")
    with LayeredInferenceEngine(model, device="cuda", vram_budget=budget, batch_size=2) as engine:
        rng = np.random.default_rng(0)
        s_ref, s = None, None
        for _ in range(STEPS):
            tok = rng.integers(0, model.config.vocab_size, size=2)
            ref, s_ref = model.forward_step(tok, s_ref)
            logits, s = engine.step(tok, s)
            np.testing.assert_allclose(logits, ref, atol=tol, rtol=0)
            assert engine.peak_device_bytes <= engine.budget
        assert_states_equal(s_ref, engine.state_to_host(s), tol)


@needs_cuda
def test_cuda_components_match_numpy():
    """The component functions themselves on CuPy arrays: router (with capacity, an empty slot), read
    metadata, writer and memory write equal their NumPy results."""
    import cupy as cp

    rng = np.random.default_rng(1)
    B, J, d_m, H, d_h = 3, 11, 8, 2, 4
    memory = rng.standard_normal((B, J, d_m))
    memory[:, 3] = 0.0
    read_ema = rng.random((B, J))
    last = rng.integers(0, 5, size=(B, J))
    u, W_q = rng.standard_normal((B, 5)), rng.standard_normal((H * d_h, 5))
    W_k, W_v = rng.standard_normal((H * d_h, d_m)), rng.standard_normal((4, d_m))
    x_w, W_w, b_w = rng.standard_normal((B, 6)), rng.standard_normal((d_m, 6)), rng.standard_normal(d_m)
    kw = dict(num_heads=H, head_dim=d_h, topk=3, load_penalty=0.3, capacity=1)
    wkw = dict(write_slots=2, clip_max=1.0, beta=8.0, theta=0.3, stale_weight=1.0, underuse_weight=1.0)
    mkw = dict(decay=0.9, write_rate=0.5, ema_decay=0.8)

    def run(xp):
        a = [xp.asarray(v) for v in (u, memory, read_ema, W_q, W_k, W_v, last, x_w, W_w, b_w)]
        r, alpha, idx, _ = router_forward(*a[:6], **kw)
        ema, last_read, _ = read_meta_forward(a[2], a[6], alpha, idx, 7, 0.9)
        w, g, targets, _ = writer_forward(a[7], a[1], ema, a[6], 9, a[8], a[9], **wkw)
        out = memory_write_forward(a[1], ema, a[6], targets, g, w, 9, **mkw)
        return [r, alpha, idx, ema, last_read, w, g, targets, *out]

    for x, y in zip(run(np), run(cp), strict=True):
        np.testing.assert_allclose(cp.asnumpy(y), x, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------
# The CuPy backend's own logic, run on a NumPy stand-in for CuPy (no GPU here)
# ---------------------------------------------------------------------------------------------------
class _FakeMemPtr:
    def __init__(self, arr, off=0):
        self.arr, self.off = arr, int(off)

    @property
    def ptr(self):
        return self.arr.ctypes.data + self.off

    def __add__(self, n):
        return _FakeMemPtr(self.arr, self.off + int(n))


class _FakeDeviceArray(np.ndarray):
    """A NumPy array that answers the CuPy ndarray calls the backend makes (set/get/data/device)."""

    def __new__(cls, shape, dtype=float, memptr=None):
        if memptr is None:
            return np.empty(shape, dtype).view(cls)
        return np.ndarray(shape, dtype, buffer=memptr.arr, offset=memptr.off).view(cls)

    @property
    def data(self):
        return _FakeMemPtr(self)

    @property
    def device(self):
        return type("Dev", (), {"id": 0})()

    def set(self, host, stream=None):
        self[...] = host

    def get(self, stream=None):
        return np.array(self).view(np.ndarray)


def _fake_cupy():
    """A module object with the CuPy API surface the backend uses, computing with NumPy on the host
    (memcpyAsync is a memmove, events and streams do nothing). It checks the backend's Python: the
    calls, the staging and slot arithmetic, the hook, the ops; not CuPy's numerics or concurrency."""
    import ctypes
    import types

    def wrap(x):
        if type(x) is np.ndarray:
            return x.view(_FakeDeviceArray)
        if isinstance(x, tuple):
            return tuple(wrap(v) for v in x)
        return x

    class Ctx:
        def __init__(self, *a, **k):
            self.id, self.ptr = (a[0] if a else 0), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

        def wait_event(self, ev):
            assert ev.recorded

    class Event:
        def __init__(self, *a, **k):
            self.recorded = False

        def record(self, stream=None):
            self.recorded = True

        def synchronize(self):
            assert self.recorded

    class Pool:
        def set_limit(self, size=None):
            self.limit = size

        def used_bytes(self):
            return 0

        def malloc(self, n):
            raise AssertionError("not called by the stand-in")

        def free_all_blocks(self):
            pass

    class Hook:
        name = "hook"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cuda = types.SimpleNamespace(
        Device=Ctx, Stream=Ctx, Event=Event, MemoryPool=Pool, MemoryHook=Hook,
        using_allocator=lambda alloc: contextlib.nullcontext(),
        alloc_pinned_memory=lambda n: bytearray(n), get_elapsed_time=lambda a, b: 1.0,
        memory=types.SimpleNamespace(OutOfMemoryError=MemoryError),
        runtime=types.SimpleNamespace(
            memGetInfo=lambda: (8 << 30, 16 << 30), memcpyHostToDevice=1, getDeviceCount=lambda: 1,
            getDeviceProperties=lambda i: {"name": b"stand-in"},
            memcpyAsync=lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n)))
    fake = types.ModuleType("fakecupy")
    fake.__version__ = "0"
    fake.cuda = cuda
    fake.ndarray = _FakeDeviceArray
    fake.asnumpy = lambda a: np.array(a).view(np.ndarray)
    fake.argsort = lambda a, axis=-1: np.argsort(a, axis=axis, kind="stable").view(_FakeDeviceArray)
    fake.get_default_memory_pool = Pool
    for name in ("empty", "zeros", "asarray", "arange", "concatenate", "empty_like", "where", "einsum", "exp",
                 "sqrt", "argmax", "take_along_axis"):
        fake.__dict__[name] = (lambda f: lambda *a, **k: wrap(f(*a, **k)))(getattr(np, name))
    for name in ("float64", "float32", "int64", "uint8"):
        fake.__dict__[name] = getattr(np, name)
    return fake


def test_cuda_backend_logic_on_a_numpy_stand_in(monkeypatch):
    """The CuPy backend's code (pinned staging, memcpy into slot views, events, the generic ops on
    device-array types, state and logits transfers) run against a NumPy stand-in for CuPy: the engine
    equals the plain model at the CUDA minimal budget. CuPy itself is not exercised here."""
    from thl_np.engines.layered.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "import_cupy", _fake_cupy)
    monkeypatch.setattr(cuda_backend.CupyBackend, "STAGE_BYTES", 1000)   # many staging rounds per piece
    model = THLModel(small_config("float64", read_slot_capacity=1, write_slots=2), seed=8)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=2, device="cuda")
    with LayeredInferenceEngine(model, device="cuda", vram_budget=budget, batch_size=2) as engine:
        assert isinstance(engine.backend, cuda_backend.CupyBackend) and engine.plan().streamed
        rng = np.random.default_rng(0)
        s_ref, s = None, None
        for _ in range(12):
            tok = rng.integers(0, model.config.vocab_size, size=2)
            ref, s_ref = model.forward_step(tok, s_ref)
            logits, s = engine.step(tok, s)
            assert type(logits) is np.ndarray and isinstance(s.memory, _FakeDeviceArray)
            np.testing.assert_allclose(logits, ref, atol=1e-12, rtol=0)
        assert_states_equal(s_ref, engine.state_to_host(s), 1e-12)
        assert "stand-in" in engine.describe()
        assert engine.backend.measure_copy_bandwidth(nbytes=1 << 16) > 0
