"""The task heads' documents and examples run as written: docs/TASKS.md's Python, the fine-tuning example
(examples/finetune_classifier.py, the PyTorch THL's classifier fine-tuning written for thl-np), and the
real-data builder and baselines (examples/stdlib_tasks.py)."""
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_tasks_doc_python_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "TASKS.md").read_text(), flags=re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/TASKS.md", "exec"), namespace)
    assert np.array_equal(namespace["again"](namespace["ids"])[0], namespace["logits"])
    assert (tmp_path / "my-classifier" / "model.safetensors").exists()


def test_finetune_classifier_example_runs(capsys):
    example = load("finetune_classifier")
    accuracy = example.main(["--steps", "20", "--tiny", "--batch-size", "8"])
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out)]
    assert len(losses) == 1 and all(math.isfinite(x) for x in losses)
    assert 0.0 <= accuracy <= 1.0 and f"held-out accuracy {accuracy:.3f} on 100 snippets" in out


def test_token_labels_follow_tokenize():
    tasks = load("stdlib_tasks")
    source = "x = 10  # note\ns = ('a b'\n     'c')\n"
    lines, labels, offsets, inside = tasks._token_labels(source)
    got = "".join({"NAME": "N", "OP": "O", "NUMBER": "D", "STRING": "S", "COMMENT": "C", "NEWLINE": "L",
                   "WS": "_"}[x] for x in labels)
    assert got == "N_O_DD__CCCCCCL" + "N_O_OSSSSS" + "L_____SSSOL"
    assert inside == set() and len(lines) == 3 and offsets[-1] == len(source)
    lines, labels, offsets, inside = tasks._token_labels('"""doc\nmore"""\nx\n')
    assert inside == {1}                      # line 1 starts inside the docstring: no snippet starts there


def test_stdlib_data_sets_are_well_formed(tmp_path):
    tasks = load("stdlib_tasks")
    tasks.build(str(tmp_path))
    from thl_np.finetune.examples import read_task_file

    for name, (task, _) in tasks.TASKS.items():
        train = read_task_file(tmp_path / name / "train.jsonl", task)
        test = read_task_file(tmp_path / name / "test.jsonl", task, train.labels and {n: i for i, n in
                                                                                      enumerate(train.labels)})
        assert len(train) > 1000 and len(test) >= 400
    topic = [json.loads(x) for x in open(tmp_path / "topic" / "train.jsonl")]
    assert sorted({e["label"] for e in topic}) == tasks.PACKAGES
    assert all(48 <= len(e["text"].encode()) <= 128 for e in topic)
    test_texts = {json.loads(x)["text"] for x in open(tmp_path / "topic" / "test.jsonl")}
    assert len(test_texts & {e["text"] for e in topic}) < 0.02 * len(test_texts)   # different files
    for line in open(tmp_path / "tokens" / "test.jsonl"):
        e = json.loads(line)
        assert len(e["labels"]) == len(e["text"].encode())
        assert set(e["labels"]) <= {"NAME", "OP", "NUMBER", "STRING", "COMMENT", "NEWLINE", "WS"}
    for line in open(tmp_path / "nextline" / "test.jsonl"):
        e = json.loads(line)
        assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4 and e["context"].endswith("\n")


def test_softmax_regression_baseline_fits_what_it_should():
    tasks = load("stdlib_tasks")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0)
    model = tasks.softmax_regression(X, y, lam=1e-6, classes=4)
    assert (model(X).argmax(axis=1) == y).mean() > 0.95
    # grouped: 3 choices per example, the right one has the largest first feature
    Xc = rng.normal(size=(200 * 3, 4))
    yc = Xc[:, 0].reshape(200, 3).argmax(axis=1)
    score = tasks.softmax_regression(Xc, yc, groups=3, lam=1e-6)
    assert (score(Xc).reshape(200, 3).argmax(axis=1) == yc).mean() > 0.95


@pytest.mark.parametrize("doc", ["docs/TASKS.md", "README.md"])
def test_documented_results_name_the_commands(doc):
    text = (ROOT / doc).read_text()
    for needle in ("examples/stdlib_tasks.py build", "thl-np finetune --task sequence-classification",
                   "thl-np finetune --task token-classification", "thl-np finetune --task multiple-choice"):
        assert needle in text, (doc, needle)
