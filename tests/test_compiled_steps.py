"""The compiled step (thl_np.engines.compiled_steps.run_steps) computes FastDecoder._advance's function:
the same session state after every prompt, step by step or in one call, and the plain path's logits
(DESIGN.md: float64 within 1e-10, float32 logits within 1e-5)."""
import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np import THLConfig, THLModel
from thl_np.engines import compiled_steps
from thl_np.engines.decoder import FastDecoder

STATE = ("S", "memory", "norm2", "read_ema", "write_ema", "last_read", "last_write", "ring_e", "ring_k", "ring_v",
         "_idx", "_alpha", "_targets", "_g", "_novel")


def small_config(**kw):
    base = dict(vocab_size=37, embedding_dim=8, hidden_dim=8, num_tiers=3, tier_dims=[8, 6, 5],
                tier_timescales=[1, 2, 3], local_window=3, memory_slots=6, memory_dim=7, query_dim=4,
                value_dim=6, num_heads=2, head_dim=3, read_topk=2, write_slots=1, dtype="float64")
    base.update(kw)
    return THLConfig(**base)


@st.composite
def configs(draw):
    J = draw(st.integers(2, 8))
    K = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    return small_config(
        num_tiers=K, tier_dims=[draw(st.integers(2, 7)) for _ in range(K)],
        tier_timescales=[1] + [draw(st.integers(1, 5)) for _ in range(K - 1)],
        memory_slots=J, read_topk=draw(st.integers(1, J)), write_slots=draw(st.integers(1, J)),
        num_heads=H, value_dim=H * draw(st.integers(1, 3)), memory_dim=draw(st.integers(2, 9)),
        local_window=draw(st.integers(0, 5)), read_slot_capacity=draw(st.one_of(st.none(), st.integers(1, 2))),
        write_rate=draw(st.sampled_from([0.05, 0.5, 1.0])), memory_decay=draw(st.sampled_from([0.9995, 0.8, 0.0])),
        load_penalty=draw(st.sampled_from([0.0, 0.1, 1.0])), novelty_theta=draw(st.sampled_from([0.3, 0.9, -0.5])),
        components={"router": draw(st.sampled_from(["spec", "unit_keys", "empty_last", "unit_rows"]))})


def session(model, B, compiled=True, renorm_below=None):
    dec = FastDecoder(model, batch_size=B, renorm_below=renorm_below)
    assert dec._compiled is not None, "small float models step with run_steps"
    if not compiled:
        dec._compiled = None   # FastDecoder._advance, kernel by kernel
    return dec


def by_steps(dec, ids):
    """One advance per token → tier states [B, T, Σd_k]."""
    return np.stack([dec.advance(ids[:, t]).copy() for t in range(ids.shape[1])], axis=1)


def assert_same_session(a, b, tol):
    """Every state array of two sessions equal (tol 0) or within tol relative to the array's largest value
    (the bank is stored divided by the decay scalar, so its scale is arbitrary)."""
    for name in STATE:
        x, y = getattr(a, name), getattr(b, name)
        if tol == 0 or x.dtype.kind in "biu":
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(1.0, np.abs(y).max(initial=0.0)), err_msg=name)
    assert (a.t, a.ring_start, a.ring_n) == (b.t, b.ring_start, b.ring_n)
    assert abs(a.scale - b.scale) <= tol * max(1.0, abs(b.scale))


@settings(max_examples=examples(40), deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2**16), B=st.sampled_from([1, 3]), T=st.integers(1, 40),
       renorm=st.sampled_from([None, 0.9]))
def test_one_call_equals_advance_and_plain(cfg, seed, B, T, renorm):
    """Random configs (tier clocks, local windows from none to 5, prompts up to 40 tokens, capacity on and
    off, the unit_keys router, eager decay γ = 0), batches of 1 and 3, renormalising often (renorm 0.9)
    or rarely: the whole prompt in one compiled call leaves the session as _advance step by step does, and
    its logits are the plain path's."""
    model = THLModel(cfg, seed=seed)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
    ref = session(model, B, compiled=False, renorm_below=renorm)
    want_hidden = by_steps(ref, ids)
    dec = session(model, B, renorm_below=renorm)
    logits = dec.prompt(ids, logits="all")
    assert_same_session(dec, ref, 1e-12)
    np.testing.assert_allclose(logits, ref.logits(want_hidden), rtol=0, atol=1e-12)
    plain, _ = model(ids, path="plain")
    assert np.abs(logits - plain).max() <= 1e-10 * max(1.0, np.abs(plain).max())


def test_one_sequence_agrees_with_advance_to_rounding():
    """B = 1, float32 and float64, a prompt longer than the local window, every tier's clock and
    renormalisations: run_steps's packed products (one fused multiply-add chain per output) and
    _advance's gemv (vectorised, reassociated sums) differ in rounding only."""
    for dtype in ("float32", "float64"):
        cfg = small_config(dtype=dtype, vocab_size=259, embedding_dim=32, hidden_dim=32, tier_dims=[32, 24, 16],
                           tier_timescales=[1, 4, 16], local_window=16, memory_slots=16, memory_dim=32,
                           query_dim=16, value_dim=32, num_heads=4, head_dim=8, read_topk=4, memory_decay=0.99,
                           components={"router": "unit_keys"})
        model = THLModel(cfg, seed=3)
        ids = np.random.default_rng(0).integers(0, 256, size=(1, 1500))
        ref = session(model, 1, compiled=False)
        by_steps(ref, ids)
        dec = session(model, 1)
        dec.prompt(ids, logits="none")
        assert ref.t == 1500 and ref.scale > 0.99 ** 1500, "the decay scalar was renormalised"
        assert_same_session(dec, ref, 1e-5 if dtype == "float32" else 1e-12)


@settings(max_examples=examples(25), deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2**16), B=st.integers(2, 11), T=st.integers(1, 30),
       dtype=st.sampled_from(["float32", "float64"]))
def test_each_row_of_a_batch_gets_the_bits_it_gets_alone(cfg, seed, B, T, dtype):
    """A sequence stepped in a batch of B (rows taken 8, 4, 2 and 1 at a time by the packed products) ends
    in the same state and gives the same logits, bit for bit, as the same sequence stepped alone: what a
    server's batching and generate_text's batched prompts rely on."""
    model = THLModel(THLConfig(**{**cfg.to_dict(), "dtype": dtype}), seed=seed)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
    batch = session(model, B)
    logits = batch.prompt(ids, logits="all")
    for b in range(B):
        alone = session(model, 1)
        want = alone.prompt(ids[b:b + 1], logits="all")
        np.testing.assert_array_equal(logits[b], want[0])
        for name in STATE:
            np.testing.assert_array_equal(getattr(batch, name)[b], getattr(alone, name)[0], err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_long_prompt_in_a_batch_gets_the_head_bits_it_gets_alone(dtype):
    """logits="all" over more positions than SMALL_BATCH (6 × 30 here, 30 alone) still runs the head row by
    row: BLAS GEMM's bits for a row change with the number of rows beside it."""
    model = THLModel(small_config(dtype=dtype), seed=3)
    ids = np.random.default_rng(3).integers(0, 37, size=(6, 30))
    logits = session(model, 6).prompt(ids, logits="all")
    for b in range(6):
        np.testing.assert_array_equal(logits[b], session(model, 1).prompt(ids[b:b + 1], logits="all")[0])


def test_steps_and_one_call_agree_and_the_state_converts():
    """prompt() in one call, then step() per token, equals step() from the start; the session's state
    (FastDecoder.state) is the plain path's."""
    cfg = small_config(local_window=4, read_slot_capacity=1, memory_decay=0.8)
    model = THLModel(cfg, seed=5)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(3, 50))
    a = session(model, 3, renorm_below=0.5)
    first = a.prompt(ids[:, :30], logits="last")
    rest = np.stack([a.step(ids[:, t]) for t in range(30, 50)], axis=1)
    b = session(model, 3, renorm_below=0.5)
    each = np.stack([b.step(ids[:, t]) for t in range(50)], axis=1)
    np.testing.assert_array_equal(first, each[:, 29])
    np.testing.assert_array_equal(rest, each[:, 30:])
    assert_same_session(a, b, 0)
    plain_logits, plain_state = model(ids, path="plain")
    assert np.abs(each - plain_logits).max() < 1e-10
    for key, want in plain_state.arrays().items():
        np.testing.assert_allclose(a.state().arrays()[key], want, rtol=0, atol=1e-10, err_msg=key)


@pytest.mark.parametrize("B", [1, 3])
def test_a_long_prompt_runs_in_chunks_with_the_same_result(B, monkeypatch):
    """compiled_steps.advance splits a prompt into calls of CHUNK steps (Ctrl-C is seen between two): the
    same session and tier states as one call."""
    model = THLModel(small_config(), seed=4)
    ids = np.random.default_rng(4).integers(0, 37, size=(B, 40))
    one = session(model, B)
    want = one.prompt(ids, logits="all")
    monkeypatch.setattr(compiled_steps, "CHUNK", 7)
    chunked = session(model, B)
    np.testing.assert_array_equal(chunked.prompt(ids, logits="all"), want)
    assert_same_session(chunked, one, 0)


def test_float32_logits_within_1e5_of_the_plain_path():
    cfg = small_config(dtype="float32", vocab_size=259, embedding_dim=16, hidden_dim=16, tier_dims=[16, 12],
                       num_tiers=2, tier_timescales=[1, 8], local_window=8, memory_slots=8, memory_dim=16,
                       components={"router": "unit_keys"})
    model = THLModel(cfg, seed=2)
    ids = np.random.default_rng(2).integers(0, 256, size=(3, 300))
    plain, _ = model(ids, path="plain")
    fast, _ = model(ids, path="fast")
    assert np.abs(fast - plain).max() < 1e-5


def test_it_applies_to_small_float_models_only():
    small = THLModel(small_config(), seed=0)
    assert compiled_steps.applies(small) and FastDecoder(small)._compiled is not None
    big = THLConfig(dim=512, memory_slots=64)
    assert compiled_steps.step_parameters(big) > compiled_steps.MAX_STEP_PARAMETERS
    from thl_np import quantize_model

    q = quantize_model(THLModel(small_config(dtype="float32"), seed=0), "int8")
    assert not compiled_steps.applies(q) and FastDecoder(q)._compiled is None
    # the count is the step's products: the matrices run_steps reads (packed), but the embedding table
    dec = FastDecoder(small)
    mats = [dec.W_qkv, dec.W_q, dec.W_k_heads_T, dec.W_v_heads, dec.W_w, *dec.W_zr, *dec.W_h]
    assert compiled_steps.step_parameters(small.config) == sum(m.size for m in mats)
    weights, _ = dec._compiled
    packed = [weights.W_qkv, weights.W_q, weights.W_k_heads_T, weights.W_v_heads, weights.W_w, weights.W_zr,
              weights.W_h]
    assert sum(m.size for m in packed) >= compiled_steps.step_parameters(small.config)  # rows padded to tiles


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_is_warm_knows_the_signature_a_session_calls(dtype):
    """is_warm builds run_steps's argument types from the model alone: they must be those a session
    passes, or "auto" would wait for a compile it thought cached (or avoid one that is)."""
    from numba import typeof

    model = THLModel(small_config(dtype=dtype, num_tiers=2, tier_dims=[8, 6], tier_timescales=[1, 2]), seed=0)
    dec = FastDecoder(model)
    dec.prompt(np.zeros((1, 2), np.int64), logits="none")
    real = tuple(typeof(x) for x in compiled_steps._arguments(dec, np.zeros((1, 1), np.int64),
                                                                np.empty((1, 0, dec.S.shape[1]), dec.dtype)))
    assert compiled_steps._signature(model) == real
    dec.logits(dec.S)   # the head's products
    assert compiled_steps.is_warm(model)


def test_the_cache_key_follows_the_kernels():
    """Numba keys a cached function by its own file only; run_steps's closure holds a digest of the kernels'
    sources, which Numba's cache key includes, so an edited kernel is compiled in, never a stale copy."""
    cells = [c.cell_contents for c in compiled_steps.run_steps.py_func.__closure__]
    assert compiled_steps._kernel_digest() in cells


def test_bench_model_reports_prefill_and_generation_on_one_thread(tmp_path, capsys):
    """`thl-np bench --model DIR --generation-only --json`: prefill and generate_text bytes/s (greedy and
    sampled) on one thread, the thread count it used."""
    import json

    from thl_np.cli import main

    THLModel(small_config(dtype="float32", vocab_size=259), seed=0).save_pretrained(str(tmp_path / "m"))
    code = main(["bench", "--model", str(tmp_path / "m"), "--generation-only", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    figures = json.loads(out)
    assert figures["generation_threads"] == 1 and figures["generation_path"] == "fast"
    for key in ("prefill_bytes_s", "greedy_bytes_s", "sampled_bytes_s"):
        assert figures[f"generation_{key}"] > 0
    assert "prefill" in err and "sampled" in err


def test_a_new_session_sees_parameters_edited_in_place():
    """As FastDecoder._advance's sessions: a session built after an in-place edit of a parameter array steps
    with the edited values (prepare keeps no copy across sessions)."""
    model = THLModel(small_config(), seed=6)
    ids = np.random.default_rng(6).integers(0, 37, size=(1, 12))
    session(model, 1).prompt(ids, logits="none")
    model.params["router.W_q.weight"][:] *= 1.5
    model.params["tiers.cells.0.W_h.weight"][:] *= 0.5
    got = session(model, 1).prompt(ids, logits="all")
    want, _ = model(ids, path="plain")
    assert np.abs(got - want).max() < 1e-10


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_head_on_one_thread_is_linear_for_each_row_alone(dtype):
    """A small model's logits (compiled_steps.head, one thread) are linalg.linear's within rounding, and each
    row's are the bits it gets alone."""
    from thl_np.components.output import layer_norm_forward
    from thl_np.fast.linalg import linear

    model = THLModel(small_config(dtype=dtype, vocab_size=259), seed=8)
    dec = session(model, 3)
    dec.prompt(np.random.default_rng(8).integers(0, 259, size=(3, 20)), logits="none")
    h = np.ascontiguousarray(layer_norm_forward(dec.S, dec.ln_w, dec.ln_b)[0])
    got = compiled_steps.head(dec, h)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got[:1], linear(h[:1], dec.W_o, dec.b_o), rtol=0, atol=tol)
    np.testing.assert_allclose(got, linear(h, dec.W_o, dec.b_o), rtol=0, atol=tol)
    np.testing.assert_array_equal(dec.logits(dec.S), got)
    for b in range(3):
        np.testing.assert_array_equal(compiled_steps.head(dec, h[b:b + 1])[0], got[b])
