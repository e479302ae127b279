"""Training: schedule, AdamW, clipping, atomic checkpoints, the loop, and exact resume."""
import json
import math
import os
import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np.config import THLConfig
from thl_np.errors import ConfigError, InputError
from thl_np.io.folder import resolve_model_dir
from thl_np.training import checkpoint as ckpt
from thl_np.training.data import LaneBatches
from thl_np.training.optim import AdamW, clip_grad_norm, default_no_decay, frozen_names, global_grad_norm
from thl_np.training.schedule import CosineSchedule, lr_at
from thl_np.training.trainer import TrainConfig, _new_rng, evaluate, train

TEXT = (b"The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        b"How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ") * 12


def tiny_config(**changes):
    base = dict(dim=16, vocab_size=259, memory_slots=8, head_dim=8, query_dim=8, local_window=8,
                dtype="float64")
    base.update(changes)
    return THLConfig(**base)


def tiny_train_config(**changes):
    base = dict(steps=6, seq_len=12, batch_size=3, lr=3e-3, warmup=2, eval_every=3, eval_tokens=200,
                eval_lanes=2, checkpoint_every=3, seed=7)
    base.update(changes)
    return TrainConfig(**base)


# ---------------------------------------------------------------------- schedule
def test_schedule_warmup_then_cosine_to_min():
    peak, warm, total = 1.0, 4, 14
    assert lr_at(0, peak, warm, total) == pytest.approx(0.25)
    assert lr_at(3, peak, warm, total) == pytest.approx(1.0)
    assert lr_at(4, peak, warm, total) == pytest.approx(1.0)
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9))  # 5 of the 9 decay steps done
    assert lr_at(9, peak, warm, total, 0.1) == pytest.approx(cosine)
    assert lr_at(13, peak, warm, total, 0.1) == pytest.approx(0.1)
    assert lr_at(100, peak, warm, total, 0.1) == pytest.approx(0.1)
    lrs = [lr_at(s, peak, warm, total) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay after warm-up
    assert CosineSchedule(2.0, 0, 5, 0.0)(4) == pytest.approx(0.0)
    assert lr_at(0, 2.0, 0, 1) == 2.0
    with pytest.raises(InputError):
        lr_at(-1, 1.0, 0, 10)


# ---------------------------------------------------------------------- AdamW and clipping
def test_adamw_matches_hand_computed_steps():
    params = {"w.weight": np.array([1.0, -2.0]), "w.bias": np.array([0.5])}
    opt = AdamW(params, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    g1 = {"w.weight": np.array([0.5, 0.1]), "w.bias": np.array([-0.2])}
    opt.step(params, g1, lr=0.1)
    # step 1: m̂ = g, v̂ = g², so the Adam step is lr·g/(|g| + eps) = ±0.1; the weight also decays by lr·wd
    np.testing.assert_allclose(params["w.weight"], [1.0 * 0.99 - 0.1, -2.0 * 0.99 - 0.1], rtol=0, atol=1e-8)
    np.testing.assert_allclose(params["w.bias"], [0.5 + 0.1], rtol=0, atol=1e-8)  # biases are not decayed
    g2 = {"w.weight": np.array([-0.3, 0.2]), "w.bias": np.array([0.4])}
    w_before = params["w.weight"].copy()
    opt.step(params, g2, lr=0.05)
    m = 0.9 * 0.1 * g1["w.weight"] + 0.1 * g2["w.weight"]
    v = 0.999 * 0.001 * g1["w.weight"] ** 2 + 0.001 * g2["w.weight"] ** 2
    expect = w_before * (1 - 0.05 * 0.1) - 0.05 * (m / (1 - 0.9**2)) / (np.sqrt(v / (1 - 0.999**2)) + 1e-8)
    np.testing.assert_allclose(params["w.weight"], expect, rtol=1e-14)
    assert opt.t == 2


def test_adamw_decay_rule_and_moment_dtype():
    assert default_no_decay("embedding.weight") and default_no_decay("layer_norm.weight")
    assert default_no_decay("tiers.cells.0.W_z.bias") and not default_no_decay("router.W_q.weight")
    params = {"a.weight": np.ones(3, np.float32)}
    opt = AdamW(params)
    opt.step(params, {"a.weight": np.full(3, 0.5, np.float32)}, lr=1e-2)
    assert params["a.weight"].dtype == np.float32 and opt.m["a.weight"].dtype == np.float32
    with pytest.raises(InputError, match="no gradient"):
        opt.step(params, {}, lr=1e-2)


def test_adamw_state_dict_round_trip_continues_identically(tmp_path):
    rng = np.random.default_rng(1)
    params = {"x.weight": rng.normal(size=(3, 4)), "x.bias": rng.normal(size=4)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
    a_params = {k: v.copy() for k, v in params.items()}
    a = AdamW(a_params, weight_decay=0.05)
    for g in grads[:2]:
        a.step(a_params, g, 1e-2)
    np.savez(tmp_path / "opt.npz", **a.state_dict())
    b_params = {k: v.copy() for k, v in a_params.items()}
    b = AdamW(b_params, weight_decay=0.05)
    with np.load(tmp_path / "opt.npz") as z:
        b.load_state_dict({k: z[k] for k in z.files})
    for g in grads[2:]:
        a.step(a_params, g, 1e-2)
        b.step(b_params, g, 1e-2)
    for k in params:
        assert np.array_equal(a_params[k], b_params[k])
    with pytest.raises(InputError, match="does not match"):
        b.load_state_dict({"step": np.array(1)})


def test_adamw_minimises_a_quadratic_stand_in():
    """A stand-in "model": loss = ½‖w − w*‖², grad = w − w*."""
    target = np.array([3.0, -1.0, 0.5])
    params = {"w.weight": np.zeros(3)}
    opt = AdamW(params, weight_decay=0.0)
    for step in range(400):
        grads = {"w.weight": params["w.weight"] - target}
        clip_grad_norm(grads, 1.0)
        opt.step(params, grads, lr_at(step, 0.1, 10, 400, 0.01))
    np.testing.assert_allclose(params["w.weight"], target, atol=1e-3)


def test_clip_grad_norm():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 10.0) == pytest.approx(5.0)
    assert grads["a"][0] == 3.0  # under the limit: untouched
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)  # returns the pre-clip norm
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose([grads["a"][0], grads["b"][0, 0]], [0.6, 0.8], rtol=1e-6)
    f32 = {"a": np.array([30.0, 40.0], np.float32)}
    clip_grad_norm(f32, 5.0)
    assert f32["a"].dtype == np.float32
    bad = {"a": np.array([np.inf])}
    assert not np.isfinite(clip_grad_norm(bad, 1.0)) and np.isinf(bad["a"][0])  # left for the caller
    assert clip_grad_norm({"a": np.array([3.0, 4.0])}, 0) == pytest.approx(5.0)  # 0 disables


# ---------------------------------------------------------------------- atomic checkpoints
def test_write_checkpoint_failure_keeps_previous(tmp_path):
    def good(folder):
        with open(os.path.join(folder, "x.txt"), "w") as f:
            f.write("one")

    first = ckpt.write_checkpoint(str(tmp_path), 1, good)
    # a failed write is one THLError naming the cause (the CLI prints it on one line); Ctrl-C stays Ctrl-C
    for error, expected in ((OSError("disk full"), InputError), (KeyboardInterrupt(), KeyboardInterrupt)):
        def bad(folder, error=error):
            with open(os.path.join(folder, "x.txt"), "w") as f:
                f.write("half")
            raise error

        with pytest.raises(expected, match="disk full.*step-000001 is kept" if expected is InputError else None):
            ckpt.write_checkpoint(str(tmp_path), 2, bad)
        assert ckpt.latest_checkpoint(str(tmp_path)) == first
        assert sorted(os.listdir(tmp_path)) == ["LATEST", "step-000001"]
        assert open(os.path.join(first, "x.txt")).read() == "one"
    second = ckpt.write_checkpoint(str(tmp_path), 2, good, keep=1)
    assert ckpt.latest_checkpoint(str(tmp_path)) == second
    assert sorted(os.listdir(tmp_path)) == ["LATEST", "step-000002"]  # the older one pruned
    assert resolve_model_dir(str(tmp_path)) == os.path.join(second, "model")


# ---------------------------------------------------------------------- the loop
def assert_same_weights(dir_a, dir_b):
    from thl_np.model import THLModel

    a = THLModel.from_pretrained(resolve_model_dir(str(dir_a)))
    b = THLModel.from_pretrained(resolve_model_dir(str(dir_b)))
    assert a.dtype == np.float64 and a.params.keys() == b.params.keys()
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), f"{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 6 steps in one go (shared by the resume tests)."""
    out = tmp_path_factory.mktemp("full")
    result = train(tiny_config(), TEXT, out, tiny_train_config())
    return out, result


def test_one_step_is_the_documented_step(tmp_path):
    """train() for one step == value_and_grad with the run's noise, clip, AdamW at lr_at(0)."""
    from thl_np.model import THLModel, value_and_grad

    tc = tiny_train_config(steps=1, warmup=0)
    train(tiny_config(), TEXT, tmp_path, tc)
    model = THLModel(tiny_config(), seed=tc.seed)
    batch = LaneBatches(np.frombuffer(TEXT, np.uint8)[: int(len(TEXT) * 0.9 + 0.5)], 3, 12).next_batch()
    u = _new_rng(tc.seed).random((12, 3, 4, 8))
    _, grads = value_and_grad(model, batch.inputs, batch.targets, gumbel_uniform=u)
    clip_grad_norm(grads, tc.grad_clip)
    opt = AdamW(model.params, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    opt.step(model.params, grads, lr_at(0, tc.lr, 0, 1))
    trained = resolve_model_dir(str(tmp_path))
    model.save_pretrained(str(tmp_path / "manual"))
    assert_same_weights(trained, tmp_path / "manual")


def test_training_lowers_the_loss_and_writes_a_complete_checkpoint(uninterrupted):
    out, result = uninterrupted
    assert result.step == 6 and not result.interrupted and len(result.history) == 6
    assert result.held_out_bpb is not None and 0 < result.held_out_bpb < 10
    assert [r["step"] for r in result.evals] == [3, 6]
    latest = ckpt.latest_checkpoint(str(out))
    assert os.path.basename(latest) == "step-000006"
    assert sorted(os.listdir(latest)) == ["eval.csv", "log.csv", "model", "optimizer.npz", "train_state.npz",
                                          "trainer.json"]
    info = json.load(open(os.path.join(latest, "trainer.json")))
    assert info["step"] == 6 and info["train_config"]["steps"] == 6
    log = ckpt.read_csv(os.path.join(latest, "log.csv"))
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["loss"] == result.history[-1]["loss"]  # repr round trip: the same float
    from thl_np.eval.diagnostics import LOG_COLUMNS

    assert set(log[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "seq_len"} | {
        f"mem_{k}" for k in LOG_COLUMNS}  # the memory figures of each step's chunk (thl_np.eval.diagnostics)
    assert ckpt.read_csv(os.path.join(latest, "eval.csv")) == result.evals  # the final eval included
    try:
        import matplotlib  # noqa: F401
        has_plot = True
    except ImportError:
        has_plot = False
    assert os.path.exists(out / "loss.png") == has_plot


def test_resume_reaches_the_same_weights_bit_for_bit(uninterrupted, tmp_path):
    full, full_result = uninterrupted
    first = train(tiny_config(), TEXT, tmp_path, tiny_train_config(steps=3, lr_decay_steps=6))
    assert first.step == 3
    resumed = train(None, TEXT, tmp_path, tiny_train_config(lr_decay_steps=6, resume=True))
    assert resumed.step == 6
    assert_same_weights(full, tmp_path)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full_result.history]
    with np.load(os.path.join(ckpt.latest_checkpoint(str(full)), "optimizer.npz")) as a, \
            np.load(os.path.join(ckpt.latest_checkpoint(str(tmp_path)), "optimizer.npz")) as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_ctrl_c_checkpoints_then_resume_matches(uninterrupted, tmp_path):
    full, _ = uninterrupted

    def press_ctrl_c_at_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    result = train(tiny_config(), TEXT, tmp_path, tiny_train_config(), log=press_ctrl_c_at_step_3)
    assert result.interrupted and result.step == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    assert os.path.basename(ckpt.latest_checkpoint(str(tmp_path))) == "step-000003"
    train(None, TEXT, tmp_path, tiny_train_config(resume=True))
    assert_same_weights(full, tmp_path)


def test_failed_save_keeps_previous_checkpoint_and_resume_still_exact(uninterrupted, tmp_path, monkeypatch):
    full, _ = uninterrupted
    train(tiny_config(), TEXT, tmp_path, tiny_train_config(steps=3, lr_decay_steps=6))

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "write_json", disk_full)  # the last file a checkpoint writes
        with pytest.raises(InputError, match="disk full"):
            train(None, TEXT, tmp_path, tiny_train_config(lr_decay_steps=6, resume=True))
    assert set(os.listdir(tmp_path)) - {"loss.png"} == {"LATEST", "step-000003"}  # no temp folder left
    assert json.load(open(tmp_path / "step-000003" / "trainer.json"))["step"] == 3
    train(None, TEXT, tmp_path, tiny_train_config(lr_decay_steps=6, resume=True))
    assert_same_weights(full, tmp_path)


def test_no_carry_state_and_float32(tmp_path):
    result = train(tiny_config(dtype="float32"), TEXT, tmp_path,
                   tiny_train_config(steps=2, carry_state=False, eval_every=0, checkpoint_every=0))
    assert result.step == 2 and math.isfinite(result.train_loss)
    latest = ckpt.latest_checkpoint(str(tmp_path))
    assert "train_state.npz" not in os.listdir(latest)  # nothing carried, nothing saved


def test_run_folder_guards(uninterrupted, tmp_path):
    full, _ = uninterrupted
    with pytest.raises(InputError, match="already holds a training run"):
        train(tiny_config(), TEXT, full, tiny_train_config())
    with pytest.raises(InputError, match="nothing to resume"):
        train(None, TEXT, tmp_path / "empty", tiny_train_config(resume=True))
    with pytest.raises(InputError, match="batch_size"):
        train(None, TEXT, full, tiny_train_config(batch_size=2, resume=True))
    with pytest.raises(ConfigError, match="vocab_size"):
        train(tiny_config(vocab_size=100), TEXT, tmp_path / "v", tiny_train_config())
    with pytest.raises(InputError, match="seq_len"):
        tiny_train_config(seq_len=0)
    with pytest.raises(InputError, match="too few"):
        train(tiny_config(), TEXT[:30], tmp_path / "small", tiny_train_config())


def test_evaluate_bits_per_byte_is_chunking_invariant():
    """Carrying the state across chunks makes the chunk length irrelevant; bpb = mean CE / ln 2."""
    from thl_np.model import THLModel

    model = THLModel(tiny_config(), seed=0)
    data = np.frombuffer(TEXT[:120], np.uint8)
    whole = evaluate(model, data, seq_len=1000, lanes=1)
    chunked = evaluate(model, data, seq_len=7, lanes=1)
    assert whole["bytes"] == 119 and chunked["bytes"] == 119
    assert chunked["bits_per_byte"] == pytest.approx(whole["bits_per_byte"], rel=1e-12)
    logits, _ = model(data[None, :-1].astype(np.int64))
    z = logits[0] - logits[0].max(axis=-1, keepdims=True)
    ce = np.log(np.exp(z).sum(-1)) - z[np.arange(119), data[1:]]
    assert whole["bits_per_byte"] == pytest.approx(ce.mean() / math.log(2), rel=1e-12)
    assert whole["bits_per_byte"] == pytest.approx(math.log2(259), rel=0.05)  # an untrained model ≈ uniform


# ---------------------------------------------------------------------- frozen parameters (--freeze)
WRITER = "writer.*"


def test_frozen_names_matches_globs_and_refuses_typos_and_everything():
    names = ["writer.W_w.weight", "writer.W_w.bias", "writer.W_r.weight", "embedding.weight", "output_head.weight"]
    assert frozen_names(names, "") == frozenset()
    assert frozen_names(names, WRITER) == {"writer.W_w.weight", "writer.W_w.bias", "writer.W_r.weight"}
    assert frozen_names(names, " writer.W_w.*, embedding.weight ,") == {
        "writer.W_w.weight", "writer.W_w.bias", "embedding.weight"}
    with pytest.raises(InputError, match="'writr.\\*' matches no parameter"):
        frozen_names(names, "writr.*")
    with pytest.raises(InputError, match="freezes every parameter"):
        frozen_names(names, "*")


@settings(max_examples=25, deadline=None)
@given(frozen=st.sets(st.sampled_from(["a", "b.bias", "c"])), seed=st.integers(0, 2**31 - 1))
def test_adamw_leaves_frozen_arrays_and_steps_the_rest_as_if_alone(frozen, seed):
    """A frozen array is untouched (and needs no gradient); the others take exactly the step of an AdamW over
    them alone: freezing one weight does not change another's update."""
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(3) for n in ("a", "b.bias", "c")}
    rest = {n: p.copy() for n, p in params.items() if n not in frozen}
    full = AdamW(params, weight_decay=0.1, frozen=frozen)
    alone = AdamW(rest, weight_decay=0.1)
    before = {n: p.copy() for n, p in params.items()}
    for _ in range(3):
        grads = {n: rng.standard_normal(3) for n in params}
        full.step(params, {n: g for n, g in grads.items() if n not in frozen}, 1e-2)
        alone.step(rest, {n: grads[n] for n in rest}, 1e-2)
    for n in params:
        if n in frozen:
            assert np.array_equal(params[n], before[n]) and not full.m[n].any() and not full.v[n].any()
        else:
            assert np.array_equal(params[n], rest[n]) and not np.array_equal(params[n], before[n])
    with pytest.raises(InputError, match="not parameters"):
        AdamW(params, frozen={"nope"})


def test_a_frozen_run_keeps_those_weights_and_clips_by_the_rest(tmp_path):
    """train(freeze=...) for one step == the documented step with the frozen gradients dropped before the
    clipping norm; the frozen weights are the initial ones bit for bit."""
    from thl_np.model import THLModel, value_and_grad

    tc = tiny_train_config(steps=1, warmup=0, freeze=WRITER, grad_clip=0.05)
    train(tiny_config(), TEXT, tmp_path, tc)
    trained = THLModel.from_pretrained(resolve_model_dir(str(tmp_path)))
    model = THLModel(tiny_config(), seed=tc.seed)
    frozen = frozen_names(model.params, WRITER)
    assert frozen and all(np.array_equal(trained.params[n], model.params[n]) for n in frozen)
    batch = LaneBatches(np.frombuffer(TEXT, np.uint8)[: int(len(TEXT) * 0.9 + 0.5)], 3, 12).next_batch()
    u = _new_rng(tc.seed).random((12, 3, 4, 8))
    _, grads = value_and_grad(model, batch.inputs, batch.targets, gumbel_uniform=u)
    grads = {n: g for n, g in grads.items() if n not in frozen}
    assert clip_grad_norm(grads, tc.grad_clip) > tc.grad_clip  # the clip is active: the norm's terms matter
    opt = AdamW(model.params, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2), eps=tc.eps, frozen=frozen)
    opt.step(model.params, grads, lr_at(0, tc.lr, 0, 1))
    for n in model.params:
        assert np.array_equal(trained.params[n], model.params[n]), n


def test_freeze_survives_a_resume_and_a_typo_fails_before_any_step(tmp_path):
    from thl_np.model import THLModel

    start = THLModel(tiny_config(), seed=7)
    train(tiny_config(), TEXT, tmp_path / "run", tiny_train_config(steps=3, freeze="writer.W_w.*"))
    train(None, TEXT, tmp_path / "run", tiny_train_config(steps=6, freeze="writer.W_w.*", resume=True))
    end = THLModel.from_pretrained(resolve_model_dir(str(tmp_path / "run")))
    assert np.array_equal(end.params["writer.W_w.weight"], start.params["writer.W_w.weight"])
    assert not np.array_equal(end.params["embedding.weight"], start.params["embedding.weight"])
    with pytest.raises(InputError, match="matches no parameter"):
        train(tiny_config(), TEXT, tmp_path / "typo", tiny_train_config(freeze="writer.W_x.*"))
    assert not (tmp_path / "typo").exists() or not any((tmp_path / "typo").iterdir())
    assert TrainConfig.from_dict({"steps": 2}).freeze == ""  # a run saved before the option freezes nothing


def test_cli_freeze_is_kept_on_resume_unless_given_again(tmp_path, capsys):
    from thl_np.cli import main
    from thl_np.training.trainer import saved_train_config

    data = tmp_path / "t.txt"
    data.write_bytes(TEXT)
    out = tmp_path / "run"

    def run(*argv):
        code = main([str(a) for a in argv])
        return code, capsys.readouterr()

    common = ["train", "--data", data, "--out", out, "--dim", 16, "--memory-slots", 8,
              "--batch-size", 2, "--seq-len", 16, "--eval-every", 0, "--eval-tokens", 64]
    code, (stdout, err) = run(*common, "--steps", 2, "--freeze", "writer.W_w.*", "--freeze", "embedding.*")
    assert code == 0, err
    assert "frozen: 3 arrays" in stdout + err
    assert saved_train_config(str(out)).freeze == "writer.W_w.*,embedding.*"
    code, (_, err) = run("train", "--data", data, "--out", out, "--resume", "--steps", 3)
    assert code == 0, err
    assert saved_train_config(str(out)).freeze == "writer.W_w.*,embedding.*"
    code, (_, err) = run("train", "--data", data, "--out", out, "--resume", "--steps", 4, "--freeze", "")
    assert code == 0, err
    assert saved_train_config(str(out)).freeze == ""
    common[4] = tmp_path / "other"
    code, (stdout, err) = run(*common, "--freeze", "nothing.*")
    assert code != 0 and "matches no parameter" in stdout + err
