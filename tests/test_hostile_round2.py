"""Hostile input, second round (issue 24, items 9-17): each case is reproduced and gets one clear line."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thl_np.cli import main
from thl_np.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 9: a plot's file suffix is checked with its location, before the work ---------------------------------
@pytest.mark.parametrize("argv", [["--memory-plot", "x.jsonl"], ["--diagnostics", "--plot", "out.txt"],
                                  ["--memory-plot", "noext"]])
def test_plot_suffix_checked_before_the_work(capsys, tmp_path, argv):
    argv = [str(tmp_path / a) if "." in a or a == "noext" else a for a in argv]
    code, out, err = run(capsys, "eval", "--model", tmp_path / "missing-model", *argv)
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "image" in err and ".png" in err
    assert not any(tmp_path.iterdir())


# -- 10: TaskModel.save_pretrained: one clear error, checked before writing, nothing left behind -------------
def _task_model():
    from thl_np import THLConfig
    from thl_np.finetune.models import THLForSequenceClassification

    config = THLConfig(dim=8, memory_slots=4, local_window=2, num_tiers=2)
    return THLForSequenceClassification(config, num_labels=2, seed=0)


@pytest.mark.parametrize("where,dtype", [("file", None), ("/proc/x", None), ("/sys/kernel/thl-x", None),
                                         ("new", "int4")])
def test_task_model_save_pretrained_refused_before_writing(tmp_path, monkeypatch, where, dtype):
    from thl_np.errors import WeightsError
    from thl_np.io import folder

    (tmp_path / "file").write_text("x")
    target = where if where.startswith("/") else str(tmp_path / where)
    written = []
    monkeypatch.setattr(folder, "write_safetensors", lambda *a, **k: written.append(a))
    with pytest.raises((InputError, WeightsError)) as info:
        _task_model().save_pretrained(target, dtype=dtype)
    assert "\n" not in str(info.value) and (target in str(info.value) or "int4" in str(info.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and not written
    assert not os.path.lexists("/proc/x")


# -- 11: ragged multiple-choice input: an InputError naming the rule ---------------------------------------
def test_multiple_choice_ragged_choices_name_the_rule():
    from thl_np import THLConfig
    from thl_np.finetune.models import THLForMultipleChoice

    model = THLForMultipleChoice(THLConfig(dim=8, memory_slots=4, local_window=2, num_tiers=2), seed=0)
    with pytest.raises(InputError, match=r"ragged.*\[B, C, T\].*same length"):
        model([[[1, 2], [3]]])
    with pytest.raises(InputError, match="ragged.*labels"):
        model([[[1, 2], [3, 4]]], labels=[[0], []])
