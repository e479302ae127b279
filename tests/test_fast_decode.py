"""The fast decode path (thl_np.engines.decoder) computes the plain path's function (spec §4).

DESIGN.md: float64 within 1e-10, float32 logits within 1e-5, over runs long enough to fill the memory,
force least-recently-used writes and renormalise the lazily applied decay.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np import THLConfig, THLModel
from thl_np.engines.decoder import FastDecoder
from thl_np.step import output_forward, run_sequence, thl_step


def small_config(**kw):
    base = dict(vocab_size=37, embedding_dim=8, hidden_dim=8, num_tiers=3, tier_dims=[8, 6, 5],
                tier_timescales=[1, 2, 3], local_window=3, memory_slots=6, memory_dim=7, query_dim=4,
                value_dim=6, num_heads=2, head_dim=3, read_topk=2, write_slots=1, dtype="float64")
    base.update(kw)
    return THLConfig(**base)


def max_rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@st.composite
def configs(draw):
    J = draw(st.integers(2, 8))
    K = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    return small_config(
        num_tiers=K, tier_dims=[draw(st.integers(2, 7)) for _ in range(K)],
        tier_timescales=[1] + [draw(st.integers(1, 4)) for _ in range(K - 1)],
        memory_slots=J, read_topk=draw(st.integers(1, J)), write_slots=draw(st.integers(1, J)),
        num_heads=H, value_dim=H * draw(st.integers(1, 3)), local_window=draw(st.integers(0, 4)),
        read_slot_capacity=draw(st.one_of(st.none(), st.integers(1, 2))),
        write_rate=draw(st.sampled_from([0.05, 0.5, 1.0])), memory_decay=draw(st.sampled_from([0.9995, 0.8])),
        load_penalty=draw(st.sampled_from([0.0, 0.1, 1.0])), novelty_theta=draw(st.sampled_from([0.3, 0.9, -0.5])))


@settings(max_examples=30, deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2**16), B=st.integers(1, 10), T=st.integers(1, 60))
def test_fast_equals_plain_float64(cfg, seed, B, T):
    """float64, the exact promise: spec §4, whole step: logits and every state array, fast vs plain equal to
    rounding, from a zero state (batches on
    each side of linalg.PACK_ROWS: packed step matrices for 2..8 sequences, row-major ones otherwise)."""
    model = THLModel(cfg, seed=seed)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
    lp, sp = model(ids, path="plain")
    lf, sf = model(ids, path="fast")
    assert max_rel(lf, lp) < 1e-10
    for key, want in sp.arrays().items():
        assert np.allclose(sf.arrays()[key], want, rtol=0, atol=1e-10), key


def contractive_model(dtype="float64", seed=7):
    """A small model whose tier weights are halved so its dynamics forget: rounding differences between
    two correct implementations then stay at rounding level instead of being amplified (see below).
    novelty_theta < 0 makes every write novel, so once the bank is full each write picks its slot by
    staleness/underuse (the least-recently-used branch)."""
    cfg = small_config(memory_decay=0.99, novelty_theta=-0.5, write_rate=0.5, dtype=dtype)
    model = THLModel(cfg, seed=seed)
    model.params = {k: v * 0.5 if k.startswith("tiers.") else v for k, v in model.params.items()}
    return model


def run_fast(model, ids, renorm_below=1e-3):
    dec = FastDecoder(model, batch_size=ids.shape[0], renorm_below=renorm_below)
    hidden = np.empty((ids.shape[0], ids.shape[1], dec.S.shape[1]), dec.dtype)
    renorms = 0
    for t in range(ids.shape[1]):
        before = dec.scale
        hidden[:, t] = dec.advance(ids[:, t])
        renorms += dec.scale > before
    return dec, hidden, renorms


def test_long_run_fills_memory_forces_lru_and_renormalises():
    """10,000 steps: the bank (J = 6) fills, novel writes then choose by staleness/underuse, and with
    γ = 0.99 the lazy decay scalar is renormalised every ~690 steps. float64 within 1e-10."""
    model = contractive_model()
    cfg = model.config
    T = 10_000
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, T))
    state, hidden_plain, lru_writes = model.init_state(2), [], 0
    for t in range(T):
        bank_full = np.linalg.norm(state.memory, axis=-1).min(axis=-1) > 1e-6
        h, state, rec = thl_step(model.params, cfg, ids[:, t], state, record=True)
        hidden_plain.append(h)
        lru_writes += int((rec.writer.novel & bank_full).sum())
    sp = state
    lp, _, _ = output_forward(model.params, np.stack(hidden_plain, axis=1))
    dec, hidden, renorms = run_fast(model, ids)
    lf = dec.logits(hidden)
    assert renorms >= 10
    assert lru_writes > 10_000, "novel writes into a full bank choose their slot by staleness/underuse"
    assert max_rel(lf, lp) < 1e-10
    sf = dec.state()
    for key, want in sp.arrays().items():
        assert np.allclose(sf.arrays()[key], want, rtol=0, atol=1e-10), key


def test_float32_fast_within_1e5_of_plain_while_no_choice_flips():
    """float32: the fast path's logits within 1e-5 of the plain path over 10,000 steps, on a contractive model
    whose scores have no near-tie, so no discrete choice flips. That is all float32 promises: where two slots
    score within rounding of each other the paths may choose differently and then differ by more
    (README, "fast and plain, what is promised"); float64 is exact (test_fast_equals_plain_float64)."""
    model = contractive_model(dtype="float32", seed=5)
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(1, 10_000))
    lp, _ = model(ids, path="plain")
    lf, _ = model(ids, path="fast")
    assert np.abs(lf - lp).max() < 1e-5


def test_chaotic_regime_diverges_no_faster_than_rounding():
    """At its default initialisation this small model is chaotic: rounding-level differences grow ~10x
    per 2,000 steps, so any two correct float64 implementations (other summation orders) separate at
    that rate. The yardstick is therefore the plain path against itself with a one-ulp relative nudge
    of its Tier-0 state at every step (as a path that rounds differently at every step would): the fast
    path must stay within 10x of that."""
    cfg = small_config(memory_decay=0.99, novelty_theta=0.05, write_rate=0.5)
    model = THLModel(cfg, seed=7)
    T = 6000
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, T))
    tiers, _, _ = run_sequence(model.params, cfg, ids, model.init_state(2))
    state, nudged = model.init_state(2), []
    for t in range(T):
        h, state, _ = thl_step(model.params, cfg, ids[:, t], state)
        nudged.append(h)
        state.tiers[0] = state.tiers[0] * (1.0 + np.finfo(np.float64).eps)
    _, hidden, _ = run_fast(model, ids)
    sensitivity = np.abs(np.stack(nudged, axis=1) - tiers).max()
    assert sensitivity > 1e-12, "the premise: this model amplifies rounding differences"
    assert np.abs(hidden - tiers).max() <= 10 * sensitivity


def test_forward_step_chain_equals_one_call_and_keeps_inputs():
    """forward_step T times (each reusing the previous state's cache) equals one call over T tokens."""
    cfg = small_config(vocab_size=40)
    model = THLModel(cfg, seed=1)
    ids = np.random.default_rng(3).integers(0, 40, size=(2, 30))
    want, _ = model(ids, path="plain")
    state = None
    for t in range(30):
        logits, state = model.forward_step(ids[:, t], state)
        assert np.abs(logits - want[:, t]).max() < 1e-12
    # a state can be used twice: both uses step a copy of the session that computed it (same numbers, bit
    # for bit); a copy of the state rebuilds the session from its values, which differs by rounding only
    # (the session keeps the decay as a separate scalar)
    _, s = model(ids[:, :10])
    a, _ = model.forward_step(ids[:, 10], s)
    b, _ = model.forward_step(ids[:, 10], s)
    c, _ = model.forward_step(ids[:, 10], s.copy())
    d, _ = model.forward_step(ids[:, 10], s.copy())
    assert np.array_equal(a, b) and np.array_equal(c, d)
    assert np.abs(a - c).max() < 1e-12


def test_cached_state_is_read_only_and_copy_is_writable():
    model = THLModel(small_config(), seed=0)
    _, state = model(np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError):
        state.memory[0, 0, 0] = 1.0
    fresh = state.copy()
    fresh.memory[0, 0, 0] = 1.0
    assert getattr(fresh, "_fast", None) is None


def test_cache_is_not_reused_after_the_weights_change():
    """An optimiser replaces parameter arrays; a state made before must not step with the old weights."""
    model = THLModel(small_config(), seed=0)
    ids = np.arange(12)[None] % 37
    _, state = model(ids)
    model.params = {k: v * 1.05 for k, v in model.params.items()}
    fast, _ = model.forward_step([5], state)
    plain, _ = model.forward_step([5], state.copy(), path="plain")
    assert np.abs(fast - plain).max() < 1e-12


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 40, 64, 65])
def test_linear_kernels_match_numpy(rows, dtype, tol):
    """fast.linear (GEMV for one row, 6×4 tiles for up to SMALL_BATCH rows, BLAS above) equals x @ W.T + b, for
    widths that leave remainders of the tiles (1001 = 6·166 + 5 rows of W, 37 columns)."""
    from thl_np.engines.decoder import linear

    rng = np.random.default_rng(rows)
    W = rng.standard_normal((1001, 37)).astype(dtype)
    b = rng.standard_normal(1001).astype(dtype)
    x = rng.standard_normal((rows, 37)).astype(dtype)
    want = x.astype(np.float64) @ W.T.astype(np.float64) + b
    got = linear(x, W, b)
    assert got.dtype == dtype and got.shape == (rows, 1001)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    # a transposed (non-contiguous) weight takes the BLAS path and gives the same numbers
    assert np.abs(linear(x, np.asfortranarray(W), b) - want).max() <= tol * np.abs(want).max()


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17])
@pytest.mark.parametrize("R", [1, 15, 16, 33, 64])
def test_packed_matrix_matches_numpy(rows, R, dtype, tol):
    """linalg.PackedMatrix.linear = x @ W.T + b for any number of rows (padded to PACK_ROWS, several calls
    above it) and row counts that leave a partial tile, one tile, or an odd number of tiles."""
    from thl_np.fast.linalg import PackedMatrix, linear

    rng = np.random.default_rng(rows * 100 + R)
    W = rng.standard_normal((R, 37)).astype(dtype)
    b = rng.standard_normal(R).astype(dtype)
    P = PackedMatrix(W)
    for _ in range(2):  # the padding buffers are reused: a second call must not see the first's rows
        x = rng.standard_normal((rows, 37)).astype(dtype)
        want = x.astype(np.float64) @ W.T.astype(np.float64) + b
        got = linear(x, P, b)
        assert got.dtype == dtype and got.shape == (rows, R)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_step_matrices_are_packed_for_small_batches_only():
    """The step's products run on packed copies for 2..PACK_ROWS sequences of a float model, built once per
    set of weights and shared by every such session; one sequence and larger batches keep the row-major
    weights."""
    from thl_np.fast.linalg import PACK_ROWS, PackedMatrix, linear

    model = THLModel(small_config(), seed=0)
    for B, packed in [(1, False), (2, True), (PACK_ROWS, True), (PACK_ROWS + 1, False)]:
        dec = model.decoder(batch_size=B)
        assert all(isinstance(W, PackedMatrix) == packed for W in dec._mats.values()), B
    dec = model.decoder(batch_size=3)
    assert dec.clone()._mats["q"] is dec._mats["q"] is model.decoder(batch_size=5)._mats["q"]  # packed once
    model.params = {k: v * 2 for k, v in model.params.items()}   # new arrays: packed again, from them
    again = model.decoder(batch_size=3)
    assert again._mats["q"] is not dec._mats["q"]
    x = np.random.default_rng(0).standard_normal((3, again.W_q.shape[1]))
    assert np.allclose(linear(x, again._mats["q"], np.zeros(again.W_q.shape[0])), x @ again.W_q.T, atol=1e-12)
    assert all(isinstance(W, np.ndarray) for W in FastDecoder(model, batch_size=3, packed_head=False)._mats.values())


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_packed_head_matches_the_plain_head(dtype, tol):
    """The head of 2..SMALL_BATCH sequences runs on a packed copy of W_o (linalg.packed_linear): equal to
    LayerNorm + x @ W_o.T + b for every row count (padding to PACK_ROWS, two calls above it), for a
    vocabulary that leaves a partial tile and an odd number of tiles; the copy is built once per W_o.
    (This model is small enough for compiled_steps, whose head runs on one thread: switched off here.)"""
    from thl_np.components.output import layer_norm_forward

    def decoder(model, batch_size, **kw):
        dec = FastDecoder(model, batch_size=batch_size, **kw)
        dec._compiled = None
        return dec

    model = THLModel(small_config(vocab_size=1001, dtype=dtype), seed=0)
    dec = decoder(model, 2)
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 8, 9, 16, 41, 64, 65):
        h = rng.standard_normal((n, dec.S.shape[1])).astype(dtype)
        hn, _ = layer_norm_forward(h, dec.ln_w, dec.ln_b)
        want = hn.astype(np.float64) @ dec.W_o.T.astype(np.float64) + dec.b_o
        got = dec.logits(h)
        assert got.dtype == np.dtype(dtype) and got.shape == (n, 1001)
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), n
    packed = model._packed_output_head[1]
    assert dec._packed_head() is packed and model.decoder(batch_size=3)._packed_head() is packed
    # new weights (an optimiser replaces the arrays): the packed copy is rebuilt from them
    model.params = {k: v * 2 for k, v in model.params.items()}
    dec = decoder(model, 2)
    h = rng.standard_normal((2, dec.S.shape[1])).astype(dtype)
    hn, _ = layer_norm_forward(h, dec.ln_w, dec.ln_b)
    assert dec._packed_head() is not packed
    assert np.abs(dec.logits(h) - (hn @ dec.W_o.T + dec.b_o)).max() <= tol * 10
    # packed_head=False keeps to the row-major kernel, same numbers
    plain_kernel = decoder(model, 2, packed_head=False).logits(h)
    assert np.abs(plain_kernel - dec.logits(h)).max() <= tol * 10


def test_capacity_head_left_without_picks_keeps_its_weights():
    """Spec §4.4 slot capacity: with capacity 1, κ = 1 and two identical heads, head 1 always picks the
    slot head 0 already took, so it is left with weight 0 and keeps its uncapped weights."""
    cfg = small_config(num_heads=2, value_dim=6, read_topk=1, read_slot_capacity=1)
    model = THLModel(cfg, seed=3)
    P = dict(model.params)
    d_h = cfg.head_dim
    for name in ("router.W_q.weight", "router.W_k.weight"):
        W = P[name].copy()
        W[d_h:] = W[:d_h]
        P[name] = W
    model.params = P
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40))
    lp, sp = model(ids, path="plain")
    lf, sf = model(ids, path="fast")
    assert max_rel(lf, lp) < 1e-10
    for key, want in sp.arrays().items():
        assert np.allclose(sf.arrays()[key], want, rtol=0, atol=1e-10), key
    # the branch was taken: both heads picked the same slot, and head 1 read it with its uncapped weight 1
    dec = FastDecoder(model, batch_size=2)
    for t in range(5):
        dec.advance(ids[:, t])
        assert np.array_equal(dec._idx[:, 0], dec._idx[:, 1])
        assert np.all(dec._alpha == 1.0)
