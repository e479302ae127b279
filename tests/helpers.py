"""Small shared utilities for the test suite: tiny configs (fixed and as hypothesis strategies), random
parameters and states, the discrete choices of a forward pass, and a finite-difference checker that
skips coordinates whose perturbation flips a discrete choice (and counts them)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from thl_np.components.output import cross_entropy_forward, load_balance_forward
from thl_np.config import THLConfig
from thl_np.params import param_shapes
from thl_np.state import InferenceState
from thl_np.step import output_forward, run_sequence, thl_step


def examples(n: int) -> int:
    """Hypothesis example counts, scaled by the environment variable THL_HYPOTHESIS_SCALE (default 1) for a
    longer search, e.g. THL_HYPOTHESIS_SCALE=20 python -m pytest tests/test_gradcheck.py."""
    return max(1, int(n * float(os.environ.get("THL_HYPOTHESIS_SCALE", "1"))))


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------
TINY = dict(
    vocab_size=11, embedding_dim=5, hidden_dim=5, num_tiers=2, tier_dims=[4, 3], tier_timescales=[1, 2],
    local_window=3, memory_slots=6, memory_dim=4, query_dim=3, value_dim=4, num_heads=2, head_dim=3,
    read_topk=2, load_penalty=0.3, read_ema_decay=0.9, write_slots=1, write_rate=0.5, dtype="float64",
)


def tiny_config(**overrides) -> THLConfig:
    """A small float64 config; keyword arguments override any field."""
    kw = dict(TINY)
    kw.update(overrides)
    return THLConfig(**kw)


@st.composite
def configs(draw, dtype="float64", max_dim=8):
    """Small configs covering the branches the conformance cases never reach: K = 1..3 with varied
    widths and clocks, local_window 0..4, slot capacity, W_w > 1, η ≠ 1, the load-balance term, and
    novelty thresholds that give both writer branches; the built-in router variants ``unit_keys``,
    ``empty_last`` and ``unit_rows`` in a fifth of them each (the fast path has their kernels too)."""
    K = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    J = draw(st.integers(2, 8))
    dim = st.integers(2, max_dim)
    return THLConfig(
        vocab_size=draw(st.integers(5, 20)),
        embedding_dim=draw(dim),
        hidden_dim=4,
        num_tiers=K,
        tier_dims=[draw(dim) for _ in range(K)],
        tier_timescales=[1] + [draw(st.integers(1, 4)) for _ in range(K - 1)],
        local_window=draw(st.integers(0, 4)),
        memory_slots=J,
        memory_dim=draw(dim),
        query_dim=draw(st.integers(1, 4)),
        value_dim=H * draw(st.integers(1, 3)),
        num_heads=H,
        head_dim=draw(st.integers(1, 4)),
        read_topk=draw(st.integers(1, J)),
        load_penalty=draw(st.sampled_from([0.0, 0.1, 0.7])),
        read_ema_decay=draw(st.sampled_from([0.99, 0.6])),
        read_slot_capacity=draw(st.sampled_from([None, 1, 2])),
        router_load_balance_lambda=draw(st.sampled_from([0.0, 0.0, 0.3])),
        write_slots=draw(st.integers(1, J)),
        memory_decay=draw(st.sampled_from([0.9995, 0.8])),
        write_rate=draw(st.sampled_from([0.05, 1.0])),
        write_clip_max=draw(st.sampled_from([0.3, 1.0, 100.0])),
        write_ema_decay=draw(st.sampled_from([0.99, 0.5])),
        novelty_beta=draw(st.sampled_from([8.0, 2.0])),
        novelty_theta=draw(st.sampled_from([-0.5, 0.3, 0.8, 1.2])),
        stale_weight=draw(st.sampled_from([1.0, 0.1])),
        underuse_weight=draw(st.sampled_from([1.0, 0.01])),
        components={"router": draw(st.sampled_from(["spec", "spec", "unit_keys", "empty_last", "unit_rows"]))},
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------------
# Parameters and states
# ---------------------------------------------------------------------------------------------------
def random_params(config: THLConfig, rng: np.random.Generator, dtype=np.float64, scale=0.5) -> dict:
    """Every spec §2 tensor drawn at a scale where no path is negligible (biases and LayerNorm too)."""
    params = {}
    for name, shape in param_shapes(config).items():
        fan_in = shape[-1]
        if name == "layer_norm.weight":
            w = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.2 * rng.standard_normal(shape)
        elif name == "embedding.weight":
            w = scale * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) * (1.5 / np.sqrt(fan_in))
        params[name] = w.astype(dtype)
    return params


def random_state(config: THLConfig, batch_size: int, rng: np.random.Generator, dtype=np.float64,
                 empty_fraction=0.3, timestep=None, local_valid=None) -> InferenceState:
    """A random mid-run state: memory with some empty (all-zero) rows, positive read_ema, last_write ≤ t,
    a partly (or fully) filled local buffer and random tier states."""
    c = config
    B, J = batch_size, c.memory_slots
    t = int(rng.integers(0, 12)) if timestep is None else int(timestep)
    memory = rng.standard_normal((B, J, c.memory_dim))
    memory[rng.random((B, J)) < empty_fraction] = 0.0
    if local_valid is None:
        local_valid = int(rng.integers(0, c.local_window + 1)) if c.local_window else 0
    buffer = np.zeros((B, c.local_window, c.embedding_dim))
    buffer[:, :local_valid] = 0.5 * rng.standard_normal((B, local_valid, c.embedding_dim))
    return InferenceState(
        timestep=t,
        tiers=[(0.5 * rng.standard_normal((B, d))).astype(dtype) for d in c.tier_dims],
        memory=memory.astype(dtype),
        read_ema=rng.uniform(0.02, 1.0, (B, J)).astype(dtype),
        write_ema=rng.uniform(0.0, 1.0, (B, J)).astype(dtype),
        last_read=rng.integers(0, t + 1, (B, J)).astype(np.int64),
        last_write=rng.integers(0, t + 1, (B, J)).astype(np.int64),
        local_buffer=buffer.astype(dtype),
        local_valid=local_valid,
    )


def has_duplicate_rows(params, config, ids, state) -> bool:
    """Whether two non-empty memory rows of one sequence are ever exactly equal during the plain run of
    ids [B, T] from ``state`` (as when W_w > 1 writes the same g·w into several empty slots). Their
    scores and affinities then tie exactly in exact arithmetic, but a BLAS product may round the two
    rows differently, so different computation paths can break the tie differently: tests that compare
    two paths leave such runs out (test_components.test_identical_rows_tie_to_the_lower_index pins the
    issue down)."""
    s = state.copy()
    for t in range(ids.shape[1] + 1):
        M = s.memory
        for b in range(M.shape[0]):
            rows = M[b][np.linalg.norm(M[b], axis=1) > 1e-6]
            if len(np.unique(rows, axis=0)) < len(rows):
                return True
        if t < ids.shape[1]:
            _, s, _ = thl_step(params, config, ids[:, t], s)
    return False


def state_equal(a: InferenceState, b: InferenceState) -> bool:
    """Bit-for-bit equality of every spec §3 key (same shapes, dtypes and values)."""
    xa, xb = a.arrays(), b.arrays()
    if xa.keys() != xb.keys():
        return False
    return all(xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]) for k in xa)


# ---------------------------------------------------------------------------------------------------
# The loss and the discrete choices of one forward pass
# ---------------------------------------------------------------------------------------------------
def discrete_choices(tape) -> list:
    """Every discrete choice spec §5 holds fixed, step by step: top-κ idx, capacity mask, write targets,
    the novel/refine branch, the arg-max slot j*, the clip branch."""
    out = []
    for rec in tape:
        cap_mask = rec.router.cap_mask
        out.append((rec.idx, None if cap_mask is None else cap_mask != 0, rec.targets, rec.writer.novel,
                    rec.writer.j_star, rec.writer.clipped))
    return out


def same_choices(a, b) -> bool:
    for sa, sb in zip(a, b, strict=True):
        for xa, xb in zip(sa, sb, strict=True):
            if (xa is None) != (xb is None):
                return False
            if xa is not None and not np.array_equal(xa, xb):
                return False
    return True


def loss_and_choices(params, config, ids, targets, state, gumbel_uniform=None):
    """Spec §5's training loss, recomputed from the forward components, and the forward's discrete choices."""
    tier_states, _, tape = run_sequence(params, config, ids, state.copy(), gumbel_uniform, record=True)
    logits, _, _ = output_forward(params, tier_states)
    loss, _ = cross_entropy_forward(logits, targets)
    lam = config.router_load_balance_lambda
    if lam:
        kl = sum(load_balance_forward(rec.A)[0].sum() for rec in tape)
        loss = loss + lam * kl / ids.size
    return float(loss), discrete_choices(tape)


# ---------------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------------
@dataclass
class FDReport:
    checked: int = 0
    skipped: int = 0
    failures: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.checked + self.skipped

    def assert_ok(self, min_checked_fraction=0.8, min_checked=1, slack=0):
        """No mismatch, and at least ``min_checked_fraction`` of the probes (less ``slack`` probes)
        checked rather than skipped, so the skip rule cannot hide failures."""
        assert not self.failures, (f"{len(self.failures)} gradient mismatch(es) (of {self.checked} checked, "
                                   f"{self.skipped} skipped): " + "; ".join(self.failures[:8]))
        assert self.checked >= min_checked, f"only {self.checked} probes checked ({self.skipped} skipped)"
        assert self.checked >= min_checked_fraction * self.total - slack, (
            f"only {self.checked} of {self.total} probes checked ({self.skipped} skipped for a flipped "
            "discrete choice): the skip rule may be hiding failures")


def same_discrete(a, b) -> bool:
    """Equality of nested discrete signatures (tuples / lists of arrays, scalars or None)."""
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return False
        return all(same_discrete(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a), np.asarray(b))


def fd_check(f, inputs: dict, grads: dict, coords: dict | None = None, eps=1e-6, rtol=1e-6, atol=1e-6,
             report: FDReport | None = None, scale=None) -> FDReport:
    """Central differences of the scalar ``f(inputs) -> (value, discrete signature)`` against ``grads``.

    ``inputs`` maps names to float64 arrays (perturbed in place, then restored); ``coords`` optionally maps
    a name to the flat indices to probe (default: all). A probe whose ±eps evaluations change the
    discrete signature is skipped and counted. A probe passes when
    |fd − analytic| ≤ atol·scale + rtol·|analytic| + noise, with ``scale`` the largest analytic gradient
    entry over every input (so tolerances are relative to the gradient scale) and ``noise`` the rounding
    floor of a central difference, 16·ε_mach·max(1, |f|)/eps (≈ 3.6e-9 for |f| ≤ 1, eps = 1e-6).
    """
    report = report or FDReport()
    f0, sig0 = f(inputs)
    # rounding in f itself: a few ulps of |f| in each of f(x ± eps), divided by 2·eps
    noise = 16 * np.finfo(np.float64).eps * max(1.0, abs(f0)) / eps
    if scale is None:
        scale = max([float(np.abs(g).max()) for g in grads.values() if g.size] + [1e-12])
    for name, x in inputs.items():
        g = grads[name]
        assert g.shape == x.shape, f"gradient of {name} has shape {g.shape}, input {x.shape}"
        flat_idx = range(x.size) if coords is None or name not in coords else coords[name]
        xf = x.reshape(-1)
        assert np.shares_memory(xf, x)
        for i in flat_idx:
            old = xf[i]
            xf[i] = old + eps
            fp, sp = f(inputs)
            xf[i] = old - eps
            fm, sm = f(inputs)
            xf[i] = old
            if not (same_discrete(sp, sig0) and same_discrete(sm, sig0)):
                report.skipped += 1
                continue
            report.checked += 1
            fd = (fp - fm) / (2 * eps)
            an = float(g.reshape(-1)[i])
            if not abs(fd - an) <= atol * scale + rtol * abs(an) + noise:
                where = tuple(int(v) for v in np.unravel_index(i, x.shape))
                report.failures.append(f"{name}{list(where)}: analytic {an:.10g}, "
                                       f"finite difference {fd:.10g}")
    return report


# ---------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------
def assert_resume_matches(config, data, tmp_path, kw, full_dir="full"):
    """A run of ``kw["steps"]`` steps (already trained into ``tmp_path / full_dir``) and one stopped at 2 steps
    then resumed to the same count reach bit for bit the same weights."""
    from thl_np.model import THLModel
    from thl_np.training.trainer import train

    steps = kw["steps"]
    assert train(config, data, str(tmp_path / "half"), **dict(kw, steps=2)).step == 2
    assert train(None, data, str(tmp_path / "half"), **dict(kw, resume=True)).step == steps
    folder = f"step-{steps:06d}/model"
    a = THLModel.from_pretrained(str(tmp_path / full_dir / folder))
    b = THLModel.from_pretrained(str(tmp_path / "half" / folder))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
