"""The ``empty_last`` router variant (thl_np.components.router_empty_last) against what it promises: an
empty slot scores the lowest a written slot can, so the picks go to written slots whatever the question;
a written slot scores as under ``unit_keys``; its hand-derived backward matches finite differences."""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np.components.router import slot_scores, top_k_desc
from thl_np.components.router_empty_last import EMPTY_LAST, empty_last_content, empty_last_content_backward
from thl_np.components.router_unit_keys import UNIT_KEYS


def bank(rng, B, J, d_m, empty):
    """Memory with ``empty`` zero rows per sequence (at random places) and written rows of norm ≥ 0.1 (100 ε)."""
    memory = rng.standard_normal((B, J, d_m))
    memory *= rng.uniform(0.1, 3.0, (B, J, 1)) / np.linalg.norm(memory, axis=-1, keepdims=True)
    is_empty = np.zeros((B, J), bool)
    for b in range(B):
        is_empty[b, rng.choice(J, empty, replace=False)] = True
    memory[is_empty] = 0.0
    return memory, is_empty


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), J=st.integers(2, 9), d_m=st.integers(1, 6), H=st.integers(1, 3),
       d_h=st.integers(1, 4), empty=st.integers(1, 8))
def test_an_empty_slot_scores_the_lowest_a_written_slot_can(seed, J, d_m, H, d_h, empty):
    """score(empty) = −‖q_mem_h‖/√d_h; every written slot scores at least that (less 10⁻⁴ of it, the most a
    row of norm ≥ 100 ε can fall below) and exactly its unit_keys score (to 10⁻⁴ of ‖q_mem_h‖/√d_h)."""
    rng = np.random.default_rng(seed)
    empty = min(empty, J - 1)
    B = 2
    memory, is_empty = bank(rng, B, J, d_m, empty)
    q = rng.standard_normal((B, H, d_h)) * rng.uniform(0.1, 10.0)
    W_k = rng.standard_normal((H * d_h, d_m))
    read_ema = np.zeros((B, J))
    q_mem, scores = slot_scores(memory, q, W_k, read_ema, 0.0, EMPTY_LAST)
    _, unit = slot_scores(memory, q, W_k, read_ema, 0.0, UNIT_KEYS)
    floor = np.linalg.norm(q_mem, axis=-1) / math.sqrt(d_h)                      # [B, H]
    for b in range(B):
        for h in range(H):
            e, w = is_empty[b], ~is_empty[b]
            np.testing.assert_allclose(scores[b, h, e], -floor[b, h], rtol=1e-12, atol=1e-300)
            assert np.all(scores[b, h, w] >= -floor[b, h] * (1 + 1e-4))
            np.testing.assert_allclose(scores[b, h, w], unit[b, h, w], rtol=0, atol=1e-4 * floor[b, h] + 1e-300)


def test_the_picks_go_to_written_slots_that_face_away_from_the_question():
    """Where unit_keys reads the empty slots (every written slot scores below 0), empty_last reads the written
    slots, best-facing first, and an empty slot only once every written slot is picked."""
    d_m = 3
    q_mem_dir = np.array([1.0, 0.0, 0.0])
    written = np.array([[-1.0, 0.2, 0.0], [-1.0, 0.0, 0.9], [-1.0, 0.1, 0.1]])   # all face away (cos < 0)
    memory = np.zeros((1, 6, d_m))
    memory[0, [1, 3, 4]] = written
    W_k = np.eye(d_m)[None].repeat(1, 0).reshape(d_m, d_m)                       # q_mem = q
    q = q_mem_dir[None, None, :]
    read_ema = np.zeros((1, 6))
    _, unit = slot_scores(memory, q, W_k, read_ema, 0.0, UNIT_KEYS)
    _, last = slot_scores(memory, q, W_k, read_ema, 0.0, EMPTY_LAST)
    assert set(top_k_desc(unit, 3)[0, 0].tolist()) == {0, 2, 5}                   # unit_keys: the empty slots
    cos = written @ q_mem_dir / np.linalg.norm(written, axis=1)
    order = [[1, 3, 4][i] for i in np.argsort(-cos, kind="stable")]
    assert top_k_desc(last, 3)[0, 0].tolist() == order                            # empty_last: the written ones
    assert top_k_desc(last, 4)[0, 0].tolist() == order + [0]                      # then the lowest empty index


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), near_empty=st.booleans())
def test_the_content_backward_matches_finite_differences(seed, near_empty):
    """empty_last_content_backward over the picked rows (float64, central differences), with rows near
    ε where the empty term's gradient is largest."""
    rng = np.random.default_rng(seed)
    B, H, kappa, d_m = 2, 2, 3, 4
    m_sel = rng.standard_normal((B, H, kappa, d_m))
    if near_empty:
        m_sel[:, :, 0] *= 2e-3 / np.linalg.norm(m_sel[:, :, 0], axis=-1, keepdims=True)
    q_mem = rng.standard_normal((B, H, d_m))
    d_score = rng.standard_normal((B, H, kappa))
    scale = 0.5

    def loss(m, q):
        # each pick's score is its own row against its head's q_mem: content on a [B·H, κ, d_m] bank
        rows = m.reshape(B * H, kappa, d_m)
        s = empty_last_content(rows, q.reshape(B * H, 1, d_m), scale).reshape(B, H, kappa)
        return float((d_score * s).sum())

    g_q, g_m = empty_last_content_backward(d_score, m_sel, q_mem, scale)
    for what, x, got in (("m_sel", m_sel, g_m), ("q_mem", q_mem, g_q)):
        h = 1e-6 * max(1e-3, float(np.abs(x).min()))
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[i] += h
            xm[i] -= h
            args_p = (xp, q_mem) if what == "m_sel" else (m_sel, xp)
            args_m = (xm, q_mem) if what == "m_sel" else (m_sel, xm)
            num[i] = (loss(*args_p) - loss(*args_m)) / (2 * h)
        np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-6 * float(np.abs(num).max()), err_msg=what)
