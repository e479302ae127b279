"""The task models (sequence classification, token classification, multiple choice): their heads, exact
gradients on both paths, padding, dropout, files, and PyTorch THL head checkpoints."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import thl_np
from thl_np import THLConfig, THLForMultipleChoice, THLForSequenceClassification, THLForTokenClassification
from thl_np.components import heads as H
from thl_np.errors import ConfigError, InputError, WeightsError
from thl_np.finetune import MODEL_CLASSES
from thl_np.finetune.head_gradcheck import check_task_gradients
from thl_np.io.convert import convert_pytorch_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PAD = 0


def tiny(**kw) -> THLConfig:
    base = dict(vocab_size=20, embedding_dim=8, hidden_dim=8, num_tiers=3, tier_dims=[8, 6, 10],
                tier_timescales=[1, 2, 4], local_window=3, memory_slots=6, memory_dim=8, query_dim=4, value_dim=8,
                num_heads=2, head_dim=4, read_topk=2, pad_token_id=PAD, dtype="float64")
    base.update(kw)
    return THLConfig(**base)


def make(cls, config=None, seed=0, **kw):
    if cls is not THLForMultipleChoice:
        kw.setdefault("num_labels", 3)
    return cls(config or tiny(), seed=seed, **kw)


def batch(cls, rng, T=9):
    """ids with right padding in one row, labels with an ignored entry, the shape each task takes."""
    if cls is THLForMultipleChoice:
        ids = rng.integers(1, 20, (2, 3, T))
        ids[0, 1, T - 3:] = PAD
        return ids, np.array([2, 0])
    ids = rng.integers(1, 20, (3, T))
    ids[1, T - 4:] = PAD
    if cls is THLForTokenClassification:
        labels = rng.integers(0, 3, (3, T))
        labels[0, 2] = -100
        return ids, labels
    return ids, np.array([0, 2, -100])


CLASSES = [THLForSequenceClassification, THLForTokenClassification, THLForMultipleChoice]


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_gradients_pass_finite_differences_and_paths_agree(cls, lam):
    """float64 finite differences through head, dropout, pooling and the whole body, with training-mode
    routing and (for one case) the load-balance term; the fast path gives the plain path's gradients."""
    rng = np.random.default_rng(1)
    model = make(cls, tiny(router_load_balance_lambda=lam))
    ids, labels = batch(cls, rng)
    flat, _ = model._flat_ids(ids)
    keep = H.draw_dropout(rng, model._features_shape(flat), 0.3)
    U = rng.random((ids.shape[-1], flat.shape[0], 2, 6))
    report = check_task_gradients(model, ids, labels, dropout=keep, gumbel_uniform=U, path="plain")
    assert report.ok, str(report)
    assert sum(r.ok is True for r in report.rows) >= len(report.rows) - 2
    loss_p, g_p = model.value_and_grad(ids, labels, dropout=keep, gumbel_uniform=U, path="plain")
    loss_f, g_f = model.value_and_grad(ids, labels, dropout=keep, gumbel_uniform=U, path="fast")
    assert abs(loss_p - loss_f) < 1e-12
    for name in g_p:
        assert np.abs(g_p[name] - g_f[name]).max() <= 1e-10 * max(1.0, np.abs(g_p[name]).max()), name


def test_gradcheck_catches_a_wrong_head_gradient(monkeypatch):
    model = make(THLForSequenceClassification)
    ids, labels = batch(THLForSequenceClassification, np.random.default_rng(2))
    real = H.pooled_head_backward

    def off_by_a_bit(d_logits, cache, W_c):
        dS, dW, db = real(d_logits, cache, W_c)
        return dS, dW * 1.001, db

    monkeypatch.setattr(H, "pooled_head_backward", off_by_a_bit)
    report = check_task_gradients(model, ids, labels, path="plain", names=["classifier.weight", "classifier.bias"])
    assert [r.name for r in report.failures] == ["classifier.weight"]


def test_untouched_parameters_get_zero_gradient_and_are_not_trainable():
    for cls in CLASSES:
        model = make(cls)
        ids, labels = batch(cls, np.random.default_rng(3))
        _, grads = model.value_and_grad(ids, labels)
        assert list(grads) == list(model.params)
        frozen = set(model.params) - set(model.trainable_names())
        expect = {"output_head.weight", "output_head.bias", "writer.W_r.weight"}
        if cls is not THLForTokenClassification:
            expect |= {"layer_norm.weight", "layer_norm.bias"}
        assert frozen == expect
        assert all(not grads[n].any() for n in frozen)
        if cls is THLForMultipleChoice:   # the softmax over choices does not see a shared shift
            assert np.abs(grads["classifier.bias"]).max() < 1e-15


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("cls", [THLForSequenceClassification, THLForMultipleChoice])
def test_right_padding_changes_nothing(cls):
    """Pooling at the last non-pad position (H.1, rows as given: padding=False; the default left-padding is
    tests/test_classifier_padding.py's): a padded row gives its unpadded logits."""
    model = make(cls)
    rng = np.random.default_rng(4)
    short = rng.integers(1, 20, 5)
    if cls is THLForMultipleChoice:
        padded = np.stack([np.r_[short, [PAD] * 4], rng.integers(1, 20, 9)])[None]
        alone = model(short[None, None], padding=False)[0][0, 0]
        assert abs(model(padded, padding=False)[0][0, 0] - alone) < 1e-12
    else:
        padded = np.r_[short, [PAD] * 4][None]
        assert np.abs(model(padded, padding=False)[0] - model(short[None], padding=False)[0]).max() < 1e-12
        assert np.abs(model(padded)[0] - model(short[None])[0]).max() < 1e-12  # both left-padded alike


def test_token_labels_at_pads_and_minus_100_are_not_counted():
    model = make(THLForTokenClassification)
    rng = np.random.default_rng(5)
    ids, labels = batch(THLForTokenClassification, rng)
    logits, loss = model(ids, labels)
    counted = (labels != -100) & (ids != PAD)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expect = -np.mean([logp[b, t, labels[b, t]] for b, t in zip(*np.nonzero(counted), strict=True)])
    assert abs(loss - expect) < 1e-12
    other = np.where(counted, labels, (labels + 1) % 3)   # changing an uncounted label changes nothing
    other[labels == -100] = -100
    assert model(ids, np.where(ids == PAD, 1, other))[1] == pytest.approx(loss, abs=1e-14)


def test_all_ignored_labels_give_zero_loss_and_gradient():
    model = make(THLForSequenceClassification)
    ids, _ = batch(THLForSequenceClassification, np.random.default_rng(6))
    loss, grads = model.value_and_grad(ids, np.full(3, -100))
    assert loss == 0.0 and all(not g.any() for g in grads.values())


# ------------------------------------------------------------------------------------------ heads alone
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_last_positions_property(N, T, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 3, (N, T))      # 0 is the pad
    last = H.last_positions(ids, 0)
    for n in range(N):
        real = np.flatnonzero(ids[n] != 0)
        assert last[n] == (real[-1] if real.size else -1)
    assert (H.last_positions(ids, None) == T - 1).all()


def test_dropout_is_seeded_scaled_and_off_in_evaluation():
    model = make(THLForSequenceClassification, classifier_dropout=0.5)
    ids, labels = batch(THLForSequenceClassification, np.random.default_rng(7))
    a = model(ids, dropout=np.random.default_rng(1))[0]
    b = model(ids, dropout=np.random.default_rng(1))[0]
    c = model(ids, dropout=np.random.default_rng(2))[0]
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert np.array_equal(model(ids)[0], model(ids)[0])
    keep = np.ones((3, 10), bool)   # keeping everything scales by 1/(1-p)
    W, bias = model.head["classifier.weight"], model.head["classifier.bias"]
    pooled = model.tier_states(ids)[np.arange(3), H.last_positions(ids, PAD), -10:]
    assert np.allclose(model(ids, dropout=keep, padding=False)[0], pooled @ W.T * 2 + bias)
    with pytest.raises(InputError, match="keep-mask of shape"):
        model(ids, dropout=np.ones((3, 4), bool))


def test_bad_inputs_are_refused_with_a_message():
    seq, choice = make(THLForSequenceClassification), make(THLForMultipleChoice)
    with pytest.raises(InputError, match="row 0 .* only pad tokens"):
        seq(np.array([[PAD, PAD], [1, 2]]))
    with pytest.raises(InputError, match="labels holds 3, outside 0..2"):
        seq(np.array([[1, 2]]), np.array([3]))
    with pytest.raises(InputError, match=r"shape \[N\]"):
        seq(np.array([[1, 2]]), np.array([[0]]))
    with pytest.raises(InputError, match=r"\[B, C, T\]"):
        choice(np.array([[1, 2]]))
    with pytest.raises(InputError, match="outside 0..2"):
        choice(np.ones((1, 3, 4), int), np.array([3]))
    with pytest.raises(InputError, match="takes no num_labels"):
        THLForMultipleChoice(tiny(), 3)


# ------------------------------------------------------------------------------------------ config and files
def test_language_model_config_json_has_no_task_fields_and_head_config_round_trips(tmp_path):
    lm = thl_np.THLModel(tiny(), seed=0)
    lm.save_pretrained(tmp_path / "lm")
    text = (tmp_path / "lm" / "config.json").read_text()
    assert text == tiny().to_json() and "task" not in json.loads(text)
    model = make(THLForSequenceClassification, id2label={0: "neg", 1: "pos"})
    model.save_pretrained(tmp_path / "seq")
    data = json.loads((tmp_path / "seq" / "config.json").read_text())
    assert data["task"] == "sequence-classification" and data["num_labels"] == 2
    assert data["id2label"] == {"0": "neg", "1": "pos"} and data["label2id"] == {"neg": 0, "pos": 1}
    assert THLConfig.load(tmp_path / "seq") == model.config
    back = THLForSequenceClassification.from_pretrained(tmp_path / "seq")
    ids = np.array([[3, 4, 5]])
    assert np.array_equal(back(ids)[0], model(ids)[0]) and back.id2label == {0: "neg", 1: "pos"}
    from thl_np.io.safetensors import read_safetensors

    names = list(read_safetensors(tmp_path / "seq" / "model.safetensors")[0])
    assert set(names) == set(thl_np.params.param_shapes(tiny())) | {"classifier.weight", "classifier.bias"}
    with pytest.raises(WeightsError, match="THLForSequenceClassification.from_pretrained"):
        thl_np.THLModel.from_pretrained(tmp_path / "seq")


def test_task_fields_are_validated():
    with pytest.raises(ConfigError, match="task"):
        tiny(num_labels=3)
    with pytest.raises(ConfigError, match="not a task"):
        tiny(task="regression", num_labels=1)
    with pytest.raises(ConfigError, match="exactly 0..1"):
        tiny(task="sequence-classification", id2label={"0": "a", "2": "b"})
    with pytest.raises(ConfigError, match="needs num_labels"):
        tiny(task="token-classification")
    with pytest.raises(ConfigError, match="classifier_dropout"):
        tiny(task="multiple-choice", classifier_dropout=1.0)


def test_a_language_model_folder_gives_a_fresh_head_and_says_so(tmp_path):
    thl_np.THLModel(tiny(), seed=0).save_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match="holds a language model: .* new token-classification head"):
        a = THLForTokenClassification.from_pretrained(tmp_path / "lm", num_labels=5, seed=4)
    lines = []
    b = THLForTokenClassification.from_pretrained(tmp_path / "lm", num_labels=5, seed=4, log=lines.append)
    assert len(lines) == 1 and "new token-classification head (classifier.weight [5, 24], seed 4)" in lines[0]
    assert np.array_equal(a.head["classifier.weight"], b.head["classifier.weight"])
    assert a.head["classifier.weight"].shape == (5, 24) and not a.head["classifier.bias"].any()
    lm = thl_np.THLModel.from_pretrained(tmp_path / "lm")
    assert all(np.array_equal(a.params[n], lm.params[n]) for n in lm.params)
    a.save_pretrained(tmp_path / "tok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # a head folder of the same task loads silently
        THLForTokenClassification.from_pretrained(tmp_path / "tok")
    with pytest.raises(InputError, match="not the 3 asked for"):
        THLForTokenClassification.from_pretrained(tmp_path / "tok", num_labels=3)


# ------------------------------------------------------------------------------------------ PyTorch THL
@pytest.mark.parametrize("name", ["sequence", "token", "choice"])
def test_converted_pytorch_thl_head_checkpoint_reproduces_its_recorded_run(name, tmp_path):
    """A PyTorch THL task model (torch.save of its state_dict, body under 'thl.') converts without torch and
    gives that model's recorded logits, loss and autograd gradients (tests/fixtures/make_torch_fixtures.py)."""
    src = FIXTURES / f"pytorch_thl_{name}"
    config = convert_pytorch_checkpoint(src, tmp_path / "out")
    run = np.load(src / "recorded_run.npz")
    cls = MODEL_CLASSES[config.task]
    assert cls.__name__.lower().endswith({"sequence": "sequenceclassification", "token": "tokenclassification",
                                          "choice": "multiplechoice"}[name])
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        model = cls.from_pretrained(tmp_path / "out", dtype=dtype)
        for path in ("plain", "fast"):
            logits, loss = model(run["input_ids"], run["labels"], path=path)
            assert np.abs(logits - run["logits"]).max() < tol and abs(loss - run["loss"]) < tol
            _, grads = model.value_and_grad(run["input_ids"], run["labels"], path=path)
            scale = max(np.abs(run[k]).max() for k in run.files if k.startswith("grad."))
            for key in (k for k in run.files if k.startswith("grad.")):
                ours = grads[key[len("grad."):].removeprefix("thl.")]
                assert np.abs(ours - run[key]).max() <= 10 * tol * scale, (dtype, path, key)


def test_cli_convert_names_the_head_loader(tmp_path):
    from thl_np.cli import main

    assert main(["convert", str(FIXTURES / "pytorch_thl_choice"), str(tmp_path / "mc")]) == 0
    assert THLConfig.load(tmp_path / "mc").task == "multiple-choice"
