"""One component's reference vectors: draw its inputs, run its forward and backward (the functions of
``thl_np.components``) in float64 and float32, and check every gradient against a central difference.

Each ``*_case(rng)`` returns a ``Component``: its scalar settings, its float64 inputs (including the
upstream gradients ``d_<output>``), and its outputs for both dtypes with the manifest's description of each
key. ``cases.component_cases`` lists them with their seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..components.embedding import embedding_backward, embedding_forward
from ..components.gru import gru_backward, gru_forward
from ..components.local_attention import local_attention_backward, local_attention_forward
from ..components.output import (
    cross_entropy_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    load_balance_forward,
)
from ..components.router import gumbel_noise, read_meta_backward, read_meta_forward, router_backward, router_forward
from ..components.writer import memory_write_backward, memory_write_forward, writer_backward, writer_forward
from ..errors import THLError
from ..step import tiers_backward, tiers_forward
from .check import DTYPES
from .files import CaseOutputs, round_sig
from .margins import MAX_ATTEMPTS, desc_gaps, writer_margins


def _normal(rng, *shape, scale=1.0):
    return rng.normal(0.0, scale, shape)


def _glorot(rng, out_dim, in_dim, gain=1.0):
    return rng.normal(0.0, gain / math.sqrt(in_dim), (out_dim, in_dim))


@dataclass
class Component:
    """One component's vectors: scalar settings, float64 inputs, and outputs for both dtypes."""

    name: str
    description: str
    spec: str
    functions: list
    config: dict
    inputs: dict
    outputs: CaseOutputs
    margins: dict = field(default_factory=dict)


def _cast_inputs(inputs, dt):
    return {k: (np.asarray(v, dtype=dt) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
            for k, v in inputs.items()}


def _run_both(inputs, fn, upstream: dict, masks: dict | None = None):
    """Run ``fn(inputs cast to dtype)`` → dict of outputs, for both dtypes; returns dtype -> dict.

    ``upstream`` maps each output to the input holding its upstream gradient (None: the output is a
    scalar loss). Every ``grad.<input>`` that ``fn`` returns is checked in float64 against a central
    difference of L = Σ upstream · output along a unit direction (``masks`` zero the entries that must
    not move, e.g. an empty slot's row); a mismatch raises THLError."""
    res = {dt: fn(_cast_inputs(inputs, dt)) for dt in DTYPES}
    rng = np.random.default_rng(99)
    masks = masks or {}

    def objective(x):
        o = fn(x)
        return sum(float((o[k] if up is None else x[up] * o[k]).sum()) for k, up in upstream.items())

    for key, g in res["float64"].items():
        if not key.startswith("grad."):
            continue
        name = key[len("grad."):]
        mask = masks.get(name, 1.0)
        g = g * mask
        v = rng.normal(0.0, 1.0, g.shape) * mask
        v = v / np.linalg.norm(v) + (g / np.linalg.norm(g) if np.any(g) else 0.0)
        v = v / np.linalg.norm(v)
        eps = 1e-6
        numeric = (objective({**inputs, name: inputs[name] + eps * v})
                   - objective({**inputs, name: inputs[name] - eps * v})) / (2 * eps)
        predicted = float((g * v).sum())
        if not abs(numeric - predicted) <= 1e-6 * max(abs(predicted), 1e-3):
            raise THLError(f"component vectors: {key} fails a finite-difference check (difference "
                           f"{numeric!r}, gradient {predicted!r})")
    return res


def _fill(out: CaseOutputs, results: dict, table):
    """``table``: (key, kind, spec, doc, required) rows; values from results[dtype][key]."""
    for key, kind, spec, doc, required in table:
        out.add(key, {d: results[d][key] for d in DTYPES}, kind, spec, doc, required)


def embedding_case(rng):
    V, d = 20, 6
    ids = np.array([[3, 7, 3, 19, 0], [7, 7, 12, 5, 3]], dtype=np.int64)
    inputs = {"weight": _normal(rng, V, d), "ids": ids, "d_e": _normal(rng, 2, 5, d)}

    def fn(x):
        return {"e": embedding_forward(x["weight"], x["ids"]),
                "grad.weight": embedding_backward(x["d_e"], x["ids"], V)}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"e": "d_e"}), [
        ("e", "value", "§4.1", "weight[ids]", True),
        ("grad.weight", "grad", "§4.1", "Σ of d_e over the positions holding each id (repeats accumulate)",
         True)])
    return Component("embedding", "Embedding lookup with repeated ids (gradients accumulate).", "§4.1",
                     ["embedding_forward", "embedding_backward"], {"vocab_size": V}, inputs, out)


def local_attention_case(rng):
    B, n, d_e, d_q, d_v = 2, 4, 6, 3, 8
    inputs = {"e": _normal(rng, B, d_e), "buffer": _normal(rng, B, n, d_e), "Wq": _glorot(rng, d_q, d_e, 2.0),
              "Wk": _glorot(rng, d_q, d_e, 2.0), "Wv": _glorot(rng, d_v, d_e), "d_l": _normal(rng, B, d_v)}

    def fn(x):
        l, cache = local_attention_forward(x["e"], x["buffer"], x["Wq"], x["Wk"], x["Wv"])
        d_e, d_buf, dWq, dWk, dWv = local_attention_backward(x["d_l"], cache, x["Wq"], x["Wk"], x["Wv"])
        return {"l": l, "attention": cache.attention, "grad.e": d_e, "grad.buffer": d_buf, "grad.Wq": dWq,
                "grad.Wk": dWk, "grad.Wv": dWv}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"l": "d_l"}), [
        ("l", "value", "§4.2", "ℓ = Σ_i a_i (E_i Wv^T)", True),
        ("attention", "value", "§4.2", "a = softmax(k·q/√d_lq) over the n buffer rows", False),
        ("grad.e", "grad", "§4.2", "", True), ("grad.buffer", "grad", "§4.2", "", True),
        ("grad.Wq", "grad", "§4.2", "", True), ("grad.Wk", "grad", "§4.2", "", True),
        ("grad.Wv", "grad", "§4.2", "", True)])
    return Component("local_attention", "Tier-0 sliding-window attention over n=4 buffer rows.", "§4.2",
                     ["local_attention_forward", "local_attention_backward"], {"n": n}, inputs, out)


def router_case(rng, name, description, *, B, H, d_h, J, d_m, kappa, d_v, capacity=None, train=False,
                want=None):
    """Draw router inputs until the top-κ gaps clear 1e-2 and ``want(extra)`` holds."""
    d_u = 9
    lam = 0.2
    for _attempt in range(MAX_ATTEMPTS):
        inputs = {"u": _normal(rng, B, d_u), "memory": _normal(rng, B, J, d_m),
                  "read_ema": rng.uniform(0.02, 0.5, (B, J)),
                  "W_q": _glorot(rng, H * d_h, d_u, 2.0), "W_k": _glorot(rng, H * d_h, d_m, 2.0),
                  "W_v": _glorot(rng, d_v, d_m)}
        if train:
            inputs["gumbel_uniform"] = rng.random((B, H, J))
        inputs["d_r"] = _normal(rng, B, d_v)
        inputs["d_alpha"] = _normal(rng, B, H, kappa)
        x = inputs
        q = (x["u"] @ x["W_q"].T).reshape(B, H, d_h)
        k = (x["memory"] @ x["W_k"].T).reshape(B, J, H, d_h)
        scores = np.einsum("bjhd,bhd->bhj", k, q) / math.sqrt(d_h) - lam * x["read_ema"][:, None]
        if train:
            scores = scores + gumbel_noise(x["gumbel_uniform"], np.float64)
        gap = float(desc_gaps(scores, kappa).min())
        if gap < 1e-2:
            continue
        res = _run_both(inputs, lambda x: _router_fn(x, H, d_h, kappa, lam, capacity, train),
                        {"r": "d_r", "alpha": "d_alpha"})
        if not np.array_equal(res["float64"]["idx"], res["float32"]["idx"]):
            continue
        if want is not None and not want(res["float64"]):
            continue
        break
    else:  # pragma: no cover - the draws above succeed within a few attempts
        raise THLError(f"component {name}: no draw keeps the router margins")
    out = CaseOutputs()
    table = [("idx", "exact", "§4.3", "the κ slots each head reads, by descending score [B, H, κ]", True),
             ("alpha", "value", "§4.3", "read weights after the capacity step [B, H, κ]", True),
             ("r", "value", "§4.3", "[r_0; …; r_{H-1}] [B, d_v]", True),
             ("scores", "value", "§4.3", "scores of every slot [B, H, J] (with the noise in training mode)",
              False)]
    if train:
        table.append(("gumbel", "value", "§4.3", "−log(−log(U + 1e-9) + 1e-9)", False))
    if capacity is not None:
        table.append(("capacity_mask", "exact", "§4.3", "1 where a pick kept its weight [B, H, κ]", False))
    table += [("grad.u", "grad", "§4.3", "", True),
              ("grad.memory", "grad", "§4.3", "[B, J, d_m]: non-zero only at the rows read", True),
              ("grad.read_ema", "grad", "§4.3", "through the −λ_load·read_ema term of the scores", True),
              ("grad.W_q", "grad", "§4.3", "", True), ("grad.W_k", "grad", "§4.3", "", True),
              ("grad.W_v", "grad", "§4.3", "", True)]
    _fill(out, res, table)
    config = {"num_heads": H, "head_dim": d_h, "read_topk": kappa, "load_penalty": lam,
              "read_slot_capacity": capacity, "training_mode": train}
    return Component(name, description, "§4.3", ["router_forward", "router_backward"], config, inputs, out,
                     {"score_gap": round_sig(gap)})


def _router_fn(x, H, d_h, kappa, lam, capacity, train):
    dt = x["u"].dtype
    gumbel = gumbel_noise(x["gumbel_uniform"], dt) if train else None
    r, alpha, idx, cache = router_forward(x["u"], x["memory"], x["read_ema"], x["W_q"], x["W_k"], x["W_v"],
                                          num_heads=H, head_dim=d_h, topk=kappa, load_penalty=lam,
                                          capacity=capacity, gumbel=gumbel)
    d_u, d_m_sel, d_ema_sel, dWq, dWk, dWv = router_backward(
        x["d_r"], x["d_alpha"], cache, x["W_q"], x["W_k"], x["W_v"], num_heads=H, head_dim=d_h,
        load_penalty=lam)
    B = idx.shape[0]
    rows = np.arange(B)[:, None, None]
    d_mem = np.zeros_like(x["memory"])
    np.add.at(d_mem, (rows, idx), d_m_sel)
    d_ema = np.zeros_like(x["read_ema"])
    np.add.at(d_ema, (rows, idx), d_ema_sel)
    B_, J, _ = x["memory"].shape
    q = (x["u"] @ x["W_q"].T).reshape(B, H, d_h)
    k = (x["memory"] @ x["W_k"].T).reshape(B, J, H, d_h)
    scores = np.einsum("bjhd,bhd->bhj", k, q) / np.sqrt(d_h) - lam * x["read_ema"][:, None]
    if gumbel is not None:
        scores = scores + gumbel
    res = {"idx": idx, "alpha": alpha, "r": r, "scores": scores, "grad.u": d_u, "grad.memory": d_mem,
           "grad.read_ema": d_ema, "grad.W_q": dWq, "grad.W_k": dWk, "grad.W_v": dWv}
    if gumbel is not None:
        res["gumbel"] = gumbel
    if capacity is not None:
        res["capacity_mask"] = cache.cap_mask
        res["_cap_used"] = cache.cap_used
    return res


def read_metadata_case(rng):
    B, H, kappa, J = 2, 3, 2, 7
    # slots picked by several heads (their α add up in A)
    idx = np.array([[[4, 1], [1, 6], [0, 4]], [[2, 3], [5, 2], [2, 0]]], dtype=np.int64)
    logits = _normal(rng, B, H, kappa)
    alpha = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    inputs = {"read_ema": rng.uniform(0.02, 0.5, (B, J)), "last_read": rng.integers(0, 30, (B, J)),
              "alpha": alpha, "idx": idx, "d_read_ema": _normal(rng, B, J), "d_A": _normal(rng, B, J)}
    t, rho = 31, 0.9

    def fn(x):
        ema, last, A = read_meta_forward(x["read_ema"], x["last_read"], x["alpha"], x["idx"], t, rho)
        d_prev, d_alpha = read_meta_backward(x["d_read_ema"], x["d_A"], x["idx"], rho)
        return {"read_ema": ema, "last_read": last, "A": A, "grad.read_ema": d_prev, "grad.alpha": d_alpha}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"read_ema": "d_read_ema", "A": "d_A"}), [
        ("read_ema", "value", "§4.4", "ρ_r·read_ema + (1−ρ_r)·A", True),
        ("last_read", "exact", "§4.4", "t at every picked slot", True),
        ("A", "value", "§4.4", "Σ of α over the picks of each slot [B, J]", True),
        ("grad.read_ema", "grad", "§4.4", "", True),
        ("grad.alpha", "grad", "§4.4", "from d_read_ema (through A) and d_A (the load-balance term)", True)])
    return Component("read_metadata", "Read-EMA update with slots picked by several heads; upstream "
                     "gradients for the new read_ema and for A (as the load-balance term gives).", "§4.4",
                     ["read_meta_forward", "read_meta_backward"], {"t": t, "read_ema_decay": rho}, inputs,
                     out)


def _gru_inputs(rng, d, n_x, prefix=""):
    fan = d + n_x
    return {f"{prefix}W_z": _glorot(rng, d, fan, 1.5), f"{prefix}b_z": _normal(rng, d, scale=0.3),
            f"{prefix}W_r": _glorot(rng, d, fan, 1.5), f"{prefix}b_r": _normal(rng, d, scale=0.3),
            f"{prefix}W_h": _glorot(rng, d, fan, 1.5), f"{prefix}b_h": _normal(rng, d, scale=0.3)}


GRU_KEYS = ("W_z", "b_z", "W_r", "b_r", "W_h", "b_h")


def gru_cell_case(rng):
    B, d, n_in, d_v = 2, 5, 4, 6
    inputs = {"s_prev": np.tanh(_normal(rng, B, d)), "x": _normal(rng, B, n_in + d_v)}
    inputs.update(_gru_inputs(rng, d, n_in + d_v))
    inputs["d_s_new"] = _normal(rng, B, d)

    def fn(x):
        s_new, cache = gru_forward(x["s_prev"], x["x"], *(x[k] for k in GRU_KEYS))
        d_s, d_x, g = gru_backward(x["d_s_new"], cache, x["W_z"], x["W_r"], x["W_h"])
        res = {"s_new": s_new, "z": cache.z, "r_g": cache.r_g, "s_tilde": cache.s_tilde,
               "grad.s_prev": d_s, "grad.x": d_x}
        res.update({f"grad.{k}": g[k] for k in GRU_KEYS})
        return res

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"s_new": "d_s_new"}), [
        ("s_new", "value", "§4.5", "(1−z) ⊙ s_prev + z ⊙ s̃", True),
        ("z", "value", "§4.5", "update gate", False), ("r_g", "value", "§4.5", "reset gate", False),
        ("s_tilde", "value", "§4.5", "candidate state s̃", False),
        ("grad.s_prev", "grad", "§4.5", "", True), ("grad.x", "grad", "§4.5", "", True)]
        + [(f"grad.{k}", "grad", "§4.5", "", True) for k in GRU_KEYS])
    return Component("gru_cell", "One active tier cell (GRU): p = [s_prev; x] with x = [lower; context].",
                     "§4.5", ["gru_forward", "gru_backward"], {}, inputs, out)


TIER_CFG = {"embedding_dim": 4, "value_dim": 6, "tier_dims": [5, 4, 6], "tier_timescales": [1, 3, 2]}


def tiers_case(rng, name, t, description):
    dims, taus, d_e, d_v = TIER_CFG["tier_dims"], TIER_CFG["tier_timescales"], TIER_CFG["embedding_dim"], \
        TIER_CFG["value_dim"]
    B = 2
    inputs = {"e": _normal(rng, B, d_e), "r": _normal(rng, B, d_v), "l": _normal(rng, B, d_v)}
    for k, d in enumerate(dims):
        inputs[f"tier_state_{k}"] = np.tanh(_normal(rng, B, d))
    for k, d in enumerate(dims):
        n_in = d_e if k == 0 else dims[k - 1]
        for g, v in _gru_inputs(rng, d, n_in + d_v).items():
            inputs[f"tiers.cells.{k}." + ("W" + g[1:] + (".weight" if g[0] == "W" else ".bias"))] = v
    for k, d in enumerate(dims):
        inputs[f"d_tier_state_{k}"] = _normal(rng, B, d)
    K = len(dims)
    active = [t % tau == 0 for tau in taus]

    def fn(x):
        s_prev = [x[f"tier_state_{k}"] for k in range(K)]
        s_new, caches = tiers_forward(x, t, x["e"], x["r"], x["l"], s_prev, taus)
        d_s_new = [x[f"d_tier_state_{k}"] for k in range(K)]
        d_prev, d_e_, d_r, d_loc, grads = tiers_backward(x, caches, d_s_new, [d_e] + dims[:-1])
        res = {f"tier_state_{k}": s_new[k] for k in range(K)}
        res.update({"grad.e": d_e_, "grad.r": d_r, "grad.l": d_loc})
        res.update({f"grad.tier_state_{k}": d_prev[k] for k in range(K)})
        for k in range(K):
            for g in ("W_z", "W_r", "W_h"):
                for suffix in (".weight", ".bias"):
                    key = f"tiers.cells.{k}.{g}{suffix}"
                    res["grad." + key] = grads.get(key, np.zeros_like(x[key]))
        return res

    out = CaseOutputs()
    table = [(f"tier_state_{k}", "value", "§4.5", "new state" + ("" if active[k] else " (inactive: = input)"),
              True) for k in range(K)]
    table += [("grad.e", "grad", "§4.5", "", True), ("grad.r", "grad", "§4.5", "", True),
              ("grad.l", "grad", "§4.5", "", True)]
    table += [(f"grad.tier_state_{k}", "grad", "§4.5", "", True) for k in range(K)]
    table += [(f"grad.tiers.cells.{k}.{g}{s}", "grad", "§4.5",
               "" if active[k] else "zero: the tier is inactive", True)
              for k in range(K) for g in ("W_z", "W_r", "W_h") for s in (".weight", ".bias")]
    _fill(out, _run_both(inputs, fn, {f"tier_state_{k}": f"d_tier_state_{k}" for k in range(K)}), table)
    cfg = dict(TIER_CFG, t=t, active=active)
    return Component(name, description, "§4.5", ["thl_np.step.tiers_forward", "thl_np.step.tiers_backward",
                                                   "gru_forward", "gru_backward"], cfg, inputs, out)


WRITER_CFG = {"write_slots": 2, "write_clip_max": 1.0, "novelty_beta": 8.0, "novelty_theta": 0.3,
              "stale_weight": 1.0, "underuse_weight": 1.0, "t": 50}


def _writer_row(rng, W_w, b_w, d_in, J, branch, clipped):
    """One sequence's writer inputs in the wanted branch, every choice far from its tie."""
    c = WRITER_CFG
    d_m = W_w.shape[0]
    for _attempt in range(10_000):
        x = _normal(rng, d_in, scale=1.5 if clipped else 0.25)
        w_raw = x @ W_w.T + b_w
        n_raw = float(np.linalg.norm(w_raw))
        if abs(n_raw - c["write_clip_max"]) < 0.05 or (n_raw > c["write_clip_max"]) != clipped:
            continue
        w = w_raw * min(1.0, c["write_clip_max"] / (n_raw + 1e-6))
        memory = _normal(rng, J, d_m, scale=1.0 / math.sqrt(d_m))
        if branch == "novel_empty":
            memory[rng.choice(J, size=int(rng.integers(1, 3)), replace=False)] = 0.0
        if branch == "refine":  # two slots close to w, so the two targets are both aligned ones
            for j, mix in zip(rng.choice(J, size=2, replace=False), (0.15, 0.4), strict=True):
                memory[j] = w / np.linalg.norm(w) * 0.8 + mix * memory[j]
        read_ema = rng.uniform(0.05, 0.5, J)
        last_write = rng.integers(0, c["t"], J)
        wm, branches = writer_margins(w[None], np.array([n_raw]), memory[None], read_ema[None],
                                      last_write[None], c["t"], write_slots=c["write_slots"],
                                      clip_max=c["write_clip_max"], theta=c["novelty_theta"],
                                      stale_weight=c["stale_weight"], underuse_weight=c["underuse_weight"])
        if branches[0] != branch:
            continue
        if (wm["aff_gap"] < 1e-2 or wm["novelty"] < 1e-2 or wm["lru_gap"] < 1e-2 or wm["empty_decades"] < 2
                or wm["jstar_norm"] < 0.1):
            continue
        return x, memory, read_ema, last_write
    raise THLError(f"no writer draw for branch {branch}")  # pragma: no cover


def writer_case(rng, name, description, rows):
    """``rows``: (branch, clipped) per sequence."""
    c = WRITER_CFG
    d0, dK, d_m, J = 5, 4, 6, 7
    d_in = d0 + dK
    W_w, b_w = _glorot(rng, d_m, d_in), _normal(rng, d_m, scale=0.05)
    drawn = [_writer_row(rng, W_w, b_w, d_in, J, br, cl) for br, cl in rows]
    B = len(rows)
    inputs = {"x_w": np.stack([r[0] for r in drawn]), "memory": np.stack([r[1] for r in drawn]),
              "read_ema": np.stack([r[2] for r in drawn]), "last_write": np.stack([r[3] for r in drawn]),
              "W_w": W_w, "b_w": b_w, "d_w": _normal(rng, B, d_m), "d_g": _normal(rng, B)}

    def fn(x):
        w, g, targets, cache = writer_forward(
            x["x_w"], x["memory"], x["read_ema"], x["last_write"], c["t"], x["W_w"], x["b_w"],
            write_slots=c["write_slots"], clip_max=c["write_clip_max"], beta=c["novelty_beta"],
            theta=c["novelty_theta"], stale_weight=c["stale_weight"], underuse_weight=c["underuse_weight"])
        d_xw, d_m_star, dW, db = writer_backward(x["d_w"], x["d_g"], cache, x["W_w"])
        d_mem = np.zeros_like(x["memory"])
        d_mem[np.arange(B), cache.j_star] += d_m_star
        return {"w": w, "g": g, "targets": targets, "novel": cache.novel, "j_star": cache.j_star,
                "clipped": cache.clipped, "novelty": 1.0 - cache.dot_star / (
                    (cache.n_w + 1e-8) * (cache.n_m_star + 1e-8)),
                "grad.x_w": d_xw, "grad.memory": d_mem, "grad.W_w": dW, "grad.b_w": db}

    empty = np.abs(inputs["memory"]).sum(axis=2, keepdims=True) > 0
    res = _run_both(inputs, fn, {"w": "d_w", "g": "d_g"}, masks={"memory": empty})
    for key in ("targets", "novel", "j_star", "clipped"):
        if not np.array_equal(res["float64"][key], res["float32"][key]):  # pragma: no cover
            raise THLError(f"component {name}: float32 {key} differs from float64")
    expect_novel = [br != "refine" for br, _ in rows]
    expect_clipped = [cl for _, cl in rows]
    if list(res["float64"]["novel"]) != expect_novel or list(res["float64"]["clipped"]) != expect_clipped:
        raise THLError(f"component {name}: branches differ from the construction")  # pragma: no cover
    out = CaseOutputs()
    _fill(out, res, [
        ("w", "value", "§4.6", "the (clipped) write vector [B, d_m]", True),
        ("g", "value", "§4.6", "write gate: σ(β(novelty−θ)) if novel, else 1", True),
        ("targets", "exact", "§4.6", "slots to write [B, W_w], in ranking order", True),
        ("novel", "exact", "§4.6", "1 novel, 0 refine", True),
        ("j_star", "exact", "§4.6", "arg-max affinity slot", False),
        ("clipped", "exact", "§4.6", "1 where ‖w_raw‖ was clipped to Δ_max", False),
        ("novelty", "value", "§4.6", "1 − max_j aff_j", False),
        ("grad.x_w", "grad", "§4.6", "", True),
        ("grad.memory", "grad", "§4.6", "[B, J, d_m]: only row j* (the novelty gate's path; 0 when refining)",
         True),
        ("grad.W_w", "grad", "§4.6", "", True), ("grad.b_w", "grad", "§4.6", "", True)])
    branches = ", ".join(f"row {i}: {br}{' clipped' if cl else ''}" for i, (br, cl) in enumerate(rows))
    return Component(name, f"{description} ({branches}).", "§4.6", ["writer_forward", "writer_backward"],
                     dict(c), inputs, out)


def memory_write_case(rng):
    B, J, d_m = 2, 6, 5
    cfg = {"t": 9, "memory_decay": 0.99, "write_rate": 0.5, "write_ema_decay": 0.9}
    inputs = {"memory": _normal(rng, B, J, d_m), "write_ema": rng.uniform(0, 0.5, (B, J)),
              "last_write": rng.integers(0, 9, (B, J)), "targets": np.array([[4, 1], [0, 5]], dtype=np.int64),
              "g": rng.uniform(0.5, 1.0, B), "w": _normal(rng, B, d_m, scale=0.4),
              "d_memory": _normal(rng, B, J, d_m)}

    def fn(x):
        m, we, lw = memory_write_forward(x["memory"], x["write_ema"], x["last_write"], x["targets"], x["g"],
                                         x["w"], cfg["t"], decay=cfg["memory_decay"],
                                         write_rate=cfg["write_rate"], ema_decay=cfg["write_ema_decay"])
        d_m, d_w, d_g = memory_write_backward(x["d_memory"], x["targets"], x["g"], x["w"],
                                              decay=cfg["memory_decay"], write_rate=cfg["write_rate"])
        return {"memory": m, "write_ema": we, "last_write": lw, "grad.memory": d_m, "grad.w": d_w,
                "grad.g": d_g}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"memory": "d_memory"}), [
        ("memory", "value", "§4.7", "γ·M, then m_j += η·g·w at every target", True),
        ("write_ema", "value", "§4.7", "", True), ("last_write", "exact", "§4.7", "", True),
        ("grad.memory", "grad", "§4.7", "γ·d_memory", True), ("grad.w", "grad", "§4.7", "", True),
        ("grad.g", "grad", "§4.7", "", True)])
    return Component("memory_write", "Decay and a two-slot write.", "§4.7",
                     ["memory_write_forward", "memory_write_backward"], cfg, inputs, out)


def layernorm_head_case(rng):
    B, T, D, V = 2, 3, 12, 20
    inputs = {"x": _normal(rng, B, T, D, scale=0.7), "layer_norm.weight": 1.0 + _normal(rng, D, scale=0.2),
              "layer_norm.bias": _normal(rng, D, scale=0.2), "output_head.weight": _glorot(rng, V, D, 2.0),
              "output_head.bias": _normal(rng, V, scale=0.2), "d_logits": _normal(rng, B, T, V)}

    def fn(x):
        h, ln_cache = layer_norm_forward(x["x"], x["layer_norm.weight"], x["layer_norm.bias"])
        logits = linear_forward(h, x["output_head.weight"], x["output_head.bias"])
        d_h, dW, db = linear_backward(x["d_logits"], h, x["output_head.weight"])
        d_x, d_gamma, d_beta = layer_norm_backward(d_h, ln_cache, x["layer_norm.weight"])
        return {"h": h, "logits": logits, "grad.x": d_x, "grad.layer_norm.weight": d_gamma,
                "grad.layer_norm.bias": d_beta, "grad.output_head.weight": dW, "grad.output_head.bias": db}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"logits": "d_logits"}), [
        ("h", "value", "§4.8", "LayerNorm(x), eps 1e-5, biased variance", False),
        ("logits", "value", "§4.8", "h W_o^T + b_o", True),
        ("grad.x", "grad", "§4.8", "", True), ("grad.layer_norm.weight", "grad", "§4.8", "", True),
        ("grad.layer_norm.bias", "grad", "§4.8", "", True),
        ("grad.output_head.weight", "grad", "§4.8", "", True),
        ("grad.output_head.bias", "grad", "§4.8", "", True)])
    return Component("layernorm_head", "LayerNorm over the concatenated tier states, then the output head, "
                     "over [B, T, Σd_k].", "§4.8",
                     ["layer_norm_forward", "layer_norm_backward", "linear_forward", "linear_backward"],
                     {"eps": 1e-5}, inputs, out)


def cross_entropy_case(rng):
    B, T, V = 2, 3, 20
    inputs = {"logits": _normal(rng, B, T, V, scale=2.0), "targets": rng.integers(0, V, (B, T))}

    def fn(x):
        loss, d = cross_entropy_forward(x["logits"], x["targets"])
        return {"loss": np.asarray(loss), "grad.logits": d}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"loss": None}), [
        ("loss", "value", "§5", "mean over B·T of −log softmax(logits)[target]", True),
        ("grad.logits", "grad", "§5", "d loss / d logits", True)])
    return Component("cross_entropy", "Mean cross-entropy and its gradient.", "§5", ["cross_entropy_forward"],
                     {}, inputs, out)


def load_balance_case(rng):
    B, J = 2, 8
    A = rng.uniform(0.1, 1.5, (B, J))
    A[0, [2, 5]] = 0.0     # slots nobody read contribute 0·log 0 = 0
    A[1, 7] = 0.0
    inputs = {"A": A, "d_kl": _normal(rng, B)}

    def fn(x):
        kl, d_A = load_balance_forward(x["A"])
        return {"kl": kl, "grad.A": x["d_kl"][:, None] * d_A}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"kl": "d_kl"}, masks={"A": A > 0}), [
        ("kl", "value", "§5", "KL(p ‖ uniform), p_j = A_j / Σ A [B]", True),
        ("grad.A", "grad", "§5", "d_kl · d kl / d A", True)])
    return Component("load_balance", "The router load-balance term (per step; the loss adds λ · its mean).",
                     "§5", ["load_balance_forward"], {}, inputs, out)


# --------------------------------------------------------------------------------------- task heads
def _head_ids(rng, shape, pad, V, pads):
    """Token ids of ``shape`` (never the pad) with ``pads`` = {row index tuple: how many trailing pads}."""
    ids = rng.integers(0, V - 1, shape)
    ids[ids >= pad] += 1
    for row, n in pads.items():
        ids[row][-n:] = pad
    return ids


def head_sequence_case(rng):
    """H.1, H.2, H.4, H.5, H.6: pool the top tier at each row's last non-pad position, dropout, classify."""
    from ..components import heads as Hd

    B, T, dims, L, pad, p = 3, 6, [4, 3, 5], 3, 0, 0.25
    D, top = sum(dims), dims[-1]
    inputs = {"tier_states": _normal(rng, B, T, D), "input_ids": _head_ids(rng, (B, T), pad, 9, {(1,): 2, (2,): 5}),
              "keep": rng.random((B, top)) >= p, "classifier.weight": _glorot(rng, L, top, 2.0),
              "classifier.bias": _normal(rng, L, scale=0.2), "labels": np.array([2, 0, -100])}

    def fn(x):
        last = Hd.last_positions(x["input_ids"], pad)
        logits, cache = Hd.pooled_head_forward(x["tier_states"], last, x["classifier.weight"],
                                               x["classifier.bias"], x["keep"], p)
        loss, d_logits = Hd.masked_cross_entropy(logits, x["labels"])
        dS, dW, db = Hd.pooled_head_backward(d_logits, cache, x["classifier.weight"])
        return {"last": last, "logits": logits, "loss": np.asarray(loss), "grad.tier_states": dS,
                "grad.classifier.weight": dW, "grad.classifier.bias": db}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"loss": None}), [
        ("last", "exact", "§H", "H.1: each row's last non-pad position [B]", False),
        ("logits", "value", "§H", "H.5 over the pooled, dropped top-tier state [B, L]", True),
        ("loss", "value", "§H", "H.6: mean cross-entropy over the rows whose label is not -100", True),
        ("grad.tier_states", "grad", "§H", "[B, T, Σd_k]: non-zero only in the top tier's columns at the pooled "
         "positions", True),
        ("grad.classifier.weight", "grad", "§H", "", True), ("grad.classifier.bias", "grad", "§H", "", True)])
    return Component("head_sequence_classification", "Sequence classification head: rows padded on the right "
                     "(pad 0), pooling at the last non-pad position (row 2 has one real token), dropout with "
                     "the given keep-mask, a label of -100 not counted.", "§H",
                     ["thl_np.components.heads.last_positions", "thl_np.components.heads.pooled_head_forward",
                      "thl_np.components.heads.masked_cross_entropy", "thl_np.components.heads.pooled_head_backward"],
                     {"pad_token_id": pad, "tier_dims": dims, "classifier_dropout": p}, inputs, out)


def head_token_case(rng):
    """H.3-H.6 for tokens: LayerNorm of the tier states at every position, dropout, classify; pads and -100
    not counted."""
    from ..components import heads as Hd

    B, T, dims, L, pad, p = 2, 5, [4, 3, 5], 4, 0, 0.25
    D = sum(dims)
    ids = _head_ids(rng, (B, T), pad, 9, {(1,): 2})
    labels = rng.integers(0, L, (B, T))
    labels[0, 1] = -100
    inputs = {"tier_states": _normal(rng, B, T, D), "input_ids": ids, "keep": rng.random((B, T, D)) >= p,
              "layer_norm.weight": 1.0 + _normal(rng, D, scale=0.2), "layer_norm.bias": _normal(rng, D, scale=0.2),
              "classifier.weight": _glorot(rng, L, D, 2.0), "classifier.bias": _normal(rng, L, scale=0.2),
              "labels": labels}

    def fn(x):
        logits, cache = Hd.token_head_forward(x["tier_states"], x["layer_norm.weight"], x["layer_norm.bias"],
                                              x["classifier.weight"], x["classifier.bias"], x["keep"], p)
        loss, d_logits = Hd.masked_cross_entropy(logits, Hd.token_labels(x["labels"], x["input_ids"], pad))
        dS, d_lw, d_lb, dW, db = Hd.token_head_backward(d_logits, cache, x["layer_norm.weight"],
                                                        x["classifier.weight"])
        return {"logits": logits, "loss": np.asarray(loss), "grad.tier_states": dS, "grad.layer_norm.weight": d_lw,
                "grad.layer_norm.bias": d_lb, "grad.classifier.weight": dW, "grad.classifier.bias": db}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"loss": None}), [
        ("logits", "value", "§H", "H.5 over the dropped LayerNorm output at every position [B, T, L]", True),
        ("loss", "value", "§H", "H.6: mean cross-entropy over the positions neither pad nor labelled -100", True),
        ("grad.tier_states", "grad", "§H", "[B, T, Σd_k]", True),
        ("grad.layer_norm.weight", "grad", "§H", "", True), ("grad.layer_norm.bias", "grad", "§H", "", True),
        ("grad.classifier.weight", "grad", "§H", "", True), ("grad.classifier.bias", "grad", "§H", "", True)])
    return Component("head_token_classification", "Token classification head: LayerNorm (spec §4.8's h) of every "
                     "position, dropout with the given keep-mask, a label per position; row 1 ends in two pads, "
                     "position (0, 1) is labelled -100.", "§H",
                     ["thl_np.components.heads.token_head_forward", "thl_np.components.heads.token_labels",
                      "thl_np.components.heads.masked_cross_entropy", "thl_np.components.heads.token_head_backward"],
                     {"pad_token_id": pad, "tier_dims": dims, "classifier_dropout": p}, inputs, out)


def head_choice_case(rng):
    """H.1, H.2, H.4, H.5, H.6 for multiple choice: B examples of C choices, one score per choice."""
    from ..components import heads as Hd

    B, C, T, dims, pad, p = 2, 3, 5, [4, 3, 5], 0, 0.25
    D, top = sum(dims), dims[-1]
    inputs = {"tier_states": _normal(rng, B, C, T, D),
              "input_ids": _head_ids(rng, (B, C, T), pad, 9, {(0, 1): 2, (1, 2): 3}),
              "keep": rng.random((B, C, top)) >= p, "classifier.weight": _glorot(rng, 1, top, 2.0),
              "classifier.bias": _normal(rng, 1, scale=0.2), "labels": np.array([1, 2])}

    def fn(x):
        ids = x["input_ids"].reshape(B * C, T)
        S = x["tier_states"].reshape(B * C, T, D)
        last = Hd.last_positions(ids, pad)
        scores, cache = Hd.pooled_head_forward(S, last, x["classifier.weight"], x["classifier.bias"],
                                               x["keep"].reshape(B * C, top), p)
        loss, d_logits = Hd.masked_cross_entropy(scores.reshape(B, C), x["labels"])
        dS, dW, db = Hd.pooled_head_backward(d_logits.reshape(B * C, 1), cache, x["classifier.weight"])
        return {"last": last.reshape(B, C), "logits": scores.reshape(B, C), "loss": np.asarray(loss),
                "grad.tier_states": dS.reshape(B, C, T, D), "grad.classifier.weight": dW}

    out = CaseOutputs()
    _fill(out, _run_both(inputs, fn, {"loss": None}), [
        ("last", "exact", "§H", "H.1 per choice [B, C]", False),
        ("logits", "value", "§H", "one score per choice [B, C] (H.5 with L = 1)", True),
        ("loss", "value", "§H", "H.6: mean cross-entropy of the right choice over the B examples", True),
        ("grad.tier_states", "grad", "§H", "[B, C, T, Σd_k]", True),
        ("grad.classifier.weight", "grad", "§H", "(the bias's gradient is 0: a shift shared by every choice)",
         True)])
    return Component("head_multiple_choice", "Multiple-choice head: B = 2 examples of C = 3 choices, each choice a "
                     "sequence pooled as in sequence classification (two choices padded), one score per choice, "
                     "softmax over the choices.", "§H",
                     ["thl_np.components.heads.last_positions", "thl_np.components.heads.pooled_head_forward",
                      "thl_np.components.heads.masked_cross_entropy", "thl_np.components.heads.pooled_head_backward"],
                     {"pad_token_id": pad, "tier_dims": dims, "classifier_dropout": p}, inputs, out)
