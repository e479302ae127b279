"""benchmarks/gradient_growth.py: the batch it measures is the one the run trains on next (same rows, same
routing noise, so its loss is the loss that step logs), it prints every lane with the writer on and off and
the chaos check, and a run whose lanes carry their state is refused."""
import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from thl_np.cli import main
from thl_np.model import value_and_grad
from thl_np.training.data import load_bytes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_growth.py"
TEXT = "def area(r):\n    return 3.14159 * r * r\n\nclass Point:\n    x = 0\n    y = 1\n" * 40
RUN = ["--dim", "8", "--memory-slots", "4", "--batch-size", "2", "--eval-every", "0", "--warmup", "1",
       "--dtype", "float64", "--held-out", "0.1"]


@pytest.fixture(scope="module")
def growth():
    spec = importlib.util.spec_from_file_location("gradient_growth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def window_run(tmp_path_factory):
    """A 3-step window run (half its rows passkey tasks), with copies of it as it stood after steps 1 and 2
    (a run keeps only its latest checkpoint) → (data file, {step: run folder})."""
    tmp = tmp_path_factory.mktemp("growth")
    text = tmp / "data.txt"
    text.write_text(TEXT)
    out = tmp / "run"
    runs = {}
    for step in (1, 2, 3):
        more = ["--resume"] if step > 1 else ["--seq-len", "48", "--task-mix", "0.5", "--tasks", "passkey", *RUN]
        assert main(["train", "--data", str(text), "--out", str(out), "--steps", str(step),
                     "--lr-decay-steps", "3", *more]) == 0
        runs[step] = tmp / f"after-{step}"
        shutil.copytree(out, runs[step])
    return text, runs


def logged_loss(step_dir, step):
    with open(step_dir / "log.csv") as f:
        return next(float(r["loss"]) for r in csv.DictReader(f) if int(r["step"]) == step)


def test_the_batch_is_the_one_the_run_trains_on_next(growth, window_run):
    text, runs = window_run
    model, inputs, targets, weights, uniforms = growth.next_batch(str(runs[2] / "step-000002"),
                                                                  load_bytes(str(text)), None)
    assert inputs.shape == (2, 48) and uniforms.shape[:2] == (48, 2)
    loss, _ = value_and_grad(model, inputs, targets, gumbel_uniform=uniforms, loss_weights=weights)
    # the loss step 3 logged (its weights are step 2's): the rows and the noise are the run's own
    assert float(loss) == pytest.approx(logged_loss(runs[3] / "step-000003", 3), rel=1e-12)
    # another checkpoint gives another batch: the script does not just read the first rows of the data
    _, inputs1, *_ = growth.next_batch(str(runs[1] / "step-000001"), load_bytes(str(text)), None)
    assert not np.array_equal(inputs1, inputs)


def test_it_prints_every_lane_writer_on_and_off_and_the_chaos_check(growth, window_run, capsys):
    text, runs = window_run
    growth.main([str(runs[2] / "step-000002"), "--data", str(text), "--lengths", "16,48", "--gammas", "0.99",
                 "--memory-bptt", "8", "--routers", "unit_rows"])
    printed = capsys.readouterr().out
    for what in ("as trained   lane 0", "as trained   lane 1", "writer off   lane 1", "decay 0.99   lane 0",
                 "cut every 8  lane 1", "router unit_rows lane 0",
                 "lane 1, T 48: fast - plain loss"):
        assert what in printed, printed
    # on this tiny stable model the fast and plain paths agree (the check can tell them apart only if they do)
    for line in printed.splitlines():
        if "fast - plain loss" in line:
            assert float(line.split("fast - plain loss ")[1].split(",")[0]) < 1e-10


def test_a_run_with_carried_lanes_is_refused(growth, tmp_path):
    text = tmp_path / "data.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    assert main(["train", "--data", str(text), "--out", str(out), "--steps", "1", "--seq-len", "16", *RUN]) == 0
    with pytest.raises(SystemExit, match="carried"):
        growth.next_batch(str(out / "step-000001"), load_bytes(str(text)), None)
