"""One definition each: the spec §5 loss (``thl_np.step.sequence_loss``), the router input u = [e; s⁰; s^{K−1}]
(``components.router.router_input``) and the writer input x_w (``components.writer.writer_input``); the
reference margins measure the config's own router (the ``unit_keys`` variant's scores included)."""
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import random_params, random_state, tiny_config

import thl_np
from thl_np.components.output import cross_entropy_forward, load_balance_forward
from thl_np.components.primitives import top_k_desc
from thl_np.components.router import DOT, router_forward, slot_scores
from thl_np.components.router_unit_keys import UNIT_KEYS, unit_keys_forward
from thl_np.engines import gradient as fast_grad
from thl_np.errors import InputError
from thl_np.model import THLModel, value_and_grad
from thl_np.reference.margins import router_scores, trace_sequence
from thl_np.step import loss_and_grads, run_sequence

PACKAGE = Path(thl_np.__file__).parent


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8")


def test_the_loss_is_defined_once():
    """Outside the components (its definition) and step.py (``add_load_balance``), only the component's own
    reference vector calls ``load_balance_forward``; every loss goes through ``step.sequence_loss`` /
    ``add_load_balance``."""
    callers = [name for name, text in _sources() if "load_balance_forward(" in text
               and not name.startswith("components/") and name != "step.py"
               and not name.endswith("component_vectors.py")]
    assert callers == [], f"the load-balance term is written again in {callers}: call thl_np.step.add_load_balance"


def test_router_and_writer_inputs_are_built_once():
    """No module outside the components concatenates [e; s⁰; s^{K−1}] or [s⁰; s^{K−1}] from a tier list
    (the fast decoder's flat tier array aside, which another change owns)."""
    pattern = re.compile(r"concatenate\(\[(e, )?[\w.]+\[0\], [\w.]+\[-1\]\]")
    found = [name for name, text in _sources() if pattern.search(text) and not name.startswith("components/")]
    assert found == []


def test_fast_gradient_is_a_sibling_of_the_plain_one():
    assert inspect.signature(fast_grad.loss_and_grads) == inspect.signature(loss_and_grads)


@pytest.mark.parametrize("capacity", [None, 1])
def test_plain_and_fast_loss_agree_with_load_balance_and_weights(capacity):
    """λ ≠ 0 and loss weights: both paths give the loss defined by hand (weighted mean cross-entropy plus λ
    times the mean KL over the B·T read-weight rows, unweighted) and the same gradients."""
    config = tiny_config(router_load_balance_lambda=0.4, write_slots=2, read_slot_capacity=capacity)
    rng = np.random.default_rng(3)
    model = THLModel(config, params=random_params(config, rng))
    B, T = 2, 7
    ids = rng.integers(0, config.vocab_size, (B, T))
    tg = rng.integers(0, config.vocab_size, (B, T))
    weights = rng.random((B, T)) + 0.1
    weights[0, 2] = 0.0
    state = random_state(config, B, rng)
    plain = value_and_grad(model, ids, tg, state=state, path="plain", loss_weights=weights)
    fast = value_and_grad(model, ids, tg, state=state, path="fast", loss_weights=weights)

    tier_states, _, tape = run_sequence(model.params, config, ids, state.copy(), record=True)
    logits = thl_np.step.output_forward(model.params, tier_states)[0]
    ce = cross_entropy_forward(logits, tg, weights)[0]
    kl = np.mean([load_balance_forward(rec.A)[0] for rec in tape])
    by_hand = ce + config.router_load_balance_lambda * kl
    assert abs(plain[0] - by_hand) <= 1e-12 * abs(by_hand)
    assert abs(fast[0] - plain[0]) <= 1e-12 * abs(plain[0])
    for name, g in plain[1].items():
        scale = max(float(np.abs(g).max()), 1e-12)
        assert float(np.abs(fast[1][name] - g).max()) <= 1e-9 * scale, name
    # λ's part reaches the router: without it the gradients differ
    no_lb = THLModel(config.replace(router_load_balance_lambda=0.0), params=model.params)
    g0 = value_and_grad(no_lb, ids, tg, state=state, path="plain", loss_weights=weights)[1]
    assert not np.allclose(g0["router.W_q.weight"], plain[1]["router.W_q.weight"])


@pytest.mark.parametrize("router", ["spec", "unit_keys"])
def test_margins_score_with_the_config_router(router):
    """``margins.router_scores`` gives the scores the config's router ranks: for ``unit_keys`` its own unit-row
    scores (not the spec's dot products), and their top κ are the slots its forward reads."""
    config = tiny_config(components={"router": router}, memory_slots=7, read_topk=3)
    rng = np.random.default_rng(5)
    P = random_params(config, rng)
    state = random_state(config, 3, rng)
    state.memory[0, 1] *= 40.0           # a strong row: unit keys score it by direction alone
    e = P["embedding.weight"][[1, 4, 7]]
    scores = router_scores(P, config, e, state)
    u = np.concatenate([e, state.tiers[0], state.tiers[-1]], axis=1)
    q = (u @ P["router.W_q.weight"].T).reshape(3, config.num_heads, config.head_dim)
    rule = UNIT_KEYS if router == "unit_keys" else DOT
    _, own = slot_scores(state.memory, q, P["router.W_k.weight"], state.read_ema, config.load_penalty, rule)
    np.testing.assert_array_equal(scores, own)
    forward = unit_keys_forward if router == "unit_keys" else router_forward
    _, _, idx, _ = forward(u, state.memory, state.read_ema, P["router.W_q.weight"], P["router.W_k.weight"],
                           P["router.W_v.weight"], num_heads=config.num_heads, head_dim=config.head_dim,
                           topk=config.read_topk, load_penalty=config.load_penalty)
    np.testing.assert_array_equal(top_k_desc(scores, config.read_topk), idx)
    if router == "unit_keys":
        _, spec = slot_scores(state.memory, q, P["router.W_k.weight"], state.read_ema, config.load_penalty, DOT)
        assert not np.allclose(scores, spec)
        assert np.abs(scores + config.load_penalty * state.read_ema[:, None]).max() <= \
            np.linalg.norm(np.einsum("bhd,hdm->bhm", q, P["router.W_k.weight"].reshape(
                config.num_heads, config.head_dim, -1)), axis=-1).max() / np.sqrt(config.head_dim) + 1e-12


def test_trace_on_a_unit_keys_config_follows_its_router():
    """The trace's score gap is measured on the unit_keys scores: equal to the gap recomputed from them, and
    the branches it counts are the writer's own."""
    config = tiny_config(components={"router": "unit_keys"}, write_slots=2)
    rng = np.random.default_rng(8)
    P = random_params(config, rng)
    state = random_state(config, 2, rng)
    ids = rng.integers(0, config.vocab_size, (2, 6))
    trace = trace_sequence(P, config, ids, state.copy())
    tier_states, _, tape = run_sequence(P, config, ids, state.copy(), record=True)
    np.testing.assert_array_equal(trace.tier_states, tier_states)
    np.testing.assert_array_equal(trace.choices["idx"], np.stack([rec.idx for rec in tape]))
    assert trace.counts["novel_empty"] + trace.counts["novel_lru"] == sum(int(rec.writer.novel.sum()) for rec in tape)


def test_margins_refuse_a_plugin_router():
    from thl_np.components.registry import _REGISTRY, register

    register("router", "test_margin_plugin", router_forward, lambda *a, **k: None, replace=True)
    try:
        config = tiny_config(components={"router": "test_margin_plugin"})
        rng = np.random.default_rng(0)
        P = random_params(config, rng)
        state = random_state(config, 1, rng)
        with pytest.raises(InputError, match="scores of its own"):
            router_scores(P, config, P["embedding.weight"][[0]], state)
    finally:
        del _REGISTRY["router"]["test_margin_plugin"]
