"""Hostile conditions around the files (issue 12): every output location is checked before the work, a
write that fails (full disk, read-only folder, kill -9) leaves no partial folder and keeps the previous
good files, a diverged run never replaces its last good checkpoint, a non-finite metric is an error, and
every CLI error is one line with a non-zero exit.

Read-only and full filesystems are real tmpfs mounts where the test can make them (root with the mount
capability), and skipped with the reason otherwise: a chmod does not stop root.
"""
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from thl_np import THLConfig, THLModel
from thl_np.cli import main
from thl_np.io.folder import resolve_model_dir
from thl_np.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n") * 8
NEW_RUN = ["--dim", "8", "--memory-slots", "4", "--seq-len", "8", "--batch-size", "2", "--eval-every", "0",
           "--warmup", "1", "--log-every", "1"]
MODEL_FLAGS = ["--dim", "8", "--memory-slots", "4", "--local-window", "2", "--num-tiers", "2", "--seed", "0"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, code=1):
    """``thl-np ARGV`` fails with status ``code``, one line on stderr starting "error: ", no traceback."""
    got, out, err = run(capsys, *argv)
    assert got == code, (got, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return out, err


def litter(folder) -> list:
    """Temporary files or folders anywhere under ``folder`` (what an interrupted write leaves)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            if ".tmp" in name or name.startswith(".thl-np-probe"):
                found.append(os.path.join(dirpath, name))
    return found


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    assert main(["init", "--out", str(out), *MODEL_FLAGS]) == 0
    return out


# ---------------------------------------------------------------------------------------------------
# Real read-only and full filesystems (tmpfs), or a skip saying why not
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a real read-only / full filesystem here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root with "
                    "CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture()
def readonly_dir(tmp_path):
    with tmpfs(tmp_path / "ro", "size=64k,ro") as path:
        with pytest.raises(OSError):
            (path / "probe").write_text("x")  # root included: the mount is read-only
        yield path


@pytest.fixture()
def small_fs(tmp_path):
    def make(kib: int) -> Path:
        return stack.enter_context(tmpfs(tmp_path / f"fs{kib}", f"size={kib}k"))

    with contextlib.ExitStack() as stack:
        yield make


# ---------------------------------------------------------------------------------------------------
# Output locations are checked before the work (defect 4)
# ---------------------------------------------------------------------------------------------------
def bad_locations(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"proc": "/proc/thl-np-test/out", "file": str(a_file), "under-file": str(a_file / "sub")}


@pytest.mark.parametrize("where", ["proc", "file", "under-file", "readonly"])
def test_train_out_is_checked_before_training(tmp_path, text_file, capsys, where, request):
    """train --out on /proc, on a file, under a file or on a read-only mount used to train every step and
    then fail with a traceback at the save; now one line before the first step, and nothing is made."""
    out = (request.getfixturevalue("readonly_dir") / "run") if where == "readonly" else bad_locations(tmp_path)[where]
    stdout, err = one_line_error(capsys, "train", "--data", text_file, "--out", out, "--steps", 3, *NEW_RUN)
    assert "--out" in err and "training from step" not in stdout and "step 1" not in stdout
    if where != "file":
        assert not os.path.exists(out)


@pytest.mark.parametrize("command", ["init", "convert", "golden"])
@pytest.mark.parametrize("where", ["proc", "under-file", "readonly"])
def test_model_writers_check_their_output_first(tmp_path, model_dir, capsys, command, where, request):
    """init, convert and golden --out on a read-only filesystem (or /proc, or under a file) raised OSError
    tracebacks; now one line, and nothing is created."""
    out = (request.getfixturevalue("readonly_dir") / "m") if where == "readonly" else bad_locations(tmp_path)[where]
    argv = {"init": ["init", "--out", out, *MODEL_FLAGS], "convert": ["convert", model_dir, out],
            "golden": ["golden", "--out", out, "-q"]}[command]
    one_line_error(capsys, *argv)
    assert not os.path.exists(out)


def test_generate_state_out_is_checked_before_generating(model_dir, capsys):
    """generate --state-out /nonexistent/s.npz printed the whole generation, then a traceback."""
    stdout, err = one_line_error(capsys, "generate", "hi", "--model", model_dir, "--max-length", 5, "--seed", 0,
                                 "--state-out", "/nonexistent/s.npz")
    assert stdout == "" and "--state-out" in err and "/nonexistent does not exist" in err


def test_eval_memory_plot_is_checked_before_measuring(model_dir, tmp_path, capsys):
    stdout, err = one_line_error(capsys, "eval", "--model", model_dir, "--memory-plot", tmp_path / "no" / "m.png",
                                 "--plot-lengths", "8")
    assert stdout == "" and "--memory-plot" in err


def test_state_out_write_failure_is_one_line(model_dir, small_fs, capsys):
    """A full disk at the --state-out save: a StateError on one line, no temporary file left."""
    fs = small_fs(4)
    with contextlib.suppress(OSError):
        with open(fs / "fill", "wb") as f:
            f.write(b"x" * (64 << 10))  # fill every free byte (the write stops at the end)
    _, err = one_line_error(capsys, "generate", "hi", "--model", model_dir, "--max-length", 3, "--seed", 0,
                            "--state-out", fs / "s.npz")
    assert "cannot write the state file" in err or "No space left" in err
    assert litter(fs) == [] and not (fs / "s.npz").exists()


# ---------------------------------------------------------------------------------------------------
# Full filesystems: refused up front when the size is known, all-or-nothing when a write fails
# ---------------------------------------------------------------------------------------------------
def test_init_on_a_full_filesystem(small_fs, capsys, monkeypatch):
    """init on a filesystem too small for the weights: refused before the model is built. With that check
    out of the way (the disk fills while writing), the write fails on one line and leaves no folder,
    no config.json.tmp, no weights without a config."""
    import thl_np.checks as checks

    fs = small_fs(64)
    _, err = one_line_error(capsys, "init", "--out", fs / "m", "--dim", "64", "--memory-slots", "8")
    assert "will be written but only" in err and not (fs / "m").exists()
    monkeypatch.setattr(checks, "check_free_space", lambda *a, **k: None)
    _, err = one_line_error(capsys, "init", "--out", fs / "m", "--dim", "64", "--memory-slots", "8")
    assert "No space left on device" in err and "nothing was left behind" in err
    assert sorted(os.listdir(fs)) == []
    (fs / "empty").mkdir()  # a folder that existed stays, empty, as it was
    one_line_error(capsys, "init", "--out", fs / "empty", "--dim", "64", "--memory-slots", "8")
    assert sorted(os.listdir(fs)) == ["empty"] and os.listdir(fs / "empty") == []


def test_overwriting_a_model_on_a_full_filesystem_keeps_the_old_one(small_fs, capsys, monkeypatch):
    """init --force over a model when the disk fills: the previous config.json and weights are unchanged."""
    import thl_np.checks as checks

    fs = small_fs(160)
    assert main(["init", "--out", str(fs / "m"), *MODEL_FLAGS]) == 0
    before = {p.name: p.read_bytes() for p in (fs / "m").iterdir()}
    monkeypatch.setattr(checks, "check_free_space", lambda *a, **k: None)
    _, err = one_line_error(capsys, "init", "--out", fs / "m", "--force", "--dim", "48", "--memory-slots", "8")
    assert "previous files are unchanged" in err
    assert {p.name: p.read_bytes() for p in (fs / "m").iterdir()} == before
    THLModel.from_pretrained(fs / "m")


def checkpoint_bytes(tmp_path, text_file) -> int:
    out = tmp_path / "probe"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--steps", "1", *NEW_RUN]) == 0
    return sum(f.stat().st_size for f in Path(ckpt.latest_checkpoint(str(out))).rglob("*") if f.is_file())


def test_checkpoint_on_a_full_filesystem(tmp_path, text_file, small_fs, capsys, monkeypatch):
    """Room for one checkpoint but not two: the second save fails on one line naming the kept checkpoint,
    no temporary folder is left, and the run resumes from that checkpoint to the same weights as a run
    that never failed."""
    import thl_np.checks as checks

    size = checkpoint_bytes(tmp_path, text_file)
    fs = small_fs((size * 3 // 2) // 1024 + 40)
    monkeypatch.setattr(checks, "check_free_space", lambda *a, **k: None)
    argv = ["train", "--data", text_file, "--out", fs / "run", "--steps", 4, "--checkpoint-every", 2, *NEW_RUN]
    _, err = one_line_error(capsys, *argv)
    assert "cannot write checkpoint step-000004" in err and "No space left on device" in err
    assert "step-000002 is kept" in err
    assert set(os.listdir(fs / "run")) - {"loss.png"} == {"LATEST", "step-000002"}
    assert litter(fs) == []
    moved = tmp_path / "moved"
    shutil.copytree(fs / "run", moved)
    assert main(["train", "--data", str(text_file), "--out", str(moved), "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(["train", "--data", str(text_file), "--out", str(reference), "--steps", "4",
                 "--checkpoint-every", "2", *NEW_RUN]) == 0
    assert_same_weights(reference, moved)


def assert_same_weights(a, b):
    ma = THLModel.from_pretrained(resolve_model_dir(str(a)))
    mb = THLModel.from_pretrained(resolve_model_dir(str(b)))
    for name, value in ma.params.items():
        np.testing.assert_array_equal(mb.params[name], value, err_msg=name)


# ---------------------------------------------------------------------------------------------------
# kill -9 during a checkpoint save, then resume: the same weights, and no litter
# ---------------------------------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys

    from thl_np.cli import main
    from thl_np.training import checkpoint as ckpt

    where, argv = sys.argv[1], sys.argv[2:]
    saves = 0
    write_checkpoint, write_csv, replace = ckpt.write_checkpoint, ckpt.write_csv, os.replace

    def counting_write_checkpoint(*args, **kwargs):
        global saves
        saves += 1
        return write_checkpoint(*args, **kwargs)

    def kill_9():
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: a real kill -9

    def write_csv_or_die(*args, **kwargs):  # the second save: model and optimiser written, the logs not
        if where == "inside-write" and saves == 2:
            kill_9()
        return write_csv(*args, **kwargs)

    def replace_or_die(src, dst):  # the second save: published as step-000004, LATEST.tmp-PID written
        if where == "after-latest-temp" and saves == 2 and os.path.basename(dst) == "LATEST":
            kill_9()
        return replace(src, dst)

    ckpt.write_checkpoint, ckpt.write_csv, os.replace = counting_write_checkpoint, write_csv_or_die, replace_or_die
    sys.exit(main(argv))
""")



@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    (folder / "corpus.txt").write_text(TEXT)
    out = folder / "run"
    assert main(["train", "--data", str(folder / "corpus.txt"), "--out", str(out), "--steps", "6",
                 "--checkpoint-every", "2", *NEW_RUN]) == 0
    return out, folder / "corpus.txt"


@pytest.mark.parametrize("where", ["inside-write", "after-latest-temp"])
def test_kill_9_during_a_checkpoint_save_then_resume(uninterrupted, tmp_path, where):
    """A real SIGKILL in the middle of the second save (inside the checkpoint's folder, or with LATEST's
    temporary written): the first checkpoint stays the latest, the resumed run reaches the uninterrupted
    run's weights bit for bit, and no temporary file or folder is left anywhere."""
    full, text = uninterrupted
    out = tmp_path / "run"
    argv = ["train", "--data", str(text), "--out", str(out), "--steps", "6", "--checkpoint-every", "2", *NEW_RUN]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", KILLER, where, *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert os.path.basename(ckpt.latest_checkpoint(str(out))) == "step-000002"
    assert litter(out), "the kill left nothing behind: it did not happen during the save"
    assert main(["train", "--data", str(text), "--out", str(out), "--resume"]) == 0
    assert litter(out) == []
    assert set(os.listdir(out)) - {"loss.png"} == {"LATEST", "step-000006"}
    assert_same_weights(full, out)


# ---------------------------------------------------------------------------------------------------
# Divergence and non-finite metrics (defects 2 and 3)
# ---------------------------------------------------------------------------------------------------
def test_divergence_keeps_the_last_good_checkpoint(tmp_path, text_file, capsys):
    """--lr 1e30 used to train on with skipped updates, print nan metrics, exit 0 and overwrite the only
    checkpoint (keep = 1). Now the first non-finite loss stops the run with one line, and the last good
    checkpoint is untouched, byte for byte."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--steps", "3", *NEW_RUN]) == 0
    good = Path(ckpt.latest_checkpoint(str(out)))
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    stdout, err = one_line_error(capsys, "train", "--data", text_file, "--out", out, "--steps", 12, "--resume",
                                 "--lr", "1e30")
    assert "training diverged" in err and "step-000003, is kept" in err and "--lr" in err
    assert "nan" not in stdout.replace("nan_", "")
    assert os.path.basename(ckpt.latest_checkpoint(str(out))) == "step-000003"
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == before


def test_an_overflowing_backward_is_named_as_such(tmp_path, text_file, capsys, monkeypatch):
    """A finite loss with a non-finite gradient is the backward overflowing through the window (seen at
    2,048-byte recall windows, where the gradient grows through the memory's loop): the error says so and
    points at the window and the memory decay, not at --lr or --grad-clip, which act after the backward."""
    import thl_np.model as model_module

    real = model_module.value_and_grad
    calls = []

    def overflowing(*args, **kwargs):
        loss, grads, *rest = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second step's backward overflows; its loss stays finite
            grads = {k: np.full_like(g, np.nan) for k, g in grads.items()}
        return (loss, grads, *rest)

    monkeypatch.setattr(model_module, "value_and_grad", overflowing)
    out = tmp_path / "run"
    _, err = one_line_error(capsys, "train", "--data", text_file, "--out", out, "--steps", 4,
                            "--checkpoint-every", 1, *NEW_RUN)
    assert "training diverged: step 2 has loss" in err and "gradient norm nan" in err
    assert "step-000001, is kept" in err
    assert "gradient overflowed" in err and "8 steps" in err and "memory_decay" in err and "--seq-len" in err
    assert "Lower the learning rate" not in err
    assert os.path.basename(ckpt.latest_checkpoint(str(out))) == "step-000001"


def test_overflowing_steps_are_skipped_up_to_the_budget(tmp_path, text_file, capsys, monkeypatch):
    """--skip-overflow N: steps 2 and 4 overflow; with N = 2 both are skipped (no update: the weights after step 2
    are those after step 1), the log marks them and has no gradient norm for them, a resumed run counts them,
    and the third overflow (step 6) stops the run with the divergence error naming the budget."""
    import thl_np.model as model_module
    from thl_np.training.trainer import skipped_steps

    real = model_module.value_and_grad
    calls = []

    def overflowing(*args, **kwargs):
        loss, grads, *rest = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in (2, 4, 6):
            grads = {k: np.full_like(g, np.inf) for k, g in grads.items()}
        return (loss, grads, *rest)

    monkeypatch.setattr(model_module, "value_and_grad", overflowing)
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--data", text_file, "--out", out, "--steps", 2, "--checkpoint-every", 1,
                                  "--skip-overflow", 2, *NEW_RUN)])
    printed = capsys.readouterr().out
    assert code == 0 and "step 2: the gradient overflowed, the step is skipped (1 of at most 2" in printed
    monkeypatch.setattr(model_module, "value_and_grad", real)
    assert main([str(a) for a in ("train", "--data", text_file, "--out", tmp_path / "one", "--steps", 1,
                                  *NEW_RUN)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(model_module, "value_and_grad", overflowing)
    a = THLModel.from_pretrained(str(tmp_path / "one" / "step-000001" / "model"))
    b = THLModel.from_pretrained(str(out / "step-000002" / "model"))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    log = ckpt.read_csv(str(out / "step-000002" / "log.csv"))
    assert log[1]["skipped"] == 1 and "grad_norm" not in log[1] and "skipped" not in log[0]
    assert skipped_steps(log) == 1
    _, err = one_line_error(capsys, "train", "--data", text_file, "--out", out, "--resume", "--steps", 8)
    assert "step 6 has loss" in err and "--skip-overflow N, now 2" in err
    assert os.path.basename(ckpt.latest_checkpoint(str(out))) == "step-000005"
    log = ckpt.read_csv(str(out / "step-000005" / "log.csv"))
    assert [r["step"] for r in log if r.get("skipped")] == [2, 4]


@pytest.mark.parametrize("flag, value", [("--grad-clip", "nan"), ("--weight-decay", "inf"), ("--lr", "inf"),
                                         ("--lr", "nan"), ("--write-rate", "inf"), ("--held-out", "nan"),
                                         ("--lr", "1e999"), ("--seed", "-1")])
def test_non_finite_training_flags_are_refused(tmp_path, text_file, capsys, flag, value):
    """--grad-clip nan and --weight-decay inf were accepted, made NaN weights, exited 0 and left a checkpoint
    that --resume refused. Now a usage error on one line naming the flag (status 2), and no run folder."""
    _, err = one_line_error(capsys, "train", "--data", text_file, "--out", tmp_path / "run", "--steps", 2,
                            *NEW_RUN, flag, value, code=2)
    assert f"{flag} = " in err and ("finite" in err or "integer" in err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("as_json", [False, True])
def test_eval_of_nan_weights_in_a_large_file_is_an_error(tmp_path, text_file, capsys, monkeypatch, as_json):
    """Files of 64 MB or more are not scanned for NaN on load (it reads every page); eval used to print
    bits_per_byte: nan and exit 0 for them. Now the non-finite metric is the error, naming the likely cause."""
    import thl_np.model as model_module

    model = THLModel(THLConfig(vocab_size=259, dim=8, memory_slots=4, local_window=2, num_tiers=2), seed=0)
    model.params["output_head.weight"][3, 1] = np.nan
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(model_module, "VERIFY_BELOW_BYTES", 0)  # as if the file were large
    stdout, err = one_line_error(capsys, "eval", "--model", tmp_path / "m", "--data", text_file,
                                 *(["--json"] if as_json else []))
    assert "bits per byte is nan" in err and "weights hold NaN" in err and "nan" not in stdout


# ---------------------------------------------------------------------------------------------------
# Writing over a model needs --force, for every command that writes a model folder (defect 8)
# ---------------------------------------------------------------------------------------------------
def test_convert_needs_force_to_overwrite_a_model(tmp_path, model_dir, capsys):
    out = tmp_path / "existing"
    assert main(["init", "--out", str(out), "--dim", "4", "--memory-slots", "4", "--num-tiers", "1"]) == 0
    before = (out / "model.safetensors").read_bytes()
    _, err = one_line_error(capsys, "convert", model_dir, out)
    assert "pass --force" in err and (out / "model.safetensors").read_bytes() == before
    code, _, err = run(capsys, "convert", model_dir, out, "--force")
    assert code == 0, err
    # a thl-np folder is copied unchanged (the PyTorch THL's write rate 1.0 is for PyTorch checkpoints only)
    source = THLConfig.load(str(model_dir))
    assert THLConfig.load(str(out)).write_rate == source.write_rate and THLConfig.load(str(out)).embedding_dim == 8


def test_train_out_cannot_be_a_model_folder(tmp_path, model_dir, text_file, capsys):
    """train --out into a model folder was allowed, and eval --model on it then evaluated the untrained
    top-level model. Now refused; and a folder holding both is refused by eval as ambiguous."""
    stdout, err = one_line_error(capsys, "train", "--data", text_file, "--out", model_dir, "--steps", 2, *NEW_RUN)
    assert "holds a model" in err and not (model_dir / "LATEST").exists()
    both = tmp_path / "both"
    shutil.copytree(model_dir, both)
    (both / "LATEST").write_text("step-000002\n")
    _, err = one_line_error(capsys, "eval", "--model", both, "--data", text_file)
    assert "both a model" in err


# ---------------------------------------------------------------------------------------------------
# Damaged files and odd arguments: one line, never a traceback (defect 9)
# ---------------------------------------------------------------------------------------------------
def damage(folder: Path, kind: str):
    step = Path(ckpt.latest_checkpoint(str(folder)))
    info = json.loads((step / "trainer.json").read_text())
    if kind == "trainer-missing-key":
        del info["data_position"]
    elif kind == "trainer-bad-rng":
        info["rng_state"] = {"bit_generator": "PCG64", "state": "x"}
    elif kind == "trainer-wrong-type":
        info["step"] = "two"
    elif kind == "trainer-not-json":
        (step / "trainer.json").write_text("{not json")
        return "trainer.json"
    elif kind == "optimizer-garbage":
        (step / "optimizer.npz").write_bytes(b"garbage")
        return "optimizer.npz"
    elif kind == "optimizer-pickle":
        np.savez(step / "optimizer.npz", x=np.array([object()], dtype=object))
        return "optimizer.npz"
    elif kind == "log-malformed":
        (step / "log.csv").write_text("step,loss\nx,y\n")
        return "log.csv"
    elif kind == "log-not-numbers":
        text = (step / "log.csv").read_text().splitlines()
        (step / "log.csv").write_text("\n".join([text[0], "1,a,b,c,d"]) + "\n")
        return "log.csv"
    elif kind == "state-nan":
        state = np.load(step / "train_state.npz")
        arrays = {k: state[k] for k in state.files}
        arrays["memory"] = arrays["memory"].copy()
        arrays["memory"][0, 0, 0] = np.nan
        np.savez(step / "train_state.npz", **arrays)
        return "memory"
    (step / "trainer.json").write_text(json.dumps(info))
    return "trainer.json"


@pytest.mark.parametrize("kind", ["trainer-missing-key", "trainer-bad-rng", "trainer-wrong-type", "trainer-not-json",
                                  "optimizer-garbage", "optimizer-pickle", "log-malformed", "log-not-numbers",
                                  "state-nan"])
def test_damaged_checkpoints_are_named(uninterrupted, tmp_path, capsys, kind):
    full, text = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    what = damage(run_dir, kind)
    _, err = one_line_error(capsys, "train", "--data", text, "--out", run_dir, "--steps", 8, "--resume")
    assert what in err, err


@pytest.mark.parametrize("content, words", [
    ("dir", "is not a file"),
    ('{"vocab_size": ' + "9" * 5000 + "}", "not a valid config.json"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"vocab_size": 259, "memory_decay": 0.0, "load_penalty": 1e999}', "load_penalty = inf"),
])
def test_damaged_config_files_on_the_command_line(tmp_path, capsys, content, words):
    folder = tmp_path / "cfg"
    folder.mkdir()
    if content == "dir":
        (folder / "config.json").mkdir()
    else:
        (folder / "config.json").write_text(content)
    _, err = one_line_error(capsys, "init", "--out", tmp_path / "m", "--config", folder / "config.json")
    assert words in err and not (tmp_path / "m").exists()
    _, err = one_line_error(capsys, "info", "--model", folder)
    assert words in err


def test_generate_argument_errors(model_dir, tmp_path, capsys):
    """--seed -1 raised numpy's ValueError; a NaN state file was reported as 'the model diverged'."""
    _, err = one_line_error(capsys, "generate", "hi", "--model", model_dir, "--seed", -1, code=2)
    assert "--seed = -1 must be an integer in [0, 9223372036854775807]" in err
    state = THLModel.from_pretrained(model_dir).init_state(1)
    state.memory[0, 0, 0] = np.nan
    state.save(tmp_path / "nan.npz")
    _, err = one_line_error(capsys, "generate", "hi", "--model", model_dir, "--state-in", tmp_path / "nan.npz")
    assert "state memory holds a non-finite value" in err and "diverged" not in err


def test_training_step_memory_is_estimated_first(tmp_path, text_file, capsys, monkeypatch):
    """A batch x sequence length the machine cannot hold is refused before the first step (the estimate is
    fast_grad.training_memory_bytes), not met as a MemoryError part way through."""
    import thl_np.checks as checks

    monkeypatch.setattr(checks, "available_memory", lambda: 200_000)  # the model fits, a step does not
    stdout, err = one_line_error(capsys, "train", "--data", text_file, "--out", tmp_path / "run", "--steps", 2,
                                 "--dtype", "float32", *NEW_RUN)
    assert "a training step of 2 x 8 bytes needs about" in err and "lower --batch-size" in err
    assert "step 1" not in stdout and not (tmp_path / "run").exists()


def test_init_of_an_impossible_model_leaves_nothing(tmp_path, capsys):
    """init --dim 100000 died of MemoryError; a failed init left an empty folder."""
    _, err = one_line_error(capsys, "init", "--out", tmp_path / "huge", "--dim", "100000")
    assert "TiB" in err and not (tmp_path / "huge").exists()
    one_line_error(capsys, "init", "--out", tmp_path / "bad", "--dim", "8", "--num-heads", "3")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------
# A closed pipe is not an error (defect 10)
# ---------------------------------------------------------------------------------------------------
class ClosedAfterFirstLine(io.TextIOBase):
    """A stdout whose reader (head -1) goes away after the first line."""

    def __init__(self):
        self.lines = 0

    def write(self, text):
        if self.lines >= 1:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        self.lines += text.count("\n")
        return len(text)

    def fileno(self):
        raise io.UnsupportedOperation("no file descriptor")


def test_closed_pipe_exits_0(model_dir, monkeypatch, capsys):
    """thl-np info | head -1 exited with status 1 (click's reaction to EPIPE); a closed pipe is not an error."""
    monkeypatch.setattr(sys, "stdout", ClosedAfterFirstLine())
    assert main(["info", "--model", str(model_dir)]) == 0
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_closed_pipe_exits_0_in_a_shell(model_dir):
    """The same through a real pipe (whether the write meets EPIPE depends on timing; the status must be 0)."""
    command = f"{sys.executable} -m thl_np.cli info --model {model_dir} | head -1"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("model: ") and done.stderr == ""
