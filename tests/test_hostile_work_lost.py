"""Issue 24, items 1-8 and the concurrent-writers property: work that was silently changed or lost.

Issue 24, items 1-8: hostile input on the newer surfaces (convert of thl-np folders, run-folder locks,
finetune --out, temporary names, labels, undecodable JSONL and arguments, batch memory, passkey lengths)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from thl_np.config import THLConfig
from thl_np.params import init_params

TINY = dict(vocab_size=259, dim=16, num_tiers=2, tier_dims=[16, 16], tier_timescales=[1, 2], local_window=4,
            memory_slots=8, query_dim=8, num_heads=2, head_dim=8, read_topk=2, write_rate=0.05)


def _cli(args):
    from thl_np.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _model():
    from thl_np.model import THLModel

    config = THLConfig(**TINY)
    return THLModel(config, params=init_params(config, seed=0, dtype=np.float32))


IDS = np.random.default_rng(1).integers(0, 256, size=(1, 12))


# ------------------------------------------------------------------ 1. convert of a thl-np folder
@pytest.mark.parametrize("kind", ["float", "int8", "task"])
def test_convert_of_thl_np_folder_copies_it_unchanged(tmp_path, kind):
    from thl_np.model import THLModel, quantize_model

    src, out = tmp_path / "src", tmp_path / "out"
    if kind == "task":
        from thl_np.finetune.models import THLForSequenceClassification as Loader

        model = Loader(THLConfig(**TINY), num_labels=3)
    else:
        Loader = THLModel
        model = _model() if kind == "float" else quantize_model(_model())
    model.save_pretrained(str(src))
    result = _cli(["convert", src, out])
    assert result.exit_code == 0, result.output
    assert "-> 1.0" not in result.output
    a, b = Loader.from_pretrained(str(src)), Loader.from_pretrained(str(out))
    assert b.config.write_rate == 0.05
    la, lb = a(IDS, path="plain"), b(IDS, path="plain")
    la = la[0] if isinstance(la, tuple) else la
    lb = lb[0] if isinstance(lb, tuple) else lb
    la = getattr(la, "logits", la)
    lb = getattr(lb, "logits", lb)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


# ------------------------------------------------------------------ 4. temporary names unique per process
def test_temporary_names_are_unique_per_process(tmp_path, monkeypatch):
    import thl_np.config as config_module
    import thl_np.state as state_module

    seen = []
    real_open = open

    def spy(path, *a, **k):
        seen.append(os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    THLConfig(**TINY).save(str(tmp_path))
    _model().init_state(1).save(str(tmp_path / "s.npz"))
    monkeypatch.undo()
    temps = [p for p in seen if ".tmp" in p]
    assert temps and all(str(os.getpid()) in os.path.basename(p) for p in temps), temps
    assert config_module and state_module


# ------------------------------------------------------------------ 2. / 3. run-folder lock, finetune --out
def _seq_file(path, n=40):
    import json

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": "ab" * (i % 5 + 1), "label": ["x", "y"][i % 2]}) + "\n")
    return path


def test_a_second_run_into_a_live_run_folder_is_refused_and_the_lock_is_released(tmp_path):
    from thl_np.errors import InputError
    from thl_np.io.folder import RUN_LOCK, run_lock
    from thl_np.training.trainer import train

    out = tmp_path / "run"
    with run_lock(out):  # a live run (this process) holds the folder
        assert (out / RUN_LOCK).exists()
        with pytest.raises(InputError, match="in use by another run"):
            train(THLConfig(**TINY), b"hello world " * 50, str(out), steps=2, seq_len=8, batch_size=2, path="plain")
        with pytest.raises(InputError, match="in use by another run"):
            train(None, b"hello world " * 50, str(out), steps=2, seq_len=8, batch_size=2, resume=True, path="plain")
    assert not out.exists()  # released, and the folder made only for the lock is gone
    train(THLConfig(**TINY), b"hello world " * 50, str(out), steps=2, seq_len=8, batch_size=2, path="plain")
    assert not (out / RUN_LOCK).exists() and (out / "LATEST").exists()


def test_a_lock_left_by_a_crashed_run_is_stale(tmp_path):
    import subprocess
    import sys

    from thl_np.io.folder import RUN_LOCK, run_lock

    out = tmp_path / "run"
    code = ("import os, sys; from thl_np.io.folder import run_lock\n"
            f"with run_lock({str(out)!r}):\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert (out / RUN_LOCK).exists()  # the crash left it behind
    with run_lock(out):  # its pid is dead: taken over
        assert (out / RUN_LOCK).read_text().strip() == str(os.getpid())


def test_finetune_out_into_a_model_folder_is_refused(tmp_path):
    _model().save_pretrained(str(tmp_path / "lm"))
    data = _seq_file(tmp_path / "d.jsonl")
    before = sorted(os.listdir(tmp_path / "lm"))
    result = _cli(["finetune", "--task", "sequence-classification", "--model", tmp_path / "lm", "--data", data,
                   "--out", tmp_path / "lm", "--steps", 1])
    message = result.output + str(result.exception or "")
    assert result.exit_code != 0 and "holds a model" in message, message
    assert len(message.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "lm")) == before


# ------------------------------------------------------------------ 5. / 6. labels and undecodable input
def _lines(tmp_path, *lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_multiple_choice_with_every_label_ignored_is_refused(tmp_path):
    from thl_np.errors import InputError
    from thl_np.finetune.examples import read_task_file

    row = '{"context": "ab", "choices": ["c", "d"], "label": -100}'
    with pytest.raises(InputError, match="no labelled row"):
        read_task_file(_lines(tmp_path, row, row), "multiple-choice")
    read_task_file(_lines(tmp_path, row, row), "multiple-choice", require_labels=False)  # predict: fine


def test_unsigned_labels_that_would_wrap_to_ignore_are_refused():
    from thl_np.errors import InputError
    from thl_np.finetune.models import THLForMultipleChoice, THLForSequenceClassification

    config = THLConfig(**TINY)
    for model, ids in ((THLForSequenceClassification(config, num_labels=2), [[1, 2, 3]]),
                       (THLForMultipleChoice(config), [[[1, 2], [3, 4]]])):
        with pytest.raises(InputError, match="18446744073709551516"):
            model(ids, labels=np.array([2**64 - 100], dtype=np.uint64), path="plain")


@pytest.mark.parametrize("line, message", [
    ('{"text": "\\ud800", "label": "x"}', "not valid UTF-8"),
    ('{"text": "ab", "label": ' + "7" * 5000 + "}", "not valid JSON"),
    ('{"text": "ab", "label": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"context": "ab", "choices": ["\\udfff", "d"], "label": 0}', "not valid UTF-8"),
    ('{"context": "ab", "choices": ["c", "d"], "label": ' + "9" * 4000 + "}", "4000 digits"),
])
def test_hostile_jsonl_gets_one_line_naming_file_and_line(tmp_path, line, message):
    from thl_np.errors import InputError
    from thl_np.finetune.examples import read_task_file

    path = _lines(tmp_path, '{"text": "ok", "label": "x"}' if "context" not in line else
                  '{"context": "ab", "choices": ["c", "d"], "label": 1}', line)
    task = "multiple-choice" if "context" in line else "sequence-classification"
    with pytest.raises(InputError, match=message) as err:
        read_task_file(path, task)
    text = str(err.value)
    assert f"{path}, line 2" in text and "\n" not in text and len(text) < 400


@pytest.mark.parametrize("args, named", [(["\udcff"], "text argument 1"),
                                         (["ab", "--choice", "\udcff", "--choice", "x"], "--choice 1")])
def test_predict_with_an_undecodable_argument_names_it(tmp_path, args, named):
    from thl_np.finetune.models import THLForMultipleChoice, THLForSequenceClassification

    cls = THLForMultipleChoice if "--choice" in args else THLForSequenceClassification
    model = cls(THLConfig(**TINY)) if "--choice" in args else cls(THLConfig(**TINY), num_labels=2)
    model.save_pretrained(str(tmp_path / "m"))
    result = _cli(["predict", "--model", tmp_path / "m", "--path", "plain", *args])
    message = result.output + str(result.exception or "")
    assert result.exit_code != 0 and named in message and "not valid UTF-8" in message, message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1


# ------------------------------------------------------------------ 7. finetune batch memory
def test_finetune_with_a_batch_too_big_for_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    import thl_np.checks

    monkeypatch.setattr(thl_np.checks, "available_memory", lambda: 1 << 30)
    _model().save_pretrained(str(tmp_path / "lm"))
    data = _seq_file(tmp_path / "d.jsonl")
    result = _cli(["finetune", "--task", "sequence-classification", "--model", tmp_path / "lm", "--data", data,
                   "--out", tmp_path / "run", "--steps", 1, "--batch-size", 100000, "--path", "plain"])
    message = result.output + str(result.exception or "")
    assert result.exit_code != 0 and "fine-tuning step of 100000 examples" in message, message
    assert "lower --batch-size" in message and "training examples" in message
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 8. passkey lengths out of range
@pytest.mark.parametrize("lengths", ["99999999999999999999", "256,2147483648"])
def test_eval_passkey_with_an_absurd_length_is_refused_up_front_with_the_range(lengths):
    result = _cli(["eval", "--passkey", "--lengths", lengths])
    message = result.output + str(result.exception or "")
    assert result.exit_code == 2 and "1..2,147,483,647" in message and "--lengths" in message, message
    assert "Traceback" not in message and "too big" not in message


# ------------------------------------------------------------------ property: N writers of the same files
def _together(commands, cwd, timeout=180):
    import subprocess
    import sys

    runner = "import sys; from thl_np.cli import main; sys.exit(main(sys.argv[1:]))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-c", runner, *map(str, c)], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


def _no_temporaries(folder):
    left = [n for n in os.listdir(folder) if ".tmp" in n or n.endswith(".lock")]
    assert not left, left


@pytest.mark.parametrize("n", [3])
def test_n_processes_writing_the_same_files_never_report_success_for_lost_work(tmp_path, n):
    from thl_np.io.folder import latest_checkpoint
    from thl_np.model import THLModel

    (tmp_path / "corpus.txt").write_bytes(bytes(range(32, 127)) * 200)
    small = ["--dim", 16, "--memory-slots", 8]
    # the same run folder: one run trains into it, every other is refused in one line
    results = _together([["train", "--data", "corpus.txt", "--out", "run", "--steps", 2, "--seq-len", 8,
                          "--batch-size", 2, "--path", "plain", "--seed", i, *small] for i in range(n)], tmp_path)
    assert sum(rc == 0 for rc, _, _ in results) == 1, results
    for rc, _, err in results:
        if rc:
            assert "Traceback" not in err and ("in use by another run" in err or "already holds a run" in err), err
    THLModel.from_pretrained(os.path.join(latest_checkpoint(str(tmp_path / "run")), "model"))
    _no_temporaries(tmp_path / "run")
    # the same model folder: one init writes it, every other is refused (never two successes, one lost)
    results = _together([["init", "--out", "m", "--seed", i, *small] for i in range(n)], tmp_path)
    assert sum(rc == 0 for rc, _, _ in results) == 1, results
    for rc, _, err in results:
        if rc:
            assert "Traceback" not in err and ("in use by another writer" in err or "not empty" in err), err
    THLModel.from_pretrained(str(tmp_path / "m"))
    _no_temporaries(tmp_path / "m")
    # the same --state-out: every generate succeeds and the file is whole (one of them, complete)
    results = _together([["generate", "--model", "m", "ab", "--max-length", 3, "--seed", i, "--path", "plain",
                          "--state-out", "s.npz"] for i in range(n)], tmp_path)
    assert all(rc == 0 for rc, _, _ in results), results
    with np.load(tmp_path / "s.npz") as state:
        assert state.files
    _no_temporaries(tmp_path)
