"""Each ONNX lowering (thl_np/onnx/<component>.py) alone against its component's definition (thl_np/components):
a graph of just that component, run in onnxruntime on the reference component cases' inputs (reference/
components, in float32) and on the cases that matter for the lowering (ties, an empty buffer, clocks)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from thl_np.components import (  # noqa: E402
    gru,
    local_attention,
    output,
    router,
    router_empty_last,
    router_unit_keys,
    router_unit_rows,
    writer,
)
from thl_np.components.embedding import embedding_forward  # noqa: E402
from thl_np.onnx.builder import BOOL, FLOAT, INT64, GraphBuilder  # noqa: E402
from thl_np.onnx.embedding import lower_embedding  # noqa: E402
from thl_np.onnx.gru import lower_gru, lower_tiers  # noqa: E402
from thl_np.onnx.local_attention import lower_buffer_push, lower_local_attention  # noqa: E402
from thl_np.onnx.output import lower_output  # noqa: E402
from thl_np.onnx.router import lower_read_meta, lower_router  # noqa: E402
from thl_np.onnx.writer import lower_memory_write, lower_writer  # noqa: E402
from thl_np.quant.scheme import quantize_matrix  # noqa: E402
from thl_np.quant.tensor import QuantizedTensor  # noqa: E402
from thl_np.step import tiers_forward  # noqa: E402

REF = os.path.join(os.path.dirname(__file__), os.pardir, "reference", "components")
ATOL = 1e-5
_ELEM = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64, np.dtype(np.bool_): BOOL}


def case(name):
    """A reference component case's inputs (floats as float32) and settings."""
    with np.load(os.path.join(REF, name, "inputs.npz")) as z:
        arrays = {k: (z[k].astype(np.float32) if z[k].dtype.kind == "f" else z[k]) for k in z.files}
    with open(os.path.join(REF, name, "config.json")) as f:
        return arrays, json.load(f)


def run(build, inputs: dict, params=None, tensor=None):
    """Build a graph whose inputs are ``inputs`` (name → array) and whose outputs are what ``build(g, *names)``
    returns; run it in onnxruntime → the outputs as arrays."""
    g = GraphBuilder(params or {}, tensor)
    for name, arr in inputs.items():
        g.add_input(name, _ELEM[np.asarray(arr).dtype], list(np.shape(arr)))
    outs = build(g, *inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for i, name in enumerate(outs):
        g.add_output(f"out{i}", name, onnx.TensorProto.UNDEFINED, None)
    model = onnx.shape_inference.infer_shapes(g.model())
    types = {v.name: v.type for v in model.graph.value_info}
    for i, name in enumerate(outs):
        model.graph.output[i].type.CopyFrom(types[name])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: np.asarray(v) for k, v in inputs.items()})


def close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("int8", [False, True])
def test_embedding(int8):
    a, _ = case("embedding")
    ids = a["ids"].reshape(-1)
    table = a["weight"]
    if int8:
        q, s = quantize_matrix(table, None)
        qt = QuantizedTensor(q, s, None)
        (got,) = run(lambda g, i: lower_embedding(g, i), {"ids": ids}, tensor=lambda n: qt)
        want = qt.rows(ids, np.float32)
        np.testing.assert_array_equal(got, want)   # float32(q)·s, the same single rounding
    else:
        (got,) = run(lambda g, i: lower_embedding(g, i), {"ids": ids}, {"embedding.weight": table})
        np.testing.assert_array_equal(got, embedding_forward(table, ids))


# ----------------------------------------------------------------------------------------- local attention
@pytest.mark.parametrize("n", [0, 1, 3, 4])
def test_local_attention_over_the_first_n_rows(n):
    a, _ = case("local_attention")
    e, buf = a["e"], a["buffer"].copy()
    buf[:, n:] = 7.0  # rows past n must not count, whatever they hold
    params = {"local_attn.q.weight": a["Wq"], "local_attn.k.weight": a["Wk"], "local_attn.v.weight": a["Wv"]}
    W, d_v, d_lq = buf.shape[1], a["Wv"].shape[0], a["Wq"].shape[0]
    (got,) = run(lambda g, e_, b_, n_: lower_local_attention(g, e_, b_, n_, W, d_v, d_lq),
                 {"e": e, "buffer": buf, "n": np.asarray(n, np.int64)}, params)
    want = (np.zeros((2, d_v), np.float32) if n == 0 else
            local_attention.local_attention_forward(e, buf[:, :n], a["Wq"], a["Wk"], a["Wv"])[0])
    close(got, want)


@pytest.mark.parametrize("n", [0, 2, 4])
def test_buffer_push(n):
    a, _ = case("local_attention")
    e, buf = a["e"], a["buffer"]
    got_buf, got_n = run(lambda g, b_, n_, e_: lower_buffer_push(g, b_, n_, e_, buf.shape[1]),
                         {"buffer": buf, "n": np.asarray(n, np.int64), "e": e})
    want_buf, want_n = local_attention.buffer_push(buf, n, e)
    np.testing.assert_array_equal(got_buf, want_buf)
    assert int(got_n) == want_n


# ----------------------------------------------------------------------------------------- router
ROUTERS = {"spec": router.router_forward, "unit_keys": router_unit_keys.unit_keys_forward,
           "empty_last": router_empty_last.empty_last_forward, "unit_rows": router_unit_rows.unit_rows_forward}


def _router(a, cfg, rule="spec", capacity="cfg"):
    cap = cfg["read_slot_capacity"] if capacity == "cfg" else capacity
    kw = dict(num_heads=cfg["num_heads"], head_dim=cfg["head_dim"], topk=cfg["read_topk"],
              load_penalty=cfg["load_penalty"], capacity=cap)
    params = {"router.W_q.weight": a["W_q"], "router.W_k.weight": a["W_k"], "router.W_v.weight": a["W_v"]}
    dims = dict(num_slots=a["memory"].shape[1], memory_dim=a["memory"].shape[2], value_dim=a["W_v"].shape[0])
    flags = dict(unit_keys=rule == "unit_keys", empty_last=rule == "empty_last", unit_rows=rule == "unit_rows")
    got = run(lambda g, u, m, r: lower_router(g, u, m, r, **flags, **dims, **kw),
              {"u": a["u"], "memory": a["memory"], "read_ema": a["read_ema"]}, params)
    want = ROUTERS[rule](a["u"], a["memory"], a["read_ema"], a["W_q"], a["W_k"], a["W_v"], **kw)[:3]
    return got, want


@pytest.mark.parametrize("name,rule,capacity", [
    ("router", "spec", "cfg"), ("router", "unit_keys", "cfg"), ("router", "empty_last", "cfg"),
    ("router_capacity", "spec", "cfg"), ("router_capacity", "unit_keys", "cfg"),
    ("router_capacity", "empty_last", "cfg"), ("router", "unit_rows", "cfg"), ("router_capacity", "unit_rows", "cfg"),
    ("router", "spec", 2)])
def test_router(name, rule, capacity):
    a, cfg = case(name)
    (r, alpha, idx), (r_w, alpha_w, idx_w) = _router(a, cfg, rule, capacity)
    np.testing.assert_array_equal(idx, idx_w)
    close(alpha, alpha_w)
    close(r, r_w)


@pytest.mark.parametrize("rule", list(ROUTERS))
def test_router_all_tie_zero_state(rule):
    """Every first step: an all-zero memory and read_ema, so every slot scores the same; TopK(sorted=1) must
    pick slots 0..κ-1 in order for every head, as the spec's tie rule says."""
    a, cfg = case("router")
    a = dict(a, memory=np.zeros_like(a["memory"]), read_ema=np.zeros_like(a["read_ema"]))
    (r, alpha, idx), (_, _, idx_w) = _router(a, cfg, rule)
    kappa = cfg["read_topk"]
    assert (idx == np.arange(kappa)).all() and (idx == idx_w).all()
    close(alpha, np.full(alpha.shape, 1.0 / kappa))
    assert not r.any()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rule=st.sampled_from(list(ROUTERS)), capacity=st.sampled_from([None, 1, 2]))
def test_router_ties_property(seed, rule, capacity):
    """Banks drawn from a few repeated rows (and zero rows), read_ema from a few values: scores tie often, and
    the export must pick exactly the slots the definition picks (equal scores: lower slot first)."""
    rng = np.random.default_rng(seed)
    a, cfg = case("router_capacity")
    B, J, d_m = a["memory"].shape
    rows = np.concatenate([np.zeros((1, d_m)), rng.integers(-2, 3, (2, d_m))]).astype(np.float32)
    a = dict(a, memory=rows[rng.integers(0, 3, (B, J))], read_ema=rng.choice([0.0, 0.25], (B, J)).astype(np.float32))
    (r, alpha, idx), (r_w, alpha_w, idx_w) = _router(a, cfg, rule, capacity)
    np.testing.assert_array_equal(idx, idx_w)
    close(alpha, alpha_w)
    close(r, r_w)


def test_read_metadata():
    a, cfg = case("read_metadata")
    got = run(lambda g, e, lr, al, ix, t: lower_read_meta(g, e, lr, al, ix, t, num_slots=a["read_ema"].shape[1],
                                                          decay=cfg["read_ema_decay"]),
              {"read_ema": a["read_ema"], "last_read": a["last_read"], "alpha": a["alpha"], "idx": a["idx"],
               "t": np.asarray(cfg["t"], np.int64)})
    want = router.read_meta_forward(a["read_ema"], a["last_read"], a["alpha"], a["idx"], cfg["t"],
                                    cfg["read_ema_decay"])
    close(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    close(got[2], want[2])


# ----------------------------------------------------------------------------------------- GRU and tiers
def test_gru_cell():
    a, _ = case("gru_cell")
    params = {f"c.{k}.{'weight' if k2 == 'W' else 'bias'}": a[f"{k2}_{k[-1]}"]
              for k in ("W_z", "W_r", "W_h") for k2 in ("W", "b")}
    (got,) = run(lambda g, s, x: lower_gru(g, s, x, "c."), {"s_prev": a["s_prev"], "x": a["x"]}, params)
    want, _ = gru.gru_forward(a["s_prev"], a["x"], a["W_z"], a["b_z"], a["W_r"], a["b_r"], a["W_h"], a["b_h"])
    close(got, want)


@pytest.mark.parametrize("t", range(7))
def test_tiers_every_clock_phase(t):
    """Clocks [1, 3, 2]: t = 0..6 covers every phase of every tier (active and inactive)."""
    a, cfg = case("tiers_some_inactive")
    params = {k: v for k, v in a.items() if k.startswith("tiers.")}
    K = len(cfg["tier_dims"])
    ins = {"t": np.asarray(t, np.int64), "e": a["e"], "r": a["r"], "l": a["l"],
           **{f"s{k}": a[f"tier_state_{k}"] for k in range(K)}}
    got = run(lambda g, t_, e, r, l_, *s: tuple(lower_tiers(g, t_, e, r, l_, list(s), cfg["tier_timescales"])),
              ins, params)
    want, _ = tiers_forward(params, t, a["e"], a["r"], a["l"], [a[f"tier_state_{k}"] for k in range(K)],
                            cfg["tier_timescales"])
    for k in range(K):
        close(got[k], want[k])
        if t % cfg["tier_timescales"][k]:
            np.testing.assert_array_equal(got[k], a[f"tier_state_{k}"])


# ----------------------------------------------------------------------------------------- writer
@pytest.mark.parametrize("name", ["writer_novel_empty", "writer_novel_lru", "writer_refine", "writer_clipped"])
def test_writer(name):
    a, cfg = case(name)
    kw = dict(num_slots=a["memory"].shape[1], memory_dim=a["memory"].shape[2],
              write_slots=cfg["write_slots"], clip_max=cfg["write_clip_max"], beta=cfg["novelty_beta"],
              theta=cfg["novelty_theta"], stale_weight=cfg["stale_weight"], underuse_weight=cfg["underuse_weight"])
    params = {"writer.W_w.weight": a["W_w"], "writer.W_w.bias": a["b_w"]}
    w, gate, targets, novel, clipped = run(
        lambda g, x, m, r, lw, t: lower_writer(g, x, m, r, lw, t, **kw),
        {"x_w": a["x_w"], "memory": a["memory"], "read_ema": a["read_ema"], "last_write": a["last_write"],
         "t": np.asarray(cfg["t"], np.int64)}, params)
    kw = {k: v for k, v in kw.items() if k not in ("num_slots", "memory_dim")}
    w_w, g_w, t_w, cache = writer.writer_forward(a["x_w"], a["memory"], a["read_ema"], a["last_write"], cfg["t"],
                                                 a["W_w"], a["b_w"], **kw)
    np.testing.assert_array_equal(targets, t_w)
    np.testing.assert_array_equal(novel, cache.novel)
    np.testing.assert_array_equal(clipped, cache.clipped)
    close(w, w_w)
    close(gate, g_w)


def test_writer_refine_ties_go_to_the_lower_slot():
    """Equal rows have equal affinities in the export too (its row sums are GEMMs, whose result does not
    depend on where a row lies): refinement picks the lower slots of a run of equal rows."""
    a, cfg = case("writer_refine")
    m = a["memory"].copy()
    m[:, 2:6] = m[:, 3:4]   # slots 2..5 equal
    a = dict(a, memory=m)
    x_w, W_w, b_w = a["x_w"], a["W_w"], a["b_w"]
    kw = dict(num_slots=m.shape[1], memory_dim=m.shape[2], write_slots=3,
              clip_max=cfg["write_clip_max"], beta=cfg["novelty_beta"], theta=1.5,
              stale_weight=1.0, underuse_weight=1.0)
    params = {"writer.W_w.weight": W_w, "writer.W_w.bias": b_w}
    got = run(lambda g, x, mm, r, lw, t: lower_writer(g, x, mm, r, lw, t, **kw)[2],
              {"x_w": x_w, "memory": m, "read_ema": a["read_ema"], "last_write": a["last_write"],
               "t": np.asarray(50, np.int64)}, params)[0]
    kw = {k: v for k, v in kw.items() if k not in ("num_slots", "memory_dim")}
    want = writer.writer_forward(x_w, m, a["read_ema"], a["last_write"], 50, W_w, b_w, **kw)[2]
    np.testing.assert_array_equal(got, want)


def test_memory_write():
    a, cfg = case("memory_write")
    kw = dict(decay=cfg["memory_decay"], write_rate=cfg["write_rate"], ema_decay=cfg["write_ema_decay"])
    got = run(lambda g, m, we, lw, tg, gg, w, t: lower_memory_write(g, m, we, lw, tg, gg, w, t,
                                                                    num_slots=a["memory"].shape[1], **kw),
              {"memory": a["memory"], "write_ema": a["write_ema"], "last_write": a["last_write"],
               "targets": a["targets"], "g": a["g"], "w": a["w"], "t": np.asarray(cfg["t"], np.int64)})
    want = writer.memory_write_forward(a["memory"], a["write_ema"], a["last_write"], a["targets"], a["g"], a["w"],
                                       cfg["t"], **kw)
    np.testing.assert_array_equal(got[0], want[0])   # the same two roundings: γ·m, then + η·g·w on targets
    close(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


# ----------------------------------------------------------------------------------------- output
def test_layer_norm_and_head():
    a, cfg = case("layernorm_head")
    x = a["x"].reshape(-1, a["x"].shape[-1])
    params = {k: a[k] for k in ("layer_norm.weight", "layer_norm.bias", "output_head.weight", "output_head.bias")}
    (got,) = run(lambda g, x_: lower_output(g, x_), {"x": x}, params)
    h, _ = output.layer_norm_forward(x, a["layer_norm.weight"], a["layer_norm.bias"])
    close(got, output.linear_forward(h, a["output_head.weight"], a["output_head.bias"]))
