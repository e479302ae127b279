"""The ``unit_rows`` router variant (thl_np.components.router_unit_rows) against what it promises: its picks and
weights are ``unit_keys``', its read is the same whatever the norms of the slots (so it cannot grow with a slot),
and the fast path computes it as the plain one. Its backward against finite differences is
tests/test_gradcheck.py's fixed case ``unit_rows``."""
import numpy as np
from helpers import random_params, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np.components.registry import has_fast_path
from thl_np.components.router_unit_keys import unit_keys_forward
from thl_np.components.router_unit_rows import unit_rows_forward
from thl_np.model import THLModel, value_and_grad


def _read(forward, memory, rng_seed, H, d_h, kappa, d_v):
    rng = np.random.default_rng(rng_seed)
    B, J, d_m = memory.shape
    u = rng.standard_normal((B, 5))
    W_q = rng.standard_normal((H * d_h, 5))
    W_k = rng.standard_normal((H * d_h, d_m))
    W_v = rng.standard_normal((H * d_v, d_m))
    return forward(u, memory, np.zeros((B, J)), W_q, W_k, W_v, num_heads=H, head_dim=d_h, topk=kappa,
                   load_penalty=0.0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), J=st.integers(2, 8), d_m=st.integers(1, 6), H=st.integers(1, 3),
       d_h=st.integers(1, 4), kappa=st.integers(1, 8), grow=st.floats(1.0, 1e4))
def test_the_read_does_not_grow_with_the_slots(seed, J, d_m, H, d_h, kappa, grow):
    """Rows of norm ≥ 1 (1000 ε), each scaled by its own factor in [1, grow]: the same picks, weights and read
    (to 1e-5 relative: ε's share of a norm is below 5e-7); unit_keys picks the same slots with the same weights, but its
    read grows with the rows."""
    rng = np.random.default_rng(seed)
    kappa = min(kappa, J)
    memory = rng.standard_normal((2, J, d_m))
    memory *= rng.uniform(1.0, 3.0, (2, J, 1)) / np.linalg.norm(memory, axis=-1, keepdims=True)
    scaled = memory * rng.uniform(1.0, grow, (2, J, 1))
    r, alpha, idx, _ = _read(unit_rows_forward, memory, seed, H, d_h, kappa, 2)
    r2, alpha2, idx2, _ = _read(unit_rows_forward, scaled, seed, H, d_h, kappa, 2)
    ru, alpha_u, idx_u, _ = _read(unit_keys_forward, memory, seed, H, d_h, kappa, 2)
    if not (np.array_equal(idx, idx2) and np.array_equal(idx, idx_u)):
        return  # a near tie the rounding of ε's share may flip: nothing to compare
    np.testing.assert_allclose(alpha2, alpha, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(alpha_u, alpha, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r2, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    if grow > 10:  # the contrast: unit_keys reads the raw rows, and its read moves with them
        ru2 = _read(unit_keys_forward, scaled, seed, H, d_h, kappa, 2)[0]
        assert not np.allclose(ru2, ru, rtol=1e-3, atol=0)


def test_the_fast_path_computes_it_as_the_plain_one():
    """A model with slots grown far past 1 (a state of large rows): loss and every gradient the same on both
    paths (float64, 1e-10 of each tensor's largest entry); the hypothesis-drawn configs of tests/test_fast_grad.py
    and tests/test_fast_decode.py draw this router a fifth of the time."""
    cfg = tiny_config(components={"router": "unit_rows"}, novelty_theta=1.2, write_rate=1.0, write_clip_max=100.0)
    assert has_fast_path(cfg)
    rng = np.random.default_rng(0)
    model = THLModel(cfg, params=random_params(cfg, rng))
    state = model.init_state(2)
    state.memory[...] = rng.standard_normal(state.memory.shape) * 50.0
    ids = rng.integers(0, cfg.vocab_size, (2, 9))
    (lp, gp), (lf, gf) = (value_and_grad(model, ids, ids, state=state, path=p) for p in ("plain", "fast"))
    assert abs(lp - lf) <= 1e-12 * abs(lp)
    for k in gp:
        assert np.abs(gf[k] - gp[k]).max() <= 1e-10 * max(np.abs(gp[k]).max(), 1e-300), k


def test_the_memory_diagnostics_read_it_on_both_paths():
    """The plain path's step records hold this router's cache: the diagnostics (``observe``) read its weights
    from it, and see what they see on the fast path."""
    from thl_np.eval.diagnostics import MemoryStats, log_row

    cfg = tiny_config(components={"router": "unit_rows"}, read_slot_capacity=1)
    rng = np.random.default_rng(2)
    model = THLModel(cfg, params=random_params(cfg, rng))
    ids = rng.integers(0, cfg.vocab_size, (2, 6))
    seen = {}
    for path in ("plain", "fast"):
        stats = MemoryStats(cfg.memory_slots)
        _, _, state = value_and_grad(model, ids, ids, path=path, observe=stats.add, return_state=True)
        seen[path] = log_row(stats.summary(state))
    assert seen["plain"].keys() == seen["fast"].keys()
    for k, v in seen["plain"].items():
        assert np.allclose(v, seen["fast"][k], rtol=1e-9, atol=1e-12), k
