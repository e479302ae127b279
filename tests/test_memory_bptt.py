"""The truncated backward through the memory bank (``memory_bptt``, ``thl_np.step.cut_memory_gradient``).

With a cut every N steps, ``value_and_grad`` must be the exact gradient of the loss whose bank, entering every
N-th step, is held at the value the forward had there (checked by central differences of that loss in float64),
on the plain and the fast path alike, and the two paths must agree as they do without a cut. The trainer and
the CLI pass it through, and a resumed run keeps it.
"""
import numpy as np
import pytest
from helpers import configs, examples, random_params, random_state, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thl_np.errors import InputError
from thl_np.gradcheck import check_gradients
from thl_np.model import THLModel, value_and_grad
from thl_np.step import cut_memory_gradient


def _run(data, cfg):
    """A drawn run (model, ids, targets, mid-run state, noise or None) and a cut N in 1..T."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    B = data.draw(st.integers(1, 2), label="B")
    T = data.draw(st.integers(2, 9), label="T")
    model = THLModel(cfg, params=random_params(cfg, rng))
    state = random_state(cfg, B, rng)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    U = rng.random((T, B, cfg.num_heads, cfg.memory_slots)) if data.draw(st.booleans(), label="noise") else None
    return model, ids, targets, state, U, data.draw(st.integers(1, T), label="memory_bptt")


def test_the_cut_steps():
    assert [t for t in range(10) if cut_memory_gradient(t, 3)] == [3, 6, 9]
    assert not any(cut_memory_gradient(t, None) for t in range(10))
    assert [t for t in range(4) if cut_memory_gradient(t, 1)] == [1, 2, 3]


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), data=st.data())
def test_the_truncated_gradient_is_the_gradient_with_held_banks(cfg, data):
    """Central differences of the loss with the bank held at every cut, against the truncated backward."""
    model, ids, targets, state, U, n = _run(data, cfg)
    path = data.draw(st.sampled_from(["plain", "fast"]), label="path")
    report = check_gradients(model, ids, targets, state, U, path=path, memory_bptt=n, tolerance=1e-5,
                             seed=data.draw(st.integers(0, 999), label="directions"))
    assert not report.failures and any(r.ok for r in report.rows), str(report)


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), data=st.data())
def test_fast_and_plain_agree_with_a_cut(cfg, data):
    model, ids, targets, state, U, n = _run(data, cfg)
    out = [value_and_grad(model, ids, targets, state=state, gumbel_uniform=U, path=p, memory_bptt=n,
                          return_state_grad=True) for p in ("plain", "fast")]
    (lp, gp, dp), (lf, gf, df) = out
    assert abs(lp - lf) <= 1e-12 * max(1.0, abs(lp))
    for name in gp:
        scale = max(float(np.abs(gp[name]).max()), 1e-300)
        assert np.abs(gf[name] - gp[name]).max() <= 1e-10 * scale, name
    for key in dp:
        if np.asarray(dp[key]).size == 0:
            continue
        scale = max(float(np.abs(dp[key]).max()), 1e-300)
        assert np.abs(np.asarray(df[key]) - np.asarray(dp[key])).max() <= 1e-10 * scale, key


def test_a_cut_changes_the_memory_gradient_only_where_it_should():
    """A cut beyond the window is no cut (the same numbers); a cut inside it changes the writer's gradient
    (it learnt from reads across the cut), and a bank that is never read gives the same gradient with or
    without it."""
    cfg = tiny_config(local_window=2, novelty_theta=-0.5)
    rng = np.random.default_rng(3)
    model = THLModel(cfg, params=random_params(cfg, rng))
    ids = rng.integers(0, cfg.vocab_size, (2, 8))
    state = model.init_state(2)
    full = value_and_grad(model, ids, ids, state=state, path="plain")[1]
    for path in ("plain", "fast"):
        beyond = value_and_grad(model, ids, ids, state=state, path=path, memory_bptt=8)[1]
        ref = full if path == "plain" else value_and_grad(model, ids, ids, state=state, path="fast")[1]
        assert all(np.array_equal(beyond[k], ref[k]) for k in ref)
        cut = value_and_grad(model, ids, ids, state=state, path=path, memory_bptt=2)[1]
        assert not np.allclose(cut["writer.W_w.weight"], full["writer.W_w.weight"], rtol=1e-6, atol=0)
        assert np.allclose(cut["output_head.weight"], full["output_head.weight"], rtol=1e-9, atol=0)
    # W_v reads the memory: with the value projection zero nothing read reaches the loss, so the bank's
    # gradient is zero and the cut changes nothing
    model.params["router.W_v.weight"][...] = 0.0
    a = value_and_grad(model, ids, ids, state=state, path="plain")[1]
    b = value_and_grad(model, ids, ids, state=state, path="plain", memory_bptt=1)[1]
    assert all(np.allclose(a[k], b[k], rtol=1e-12, atol=1e-300) for k in a)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4"])
def test_a_bad_cut_is_refused(bad):
    cfg = tiny_config()
    model = THLModel(cfg, params=random_params(cfg, np.random.default_rng(0)))
    ids = np.zeros((1, 3), np.int64)
    with pytest.raises(InputError, match="memory_bptt"):
        value_and_grad(model, ids, ids, memory_bptt=bad)


def test_the_trainer_and_the_cli_pass_it_through(tmp_path, capsys):
    """memory_bptt reaches the gradient (a run with it takes another second step than one without; the first
    step's loss is the same: the forward is), --memory-bptt is saved with the run and a resumed run keeps it."""
    from thl_np.cli import main
    from thl_np.training.trainer import TrainConfig, saved_train_config, train

    with pytest.raises(InputError, match="memory_bptt"):
        TrainConfig(memory_bptt=0)
    data = bytes(np.random.default_rng(0).integers(97, 123, 6000).astype(np.uint8))
    cfg = tiny_config(vocab_size=259, dtype="float32")
    kw = dict(steps=3, batch_size=2, seq_len=32, full_bptt=True, eval_every=0, eval_tokens=64, seed=1)
    losses = {n: [r["loss"] for r in train(cfg, data, str(tmp_path / n), **dict(kw, memory_bptt=m)).history]
              for n, m in (("whole", None), ("cut", 4))}
    assert losses["whole"][0] == losses["cut"][0]
    assert losses["whole"][1:] != losses["cut"][1:]
    path = tmp_path / "d.txt"
    path.write_bytes(data)
    common = ["train", "--data", str(path), "--out", str(tmp_path / "cli")]
    assert main(common + ["--dim", "8", "--memory-slots", "8", "--steps", "2", "--batch-size", "2", "--seq-len",
                          "32", "--full-bptt", "--eval-every", "0", "--eval-tokens", "64", "--memory-bptt", "4"]) == 0
    assert saved_train_config(str(tmp_path / "cli")).memory_bptt == 4
    assert main(common + ["--resume", "--steps", "3"]) == 0
    assert saved_train_config(str(tmp_path / "cli")).memory_bptt == 4
