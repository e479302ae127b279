"""`thl-np train` and `thl-np eval` end to end on a small text file, and their one-line errors."""
import json

import pytest

from thl_np.cli import main

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n") * 8
TINY = ["--dim", "16", "--memory-slots", "8", "--seq-len", "16", "--batch-size", "2", "--dtype", "float64",
        "--eval-every", "2", "--warmup", "1", "--log-every", "1"]


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_eval_then_resume(tmp_path, text_file, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", text_file, "--out", out_dir, "--steps", 4, *TINY)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("training from step 0 to 4")
    assert any(line.startswith("step 2/4  loss") and "tok/s" in line and "ETA" in line for line in lines)
    assert any("held-out" in line and "bits/byte" in line for line in lines[1:-1])  # the periodic eval
    assert lines[-1].startswith("done: step 4/4, train loss") and "held-out bits/byte" in lines[-1]
    assert "time" in lines[-1]

    code, out, err = run(capsys, "eval", "--model", out_dir, "--data", text_file, "--seq-len", 32)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("bits_per_byte: ") and 0 < float(last.split()[-1]) < 10

    code, out, err = run(capsys, "eval", "--model", out_dir, "--data", text_file, "--max-bytes", 100,
                         "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["bytes"] == 96 and res["lanes"] == 4 and res["bits_per_byte"] > 0

    code, out, err = run(capsys, "train", "--data", text_file, "--out", out_dir, "--steps", 6, "--resume")
    assert code == 0, err
    assert out.splitlines()[0].startswith("resuming at step 4 to 6")
    assert out.strip().splitlines()[-1].startswith("done: step 6/6")


def test_train_config_file_and_flags(tmp_path, text_file, capsys):
    from thl_np.config import THLConfig
    from thl_np.training import latest_checkpoint

    cfg = tmp_path / "config.json"
    THLConfig(dim=16, vocab_size=300, memory_slots=8, head_dim=8, query_dim=8, local_window=4).save(str(cfg))
    out_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", text_file, "--out", out_dir, "--config", cfg, "--steps", 1,
                       "--seq-len", 8, "--batch-size", 2, "--write-rate", 0.5, "--no-carry-state")
    assert code == 0, err
    saved = THLConfig.load(str(tmp_path / latest_checkpoint(str(out_dir)) / "model"))
    assert (saved.vocab_size, saved.local_window, saved.memory_slots, saved.write_rate) == (300, 4, 8, 0.5)


@pytest.mark.parametrize("case", ["missing", "empty", "seq_len_0", "exists"])
def test_train_bad_input_is_one_clear_error(tmp_path, text_file, capsys, case):
    data, extra, code_want, words = text_file, [], 1, None
    if case == "missing":
        data, words = tmp_path / "nope.txt", "does not exist"
    elif case == "empty":
        data, words = tmp_path / "empty.txt", "empty"
        data.write_text("")
    elif case == "seq_len_0":
        extra, code_want, words = ["--seq-len", "0"], 2, "--seq-len"
    else:
        run(capsys, "train", "--data", text_file, "--out", tmp_path / "run", "--steps", 1, *TINY)
        words = "--resume"
    code, out, err = run(capsys, "train", "--data", data, "--out", tmp_path / "run", "--steps", 1,
                         *TINY, *extra)
    assert code == code_want
    assert words in err and "Traceback" not in err
    if code_want == 1:
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_eval_bad_model_folder(tmp_path, text_file, capsys):
    code, _, err = run(capsys, "eval", "--model", tmp_path / "nothing", "--data", text_file)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_shows_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Example" in out and f"thl-np {command}" in out


def test_bench_prints_every_figure_of_one_run(capsys):
    """`thl-np bench` on a small fresh model: the decode figures at batch 1 and 8 with their bound and
    ratio, prompt and training throughput, the GEMV bandwidth and peak memory, consistent with each other."""
    code, out, err = run(capsys, "bench", "--dim", 16, "--memory-slots", 8, "--decode-steps", 3, "--prompt-len", 4,
                         "--json")
    assert code == 0, err
    figures = json.loads(out)  # --json: standard output is the JSON object alone, the text goes to stderr
    text = err
    for B in (1, 8):
        assert f"decode batch {B}:" in text
        tps, bound = figures[f"decode_b{B}_tok_s"], figures[f"decode_b{B}_bound_tok_s"]
        assert tps > 0 and bound > 0
        assert figures[f"decode_b{B}_ratio_to_bound"] == pytest.approx(tps / bound)
        # the functional API (model.forward_step) in the same rounds, against the same bound
        assert f"forward_step batch {B}:" in text
        fs = figures[f"forward_step_b{B}_tok_s"]
        assert figures[f"forward_step_b{B}_ratio_to_bound"] == pytest.approx(fs / bound)
        assert figures[f"forward_step_b{B}_vs_session"] == pytest.approx(fs / tps)
        assert figures[f"decode_b{B}_threads"] >= 1 and figures[f"forward_step_b{B}_threads"] >= 1
    assert figures["threads_requested"] == "auto" and figures["others_running"] >= 0
    assert figures["prompt_tok_s"] > 0 and figures["train_tok_s"] > 0
    assert figures["peak_rss_MB"] > 0
    # the bound uses the better of the two GEMVs measured, so it is never easier than either
    assert figures["gemv_bandwidth_GBps"] == max(figures["gemv_bandwidth_blas_GBps"],
                                                 figures["gemv_bandwidth_kernel_GBps"]) > 0
    assert "GEMV bandwidth" in text and "train fwd+bwd" in text


def test_lr_decay_steps_makes_a_short_run_the_start_of_a_longer_schedule(tmp_path, text_file, capsys):
    """--lr-decay-steps N: the cosine reaches its floor at step N, not at --steps, so a run of 4 steps logs
    the learning rates of the first 4 steps of a 12-step run (and a plain 4-step run does not)."""
    import csv

    from thl_np.training.checkpoint import latest_checkpoint
    from thl_np.training.schedule import lr_at

    def lrs(out_dir, *extra):
        code, out, err = run(capsys, "train", "--data", text_file, "--out", out_dir, "--steps", 4, *TINY, *extra)
        assert code == 0, err
        with open(f"{latest_checkpoint(str(out_dir))}/log.csv") as f:
            return [float(row["lr"]) for row in csv.DictReader(f)]

    longer = lrs(tmp_path / "a", "--lr-decay-steps", 12)
    assert longer == pytest.approx([lr_at(s, 3e-3, 1, 12) for s in range(4)])
    assert lrs(tmp_path / "b") == pytest.approx([lr_at(s, 3e-3, 1, 4) for s in range(4)]) != longer
    code, out, err = run(capsys, "train", "--data", text_file, "--out", tmp_path / "c", "--steps", 4, *TINY,
                         "--lr-decay-steps", 0)
    assert code != 0 and "lr_decay_steps" in (out + err).replace("-", "_")
