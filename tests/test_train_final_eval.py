"""Issue 27: the final evaluation obeys --eval-tokens, shows progress and keeps the checkpoint on Ctrl-C;
trainer callbacks; the training progress line fits the terminal, in bits per byte."""
import os
import signal

from test_training import TEXT, tiny_config, tiny_train_config

from thl_np.cli.train import _Progress
from thl_np.training import checkpoint as ckpt
from thl_np.training.trainer import train


def test_final_evaluation_obeys_the_cap_and_reports_progress(tmp_path):
    events = []
    result = train(tiny_config(), TEXT, tmp_path, tiny_train_config(steps=2, eval_every=0, eval_tokens=64),
                   log=events.append)
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) == 1 and evals[0]["bytes"] <= 64
    assert result.held_out_bpb is not None
    progress = [e for e in events if e["event"] == "eval_progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == evals[0]["bytes"]


def test_ctrl_c_during_the_final_evaluation_keeps_the_trained_checkpoint(tmp_path):
    def ctrl_c_in_final_eval(event):
        if event["event"] == "eval_progress" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(tiny_config(), TEXT, tmp_path, tiny_train_config(steps=2, eval_every=0),
                   log=ctrl_c_in_final_eval)
    assert result.step == 2 and result.held_out_bpb is None
    assert os.path.basename(ckpt.latest_checkpoint(str(tmp_path))) == "step-000002"

    def two_ctrl_c(event):  # the second Ctrl-C raises at once: still saved
        if event["event"] == "eval_progress":
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "again"
    train(tiny_config(), TEXT, out, tiny_train_config(steps=2, eval_every=0), log=two_ctrl_c)
    assert os.path.basename(ckpt.latest_checkpoint(str(out))) == "step-000002"


class Recorder:
    def __init__(self):
        self.steps, self.evals, self.checkpoints = [], [], []

    def on_step(self, event):
        self.steps.append(event["step"])

    def on_eval(self, event):
        self.evals.append(event["bits_per_byte"])

    def on_checkpoint(self, event):
        self.checkpoints.append(event["path"])


def test_trainer_callbacks_get_every_step_evaluation_and_checkpoint(tmp_path):
    rec = Recorder()
    result = train(tiny_config(), TEXT, tmp_path, tiny_train_config(steps=4, eval_every=2, checkpoint_every=2),
                   callbacks=[rec])
    assert rec.steps == [1, 2, 3, 4]
    assert len(rec.evals) == 2 and rec.evals[-1] == result.held_out_bpb
    assert rec.checkpoints and rec.checkpoints[-1] == result.checkpoint


def test_the_live_training_line_fits_the_terminal_in_bits_per_byte(capsys):
    event = {"event": "step", "step": 3, "steps": 1000, "loss": 1.3863, "lr": 1e-3, "grad_norm": 1.0,
             "tokens_per_s": 12345.0, "eta_s": 100.0, "seq_len": 128, "mem_read_entropy": 1.5,
             "mem_top1_mass": 0.4, "mem_effective_slots": 5.0, "mem_share_refine": 0.5,
             "mem_share_novel_evict": 0.2, "mem_mean_gate": 0.3}
    for width in (50, 80, 200):
        _Progress(1, tty=True, width=width)(event)
        line = capsys.readouterr().out.lstrip("\r")
        assert len(line) <= width - 1
        assert "step 3/1000" in line and "2.0000 bits/byte" in line and "ETA" in line and "nats" not in line
    _Progress(1, tty=True, width=200)(event)
    assert "evict" in capsys.readouterr().out


def test_long_eval_jobs_show_progress_on_a_terminal_only():
    import io

    from thl_np.cli.train import _StderrProgress

    out = io.StringIO()
    with _StderrProgress("passkey trials", stream=out, tty=True) as bar:
        bar(1, 4)
        bar(4, 4)
    assert "passkey trials: 1/4 (25%), ETA" in out.getvalue()
    for quiet, tty in ((True, True), (False, False)):
        out = io.StringIO()
        with _StderrProgress("x", quiet=quiet, stream=out, tty=tty) as bar:
            bar(1, 2)
        assert out.getvalue() == ""


def test_passkey_and_compare_call_their_progress():
    from thl_np import THLModel
    from thl_np.eval.compare import compare_models
    from thl_np.eval.long_context import passkey_eval

    model = THLModel(tiny_config(), seed=0)
    seen = []
    passkey_eval(model, [256], trials=2, on_trial=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    seen.clear()
    compare_models(model, model, TEXT, seq_len=8, lanes=2, max_bytes=64, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
