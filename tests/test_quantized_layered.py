"""The layered engine on int8 weights (thl_np.engines.layered.storage): it streams the int8 values and
scales, dequantizes on the device, equals the plain model on the same quantized weights, and its budget
counts the int8 bytes it moves and the float copies it makes (measured with tracemalloc)."""
import contextlib
import tracemalloc

import numpy as np
import pytest
from test_layered import _fake_cupy, _FakeDeviceArray, assert_states_equal, small_config

from thl_np import InferenceState, THLConfig, THLModel
from thl_np.engines.layered import LayeredInferenceEngine, parse_bytes, plan_layers
from thl_np.model import quantize_model
from thl_np.quant import SCHEMES, scheme_config

TOL = {"float64": 1e-12, "float32": 1e-5}


def wide_config(dtype):
    """Rows wider than 32 columns, so block-32 scales make several groups per row."""
    return small_config(dtype, vocab_size=300, embedding_dim=40, tier_dims=[24, 36, 40], memory_dim=48,
                        value_dim=32, num_heads=4, head_dim=8, query_dim=8)


def run_both(model, engine, steps=12, batch_size=2, seed=0):
    rng = np.random.default_rng(seed)
    tol = TOL[model.config.dtype]
    s_ref = s = None
    for _ in range(steps):
        tok = rng.integers(0, model.config.vocab_size, size=batch_size)
        ref, s_ref = model.forward_step(tok, s_ref, path="plain")
        logits, s = engine.step(tok, s)
        np.testing.assert_allclose(logits, ref, atol=tol * max(1.0, float(np.abs(ref).max())), rtol=0)
        assert engine.peak_device_bytes <= engine.budget
    assert_states_equal(s_ref, engine.state_to_host(s), tol * 10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("kind", ["unlimited", "minimal"])
def test_engine_equals_plain_model_on_int8_weights(kind, scheme, dtype):
    model = quantize_model(THLModel(wide_config(dtype), seed=1), scheme)
    budget = None if kind == "unlimited" else LayeredInferenceEngine.minimum_budget(model, batch_size=2)
    with LayeredInferenceEngine(model, vram_budget=budget, batch_size=2) as engine:
        plan = engine.plan()
        if kind == "minimal":
            assert "output_head" in plan.streamed and len(plan.head_chunks) > 1
            assert plan.module("output_head").params == ("output_head.weight", "output_head.weight_scale",
                                                         "output_head.bias")
        run_both(model, engine)


def test_plan_counts_int8_bytes():
    """Resident and streamed weights are the stored int8 values and float32 scales: each module about a quarter
    of its float32 bytes, and the streamed bytes of a step likewise."""
    cfg = wide_config("float32")
    model = THLModel(cfg, seed=0)
    qmodel = quantize_model(model)
    fplan = plan_layers(cfg, 1 << 40, 1, "float32")
    qplan = plan_layers(qmodel.config, 1 << 40, 1, "float32")
    for m in fplan.modules:
        if m.has_weights and m.name != "layer_norm":
            ratio = qplan.module(m.name).nbytes / m.nbytes
            assert 0.25 <= ratio < 0.3, (m.name, ratio)
    for q, f in ((qmodel, model),):
        fb = LayeredInferenceEngine.minimum_budget(f, batch_size=1)
        qb = LayeredInferenceEngine.minimum_budget(q, batch_size=1)
        with LayeredInferenceEngine(f, vram_budget=fb) as fe, LayeredInferenceEngine(q, vram_budget=qb) as qe:
            s_f = s_q = None
            for tok in range(5):
                _, s_f = fe.step([tok], s_f)
                _, s_q = qe.step([tok], s_q)
            assert qe.stats["bytes_streamed"] <= 0.3 * fe.stats["bytes_streamed"]
            assert "output_head" in qe.plan().streamed


def test_default_size_int8_plan_fits_64MB():
    """The issue's case: a quantized default-size model (~174M parameters) under a 64 MB budget, from shapes
    only, streaming at most 0.3x the bytes per step of the float32 model's plan at the same budget."""
    q = THLConfig(quantization=scheme_config("int8"))
    plan = plan_layers(q, parse_bytes("64MB"), 1, "float32")
    fplan = plan_layers(THLConfig(), parse_bytes("64MB"), 1, "float32")
    assert plan.planned_peak <= 64_000_000 and "output_head" in plan.streamed

    def streamed(p):
        return sum(m.layout_bytes / m.every for m in p.modules if m.has_weights and not m.resident)
    assert streamed(plan) <= 0.3 * streamed(fplan)
    assert plan.module("output_head").nbytes < 0.26 * fplan.module("output_head").nbytes


def test_memory_mapped_int8_file_streams(tmp_path):
    quantize_model(THLModel(wide_config("float32"), seed=3), "int8-block32").save_pretrained(tmp_path)
    model = THLModel.from_pretrained(tmp_path)
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=1)
    with LayeredInferenceEngine(model, vram_budget=budget) as engine:
        assert "output_head" in engine.describe()
        run_both(model, engine, steps=8, batch_size=1)


def test_workspace_bounds_cover_real_allocations_with_int8_weights():
    """As test_layered's: each module's planned workspace (its float copies of int8 weights included) bounds
    what it really allocates, and the engine allocates no more than its accounted peak plus the host logits."""
    cfg = small_config("float32", vocab_size=400, embedding_dim=40, tier_dims=[24, 32, 40], memory_slots=96,
                       memory_dim=48, value_dim=32, num_heads=4, head_dim=8, read_topk=4, local_window=6,
                       read_slot_capacity=2, write_slots=2)
    for scheme in SCHEMES:
        model = quantize_model(THLModel(cfg, seed=6), scheme)
        B = 4
        budget = LayeredInferenceEngine.minimum_budget(model, batch_size=B)
        state = InferenceState.init(batch_size=B, config=cfg)
        toks = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(10, B))
        measured = {}
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            engine = LayeredInferenceEngine(model, vram_budget=budget, batch_size=B, overlap=False)
            reserve = engine.backend.workspace

            @contextlib.contextmanager
            def measuring(nbytes, what="workspace", reserve=reserve, measured=measured):
                cur, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                with reserve(nbytes, what):
                    yield
                measured.setdefault(nbytes, []).append(tracemalloc.get_traced_memory()[1] - cur)

            engine.backend.workspace = measuring
            tracemalloc.reset_peak()
            for tok in toks:
                _, state = engine.step(tok, state)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        for m in engine.plan().modules:
            assert m.workspace in measured, m.name
            assert max(measured[m.workspace]) <= m.workspace, (scheme, m.name, max(measured[m.workspace]),
                                                               m.workspace)
        assert peak - base <= engine.peak_device_bytes + B * cfg.vocab_size * 4 + (64 << 10)
        assert engine.peak_device_bytes <= budget
        engine.close()


def test_cuda_backend_on_a_numpy_stand_in_with_int8_weights(monkeypatch):
    """The CuPy backend's code with int8 pieces in the slots and dequantization on "device" arrays."""
    from thl_np.engines.layered.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "import_cupy", _fake_cupy)
    monkeypatch.setattr(cuda_backend.CupyBackend, "STAGE_BYTES", 1000)
    model = quantize_model(THLModel(wide_config("float64"), seed=8), "int8-block32")
    budget = LayeredInferenceEngine.minimum_budget(model, batch_size=2, device="cuda")
    with LayeredInferenceEngine(model, device="cuda", vram_budget=budget, batch_size=2) as engine:
        assert engine.plan().streamed
        rng = np.random.default_rng(0)
        s_ref = s = None
        for _ in range(8):
            tok = rng.integers(0, model.config.vocab_size, size=2)
            ref, s_ref = model.forward_step(tok, s_ref, path="plain")
            logits, s = engine.step(tok, s)
            assert isinstance(s.memory, _FakeDeviceArray)
            np.testing.assert_allclose(logits, ref, atol=1e-12, rtol=0)
