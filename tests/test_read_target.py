"""The read-target term (thl_np.components.read_target): its definition by hand, its gradient by finite
differences, the fast path against the plain one, where its gradient goes, its validator, the rows the
training batches mark, and the trainer's ``--read-weight``."""
import numpy as np
import pytest
from helpers import (
    assert_resume_matches,
    discrete_choices,
    examples,
    fd_check,
    random_params,
    random_state,
    tiny_config,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np.cli import main
from thl_np.components.embedding import embedding_forward
from thl_np.components.read_target import THROUGH, ReadTargets, target_slots
from thl_np.errors import InputError
from thl_np.model import THLModel, value_and_grad
from thl_np.step import read_scores, run_sequence, thl_step
from thl_np.training import checkpoint as ckpt
from thl_np.training.synthetic_tasks import WindowBatches
from thl_np.training.trainer import LOG_FIELDS, OLDER_LOG_FIELDS, TrainConfig, read_targets_of, train

CORPUS = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 300).encode()
ROUTERS = {"spec": {}, "unit_keys": {"router": "unit_keys"}, "empty_last": {"router": "empty_last"}}


def _case(router="unit_keys", seed=3, B=2, T=9, **overrides):
    config = tiny_config(components=ROUTERS[router], write_slots=2, **overrides)
    rng = np.random.default_rng(seed)
    model = THLModel(config, params=random_params(config, rng))
    ids = rng.integers(0, config.vocab_size, (B, T))
    tg = rng.integers(0, config.vocab_size, (B, T))
    sources = np.zeros((B, T), bool)
    sources[:, 2:4] = True
    asks = np.zeros((B, T), bool)
    asks[:, T - 3:] = True
    asks[1, T - 3] = False
    return model, ids, tg, random_state(config, B, rng), sources, asks


def _term_by_hand(model, ids, state, sources, asks, mu):
    """μ · the mean over asked (step, row) pairs with a target of −log (1/H) Σ_h Σ_{j∈T} softmax_j(score)."""
    c, P = model.config, model.params
    written = np.zeros((ids.shape[0], c.memory_slots), bool)
    terms = []
    for t in range(ids.shape[1]):
        e = embedding_forward(P["embedding.weight"], ids[:, t])
        scores = read_scores(P, c, e, state)                      # [B, H, J]
        for b in range(ids.shape[0]):
            if asks[b, t] and written[b].any():
                p = np.exp(scores[b] - scores[b].max(axis=-1, keepdims=True))
                p /= p.sum(axis=-1, keepdims=True)
                terms.append(-np.log(np.mean(p[:, written[b]].sum(axis=-1))))
        _, state, rec = thl_step(P, c, ids[:, t], state, record=True)
        for b in range(ids.shape[0]):
            if sources[b, t]:
                written[b, rec.targets[b]] = True
    return mu * float(np.mean(terms)), len(terms)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_the_term_is_its_definition(router):
    model, ids, tg, state, sources, asks = _case(router)
    reported = []
    rt = ReadTargets(sources, asks, 0.7, report=lambda mean, n: reported.append((mean, n)))
    with_term = value_and_grad(model, ids, tg, state=state.copy(), path="plain", read_targets=rt)[0]
    without = value_and_grad(model, ids, tg, state=state.copy(), path="plain")[0]
    by_hand, n = _term_by_hand(model, ids, state.copy(), sources, asks, 0.7)
    assert n == 5 and reported[0][1] == n and by_hand > 0
    assert with_term - without == pytest.approx(by_hand, rel=1e-12)
    assert reported[0][0] * 0.7 == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("through", THROUGH)
def test_gradient_matches_finite_differences(router, through):
    model, ids, tg, state, sources, asks = _case(router, seed=5)
    rt = ReadTargets(sources, asks, 0.9, through=through)
    _, grads = value_and_grad(model, ids, tg, state=state.copy(), path="plain", read_targets=rt)
    params = {k: v.copy() for k, v in model.params.items()}

    def f(inputs):
        m = THLModel(model.config, params=inputs)
        loss = value_and_grad(m, ids, tg, state=state.copy(), path="plain", read_targets=rt)[0]
        return float(loss), discrete_choices(run_sequence(inputs, model.config, ids, state.copy(), record=True)[2])

    if through == "all":
        coords = {k: np.random.default_rng(1).choice(v.size, min(v.size, 6), replace=False) for k, v in
                  params.items()}
        fd_check(f, params, grads, coords).assert_ok()
    else:   # a stopped gradient has no finite difference: what it moves, and that it stops short of "all"
        without = value_and_grad(model, ids, tg, state=state.copy(), path="plain")[1]
        full = value_and_grad(model, ids, tg, state=state.copy(), path="plain",
                              read_targets=ReadTargets(sources, asks, 0.9))[1]
        moved = {k for k in grads if not np.array_equal(grads[k], without[k])}
        if through == "router":
            assert moved == {"router.W_q.weight", "router.W_k.weight"}
        else:   # the query's inputs too (the embedding, the tiers), but not what reaches only the memory
            assert {"router.W_q.weight", "router.W_k.weight", "embedding.weight"} <= moved
        assert any(not np.allclose(grads[k], full[k], rtol=1e-9, atol=0) for k in grads)


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("through", THROUGH)
@pytest.mark.parametrize("gumbel", [False, True])
def test_fast_path_equals_plain_path(router, through, gumbel):
    model, ids, tg, state, sources, asks = _case(router, seed=7, T=11, read_slot_capacity=1)
    c = model.config
    U = np.random.default_rng(2).random((11, 2, c.num_heads, c.memory_slots)) if gumbel else None
    rt = ReadTargets(sources, asks, 1.3, through=through)
    kw = dict(state=state, gumbel_uniform=U, read_targets=rt, return_state_grad=True, loss_weights=None)
    plain = value_and_grad(model, ids, tg, path="plain", **kw)
    fast = value_and_grad(model, ids, tg, path="fast", **kw)
    assert fast[0] == pytest.approx(plain[0], rel=1e-13)
    for name, g in plain[1].items():
        assert np.abs(fast[1][name] - g).max() <= 1e-11 * max(np.abs(g).max(), 1e-12), name
    for key, g in plain[2].items():
        g, f = np.asarray(g, float), np.asarray(fast[2][key], float)
        assert np.abs(f - g).max() <= 1e-11 * max(np.abs(g).max(), 1e-12), key


def test_no_target_no_term():
    """Asked rows whose value no step wrote add nothing: the same loss and gradients, N = 0 reported."""
    model, ids, tg, state, _, asks = _case()
    reported = []
    rt = ReadTargets(np.zeros_like(asks), asks, 2.0, report=lambda mean, n: reported.append((mean, n)))
    for path in ("plain", "fast"):
        a = value_and_grad(model, ids, tg, state=state, path=path, read_targets=rt)
        b = value_and_grad(model, ids, tg, state=state, path=path)
        assert a[0] == b[0] and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])
    assert reported == [(0.0, 0), (0.0, 0)]


@settings(max_examples=examples(30), deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2 ** 31))
def test_target_slots_are_the_earlier_writes_of_the_asked_id(B, T, W, ids, seed):
    rng = np.random.default_rng(seed)
    J = 7
    writes = rng.integers(0, J, (T, B, W))
    sources = rng.integers(0, ids + 1, (B, T)) * (rng.random((B, T)) < 0.5)
    asks = rng.integers(0, ids + 1, (B, T))
    got = target_slots(writes, sources, asks, J)
    for t in range(T):
        for b in range(B):
            want = {int(j) for s in range(t) if asks[b, t] and sources[b, s] == asks[b, t] for j in writes[s, b]}
            assert set(np.flatnonzero(got[t, b]).tolist()) == want


def test_byte_ids_point_each_answer_step_at_its_byte():
    """Ids k: answer step k reads toward what source step k wrote, not the other bytes' slots; bool marks
    (one id) toward all of them."""
    model, ids, tg, state, _, _ = _case(T=10)
    sources = np.zeros((2, 10), np.int64)
    sources[:, 1:4] = [1, 2, 3]
    asks = np.zeros((2, 10), np.int64)
    asks[:, 6:10] = [1, 2, 3, 4]
    tape = run_sequence(model.params, model.config, ids, state.copy(), record=True)[2]
    writes = np.stack([rec.targets for rec in tape])
    slots = target_slots(writes, sources, asks, model.config.memory_slots)
    for b in range(2):
        for k in range(3):
            assert set(np.flatnonzero(slots[6 + k, b])) == set(writes[1 + k, b].tolist())
        assert not slots[9, b].any()                                  # the stop's id has no source
    one = target_slots(writes, (sources > 0).astype(int), (asks > 0).astype(int), model.config.memory_slots)
    assert all(set(np.flatnonzero(one[t, b])) == set(writes[1:4, b].ravel().tolist())
               for t in range(6, 10) for b in range(2))
    for path in ("plain", "fast"):
        a = value_and_grad(model, ids, tg, state=state, path=path, read_targets=ReadTargets(sources, asks, 1.0))[0]
        u = value_and_grad(model, ids, tg, state=state, path=path,
                           read_targets=ReadTargets(sources > 0, asks > 0, 1.0))[0]
        assert a != u


def test_validator_refuses_what_no_path_serves():
    model, ids, tg, state, sources, asks = _case()
    bad = [(ReadTargets(sources[:, :-1], asks, 1.0), "shape"),
           (ReadTargets(sources.astype(float), asks, 1.0), "bool"),
           (ReadTargets(-sources.astype(int), asks, 1.0), ">= 0"),
           (ReadTargets(sources, asks, 0.0), "> 0"), (ReadTargets(sources, asks, float("nan")), "> 0"),
           (ReadTargets(sources, asks, 1.0, through="writer"), "through"),
           (ReadTargets(sources, asks, 1.0, report=3), "callable")]
    for rt, words in bad:
        for path in ("plain", "fast"):
            with pytest.raises(InputError, match=words):
                value_and_grad(model, ids, tg, state=state, path=path, read_targets=rt)


# ---------------------------------------------------------------------------------------------------
# the rows a training batch marks, and the trainer
# ---------------------------------------------------------------------------------------------------
def test_batches_mark_the_stated_value_and_the_answer():
    wb = WindowBatches(CORPUS, 8, 400, task_mix=0.75, tasks=("kv", "kv1ws", "passkey"), answer_weight=4.0, seed=3)
    marked = 0
    for _ in range(4):
        batch = wb.next_batch()
        assert batch.asks is not None and batch.sources.shape == batch.asks.shape == batch.inputs.shape
        for b in range(8):
            if not batch.asks[b].any():
                assert not batch.sources[b].any()
                continue
            marked += 1
            answer = bytes(batch.targets[b][batch.asks[b] > 0].astype(np.uint8))
            value = bytes(batch.inputs[b][batch.sources[b] > 0].astype(np.uint8))
            src = np.flatnonzero(batch.sources[b])
            ask = np.flatnonzero(batch.asks[b])
            assert value == answer[:len(value)] and len(answer) == len(value) + 1   # the value, then its stop
            assert np.array_equal(src, np.arange(src[0], src[0] + len(value)))   # one run of bytes
            assert np.array_equal(ask, np.arange(400 - len(answer), 400)) and src[-1] < ask[0]
            assert np.array_equal(batch.sources[b][src], np.arange(1, len(value) + 1))     # byte k is id k
            assert np.array_equal(batch.asks[b][ask], np.arange(1, len(answer) + 1))       # answer byte k too
            for k in range(len(value)):      # the step with id k writes value byte k; the answer's step k predicts it
                assert batch.inputs[b][src[k]] == batch.targets[b][ask[k]]
            assert np.array_equal(batch.asks[b] > 0, batch.weights[b] == 4.0)
    assert marked > 10
    plain = WindowBatches(CORPUS, 4, 200, task_mix=1.0, tasks=("passkey", "copy"), seed=1).next_batch()
    assert plain.sources is None and plain.asks is None


@pytest.mark.parametrize("match", ["value", "byte", "value+stop"])
def test_the_trainer_points_no_stop_step_anywhere_unless_asked(match):
    batch = WindowBatches(CORPUS, 8, 300, task_mix=0.75, tasks=("kv1ws", "copy"), answer_weight=4.0,
                          seed=5).next_batch()
    tc = TrainConfig(read_weight=0.3, task_mix=0.75, tasks="kv1ws,copy", read_match=match, read_through="router")
    rt = read_targets_of(batch, tc)
    assert (rt.weight, rt.through) == (0.3, "router")
    for b in range(8):
        n = int((batch.sources[b] > 0).sum())
        ask = np.flatnonzero(batch.asks[b])
        if n == 0:
            assert not rt.asks[b].any() and not rt.sources[b].any()
            continue
        if match == "value+stop":
            assert np.array_equal(np.flatnonzero(rt.asks[b]), ask) and np.all(rt.asks[b, ask] == 1)
        else:
            assert np.array_equal(np.flatnonzero(rt.asks[b]), ask[:n]) and rt.asks[b, ask[-1]] == 0   # not the stop
        want = np.arange(1, n + 1) if match == "byte" else np.ones(n)
        assert np.array_equal(rt.asks[b, ask[:n]], want)
        assert np.array_equal(rt.sources[b][batch.sources[b] > 0], want)
    assert read_targets_of(WindowBatches(CORPUS, 2, 100, seed=1).next_batch(), tc) is None


def test_trainer_read_weight_logs_the_term_and_resumes_bit_for_bit(tmp_path):
    cfg = tiny_config(vocab_size=259, components={"router": "unit_keys"})
    kw = dict(steps=4, seq_len=200, batch_size=2, task_mix=1.0, tasks="kv1ws", answer_weight=4.0, eval_every=0,
              checkpoint_every=2, warmup=1, held_out_fraction=0.1, read_weight=0.5, read_through="query",
              read_match="byte")
    full = train(cfg, CORPUS, str(tmp_path / "full"), **kw)
    assert all(r["read_rows"] > 0 and r["read_nats"] > 0 for r in full.history)
    log = ckpt.read_csv(str(tmp_path / "full" / "step-000004" / "log.csv"), LOG_FIELDS)
    assert log[-1]["read_nats"] == pytest.approx(full.history[-1]["read_nats"])
    off = train(cfg, CORPUS, str(tmp_path / "off"), **dict(kw, read_weight=0.0))
    assert all("read_nats" not in r for r in off.history)
    assert full.history[0]["loss"] > off.history[0]["loss"]      # the same first batch, plus μ·ℓ
    assert_resume_matches(cfg, CORPUS, tmp_path, kw)


def test_a_log_from_before_the_term_still_resumes(tmp_path):
    cfg = tiny_config(vocab_size=259)
    kw = dict(steps=2, seq_len=64, batch_size=2, eval_every=0, checkpoint_every=1, warmup=1, held_out_fraction=0.1)
    train(cfg, CORPUS, str(tmp_path / "run"), **dict(kw, steps=1))
    path = str(tmp_path / "run" / "step-000001" / "log.csv")
    rows = ckpt.read_csv(path, LOG_FIELDS)
    ckpt.write_csv(path, OLDER_LOG_FIELDS[0], rows)                  # the columns a run wrote before
    assert train(None, CORPUS, str(tmp_path / "run"), **dict(kw, resume=True)).step == 2
    path = str(tmp_path / "run" / "step-000002" / "log.csv")
    with open(path, "w") as f:
        f.write("step,loss,something\n1,2.0,3.0\n")
    with pytest.raises(InputError, match="log.csv"):
        train(None, CORPUS, str(tmp_path / "run"), **dict(kw, resume=True, steps=3))


def test_read_weight_needs_kv_rows_and_the_cli_flags(tmp_path, capsys):
    with pytest.raises(InputError, match="key-value task rows"):
        TrainConfig(read_weight=1.0, task_mix=0.5, tasks="passkey")
    with pytest.raises(InputError, match="key-value task rows"):
        TrainConfig(read_weight=1.0, tasks="kv1")
    with pytest.raises(InputError, match="read_through"):
        TrainConfig(read_through="memory")
    with pytest.raises(InputError, match="read_match"):
        TrainConfig(read_match="slot")
    assert TrainConfig(read_weight=1.0, task_mix=0.5, tasks="passkey,kv1").read_weight == 1.0
    data = tmp_path / "corpus.py"
    data.write_bytes(CORPUS)
    out = tmp_path / "run"
    flags = {"--dim": 8, "--memory-slots": 8, "--seq-len": 200, "--task-mix": 1, "--tasks": "kv1ws",
             "--answer-weight": 5, "--read-weight": 2, "--read-through": "router", "--read-match": "byte",
             "--batch-size": 2, "--steps": 2,
             "--eval-every": 0, "--log-every": 1, "--dtype": "float64"}
    code = main(["train", "--data", str(data), "--out", str(out), *[str(x) for kv in flags.items() for x in kv]])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "  read " in text
    from thl_np.training.trainer import saved_train_config

    tc = saved_train_config(str(out))
    assert (tc.read_weight, tc.read_through, tc.read_match) == (2.0, "router", "byte")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "bad"), "--dim", "8", "--steps", "1",
                 "--read-weight", "1"])
    assert code != 0 and "key-value task rows" in capsys.readouterr().err
