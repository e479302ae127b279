"""Fine-tuning and prediction: `thl-np finetune` / `thl-np predict` end to end for the three tasks, exact resume,
the documented step, and JSONL lines refused with a message naming them."""
import json
import os
import random
import signal

import numpy as np
import pytest

import thl_np
from thl_np.cli import main
from thl_np.components.heads import draw_dropout
from thl_np.errors import InputError
from thl_np.finetune import MODEL_CLASSES
from thl_np.finetune.examples import ExampleOrder, aligned_length, batch, read_task_file
from thl_np.finetune.trainer import FinetuneConfig, finetune
from thl_np.io.folder import resolve_model_dir
from thl_np.training import checkpoint as ckpt
from thl_np.training.optim import AdamW, clip_grad_norm
from thl_np.training.schedule import lr_at
from thl_np.training.trainer import _new_rng


def tiny_lm_config():
    return thl_np.THLConfig(vocab_size=259, dim=12, num_tiers=2, tier_dims=[12, 10], tier_timescales=[1, 4],
                            local_window=4, memory_slots=8, query_dim=6, num_heads=2, head_dim=6, read_topk=2,
                            dtype="float64")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny language model and a small JSONL file per task."""
    root = tmp_path_factory.mktemp("ft")
    thl_np.THLModel(tiny_lm_config(), seed=0).save_pretrained(root / "lm")
    r = random.Random(0)
    with open(root / "seq.jsonl", "w") as f:
        for _ in range(24):
            label = r.choice(["digits", "letters", "mixed"])
            alphabet = {"digits": "0123456789", "letters": "abcdefgh", "mixed": "a1b2"}[label]
            f.write(json.dumps({"text": "".join(r.choice(alphabet) for _ in range(r.randint(2, 9))), "label": label})
                    + "\n")
        f.write("\n")  # a blank line is skipped
    with open(root / "tok.jsonl", "w") as f:
        for _ in range(20):
            text = "".join(r.choice("ab12 é") for _ in range(r.randint(2, 9)))
            labels = []
            for ch in text:
                kind = "D" if ch.isdigit() else ("S" if ch == " " else "L")
                labels += [kind] + [None] * (len(ch.encode()) - 1)
            f.write(json.dumps({"text": text, "labels": labels}) + "\n")
    with open(root / "mc.jsonl", "w") as f:
        for _ in range(20):
            ctx = "".join(r.choice("ab") for _ in range(4))
            choices = [ctx[-1] * 2, "zz", "q1"]
            k = r.randrange(3)
            choices[0], choices[k] = choices[k], choices[0]
            f.write(json.dumps({"context": ctx, "choices": choices, "label": k, "id": "ignored"}) + "\n")
    return root


TASK_FILES = {"sequence-classification": "seq.jsonl", "token-classification": "tok.jsonl",
              "multiple-choice": "mc.jsonl"}


def tc(task, **kw):
    base = dict(task=task, steps=6, batch_size=3, seq_len=9, warmup=2, lr=3e-3, eval_every=3, checkpoint_every=3,
                held_out_fraction=0.2, seed=1)
    base.update(kw)
    return FinetuneConfig(**base)


def same_weights(a, b):
    a_files = {n: v for n, v in thl_np.io.safetensors.read_safetensors(os.path.join(a, "model.safetensors"))[0].items()}
    b_files = thl_np.io.safetensors.read_safetensors(os.path.join(b, "model.safetensors"))[0]
    return a_files.keys() == b_files.keys() and all(np.array_equal(a_files[n], b_files[n]) for n in a_files)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("task", list(TASK_FILES))
def test_finetune_and_predict_end_to_end(task, files, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--task", task, "--model", str(files / "lm"), "--data", str(files / TASK_FILES[task]),
            "--out", str(out), "--steps", "4", "--batch-size", "3", "--seq-len", "9", "--eval-every", "2",
            "--log-every", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "holds a language model" in printed and "pad_token_id = 256" in printed
    assert "held-out accuracy" in printed and "majority-class baseline" in printed
    model = MODEL_CLASSES[task].from_pretrained(out)     # the run folder loads as it is
    assert model.config.task == task and model.config.pad_token_id == 256
    if task != "multiple-choice":
        assert set(model.config.id2label.values()) == ({"digits", "letters", "mixed"} if task.startswith("seq")
                                                       else {"D", "L", "S"})
    data = read_task_file(files / TASK_FILES[task], task, model.config.label2id)
    ids, labels = batch(data, [0, 1], model.config, 9)
    logits, loss = model(ids, labels)
    assert np.isfinite(loss) and logits.shape[0] == 2
    # predict over the JSONL, as JSON lines, and over texts given as arguments
    assert main(["predict", "--model", str(out), "--data", str(files / TASK_FILES[task]), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(data) + 1 and 0 <= lines[-1]["accuracy"] <= 1 and lines[-1]["count"] > 0
    if task == "sequence-classification":
        assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-5 and lines[0]["label"] in model.id2label.values()
        assert main(["predict", "--model", str(out), "12345", "abcd"]) == 0
        text = capsys.readouterr().out.splitlines()
        assert len(text) == 2 and text[0].split("\t")[0] in model.id2label.values()
    elif task == "token-classification":
        assert len(lines[0]["labels"]) == len(data.examples[0].ids[0])
        assert main(["predict", "--model", str(out), "ab 12"]) == 0
        runs = [line.split(None, 2) for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert all(label in {"D", "L", "S"} and 0 < float(p) <= 1 for label, p, _ in runs)
        assert "".join(eval(text) for _, _, text in runs) == "ab 12"     # the runs cover the text in order
    else:
        assert len(lines[0]["probabilities"]) == 3 and lines[0]["choice"] in (0, 1, 2)
        assert main(["predict", "--model", str(out), "abab", "--choice", "bb", "--choice", "zz"]) == 0
        assert "'bb'" in capsys.readouterr().out


def test_predict_refuses_a_language_model_and_bad_usage(files, capsys):
    assert main(["predict", "--model", str(files / "lm"), "abc"]) == 2
    assert "is a language model, not a task model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the step, resume
def test_one_step_is_the_documented_step(files, tmp_path):
    """finetune() for one step == batch, uniforms then dropout from the run's generator, value_and_grad,
    clipping, AdamW at lr_at(0) over the trainable parameters."""
    config = tc("sequence-classification", steps=1, warmup=0, eval_every=0)
    finetune(files / "lm", files / "seq.jsonl", tmp_path / "run", config)
    model = thl_np.THLForSequenceClassification.from_pretrained(files / "lm", id2label=dict(enumerate(
        ["digits", "letters", "mixed"])), seed=1, log=lambda line: None)
    model.body.config = model.config.replace(pad_token_id=256)
    data = read_task_file(files / "seq.jsonl", "sequence-classification")
    perm = np.random.default_rng([1, 0x68656C64]).permutation(len(data))
    train = data.subset(np.sort(perm[round(len(data) * 0.2):]))
    ids, labels = batch(train, ExampleOrder(len(train), 3, 1).next_batch(), model.config, 9)
    rng = _new_rng(1)
    U = rng.random((ids.shape[1], 3, 2, 8))
    keep = draw_dropout(rng, (3, 10), 0.1)
    _, grads = model.value_and_grad(ids, labels, dropout=keep, gumbel_uniform=U)
    names = model.trainable_names()
    grads = {n: grads[n] for n in names}
    clip_grad_norm(grads, config.grad_clip)
    from thl_np.finetune.models import Subset

    AdamW(Subset(model.params, names), weight_decay=config.weight_decay, betas=(config.beta1, config.beta2),
          eps=config.eps).step(Subset(model.params, names), grads, lr_at(0, config.lr, 0, 1))
    model.save_pretrained(tmp_path / "manual")
    assert same_weights(resolve_model_dir(str(tmp_path / "run")), tmp_path / "manual")
    lm = thl_np.THLModel.from_pretrained(files / "lm")
    trained = thl_np.THLForSequenceClassification.from_pretrained(tmp_path / "run")
    for name in ("output_head.weight", "layer_norm.weight", "writer.W_r.weight"):   # not trainable: untouched
        assert np.array_equal(trained.params[name], lm.params[name])


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_resume_after_an_interruption_is_bit_identical(task, files, tmp_path):
    data = files / TASK_FILES[task]
    full = finetune(files / "lm", data, tmp_path / "full", tc(task))
    assert full.step == 6 and [e["step"] for e in full.evals] == [3, 6]
    assert full.held_out_accuracy is not None and full.majority_accuracy is not None

    def ctrl_c_at_step_2(event):
        if event["event"] == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part = finetune(files / "lm", data, tmp_path / "part", tc(task), log=ctrl_c_at_step_2)
    assert part.interrupted and part.step == 2
    assert os.path.basename(ckpt.latest_checkpoint(str(tmp_path / "part"))) == "step-000002"
    resumed = finetune(None, data, tmp_path / "part", tc(task, resume=True))
    assert resumed.step == 6
    assert same_weights(resolve_model_dir(str(tmp_path / "full")), resolve_model_dir(str(tmp_path / "part")))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert resumed.evals == full.evals
    other = tmp_path / "other.jsonl"
    other.write_text("".join(open(data).readlines()[1:]))
    with pytest.raises(InputError, match="examples differ"):
        finetune(None, other, tmp_path / "part", tc(task, resume=True, steps=8))
    with pytest.raises(InputError, match="already holds a run"):
        finetune(files / "lm", data, tmp_path / "full", tc(task))


def test_cli_resume_keeps_the_saved_flags(files, tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["--data", str(files / "mc.jsonl"), "--out", out]
    assert main(["finetune", "--task", "multiple-choice", "--model", str(files / "lm"), *common, "--steps", "2",
                 "--batch-size", "3", "--seq-len", "9"]) == 0
    assert main(["finetune", *common, "--resume", "--steps", "3"]) == 0
    info = json.load(open(os.path.join(ckpt.latest_checkpoint(out), "trainer.json")))
    assert info["step"] == 3 and info["train_config"]["batch_size"] == 3 and info["train_config"]["seq_len"] == 9
    assert "resuming at step 2 to 3" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad lines
BAD = [
    ("sequence-classification", '{"text": "a", "label": "x"}\nnot json\n', "line 2: not valid JSON"),
    ("sequence-classification", '{"text": "a"}\n', 'line 1: "label" is missing'),
    ("sequence-classification", '{"text": "", "label": "x"}\n', 'line 1: "text" is empty'),
    ("sequence-classification", '["a", "x"]\n', "line 1: expected a JSON object"),
    ("sequence-classification", '{"text": 3, "label": "x"}\n', 'line 1: "text" must be a string'),
    ("token-classification", '{"text": "é", "labels": ["x"]}\n', "line 1: \"labels\" has 1 entries but the text "
                                                                  "has 2 UTF-8 bytes"),
    ("token-classification", '{"text": "a", "labels": [true]}\n', "line 1: labels[0] must be"),
    ("multiple-choice", '{"context": "a", "choices": ["b", "c"], "label": 0}\n'
                        '{"context": "a", "choices": ["b", "c", "d"], "label": 0}\n', "line 2: 3 choices"),
    ("multiple-choice", '{"context": "a", "choices": ["b", "c"], "label": 2}\n', "line 1: label 2 is not the index"),
    ("multiple-choice", '{"context": "a", "choices": ["b"], "label": 0}\n', "line 1: \"choices\" must be a list of "
                                                                           "at least 2"),
    ("multiple-choice", '{"context": "a", "choices": ["b", "c"], "label": "0"}\n', "line 1: \"label\" must be the "
                                                                                 "integer index"),
]


@pytest.mark.parametrize("task,text,message", BAD)
def test_bad_jsonl_lines_are_refused_naming_the_line(task, text, message, files, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_task_file(path, task)
    assert main(["finetune", "--task", task, "--model", str(files / "lm"), "--data", str(path), "--out",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{path}, {message.split(':')[0]}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()   # refused before any work


def test_an_output_path_that_is_a_file_is_refused_before_any_step(files, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        finetune(files / "lm", files / "seq.jsonl", tmp_path / "file", tc("sequence-classification"))
    steps = []
    with pytest.raises(InputError, match="cannot create the output folder"):
        finetune(files / "lm", files / "seq.jsonl", tmp_path / "file" / "run", tc("sequence-classification"),
                 log=steps.append)
    assert not any(e["event"] == "step" for e in steps)


def test_unknown_labels_and_empty_files_are_refused(files, tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text('{"text": "abc", "label": "digits"}\n{"text": "abc", "label": "symbols"}\n')
    with pytest.raises(InputError, match="line 2: label 'symbols' is not one of the model's labels"):
        finetune(files / "lm", files / "seq.jsonl", tmp_path / "run", tc("sequence-classification"), eval_data=path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="holds no examples"):
        read_task_file(tmp_path / "empty.jsonl", "token-classification")
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(InputError, match="at least 2"):
        finetune(files / "lm", one, tmp_path / "run2", tc("sequence-classification"))


# ------------------------------------------------------------------------------------------ batches
def test_pooled_batches_end_on_a_top_tier_step_and_token_batches_pad_right(files):
    config = tiny_lm_config().replace(pad_token_id=256)   # top tier clock 4
    assert [aligned_length(n, 4, None) for n in (1, 2, 5, 6, 9)] == [1, 5, 5, 9, 9]
    assert aligned_length(12, 4, 10) == 9 and aligned_length(7, 64, 32) == 7 and aligned_length(40, 64, 32) == 32
    seq = read_task_file(files / "seq.jsonl", "sequence-classification")
    ids, labels = batch(seq, range(5), config, 9)
    assert (ids.shape[1] - 1) % 4 == 0 and (ids[:, -1] != 256).all() and labels.shape == (5,)
    for row, ex in zip(ids, seq.examples[:5], strict=True):
        assert list(row[row != 256]) == list(ex.ids[0][-ids.shape[1]:])
    mc = read_task_file(files / "mc.jsonl", "multiple-choice")
    ids, labels = batch(mc, range(2), config, 9)
    assert ids.shape == (2, 3, 9) and (ids[..., -1] != 256).all()
    tok = read_task_file(files / "tok.jsonl", "token-classification")
    ids, labels = batch(tok, range(4), config, 5)
    assert ids.shape[1] <= 5 and (ids[:, 0] != 256).all() and ((ids == 256) <= (labels == -100)).all()


def test_example_order_is_a_seeded_permutation_per_epoch():
    order = ExampleOrder(7, 3, seed=5)
    seen = np.concatenate([order.next_batch() for _ in range(7)])    # 21 = three epochs
    assert all(sorted(seen[7 * e:7 * (e + 1)]) == list(range(7)) for e in range(3))
    again = ExampleOrder(7, 3, seed=5)
    again.next_batch()
    pos = again.position
    resumed = ExampleOrder(7, 3, seed=5)
    resumed.position = pos
    assert np.array_equal(np.concatenate([resumed.next_batch() for _ in range(6)]), seen[3:21])
