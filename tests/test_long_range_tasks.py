"""Long-range training data (thl_np.training.synthetic_tasks), the answer-weighted loss, and whole-sequence training
with a length schedule in the trainer and the CLI."""
import json

import numpy as np
import pytest
from helpers import assert_resume_matches, random_params, tiny_config

from thl_np import THLModel
from thl_np.cli import main
from thl_np.errors import InputError
from thl_np.eval.long_context import FILLERS
from thl_np.model import value_and_grad
from thl_np.training import checkpoint as ckpt
from thl_np.training.synthetic_tasks import (
    TASK_MAKERS,
    WindowBatches,
    insert_lines,
    parse_seq_len,
    parse_tasks,
    seq_len_at,
)
from thl_np.training.trainer import TrainConfig, train

CORPUS = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 200).encode()


def test_seq_len_schedule_doubles_in_equal_stages():
    # 128 -> 1024: 3 doublings, 4 stages of 25 steps over a ramp of 100
    got = [seq_len_at(s, 128, 1024, 100) for s in (0, 24, 25, 49, 50, 75, 99, 100, 10**6)]
    assert got == [128, 128, 256, 256, 512, 1024, 1024, 1024, 1024]
    assert seq_len_at(500, 100, 300, 10) == 300            # capped at the final length (not 400)
    assert seq_len_at(7, 64) == 64 and seq_len_at(7, 64, 64, 3) == 64
    assert parse_seq_len("128") == (128, None) and parse_seq_len("128:4096") == (128, 4096)
    for bad in ("0", "4096:128", "a:b", "1:2:3", ""):
        with pytest.raises(InputError, match="START:FINAL"):
            parse_seq_len(bad)
    assert parse_tasks("passkey, copy") == ("passkey", "copy")
    with pytest.raises(InputError, match="passkey, recall, copy"):
        parse_tasks("passkey,sort")


def test_insert_lines_goes_to_the_nearest_line_boundary():
    filler = b"aaaa\nbbbb\ncccc\n"                     # boundaries 0, 5, 10, 15
    assert insert_lines(filler, [b"K\n"], [0.4]) == b"aaaa\nbbbb\nK\ncccc\n"[:5] + b"K\nbbbb\ncccc\n"
    assert insert_lines(filler, [b"K\n"], [0.7]) == b"aaaa\nbbbb\nK\ncccc\n"
    assert insert_lines(filler, [b"X\n", b"Y\n"], [1.0, 0.0]) == b"Y\naaaa\nbbbb\ncccc\nX\n"
    assert insert_lines(b"", [b"K\n"], [0.5]) == b"K\n"


@pytest.mark.parametrize("task", sorted(TASK_MAKERS))
@pytest.mark.parametrize("filler", ["corpus", "python", "prose"])
def test_every_task_window_ends_with_its_answer_and_weights_it(task, filler):
    wb = WindowBatches(CORPUS, 3, 300, task_mix=1.0, tasks=(task,), filler=filler, answer_weight=7.0, seed=4)
    batch = wb.next_batch()
    assert batch.inputs.shape == batch.targets.shape == (3, 300) and batch.reset
    assert np.array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    for b in range(3):
        text = bytes(np.r_[batch.inputs[b], batch.targets[b, -1]].astype(np.uint8)).decode()
        n_ans = int((batch.weights[b] == 7.0).sum())
        answer, rest = text[-n_ans:], text[:-n_ans]
        assert set(np.unique(batch.weights[b])) == {1.0, 7.0} and (batch.weights[b, -n_ans:] == 7.0).all()
        if task == "passkey":
            phr = FILLERS["prose" if filler == "prose" else "python"]
            assert answer.isdigit() and len(answer) == 5
            assert rest.endswith(phr["question"]) and phr["key"].format(key=answer) in rest
        elif task == "recall":
            name = rest.rsplit("what is ", 1)[1].split("?")[0]
            assert f"remember: {name} is {answer}.\n" in rest
        else:
            assert rest.endswith("paste it: ") and f"copy this: {answer}\n" in rest
        if filler == "corpus":   # the haystack is the corpus itself
            assert "return x + 1" in rest
        # the question starts a line of its own (as in thl-np eval --passkey's haystacks)
        last_line = rest[rest.rindex("\n") + 1:]
        lead = "" if filler == "prose" else "    # "
        assert last_line.startswith(lead + {"passkey": "what is the pass key" if lead else "What is the pass key",
                                            "recall": "what is ", "copy": "paste it: "}[task])


def test_mix_reproducible_resumable_and_corpus_rows_unweighted():
    def batches(wb, n):
        return [wb.next_batch() for _ in range(n)]

    kw = dict(task_mix=0.5, filler="mixed", answer_weight=3.0, seed=9, seq_len_final=512, seq_len_ramp=4)
    a = batches(WindowBatches(CORPUS, 4, 128, **kw), 6)
    b = WindowBatches(CORPUS, 4, 128, **kw)
    first = batches(b, 3)
    resumed = WindowBatches(CORPUS, 4, 128, position=b.position, **kw)
    rest = batches(resumed, 3)
    for x, y in zip(a, first + rest, strict=True):
        assert np.array_equal(x.inputs, y.inputs) and np.array_equal(x.weights, y.weights)
    assert [x.inputs.shape[1] for x in a] == [128, 128, 256, 512, 512, 512]   # 3 stages over 4 steps
    rows = np.concatenate([x.weights.max(axis=1) for x in a])
    assert 0 < (rows == 3.0).sum() < len(rows)               # some rows tasks, some corpus text
    other = WindowBatches(CORPUS, 4, 128, **dict(kw, seed=10)).next_batch()
    assert not np.array_equal(other.inputs, a[0].inputs)
    assert WindowBatches(CORPUS, 2, 64, task_mix=0.5).next_batch().weights is None   # weight 1: no weights


def test_window_batches_refuse_bad_settings():
    with pytest.raises(InputError, match="too few"):
        WindowBatches(b"x" * 100, 2, 100)
    with pytest.raises(InputError, match="task_mix"):
        WindowBatches(CORPUS, 2, 64, task_mix=1.5)
    with pytest.raises(InputError, match="filler"):
        WindowBatches(CORPUS, 2, 64, filler="poetry")
    with pytest.raises(InputError, match="window-batch position"):
        WindowBatches(CORPUS, 2, 64, position={"offset": 0, "epoch": 0})
    with pytest.raises(InputError, match="seq_len_final"):
        TrainConfig(seq_len=256, seq_len_final=128)
    # a window too short for the task: corpus text instead (no answer weights)
    short = WindowBatches(CORPUS, 2, 16, task_mix=1.0, tasks=("passkey",), answer_weight=2.0).next_batch()
    assert (short.weights == 1.0).all()


# ---------------------------------------------------------------------------------------------------
# the weighted loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["fast", "plain"])
def test_loss_weights_are_a_weighted_mean_with_its_exact_gradient(path):
    cfg = tiny_config()
    model = THLModel(cfg, params=random_params(cfg, np.random.default_rng(0)))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 7))
    tg = rng.integers(0, cfg.vocab_size, size=(2, 7))
    w = rng.uniform(0.0, 3.0, size=(2, 7))
    loss, grads = value_and_grad(model, ids, tg, loss_weights=w, path=path)
    per_pos = []   # each position's loss on its own: the weighted mean is Σ w·CE / Σ w
    for b in range(2):
        for t in range(7):
            one = np.zeros((2, 7))
            one[b, t] = 1.0
            per_pos.append(value_and_grad(model, ids, tg, loss_weights=one, path=path))
    want = sum(w[b, t] * per_pos[b * 7 + t][0] for b in range(2) for t in range(7)) / w.sum()
    assert loss == pytest.approx(want, rel=1e-12)
    for name, g in grads.items():
        want_g = sum(w[b, t] * per_pos[b * 7 + t][1][name] for b in range(2) for t in range(7)) / w.sum()
        assert np.allclose(g, want_g, rtol=1e-9, atol=1e-12), name
    plain = value_and_grad(model, ids, tg, path=path)
    ones = value_and_grad(model, ids, tg, loss_weights=np.ones((2, 7)), path=path)
    assert ones[0] == pytest.approx(plain[0], rel=1e-12)
    for bad, words in ((np.ones((2, 6)), "shape"), (-np.ones((2, 7)), ">= 0"), (np.zeros((2, 7)), "positive sum")):
        with pytest.raises(InputError, match=words):
            value_and_grad(model, ids, tg, loss_weights=bad, path=path)


# ---------------------------------------------------------------------------------------------------
# the trainer and the CLI
# ---------------------------------------------------------------------------------------------------
def test_trainer_windows_schedule_and_resume_bit_for_bit(tmp_path):
    cfg = tiny_config(vocab_size=259)
    kw = dict(steps=4, seq_len=120, seq_len_final=240, seq_len_ramp=4, lr_decay_steps=4, batch_size=2,
              task_mix=0.5, answer_weight=4.0, eval_every=0, checkpoint_every=2, warmup=1, held_out_fraction=0.1)
    full = train(cfg, CORPUS, str(tmp_path / "full"), **kw)
    assert [r["seq_len"] for r in full.history] == [120, 120, 240, 240]
    assert all(0 <= r["mem_share_refine"] <= 1 and r["mem_read_entropy"] >= 0 for r in full.history)
    log = ckpt.read_csv(str(tmp_path / "full" / "step-000004" / "log.csv"))
    assert log[-1]["mem_effective_slots"] == pytest.approx(full.history[-1]["mem_effective_slots"])
    assert_resume_matches(cfg, CORPUS, tmp_path, kw)


def test_cli_train_tasks_then_eval_diagnostics_and_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")   # wide enough for every column of the progress line
    data = tmp_path / "corpus.py"
    data.write_bytes(CORPUS)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--dim", "8", "--memory-slots", "8",
                 "--seq-len", "120:240", "--task-mix", "0.5", "--tasks", "passkey,copy", "--answer-weight", "5",
                 "--batch-size", "2", "--steps", "2", "--eval-every", "0", "--log-every", "1",
                 "--set", "memory_decay=1.0", "--dtype", "float64"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "T 120  mem H" in text and "refine" in text
    from thl_np.training.trainer import saved_train_config

    tc = saved_train_config(str(out))
    assert (tc.seq_len, tc.seq_len_final, tc.task_mix, tc.tasks, tc.answer_weight) == (120, 240, 0.5,
                                                                                       "passkey,copy", 5.0)
    from thl_np.config import THLConfig
    from thl_np.training import latest_checkpoint

    assert THLConfig.load(latest_checkpoint(str(out)) + "/model").memory_decay == 1.0
    code = main(["eval", "--model", str(out), "--diagnostics", "--lengths", "200", "--path", "plain"])
    text = capsys.readouterr().out
    assert code == 0 and "memory diagnostics (plain path) over a 200-byte passkey prompt" in text
    assert "writes: refine" in text and "bank at the end" in text
    code = main(["eval", "--model", str(out), "--passkey", "--trace", "--lengths", "200", "--trials", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "passkey trace (fast path): length 200" in text and "key line:" in text
    code = main(["eval", "--model", str(out), "--passkey", "--trace", "--diagnostics", "--lengths", "150",
                 "--trials", "1", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["diagnostics"]["steps"] == 150 and res["trace"][0]["length"] == 150
    code = main(["eval", "--model", str(out), "--diagnostics", "--trace"])
    assert code == 2 and "--trace follows --passkey" in capsys.readouterr().err
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "bad"), "--set", "memory_decay"])
    assert code == 2 and "FIELD=VALUE" in capsys.readouterr().err


def test_cli_train_init_from_the_packaged_model_with_set(tmp_path, capsys):
    from thl_np.config import THLConfig
    from thl_np.training import latest_checkpoint

    data = tmp_path / "corpus.py"
    data.write_bytes(CORPUS)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--init", "default", "--set", "memory_slots=16",
                 "--set", "memory_decay=1.0", "--steps", "1", "--seq-len", "16", "--batch-size", "1",
                 "--eval-every", "0", "--held-out", "0.01"])
    assert code == 0, capsys.readouterr().err
    saved = THLConfig.load(latest_checkpoint(str(out)) + "/model")
    assert (saved.embedding_dim, saved.memory_slots, saved.memory_decay) == (128, 16, 1.0)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--init", "default", "--dim", "8"])
    assert code == 2 and "--init takes the model's shape" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_hard_routing_trains_on_the_eval_mode_reads(tmp_path, path):
    """--routing hard: the first step's loss is the noise-free loss of the first batch; gumbel's is not."""
    from thl_np.training.data import LaneBatches, split_bytes

    cfg = tiny_config(vocab_size=259)
    kw = dict(steps=1, seq_len=64, batch_size=2, eval_every=0, checkpoint_every=0, warmup=1, held_out_fraction=0.1,
              path=path)
    start = THLModel(cfg, seed=5)
    batch = LaneBatches(split_bytes(np.frombuffer(CORPUS, np.uint8), 0.1)[0], 2, 64).next_batch()
    want = float(value_and_grad(start, batch.inputs, batch.targets, path=path)[0])
    losses = {}
    for routing in ("hard", "gumbel"):
        model = THLModel(cfg, params={k: v.copy() for k, v in start.params.items()})
        losses[routing] = train(model, CORPUS, str(tmp_path / routing), routing=routing, **kw).history[0]["loss"]
    assert losses["hard"] == pytest.approx(want, rel=1e-12)
    assert losses["gumbel"] != pytest.approx(want, rel=1e-6)
    with pytest.raises(InputError, match="routing = 'soft'"):
        TrainConfig(routing="soft")


def test_cli_train_routing_flag_is_saved_and_resumed(tmp_path, capsys):
    from thl_np.training.trainer import saved_train_config

    data = tmp_path / "corpus.py"
    data.write_bytes(CORPUS)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--dim", "8", "--memory-slots", "8", "--seq-len", "64",
            "--batch-size", "2", "--eval-every", "0", "--dtype", "float64"]
    assert main(args + ["--steps", "1", "--routing", "hard"]) == 0
    assert saved_train_config(str(out)).routing == "hard"
    assert main(args + ["--steps", "2", "--resume"]) == 0          # not given again: kept
    assert saved_train_config(str(out)).routing == "hard"
    assert main(args[:4] + [str(tmp_path / "other"), "--routing", "soft"]) == 2
    assert "'soft' is not one of" in capsys.readouterr().err
