"""Reference vectors for ports: generating them (``thl-np golden``) and checking a port against them
(``thl-np check-port``).

A reference folder holds, for every *case*, the inputs a port needs and the outputs thl-np computed
from them, in float64 and in float32 (the same inputs cast to float32, computed in float32)::

    reference/
      manifest.json                        what every file holds (keys, shapes, kinds), spec §, tolerances
      README.md
      cases/<name>/                        whole sequences (spec §4 steps, §5 loss and gradients)
        config.json  model.safetensors  state_in.npz  inputs.npz
        outputs_float64.npz  outputs_float32.npz
      components/<name>/                   one component's forward and backward
        config.json  inputs.npz  outputs_float64.npz  outputs_float32.npz
      training/<name>/                     a short AdamW trajectory
        config.json  train.json  model.safetensors  state_in.npz  inputs.npz
        outputs_float64.npz  outputs_float32.npz

A port's RESULTS_DIR mirrors it: ``RESULTS_DIR/<case>/outputs_<dtype>.npz`` with the same keys.
``compare_results`` (and ``thl-np check-port``) compares the two, tensor by tensor.

Every discrete choice a case makes (top-κ slots, capacity mask, write branch, write targets, the arg-max
slot, the clip branch, gradient clipping) is kept far from a tie: inputs are drawn from a seeded
generator, the margins are measured, and the draw is repeated (next seed) until every margin clears
``MARGINS`` and the float32 run makes the same choices as the float64 one. The gradients are checked
against central differences (per component's parameters, per initial-state key, per component input)
before anything is written.
Everything is deterministic: ``generate`` twice gives the same files.
"""
from __future__ import annotations

import fnmatch
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .components.embedding import embedding_backward, embedding_forward
from .components.gru import gru_backward, gru_forward
from .components.local_attention import local_attention_backward, local_attention_forward
from .components.output import (
    cross_entropy_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    load_balance_forward,
)
from .components.router import gumbel_noise, read_meta_backward, read_meta_forward, router_backward, router_forward
from .components.writer import (
    EMPTY_NORM,
    memory_write_backward,
    memory_write_forward,
    writer_backward,
    writer_forward,
)
from .config import THLConfig
from .errors import InputError, THLError
from .inference.state import InferenceState
from .io.safetensors import write_safetensors
from .model import THLModel, value_and_grad
from .params import param_shapes
from .step import output_forward, run_sequence, thl_step, tiers_backward, tiers_forward

FORMAT = "thl-np reference vectors"
FORMAT_VERSION = 1
DTYPES = ("float64", "float32")

#: Tolerances, the same as the shared conformance runner's. ``atol`` bounds max|port − reference| of a
#: value (logits, loss, states, forward outputs, weights); ``rtol`` bounds max|port − reference| divided by
#: the reference tensor's largest |entry| (gradients). Integer tensors must match exactly.
TOLERANCES = {
    "float64": {"atol": 1e-9, "rtol": 1e-8},
    "float32": {"atol": 2e-3, "rtol": 3e-2},
}

#: Smallest margin every discrete choice must keep (``trace_sequence``, ``writer_margins``): score gaps,
#: arg-max affinity gap, |novelty − θ|, relative distance of ‖w_raw‖ from the clip point, relative gaps
#: of the staleness/underuse ranking, decades between a slot norm and the 1e-6 "empty" threshold, and
#: the norm of the arg-max slot j* (an empty j* would make d aff/d m_j* ~ 1e8: ill-conditioned).
MARGINS = {"score_gap": 1e-4, "aff_gap": 1e-4, "novelty": 1e-4, "clip": 1e-4, "lru_gap": 1e-4,
           "empty_decades": 2.0, "jstar_norm": 1e-3, "grad_clip": 1e-3}

KIND_DOC = {
    "value": "a forward value: passes when max|port - ref| <= atol",
    "grad": "a gradient: passes when max|port - ref| / max|ref| <= rtol (relative to the tensor's largest "
            "entry)",
    "exact": "an integer (index, branch, counter): must be equal",
}

MAX_ATTEMPTS = 200


# ===================================================================================================
# Files
# ===================================================================================================
def save_npz(path, arrays: dict) -> None:
    """Write an uncompressed .npz deterministically (fixed zip timestamps, keys in the given order), so
    regenerating a file gives the same bytes. ``np.load`` reads it like any .npz."""
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json_text(data, indent=0) -> str:
    """JSON with one key per line, but short lists and flat objects on one line: short and diff-friendly."""
    pad = " " * (indent + 1)
    flat = json.dumps(data, ensure_ascii=False)
    if len(flat) <= 160 and not (isinstance(data, dict) and any(isinstance(v, dict) for v in data.values())):
        return flat
    if isinstance(data, dict) and data:
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_json_text(v, indent + 1)}"
                 for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        return "[\n" + ",\n".join(pad + _json_text(v, indent + 1) for v in data) + "\n" + " " * indent + "]"
    return json.dumps(data, ensure_ascii=False)


def write_json(path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(_json_text(data) + "\n")


def _round(x, digits=3):
    """A float rounded to ``digits`` significant digits, for the manifest (stable across machines)."""
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return x if math.isfinite(x) else None
    return float(f"{x:.{digits}g}")


# ===================================================================================================
# Outputs of one case: arrays per dtype plus what each key is
# ===================================================================================================
@dataclass
class _Outputs:
    """Collects a case's output tensors for both dtypes and their manifest description."""

    keys: dict = field(default_factory=dict)          # key -> {"kind", "required", "spec", "doc"}
    arrays: dict = field(default_factory=lambda: {d: {} for d in DTYPES})

    def add(self, key, values: dict, kind: str, spec: str, doc: str = "", required: bool = True):
        """``values``: dtype name -> array (float arrays stored in that dtype, integers as int64)."""
        self.keys[key] = {"kind": kind, "required": required, "spec": spec, **({"doc": doc} if doc else {})}
        for dt in DTYPES:
            a = np.asarray(values[dt])
            if kind == "exact":
                a = a.astype(np.int64)
            elif a.dtype.kind == "f":
                a = a.astype(dt)
            self.arrays[dt][key] = a

    def add_same(self, key, value, kind, spec, doc="", required=True):
        self.add(key, {d: value for d in DTYPES}, kind, spec, doc, required)

    def manifest(self) -> dict:
        out = {}
        for key, info in self.keys.items():
            a = self.arrays["float64"][key]
            out[key] = {"shape": list(a.shape), "dtype": "int64" if info["kind"] == "exact" else "float",
                        **info}
        return out


def _check_float32(out: _Outputs, name: str, factor: float = 0.1) -> None:
    """Our own float32 run must sit well inside the float32 tolerances of our float64 one (a tenth of
    them), or the case leaves a port no room: raise if it does not."""
    tol = TOLERANCES["float32"]
    for key, info in out.keys.items():
        ok, d_abs, d_rel, msg = compare_arrays(out.arrays["float32"][key], out.arrays["float64"][key],
                                               info["kind"], tol["atol"] * factor, tol["rtol"] * factor)
        if not ok:
            raise THLError(f"reference {name}: float32 {key} is {d_abs:.1e} (abs) / {d_rel:.1e} (rel) from "
                           f"float64, too close to the float32 tolerance {msg}")


def _describe_arrays(arrays: dict) -> dict:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in arrays.items()}


# ===================================================================================================
# Random weights and states
# ===================================================================================================
DEFAULT_GAINS = {"embedding": 0.6, "bias": 0.15, "router.W_q": 1.5, "router.W_k": 1.5, "writer.W_w": 1.0}


def random_params(config: THLConfig, rng: np.random.Generator, gains: dict | None = None) -> dict:
    """Every spec §2 tensor, float64, at a scale where no path is negligible: linear weights
    N(0, gain²/fan_in), biases N(0, 0.15²) (non-zero, so a dropped bias shows), LayerNorm weight
    1 + N(0, 0.1²). ``gains`` raises the router's query/key weights (so scores spread and top-κ gaps are
    wide) and sets the writer's (so ‖w_raw‖ straddles the clip point)."""
    g = dict(DEFAULT_GAINS)
    g.update(gains or {})
    params = {}
    for name, shape in param_shapes(config).items():
        if name == "embedding.weight":
            w = rng.normal(0.0, g["embedding"], shape)
        elif name == "layer_norm.weight":
            w = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name.endswith(".bias"):
            w = rng.normal(0.0, g["bias"], shape)
        else:
            gain = next((v for k, v in g.items() if name.startswith(k + ".")), 1.0)
            w = rng.normal(0.0, gain / math.sqrt(shape[1]), shape)
        params[name] = w
    return params


def random_state(config: THLConfig, batch: int, rng: np.random.Generator, *, timestep: int, local_valid: int,
                 empty_slots: int, memory_scale: float = 1.0) -> InferenceState:
    """A mid-run float64 state: tier states in (−1, 1), memory rows of norm ≈ ``memory_scale`` with
    ``empty_slots`` all-zero rows per sequence, read_ema in [0.02, 0.4] (never 0, so the underuse term
    stays finite and distinct per slot), last_read / last_write before ``timestep``, and ``local_valid``
    random rows in the local buffer (the rest zero)."""
    c = config
    B, J = batch, c.memory_slots
    memory = rng.normal(0.0, memory_scale / math.sqrt(c.memory_dim), (B, J, c.memory_dim))
    for b in range(B):
        memory[b, rng.choice(J, size=empty_slots, replace=False)] = 0.0
    buffer = np.zeros((B, c.local_window, c.embedding_dim))
    buffer[:, :local_valid] = rng.normal(0.0, 0.6, (B, local_valid, c.embedding_dim))
    hi = max(timestep, 1)
    return InferenceState(
        timestep=timestep,
        tiers=[np.tanh(rng.normal(0.0, 1.0, (B, d))) for d in c.tier_dims],
        memory=memory,
        read_ema=rng.uniform(0.02, 0.4, (B, J)),
        write_ema=rng.uniform(0.0, 0.4, (B, J)),
        last_read=rng.integers(0, hi, (B, J)).astype(np.int64),
        last_write=rng.integers(0, hi, (B, J)).astype(np.int64),
        local_buffer=buffer,
        local_valid=local_valid,
    )


def state_arrays(state: InferenceState, dtype=None) -> dict:
    """The spec §3 keys of a state (floats cast to ``dtype`` if given)."""
    out = {}
    for k, v in state.arrays().items():
        v = np.asarray(v)
        out[k] = v.astype(dtype) if dtype is not None and v.dtype.kind == "f" else v
    return out


# ===================================================================================================
# Margins of the discrete choices
# ===================================================================================================
def _desc_gaps(values, k):
    """Gaps between consecutive entries of ``values`` (last axis) sorted descending, for the first k
    ranks and the boundary after them: what decides both the top-k set and its order."""
    s = -np.sort(-values, axis=-1)
    n = min(k, s.shape[-1] - 1)
    if n <= 0:
        return np.full(values.shape[:-1], np.inf)
    return (s[..., :n] - s[..., 1:n + 1]).min(axis=-1)


def router_scores(params, config, e, state, gumbel=None):
    """Spec §4.3 scores [B, H, J] (recomputed independently of ``router_forward``, for margins)."""
    c = config
    B, J, _ = state.memory.shape
    u = np.concatenate([e, state.tiers[0], state.tiers[-1]], axis=1)
    q = (u @ params["router.W_q.weight"].T).reshape(B, c.num_heads, c.head_dim)
    keys = (state.memory @ params["router.W_k.weight"].T).reshape(B, J, c.num_heads, c.head_dim)
    s = np.einsum("bjhd,bhd->bhj", keys, q) / math.sqrt(c.head_dim) - c.load_penalty * state.read_ema[:, None]
    return s if gumbel is None else s + gumbel


def writer_margins(w, n_raw, memory, read_ema_after, last_write, t, *, write_slots, clip_max, theta,
                   stale_weight, underuse_weight):
    """Margins and branch of the writer's choices for every sequence (spec §4.6)."""
    B = w.shape[0]
    n_m = np.sqrt((memory * memory).sum(axis=2))
    n_w = np.sqrt((w * w).sum(axis=1))
    aff = np.einsum("bjm,bm->bj", memory, w) / ((n_w[:, None] + 1e-8) * (n_m + 1e-8))
    novelty = 1.0 - aff.max(axis=1)
    out = {"clip": np.inf, "aff_gap": np.inf, "novelty": np.inf, "lru_gap": np.inf, "empty_decades": np.inf,
           "jstar_norm": np.inf}
    branches = []
    for b in range(B):
        out["clip"] = min(out["clip"], abs(n_raw[b] + 1e-6 - clip_max) / clip_max)
        out["novelty"] = min(out["novelty"], abs(novelty[b] - theta))
        nz = n_m[b][n_m[b] > 0]
        if nz.size:
            out["empty_decades"] = min(out["empty_decades"], float(np.abs(np.log10(nz / EMPTY_NORM)).min()))
        empty = n_m[b] <= EMPTY_NORM
        out["jstar_norm"] = min(out["jstar_norm"], float(n_m[b, np.argmax(aff[b])]))
        if novelty[b] > theta:
            out["aff_gap"] = min(out["aff_gap"], _desc_gaps(aff[b], 1))       # the arg-max slot j*
            if empty.any():
                branches.append("novel_empty")
            else:
                score = stale_weight * (t - last_write[b]) + underuse_weight / (1e-8 + read_ema_after[b])
                s = -np.sort(-score)
                n = min(write_slots, s.size - 1)
                if n > 0:
                    rel = (s[:n] - s[1:n + 1]) / np.maximum(1.0, np.abs(s[:n]))
                    out["lru_gap"] = min(out["lru_gap"], float(rel.min()))
                branches.append("novel_lru")
        else:
            out["aff_gap"] = min(out["aff_gap"], _desc_gaps(aff[b], write_slots))
            branches.append("refine")
    return out, branches


@dataclass
class Trace:
    """The discrete choices of a run, step by step, their smallest margins, and branch counts."""

    choices: dict
    margins: dict
    counts: dict
    tier_states: np.ndarray
    final_state: InferenceState

    def margins_ok(self) -> bool:
        return all(self.margins.get(k, np.inf) >= v for k, v in MARGINS.items())

    def same_choices(self, other: Trace) -> bool:
        return all(np.array_equal(self.choices[k], other.choices[k]) for k in self.choices)


def trace_sequence(params, config, input_ids, state, gumbel_uniform=None) -> Trace:
    """Run ``thl_step`` step by step, recording every discrete choice and the margin that decided it."""
    c = config
    dtype = params["embedding.weight"].dtype
    B, T = input_ids.shape
    margins = {k: np.inf for k in ("score_gap", "aff_gap", "novelty", "clip", "lru_gap", "empty_decades",
                                   "jstar_norm")}
    counts = {"novel_empty": 0, "novel_lru": 0, "refine": 0, "clipped": 0, "unclipped": 0,
              "capacity_masked_picks": 0, "capacity_fallback_heads": 0, "local_attention_steps": 0}
    rec_keys = ("idx", "targets", "novel", "j_star", "clipped") + (("capacity_mask",) if
                                                                   c.read_slot_capacity is not None else ())
    choices = {k: [] for k in rec_keys}
    tier_states = np.empty((B, T, c.total_tier_dim), dtype=dtype)
    for t in range(T):
        gumbel = None if gumbel_uniform is None else gumbel_noise(gumbel_uniform[t], dtype)
        prev = state
        ids = input_ids[:, t]
        tier_states[:, t], state, rec = thl_step(params, c, ids, prev, gumbel, record=True)
        e = params["embedding.weight"][ids]
        scores = router_scores(params, c, e, prev, gumbel)
        margins["score_gap"] = min(margins["score_gap"], float(_desc_gaps(scores, c.read_topk).min()))
        wm, branches = writer_margins(
            rec.w, rec.writer.n_raw, prev.memory, state.read_ema, prev.last_write, int(prev.timestep),
            write_slots=c.write_slots, clip_max=c.write_clip_max, theta=c.novelty_theta,
            stale_weight=c.stale_weight, underuse_weight=c.underuse_weight)
        for k, v in wm.items():
            margins[k] = min(margins[k], float(v))
        for br in branches:
            counts[br] += 1
        n_clip = int(rec.writer.clipped.sum())
        counts["clipped"] += n_clip
        counts["unclipped"] += B - n_clip
        counts["local_attention_steps"] += int(rec.local is not None)
        choices["idx"].append(rec.idx)
        choices["targets"].append(rec.targets)
        choices["novel"].append(rec.writer.novel)
        choices["j_star"].append(rec.writer.j_star)
        choices["clipped"].append(rec.writer.clipped)
        if c.read_slot_capacity is not None:
            cap_mask, cap_used = rec.router.cap_mask, rec.router.cap_used
            choices["capacity_mask"].append(cap_mask)
            counts["capacity_masked_picks"] += int((cap_mask == 0).sum())
            counts["capacity_fallback_heads"] += int((~cap_used).sum())
    choices = {k: np.stack(v).astype(np.int64) for k, v in choices.items()}
    return Trace(choices, margins, counts, tier_states, state)


# ===================================================================================================
# Sequence cases
# ===================================================================================================
@dataclass(frozen=True)
class SequenceCase:
    name: str
    description: str
    config: dict
    batch: int
    steps: int
    seed: int
    timestep: int
    local_valid: int
    empty_slots: int
    train: bool = False
    memory_scale: float = 1.0
    gains: dict = field(default_factory=dict)
    require: dict = field(default_factory=dict)   # minimum branch counts the run must show


def _cfg(**kw) -> dict:
    base = dict(dtype="float64")
    base.update(kw)
    return base


SEQUENCE_CASES = (
    SequenceCase(
        name="small_default",
        description="The default config scaled down (K=3, clocks 1/8/64, W_loc=8, H=4, κ=4, η=0.05, "
                    "γ=0.9995), eval-mode routing, from a mid-run state at t=60 (tier 1 and 2 fire at t=64) "
                    "with 3 empty slots per sequence; the local buffer fills and starts dropping rows.",
        config=_cfg(vocab_size=48, embedding_dim=16, hidden_dim=16, num_tiers=3, tier_dims=[16, 16, 16],
                    tier_timescales=[1, 8, 64], local_window=8, memory_slots=16, memory_dim=16, query_dim=8,
                    value_dim=16, num_heads=4, head_dim=4, read_topk=4),
        batch=2, steps=32, seed=100, timestep=60, local_valid=5, empty_slots=3,
        gains={"writer.W_w": 0.5, "embedding": 1.5},
        require={"novel_empty": 2, "novel_lru": 2, "refine": 2, "clipped": 2, "unclipped": 2},
    ),
    SequenceCase(
        name="multi_write_capacity",
        description="Training-mode (Gumbel) routing with read_slot_capacity=1, write_slots=3, the router "
                    "load-balance loss (λ=0.05), η=0.3, tiers of different widths [12, 8, 14] on clocks "
                    "1/2/4; starts with an empty local buffer (ℓ=0 at the first step) and 4 empty slots.",
        config=_cfg(vocab_size=40, embedding_dim=12, hidden_dim=12, num_tiers=3, tier_dims=[12, 8, 14],
                    tier_timescales=[1, 2, 4], local_window=4, memory_slots=12, memory_dim=10, query_dim=6,
                    value_dim=12, num_heads=3, head_dim=5, read_topk=3, read_slot_capacity=1,
                    router_load_balance_lambda=0.05, write_slots=3, write_rate=0.3, load_penalty=0.2),
        batch=2, steps=24, seed=200, timestep=10, local_valid=0, empty_slots=1, train=True,
        gains={"writer.W_w": 0.6, "embedding": 1.5},
        require={"novel_empty": 1, "novel_lru": 2, "capacity_masked_picks": 4, "clipped": 1, "unclipped": 1},
    ),
    SequenceCase(
        name="no_local_window",
        description="local_window=0 (ℓ is always 0, the buffer has no rows), K=2 on clocks 1/3, "
                    "write_slots=2, a full memory from the start (every novel write is an LRU write).",
        config=_cfg(vocab_size=32, embedding_dim=10, hidden_dim=10, num_tiers=2, tier_dims=[10, 14],
                    tier_timescales=[1, 3], local_window=0, memory_slots=10, memory_dim=12, query_dim=4,
                    value_dim=8, num_heads=2, head_dim=6, read_topk=2, write_slots=2, write_rate=0.5),
        batch=2, steps=20, seed=300, timestep=7, local_valid=0, empty_slots=0,
        gains={"writer.W_w": 0.5},
        require={"novel_lru": 2, "refine": 1},
    ),
    SequenceCase(
        name="long_lru",
        description="A long run (T=128) on 8 slots with η=1 (the PyTorch THL's behaviour), γ=0.99 and θ=0.15 "
                    "(so most steps are novel): the two empty slots fill, then the memory stays full and "
                    "novel writes choose their slot by staleness + underuse, with refinements in between.",
        config=_cfg(vocab_size=24, embedding_dim=8, hidden_dim=8, num_tiers=2, tier_dims=[8, 8],
                    tier_timescales=[1, 4], local_window=4, memory_slots=8, memory_dim=8, query_dim=4,
                    value_dim=8, num_heads=2, head_dim=4, read_topk=2, write_rate=1.0, memory_decay=0.99,
                    novelty_theta=0.15),
        batch=1, steps=128, seed=400, timestep=200, local_valid=4, empty_slots=2,
        gains={"writer.W_w": 0.7, "embedding": 1.5},
        require={"novel_empty": 2, "novel_lru": 20, "refine": 3},
    ),
)


def _draw_sequence(case: SequenceCase, seed: int):
    rng = np.random.default_rng(seed)
    config = THLConfig(**case.config)
    params = random_params(config, rng, case.gains)
    state = random_state(config, case.batch, rng, timestep=case.timestep, local_valid=case.local_valid,
                         empty_slots=case.empty_slots, memory_scale=case.memory_scale)
    ids = rng.integers(0, config.vocab_size, (case.batch, case.steps)).astype(np.int64)
    targets = rng.integers(0, config.vocab_size, (case.batch, case.steps)).astype(np.int64)
    U = None
    if case.train:
        U = rng.random((case.steps, case.batch, config.num_heads, config.memory_slots))
    return config, params, state, ids, targets, U


def _cast_params(params, dtype):
    return {k: np.asarray(v, dtype=dtype) for k, v in params.items()}


def find_draw(case: SequenceCase):
    """The first seed (``case.seed``, +1, ...) whose run keeps every margin and meets ``case.require``,
    with float32 making the same choices as float64. Returns (seed, drawn inputs, float64 trace)."""
    for attempt in range(MAX_ATTEMPTS):
        seed = case.seed + attempt
        config, params, state, ids, targets, U = _draw_sequence(case, seed)
        tr64 = trace_sequence(params, config, ids, state.copy(), U)
        if not tr64.margins_ok():
            continue
        if any(tr64.counts.get(k, 0) < v for k, v in case.require.items()):
            continue
        tr32 = trace_sequence(_cast_params(params, np.float32), config, ids, state.copy(np.float32), U)
        if not tr64.same_choices(tr32):
            continue
        return seed, (config, params, state, ids, targets, U), tr64
    raise THLError(f"reference case {case.name}: no draw in {MAX_ATTEMPTS} seeds keeps every margin")


def _loss_only(params, config, ids, targets, state, U) -> float:
    """Spec §5's loss, forward only (for finite differences)."""
    lam = config.router_load_balance_lambda
    tier_states, _, tape = run_sequence(params, config, ids, state.copy(), U, record=bool(lam))
    loss = cross_entropy_forward(output_forward(params, tier_states)[0], targets)[0]
    if lam:
        loss = loss + lam * sum(load_balance_forward(rec.A)[0].sum() for rec in tape) / ids.size
    return float(loss)


def _param_group(name: str) -> str:
    """The component a parameter belongs to (one finite-difference check per component)."""
    if name.startswith("tiers.cells."):
        return ".".join(name.split(".")[:3])
    if name.startswith(("layer_norm.", "output_head.")):
        return "output"
    return name.split(".")[0]


def directional_checks(params, config, ids, targets, state, U, grads, d_state, rng, eps=1e-5) -> dict:
    """For the parameters of every component and for every differentiable state key: the central
    difference of the loss along a unit direction against the gradient's inner product with it. Each
    tensor's share of the direction is half its gradient's own direction, half random, normalised, so
    every tensor of a group weighs alike. Raises THLError naming the group if they disagree; returns the
    relative errors. The step (norm 1e-5) is far below every choice margin: no discrete choice moves."""
    errors = {}

    def unit(g, mask=1.0):
        v = rng.normal(0.0, 1.0, g.shape) * mask
        v /= max(np.linalg.norm(v), 1e-300)
        n = np.linalg.norm(g)
        v = v + (g / n if n > 0 else 0.0)
        return v / max(np.linalg.norm(v), 1e-300)

    def check(name, pairs, loss_at):
        """``pairs``: [(gradient, direction)]; ``loss_at(sign · eps)`` moves along the directions."""
        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        predicted = sum(float((g * v).sum()) for g, v in pairs)
        err = abs(numeric - predicted) / max(abs(predicted), 1e-6)
        errors[name] = err
        if not err < 1e-6:
            raise THLError(f"reference case: the gradient of {name} fails a finite-difference check "
                           f"(difference {numeric!r}, gradient {predicted!r}, relative error {err:.1e})")

    groups = {}
    for name in grads:
        groups.setdefault(_param_group(name), []).append(name)
    for group, names in groups.items():
        dirs = {n: unit(grads[n]) / math.sqrt(len(names)) for n in names}
        check(f"grad.{group}.*", [(grads[n], dirs[n]) for n in names], lambda step, dirs=dirs: _loss_only(
            {**params, **{n: params[n] + step * v for n, v in dirs.items()}}, config, ids, targets, state, U))
    for key, g in d_state.items():
        if np.size(g) == 0:
            continue
        # keep empty slots empty (their norm decides the write branch)
        mask = (np.abs(state.memory).sum(axis=2, keepdims=True) > 0) if key == "memory" else 1.0
        v = unit(g * mask, mask)

        def loss_at(step, key=key, v=v):
            s = state.copy()
            if key.startswith("tier_state_"):
                k = int(key[len("tier_state_"):])
                s.tiers[k] = s.tiers[k] + step * v
            else:
                setattr(s, key, getattr(s, key) + step * v)
            return _loss_only(params, config, ids, targets, s, U)

        check(f"grad_state.{key}", [(g * mask, v)], loss_at)
    return errors


def _sequence_outputs(config, params, state, ids, targets, U, trace64, trace32) -> _Outputs:
    out = _Outputs()
    per = {}
    for dt in DTYPES:
        model = THLModel(config.replace(dtype=dt), params=params, dtype=dt)
        logits, _ = model(ids, state=state, gumbel_uniform=U)
        loss, grads, state_out, d_state = value_and_grad(model, ids, targets, state=state, gumbel_uniform=U,
                                                         return_state=True, return_state_grad=True)
        if dt == "float64":
            directional_checks(model.params, config, ids, targets, state, U, grads, d_state,
                               np.random.default_rng(12345))
        per[dt] = (logits, loss, grads, state_out, d_state)
    out.add("logits", {d: per[d][0] for d in DTYPES}, "value", "§4.8", "logits of every step [B, T, V]")
    out.add("loss", {d: np.asarray(per[d][1]) for d in DTYPES}, "value", "§5",
            "mean cross-entropy over B·T (+ the load-balance term when its λ is non-zero)")
    for key in per["float64"][3].arrays():
        kind = "exact" if np.asarray(per["float64"][3].arrays()[key]).dtype.kind == "i" else "value"
        out.add(f"state_out.{key}", {d: per[d][3].arrays()[key] for d in DTYPES}, kind, "§3",
                "the state after the T steps")
    for name in param_shapes(config):
        out.add(f"grad.{name}", {d: per[d][2][name] for d in DTYPES}, "grad", "§5")
    for key in per["float64"][4]:
        out.add(f"grad_state.{key}", {d: per[d][4][key] for d in DTYPES}, "grad", "§5",
                "gradient of the loss w.r.t. this key of the initial state")
    # diagnostics: optional, for localising a failure to a step
    traces = {"float64": trace64, "float32": trace32}
    out.add("tier_states", {d: traces[d].tier_states for d in DTYPES}, "value", "§4.5",
            "[s^0; …; s^{K-1}] after every step [B, T, Σd_k] (the LayerNorm's input)", required=False)
    docs = {"idx": ("§4.3", "slots read per step [T, B, H, κ], by descending score"),
            "capacity_mask": ("§4.3", "1 where a pick kept its weight under the slot capacity [T, B, H, κ]"),
            "targets": ("§4.6", "slots written per step [T, B, W_w], in ranking order"),
            "novel": ("§4.6", "1 for the novel branch, 0 for refinement [T, B]"),
            "j_star": ("§4.6", "the arg-max-affinity slot [T, B] (where the novelty's gradient reaches M)"),
            "clipped": ("§4.6", "1 where ‖w_raw‖ was clipped [T, B]")}
    for key in trace64.choices:
        spec, doc = docs[key]
        out.add(f"trace.{key}", {d: traces[d].choices[key] for d in DTYPES}, "exact", spec, doc,
                required=False)
    return out


def generate_sequence_case(case: SequenceCase, folder: str) -> dict:
    seed, (config, params, state, ids, targets, U), tr64 = find_draw(case)
    tr32 = trace_sequence(_cast_params(params, np.float32), config, ids, state.copy(np.float32), U)
    os.makedirs(folder, exist_ok=True)
    config.save(os.path.join(folder, "config.json"))
    write_safetensors(os.path.join(folder, "model.safetensors"), params,
                      metadata={"format": "thl-np", "format_version": "1", "config": config.to_json()})
    state_arr = state_arrays(state)
    save_npz(os.path.join(folder, "state_in.npz"), state_arr)
    inputs = {"input_ids": ids, "targets": targets}
    if U is not None:
        inputs["gumbel_uniform"] = U
    save_npz(os.path.join(folder, "inputs.npz"), inputs)
    out = _sequence_outputs(config, params, state, ids, targets, U, tr64, tr32)
    _check_float32(out, case.name)
    for dt in DTYPES:
        save_npz(os.path.join(folder, f"outputs_{dt}.npz"), out.arrays[dt])
    return {
        "kind": "sequence",
        "description": case.description,
        "spec": ["§3", "§4", "§5"],
        "routing": "training (gumbel_uniform given)" if case.train else "eval",
        "seed": seed,
        "inputs": {
            "config.json": "THLConfig (spec §1)",
            "model.safetensors": {k: list(v.shape) for k, v in params.items()},
            "state_in.npz": _describe_arrays(state_arr),
            "inputs.npz": _describe_arrays(inputs),
        },
        "outputs": out.manifest(),
        "margins": {k: _round(v) for k, v in tr64.margins.items()},
        "counts": tr64.counts,
    }


# ===================================================================================================
# Components
# ===================================================================================================
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
    outputs: _Outputs
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


def _fill(out: _Outputs, results: dict, table):
    """``table``: (key, kind, spec, doc, required) rows; values from results[dtype][key]."""
    for key, kind, spec, doc, required in table:
        out.add(key, {d: results[d][key] for d in DTYPES}, kind, spec, doc, required)


def _component_embedding(rng):
    V, d = 20, 6
    ids = np.array([[3, 7, 3, 19, 0], [7, 7, 12, 5, 3]], dtype=np.int64)
    inputs = {"weight": _normal(rng, V, d), "ids": ids, "d_e": _normal(rng, 2, 5, d)}

    def fn(x):
        return {"e": embedding_forward(x["weight"], x["ids"]),
                "grad.weight": embedding_backward(x["d_e"], x["ids"], V)}

    out = _Outputs()
    _fill(out, _run_both(inputs, fn, {"e": "d_e"}), [
        ("e", "value", "§4.1", "weight[ids]", True),
        ("grad.weight", "grad", "§4.1", "Σ of d_e over the positions holding each id (repeats accumulate)",
         True)])
    return Component("embedding", "Embedding lookup with repeated ids (gradients accumulate).", "§4.1",
                     ["embedding_forward", "embedding_backward"], {"vocab_size": V}, inputs, out)


def _component_local_attention(rng):
    B, n, d_e, d_q, d_v = 2, 4, 6, 3, 8
    inputs = {"e": _normal(rng, B, d_e), "buffer": _normal(rng, B, n, d_e), "Wq": _glorot(rng, d_q, d_e, 2.0),
              "Wk": _glorot(rng, d_q, d_e, 2.0), "Wv": _glorot(rng, d_v, d_e), "d_l": _normal(rng, B, d_v)}

    def fn(x):
        l, cache = local_attention_forward(x["e"], x["buffer"], x["Wq"], x["Wk"], x["Wv"])
        d_e, d_buf, dWq, dWk, dWv = local_attention_backward(x["d_l"], cache, x["Wq"], x["Wk"], x["Wv"])
        return {"l": l, "attention": cache.attention, "grad.e": d_e, "grad.buffer": d_buf, "grad.Wq": dWq,
                "grad.Wk": dWk, "grad.Wv": dWv}

    out = _Outputs()
    _fill(out, _run_both(inputs, fn, {"l": "d_l"}), [
        ("l", "value", "§4.2", "ℓ = Σ_i a_i (E_i Wv^T)", True),
        ("attention", "value", "§4.2", "a = softmax(k·q/√d_lq) over the n buffer rows", False),
        ("grad.e", "grad", "§4.2", "", True), ("grad.buffer", "grad", "§4.2", "", True),
        ("grad.Wq", "grad", "§4.2", "", True), ("grad.Wk", "grad", "§4.2", "", True),
        ("grad.Wv", "grad", "§4.2", "", True)])
    return Component("local_attention", "Tier-0 sliding-window attention over n=4 buffer rows.", "§4.2",
                     ["local_attention_forward", "local_attention_backward"], {"n": n}, inputs, out)


def _router_component(rng, name, description, *, B, H, d_h, J, d_m, kappa, d_v, capacity=None, train=False,
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
        gap = float(_desc_gaps(scores, kappa).min())
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
    out = _Outputs()
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
                     {"score_gap": _round(gap)})


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


def _component_read_metadata(rng):
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

    out = _Outputs()
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


def _component_gru_cell(rng):
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

    out = _Outputs()
    _fill(out, _run_both(inputs, fn, {"s_new": "d_s_new"}), [
        ("s_new", "value", "§4.5", "(1−z) ⊙ s_prev + z ⊙ s̃", True),
        ("z", "value", "§4.5", "update gate", False), ("r_g", "value", "§4.5", "reset gate", False),
        ("s_tilde", "value", "§4.5", "candidate state s̃", False),
        ("grad.s_prev", "grad", "§4.5", "", True), ("grad.x", "grad", "§4.5", "", True)]
        + [(f"grad.{k}", "grad", "§4.5", "", True) for k in GRU_KEYS])
    return Component("gru_cell", "One active tier cell (GRU): p = [s_prev; x] with x = [lower; context].",
                     "§4.5", ["gru_forward", "gru_backward"], {}, inputs, out)


TIER_CFG = {"embedding_dim": 4, "value_dim": 6, "tier_dims": [5, 4, 6], "tier_timescales": [1, 3, 2]}


def _component_tiers(rng, name, t, description):
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

    out = _Outputs()
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


def _component_writer(rng, name, description, rows):
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
    out = _Outputs()
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


def _component_memory_write(rng):
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

    out = _Outputs()
    _fill(out, _run_both(inputs, fn, {"memory": "d_memory"}), [
        ("memory", "value", "§4.7", "γ·M, then m_j += η·g·w at every target", True),
        ("write_ema", "value", "§4.7", "", True), ("last_write", "exact", "§4.7", "", True),
        ("grad.memory", "grad", "§4.7", "γ·d_memory", True), ("grad.w", "grad", "§4.7", "", True),
        ("grad.g", "grad", "§4.7", "", True)])
    return Component("memory_write", "Decay and a two-slot write.", "§4.7",
                     ["memory_write_forward", "memory_write_backward"], cfg, inputs, out)


def _component_layernorm_head(rng):
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

    out = _Outputs()
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


def _component_cross_entropy(rng):
    B, T, V = 2, 3, 20
    inputs = {"logits": _normal(rng, B, T, V, scale=2.0), "targets": rng.integers(0, V, (B, T))}

    def fn(x):
        loss, d = cross_entropy_forward(x["logits"], x["targets"])
        return {"loss": np.asarray(loss), "grad.logits": d}

    out = _Outputs()
    _fill(out, _run_both(inputs, fn, {"loss": None}), [
        ("loss", "value", "§5", "mean over B·T of −log softmax(logits)[target]", True),
        ("grad.logits", "grad", "§5", "d loss / d logits", True)])
    return Component("cross_entropy", "Mean cross-entropy and its gradient.", "§5", ["cross_entropy_forward"],
                     {}, inputs, out)


def _component_load_balance(rng):
    B, J = 2, 8
    A = rng.uniform(0.1, 1.5, (B, J))
    A[0, [2, 5]] = 0.0     # slots nobody read contribute 0·log 0 = 0
    A[1, 7] = 0.0
    inputs = {"A": A, "d_kl": _normal(rng, B)}

    def fn(x):
        kl, d_A = load_balance_forward(x["A"])
        return {"kl": kl, "grad.A": x["d_kl"][:, None] * d_A}

    out = _Outputs()
    _fill(out, _run_both(inputs, fn, {"kl": "d_kl"}, masks={"A": A > 0}), [
        ("kl", "value", "§5", "KL(p ‖ uniform), p_j = A_j / Σ A [B]", True),
        ("grad.A", "grad", "§5", "d_kl · d kl / d A", True)])
    return Component("load_balance", "The router load-balance term (per step; the loss adds λ · its mean).",
                     "§5", ["load_balance_forward"], {}, inputs, out)


def _components():
    """Every component, each from its own seeded generator (so editing one leaves the others' bytes)."""
    def rng(i):
        return np.random.default_rng(7000 + i)

    def cap_want(res):
        m, used = res["capacity_mask"], res["_cap_used"]
        return bool((m[0] == 0).any() and used[0].all() and (~used[1]).any())

    return [
        _component_embedding(rng(0)),
        _component_local_attention(rng(1)),
        _router_component(rng(2), "router", "Router read, eval mode, no capacity", B=2, H=3, d_h=4, J=9,
                          d_m=6, kappa=3, d_v=6),
        _router_component(rng(3), "router_capacity", "Router read with read_slot_capacity=1: row 0 has "
                          "masked picks (renormalised), row 1 a head whose every pick is masked (it keeps "
                          "its uncapped α)", B=2, H=3, d_h=4, J=6, d_m=6, kappa=2, d_v=6, capacity=1,
                          want=cap_want),
        _router_component(rng(4), "router_gumbel", "Router read in training mode (Gumbel noise from the "
                          "given uniforms)", B=2, H=2, d_h=4, J=8, d_m=6, kappa=3, d_v=6, train=True),
        _component_read_metadata(rng(5)),
        _component_gru_cell(rng(6)),
        _component_tiers(rng(7), "tiers_all_active", 0, "All K=3 tiers at t=0 (every clock fires)"),
        _component_tiers(rng(8), "tiers_some_inactive", 4, "Clocks [1, 3, 2] at t=4: tier 1 is inactive "
                         "(keeps its state), tier 2 is active and reads tier 1's unchanged state"),
        _component_writer(rng(9), "writer_novel_empty", "Writer, novel branch with empty slots: targets are "
                          "the empty slots by index, then the others by index", [("novel_empty", False)] * 2),
        _component_writer(rng(10), "writer_novel_lru", "Writer, novel branch on a full memory: targets are "
                          "the largest staleness + underuse", [("novel_lru", False)] * 2),
        _component_writer(rng(11), "writer_refine", "Writer, refinement: g = 1, targets are the largest "
                          "affinities", [("refine", False)] * 2),
        _component_writer(rng(12), "writer_clipped", "Writer with ‖w_raw‖ > Δ_max in every branch",
                          [("novel_empty", True), ("novel_lru", True), ("refine", True)]),
        _component_memory_write(rng(13)),
        _component_layernorm_head(rng(14)),
        _component_cross_entropy(rng(15)),
        _component_load_balance(rng(16)),
    ]


def generate_component(comp: Component, folder: str) -> dict:
    _check_float32(comp.outputs, comp.name)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), comp.config)
    save_npz(os.path.join(folder, "inputs.npz"), comp.inputs)
    for dt in DTYPES:
        save_npz(os.path.join(folder, f"outputs_{dt}.npz"), comp.outputs.arrays[dt])
    entry = {"kind": "component", "description": comp.description, "spec": [comp.spec],
             "functions": [f if "." in f else f"{_module_of(f)}.{f}" for f in comp.functions],
             "inputs": {"config.json": comp.config, "inputs.npz": _describe_arrays(comp.inputs)},
             "outputs": comp.outputs.manifest()}
    if comp.margins:
        entry["margins"] = comp.margins
    return entry


def _module_of(fn_name: str) -> str:
    for mod in ("embedding", "local_attention", "router", "gru", "writer", "output"):
        module = __import__(f"thl_np.components.{mod}", fromlist=[fn_name])
        if hasattr(module, fn_name):
            return module.__name__
    return "thl_np.model"  # pragma: no cover


# ===================================================================================================
# Training trajectory
# ===================================================================================================
TRAIN_CASE = dict(
    name="adamw_10",
    config=_cfg(vocab_size=20, embedding_dim=8, hidden_dim=8, num_tiers=2, tier_dims=[8, 8],
                tier_timescales=[1, 2], local_window=3, memory_slots=6, memory_dim=8, query_dim=4,
                value_dim=8, num_heads=2, head_dim=4, read_topk=2, write_rate=0.5),
    batch=2, seq_len=8, steps=10, seed=500, timestep=5, local_valid=2, empty_slots=1,
    hyper={"peak_lr": 0.01, "warmup": 3, "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta1": 0.9,
           "beta2": 0.99, "eps": 1e-8, "grad_clip": 2.2},
)


def _train_trajectory(config, params, state, inputs, hyper, dtype):
    """Run the 10 steps in ``dtype``: the loop of ``thl_np.training.trainer._train_step`` with given data,
    noise and learning rates. Returns (losses, norms, final params, final state, traces)."""
    from .training.optim import AdamW, clip_grad_norm

    model = THLModel(config.replace(dtype=dtype), params=params, dtype=dtype)
    opt = AdamW(model.params, weight_decay=hyper["weight_decay"], betas=(hyper["beta1"], hyper["beta2"]),
                eps=hyper["eps"])
    st = state.copy(dtype)
    losses, norms, traces = [], [], []
    for i in range(len(inputs["lr"])):
        U = inputs["gumbel_uniform"][i]
        traces.append(trace_sequence(model.params, model.config, inputs["input_ids"][i], st.copy(), U))
        loss, grads, st = value_and_grad(model, inputs["input_ids"][i], inputs["targets"][i], state=st,
                                         gumbel_uniform=U, return_state=True)
        grads = dict(grads)
        norms.append(clip_grad_norm(grads, hyper["grad_clip"]))
        losses.append(loss)
        opt.step(model.params, grads, float(inputs["lr"][i]))
    return np.array(losses), np.array(norms), model.params, st, traces


def generate_training(folder: str) -> dict:
    from .training.schedule import lr_at

    tc = TRAIN_CASE
    hyper = tc["hyper"]
    S, B, T = tc["steps"], tc["batch"], tc["seq_len"]
    lrs = np.array([lr_at(i, hyper["peak_lr"], hyper["warmup"], S, hyper["min_lr_ratio"]) for i in range(S)])
    for attempt in range(MAX_ATTEMPTS):
        seed = tc["seed"] + attempt
        rng = np.random.default_rng(seed)
        config = THLConfig(**tc["config"])
        params = random_params(config, rng, {"writer.W_w": 0.5})
        state = random_state(config, B, rng, timestep=tc["timestep"], local_valid=tc["local_valid"],
                             empty_slots=tc["empty_slots"])
        inputs = {"input_ids": rng.integers(0, config.vocab_size, (S, B, T)).astype(np.int64),
                  "targets": rng.integers(0, config.vocab_size, (S, B, T)).astype(np.int64),
                  "gumbel_uniform": rng.random((S, T, B, config.num_heads, config.memory_slots)),
                  "lr": lrs}
        run = {dt: _train_trajectory(config, params, state, inputs, hyper, dt) for dt in DTYPES}
        tr64, tr32 = run["float64"][4], run["float32"][4]
        if not all(t.margins_ok() for t in tr64):
            continue
        if not all(a.same_choices(b) for a, b in zip(tr64, tr32, strict=True)):
            continue
        clip_margin = float(np.min(np.abs(run["float64"][1] - hyper["grad_clip"]) / hyper["grad_clip"]))
        if clip_margin < MARGINS["grad_clip"]:
            continue
        break
    else:  # pragma: no cover
        raise THLError("training case: no draw keeps every margin")
    os.makedirs(folder, exist_ok=True)
    config.save(os.path.join(folder, "config.json"))
    write_safetensors(os.path.join(folder, "model.safetensors"), params,
                      metadata={"format": "thl-np", "format_version": "1", "config": config.to_json()})
    save_npz(os.path.join(folder, "state_in.npz"), state_arrays(state))
    save_npz(os.path.join(folder, "inputs.npz"), inputs)
    train_json = {
        "steps": S, "batch_size": B, "seq_len": T,
        "optimizer": "AdamW (decoupled weight decay), PyTorch's update: m = β1·m + (1−β1)·g; "
                     "v = β2·v + (1−β2)·g²; p = p·(1 − lr·wd) for decayed tensors; "
                     "p = p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)",
        "lr": [float(x) for x in lrs],
        "lr_schedule": f"lr_at(step, peak_lr={hyper['peak_lr']}, warmup={hyper['warmup']}, "
                       f"total_steps={S}, min_lr_ratio={hyper['min_lr_ratio']}): linear warm-up "
                       "peak·(step+1)/warmup, then cosine to min_lr at the last step (inputs.npz holds the "
                       "values)",
        **hyper,
        "no_decay": "tensors named *.bias, layer_norm.*, and embedding.weight are not decayed",
        "grad_clip_rule": "global L2 norm over all gradients (float64 accumulation); if norm > grad_clip, "
                          "every gradient is multiplied by grad_clip / (norm + 1e-6)",
        "moments": "m and v start at 0, kept in the compute dtype",
        "state": "step i starts from the state the step i−1 ended with (step 0 from state_in.npz); the "
                 "gradient does not flow into the state passed in (truncated BPTT)",
        "routing": "training mode with gumbel_uniform[i] for step i",
        "order": "loss, grads = value_and_grad; norm = clip(grads); AdamW step with lr[i]",
    }
    write_json(os.path.join(folder, "train.json"), train_json)
    out = _Outputs()
    out.add("loss", {d: run[d][0] for d in DTYPES}, "value", "§5",
            "loss of each step, before its update [steps]")
    out.add("grad_norm", {d: run[d][1] for d in DTYPES}, "value", "§5",
            "global gradient norm of each step, before clipping [steps]")
    for name in param_shapes(config):
        out.add(f"final.{name}", {d: run[d][2][name] for d in DTYPES}, "value", "§2",
                "the weight after the 10 updates")
    for key, v in run["float64"][3].arrays().items():
        kind = "exact" if np.asarray(v).dtype.kind == "i" else "value"
        out.add(f"state_out.{key}", {d: run[d][3].arrays()[key] for d in DTYPES}, kind, "§3",
                "the state after the last step")
    _check_float32(out, tc["name"])
    for dt in DTYPES:
        save_npz(os.path.join(folder, f"outputs_{dt}.npz"), out.arrays[dt])
    margins = {k: _round(min(t.margins[k] for t in run["float64"][4])) for k in run["float64"][4][0].margins}
    margins["grad_clip"] = _round(clip_margin)
    return {"kind": "training", "description": "10 AdamW steps with gradient clipping and a warm-up/cosine "
            "schedule, training-mode routing, the state carried from step to step (as thl-np train does).",
            "spec": ["§5"], "seed": seed,
            "inputs": {"config.json": "THLConfig (spec §1)", "train.json": train_json,
                       "model.safetensors": {k: list(v.shape) for k, v in params.items()},
                       "state_in.npz": _describe_arrays(state_arrays(state)),
                       "inputs.npz": _describe_arrays(inputs)},
            "outputs": out.manifest(), "margins": margins}


# ===================================================================================================
# The whole folder
# ===================================================================================================
README = """# Reference vectors

Generated by `thl-np golden --out reference` (thl_np/reference.py); do not edit by hand.
`manifest.json` lists every case, every file, every tensor (shape, kind, spec section) and the tolerances.
See docs/PORTING.md for how a port reads these files, writes its results, and runs `thl-np check-port`.
"""


def generate(out_dir: str, log=None) -> dict:
    """Write every reference case under ``out_dir`` and its manifest.json; returns the manifest."""
    log = log or (lambda msg: None)
    os.makedirs(out_dir, exist_ok=True)
    cases = {}
    for case in SEQUENCE_CASES:
        log(f"cases/{case.name}")
        cases[f"cases/{case.name}"] = generate_sequence_case(case, os.path.join(out_dir, "cases", case.name))
    for comp in _components():
        log(f"components/{comp.name}")
        cases[f"components/{comp.name}"] = generate_component(comp, os.path.join(out_dir, "components",
                                                                                   comp.name))
    log(f"training/{TRAIN_CASE['name']}")
    cases[f"training/{TRAIN_CASE['name']}"] = generate_training(os.path.join(out_dir, "training",
                                                                             TRAIN_CASE["name"]))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": "thl-np golden (thl_np/reference.py)",
        "layout": {
            "cases/<name>": "config.json, model.safetensors (float64), state_in.npz (spec §3 keys), "
                            "inputs.npz; outputs_<dtype>.npz",
            "components/<name>": "config.json (scalar settings), inputs.npz (float64 inputs, parameters and "
                                 "the upstream gradients d_<output>); outputs_<dtype>.npz",
            "training/<name>": "config.json, train.json (hyper-parameters), model.safetensors (initial "
                               "weights), state_in.npz, inputs.npz; outputs_<dtype>.npz",
            "results": "a port writes RESULTS_DIR/<case>/outputs_<dtype>.npz with the keys listed under "
                       "outputs",
        },
        "dtypes": {"float64": "inputs as stored, computed in float64",
                   "float32": "the same inputs cast to float32, computed in float32 (integers unchanged)"},
        "tolerances": TOLERANCES,
        "kinds": KIND_DOC,
        "required": "keys with required=false are diagnostics: compared when the results hold them, else "
                    "skipped",
        "margins": {"thresholds": MARGINS,
                    "meaning": "every discrete choice of every case is at least this far from a tie "
                               "(sequence cases list the smallest margin they reached)"},
        "cases": cases,
    }
    write_json(os.path.join(out_dir, "manifest.json"), manifest)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(README)
    return manifest


# ===================================================================================================
# Comparison (thl-np check-port)
# ===================================================================================================
def default_reference_dir() -> str:
    """The repository's reference/ folder (next to the thl_np package in a checkout)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference")


@dataclass
class TensorCheck:
    """One tensor's comparison. ``status`` is OK, NOT OK, MISSING or SKIPPED (optional, not provided)."""

    case: str
    key: str
    kind: str
    status: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tol: float = float("nan")
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("OK", "SKIPPED")


@dataclass
class CheckReport:
    dtype: str
    results_dir: str
    reference_dir: str
    checks: list = field(default_factory=list)
    missing_files: list = field(default_factory=list)   # (case, expected path)

    @property
    def passed(self) -> int:
        return sum(c.status == "OK" for c in self.checks)

    @property
    def failed(self) -> int:
        return sum(c.status in ("NOT OK", "MISSING") for c in self.checks)

    @property
    def skipped(self) -> int:
        return sum(c.status == "SKIPPED" for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def failures(self) -> list:
        return [c for c in self.checks if not c.ok]


def compare_arrays(got, ref, kind: str, atol: float, rtol: float) -> tuple[bool, float, float, str]:
    """Compare one port tensor with the reference → (ok, max abs diff, max diff / max|ref|, message).

    ``kind`` "value": ok when max abs ≤ atol; "grad": ok when max abs / max|ref| ≤ rtol; "exact": equal.
    """
    ref = np.asarray(ref)
    try:
        got = np.asarray(got)
    except Exception as exc:  # pragma: no cover - np.load gives arrays
        return False, np.nan, np.nan, f"unreadable ({exc})"
    if got.shape != ref.shape and not (got.size == ref.size == 1):
        return False, np.nan, np.nan, f"shape {list(got.shape)}, expected {list(ref.shape)}"
    if got.dtype.kind not in "biuf":
        return False, np.nan, np.nan, f"dtype {got.dtype} is not numeric"
    g = got.astype(np.float64).reshape(ref.shape)
    r = ref.astype(np.float64)
    if not np.all(np.isfinite(g)):
        return False, np.nan, np.nan, f"{int((~np.isfinite(g)).sum())} non-finite value(s)"
    diff = float(np.abs(g - r).max()) if r.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    rel = diff / max(scale, 1e-12)
    if kind == "exact":
        bad = int((g != r).sum())
        return bad == 0, diff, rel, (f"{bad} of {r.size} entries differ" if bad else "")
    if kind == "grad":
        return rel <= rtol, diff, rel, ""
    return diff <= atol, diff, rel, ""


def load_manifest(reference_dir: str) -> dict:
    path = os.path.join(reference_dir, "manifest.json")
    if not os.path.isfile(path):
        raise InputError(f"no manifest.json in {reference_dir}: pass --reference DIR, a folder written by "
                         "`thl-np golden --out DIR`")
    with open(path) as f:
        return json.load(f)


def select_cases(manifest: dict, patterns=None) -> list:
    """Case ids matching any pattern: a full id ("components/router"), its last part ("router"), or a glob
    ("components/writer_*"). Raises InputError naming the known cases when a pattern matches none."""
    ids = list(manifest["cases"])
    if not patterns:
        return ids
    chosen = []
    for p in patterns:
        hits = [c for c in ids if c == p or c.split("/", 1)[1] == p or fnmatch.fnmatch(c, p)
                or fnmatch.fnmatch(c.split("/", 1)[1], p)]
        if not hits:
            raise InputError(f"no reference case matches {p!r}; the cases are: {', '.join(ids)}")
        chosen += [h for h in hits if h not in chosen]
    return [c for c in ids if c in chosen]


def compare_results(results_dir, reference_dir=None, cases=None, dtype="float64", atol=None, rtol=None
                    ) -> CheckReport:
    """Compare a port's RESULTS_DIR (laid out like the reference folder) with the reference.

    For every selected case, reads ``RESULTS_DIR/<case>/outputs_<dtype>.npz`` and compares each key the
    manifest lists: required keys must be present; optional (diagnostic) keys are compared when present.
    ``atol`` / ``rtol`` override the manifest's tolerances for values / gradients.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: use float64 or float32")
    reference_dir = os.fspath(reference_dir or default_reference_dir())
    results_dir = os.fspath(results_dir)
    manifest = load_manifest(reference_dir)
    if not os.path.isdir(results_dir):
        expected = os.path.join(results_dir, "<case>", f"outputs_{dtype}.npz")
        raise InputError(f"results folder {results_dir} does not exist: a port writes {expected} for each "
                         "case it runs")
    tol = dict(manifest.get("tolerances", TOLERANCES)[dtype])
    if atol is not None:
        tol["atol"] = float(atol)
    if rtol is not None:
        tol["rtol"] = float(rtol)
    report = CheckReport(dtype, results_dir, reference_dir)
    fname = f"outputs_{dtype}.npz"
    for case in select_cases(manifest, cases):
        keys = manifest["cases"][case]["outputs"]
        ref = load_npz(os.path.join(reference_dir, case, fname))
        path = os.path.join(results_dir, case, fname)
        if not os.path.isfile(path):
            report.missing_files.append((case, path))
            for key, info in keys.items():
                if info.get("required", True):
                    report.checks.append(TensorCheck(case, key, info["kind"], "MISSING",
                                                     message=f"file {path} does not exist"))
            continue
        try:
            got = load_npz(path)
        except Exception as exc:
            report.missing_files.append((case, path))
            why = f"{path} is not a readable .npz ({type(exc).__name__}: {exc})"
            report.checks.append(TensorCheck(case, fname, "file", "NOT OK", message=why))
            continue
        for key, info in keys.items():
            kind = info["kind"]
            limit = tol["rtol"] if kind == "grad" else (0.0 if kind == "exact" else tol["atol"])
            if key not in got:
                if info.get("required", True):
                    report.checks.append(TensorCheck(case, key, kind, "MISSING", tol=limit,
                                                     message=f"key {key!r} not in {path}"))
                else:
                    report.checks.append(TensorCheck(case, key, kind, "SKIPPED", tol=limit,
                                                     message="optional, not in the results"))
                continue
            ok, d_abs, d_rel, msg = compare_arrays(got[key], ref[key], kind, tol["atol"], tol["rtol"])
            status = "OK" if ok else "NOT OK"
            report.checks.append(TensorCheck(case, key, kind, status, d_abs, d_rel, limit, msg))
    return report


def _fmt(x: float) -> str:
    return "      -" if not np.isfinite(x) else f"{x:7.1e}"


def format_report(report: CheckReport, verbose: bool = True) -> str:
    """The check-port listing: per case, one line per tensor (OK / NOT OK with max abs and max rel
    difference), then ``N passed, M failed``."""
    lines = [f"reference {report.reference_dir}", f"results   {report.results_dir}   [{report.dtype}]"]
    by_case = {}
    for c in report.checks:
        by_case.setdefault(c.case, []).append(c)
    missing = dict(report.missing_files)
    width = max([len(c.key) for c in report.checks] + [20])
    for case, checks in by_case.items():
        lines.append("")
        lines.append(case)
        if case in missing and all(c.status == "MISSING" for c in checks):
            lines.append(f"  NOT OK  missing file: expected {missing[case]} ({len(checks)} required tensors)")
            continue
        if not verbose and all(c.ok for c in checks):
            n_ok = sum(c.status == "OK" for c in checks)
            lines.append(f"  all {n_ok} OK")
            continue
        for c in checks:
            if c.status == "SKIPPED":
                if verbose:
                    lines.append(f"  --      {c.key:<{width}}  (optional, not provided)")
                continue
            if c.status == "OK" and not verbose:
                continue
            label = "OK    " if c.status == "OK" else "NOT OK"
            tol = "exact" if c.kind == "exact" else (f"rel <= {c.tol:.0e}" if c.kind == "grad" else
                                                       f"abs <= {c.tol:.0e}")
            line = (f"  {label}  {c.key:<{width}}  max abs {_fmt(c.max_abs)}  max rel {_fmt(c.max_rel)}"
                    f"  ({tol})")
            if c.message:
                line += f"  {c.message}"
            lines.append(line)
    lines.append("")
    if report.skipped:
        lines.append(f"{report.skipped} optional tensors not provided (skipped)")
    if report.missing_files:
        lines.append(f"{len(report.missing_files)} result file(s) missing or unreadable:")
        lines += [f"  {p}" for _, p in report.missing_files]
    lines.append(f"{report.passed} passed, {report.failed} failed")
    return "\n".join(lines)


__all__ = ["TOLERANCES", "MARGINS", "generate", "compare_results", "compare_arrays", "format_report",
           "CheckReport", "TensorCheck", "load_manifest", "select_cases", "default_reference_dir", "save_npz",
           "load_npz"]
