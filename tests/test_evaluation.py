"""Passkey retrieval and memory-vs-context evaluation (thl_np.eval.long_context) and their `thl-np eval` flags."""
import json

import numpy as np
import pytest

from thl_np import THLConfig, THLModel
from thl_np.cli import main
from thl_np.errors import InputError
from thl_np.eval.long_context import (
    CHANCE_EXACT,
    CHANCE_PER_DIGIT,
    FILLERS,
    kv_cache_bytes,
    matched_transformer,
    memory_vs_context,
    passkey_eval,
    passkey_prompt,
    plot_memory,
    rss_bytes,
)
from thl_np.state import InferenceState


@pytest.fixture(scope="module")
def tiny():
    config = THLConfig(vocab_size=259, dim=16, memory_slots=8, local_window=8, head_dim=8, query_dim=8,
                       num_heads=2, read_topk=2)
    return THLModel(config, seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("tiny")
    tiny.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("filler", ["python", "prose"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_has_exact_length_and_the_key_at_its_depth(filler, depth):
    f = FILLERS[filler]
    longest = max(map(len, f["lines"]))
    for length in (120, 256, 1000):
        prompt, at = passkey_prompt(length, "40719", depth, filler, np.random.default_rng(length))
        key_line = f["key"].format(key="40719")
        assert len(prompt) == length and prompt.isascii()
        assert prompt.endswith(f["question"]) and prompt[at:].startswith(key_line)
        assert prompt.count("40719") == 2
        n_fill = length - len(key_line) - len(f["question"])
        assert abs(at - depth * n_fill) <= longest  # the nearest line boundary to the depth


def test_passkey_prompt_rejects_bad_arguments():
    with pytest.raises(InputError, match="too short"):
        passkey_prompt(50, "12345")
    with pytest.raises(InputError, match="5 digits"):
        passkey_prompt(500, "1234")
    with pytest.raises(InputError, match="depth"):
        passkey_prompt(500, "12345", depth=1.5)
    with pytest.raises(InputError, match="filler"):
        passkey_prompt(500, "12345", filler="poetry")


def test_passkey_eval_on_a_tiny_model(tiny):
    report = passkey_eval(tiny, lengths=[128, 384], trials=3, seed=1)
    assert report["chance"]["accuracy"] == CHANCE_EXACT == 1e-5
    assert report["chance"]["digit_accuracy"] == report["chance"]["forced_digit_accuracy"] == CHANCE_PER_DIGIT
    assert abs(report["chance"]["key_bits_per_digit"] - 3.3219) < 1e-4
    assert [r["length"] for r in report["results"]] == [128, 384]
    expected_state = InferenceState.init(1, tiny.config).nbytes
    for row in report["results"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["digit_accuracy"] <= 1.0
        assert row["trials"] == 3 and row["correct"] == round(row["accuracy"] * 3)
        assert 0.0 <= row["forced_digit_accuracy"] <= 1.0
        assert row["key_bits_per_digit"] > 0 and row["control_bits_per_digit"] > 0
        assert row["state_bytes"] == expected_state  # the same at every length
        assert row["session_bytes"] >= row["state_bytes"]
        if rss_bytes()["rss"] is not None:
            assert row["rss_bytes"] > 1_000_000 and row["rss_peak_bytes"] >= row["rss_bytes"]
        for sample in row["samples"]:
            assert len(sample["key"]) == 5 and sample["key"].isdigit() and len(sample["answer"]) == 5
    json.dumps(report)  # JSON-able as it is
    again = passkey_eval(tiny, lengths=[384], trials=3, seed=1)  # a length's trials do not depend on others
    assert again["results"][0]["samples"] == report["results"][1]["samples"]


def test_passkey_eval_finds_a_key_a_model_can_see():
    """A model whose answer is fixed gets it right exactly when the key equals it: the scoring is sound."""

    class Echo:  # always answers "00000": keys of all zeros score 1, others 0 (digit accuracy counts zeros)
        config = THLConfig(vocab_size=259, dim=8, memory_slots=4, local_window=0, head_dim=4, query_dim=4,
                           num_heads=2, read_topk=1)

        def decoder(self, batch_size=1):
            model = THLModel(self.config, seed=0)
            dec = model.decoder(batch_size=batch_size)
            zero = np.full((1, 259), -1.0)
            zero[0, ord("0")] = 1.0
            dec.prompt = lambda ids, logits="all": zero
            dec.step = lambda ids, want_logits=True: zero
            return dec

    report = passkey_eval(Echo(), lengths=[200], trials=20, seed=3, keep_samples=20)
    row = report["results"][0]
    keys = [s["key"] for s in row["samples"]]
    assert len(keys) == 20 and all(s["answer"] == "00000" for s in row["samples"])
    assert row["digit_accuracy"] == sum(k.count("0") for k in keys) / 100
    assert row["accuracy"] == sum(k == "00000" for k in keys) / 20


def test_kv_cache_formula_and_the_matched_transformer(tiny):
    assert kv_cache_bytes(12, 768, 1024, 2) == 2 * 12 * 1024 * 768 * 2 == 37_748_736  # GPT-2 small, fp16
    assert kv_cache_bytes(3, 128, 4096) == 12_582_912
    assert kv_cache_bytes(3, 128, 0) == 0
    with pytest.raises(InputError):
        kv_cache_bytes(3, 128, -1)
    assert matched_transformer(tiny.config) == {"layers": 3, "width": 16}


def test_memory_vs_context_is_flat_for_thl_and_linear_for_the_kv_cache(tiny):
    report = memory_vs_context(tiny, lengths=[64, 256, 1024])
    rows = report["results"]
    assert len({r["state_bytes"] for r in rows}) == 1 and len({r["session_bytes"] for r in rows}) == 1
    kv = [r["kv_cache_bytes"] for r in rows]
    assert kv == [2 * 3 * T * 16 * 4 for T in (64, 256, 1024)]
    assert [r["kv_cache_bytes_float16"] * 2 for r in rows] == kv
    assert report["transformer"]["computed"] is True
    json.dumps(report)


def test_plot_memory_writes_a_png(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    report = memory_vs_context(tiny, lengths=[64, 256])
    out = plot_memory(report, tmp_path / "sub" / "mem.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_passkey_and_plot_json(tiny_dir, tmp_path, capsys):
    png = tmp_path / "mem.png"
    argv = ["eval", "--model", str(tiny_dir), "--passkey", "--lengths", "128,256", "--trials", "2", "--json"]
    has_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        has_mpl = False
    if has_mpl:
        argv += ["--memory-plot", str(png), "--plot-lengths", "64,128"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert [r["length"] for r in res["passkey"]["results"]] == [128, 256]
    if has_mpl:
        assert png.is_file() and res["memory"]["plot"] == str(png)


def test_eval_cli_text_output_and_usage_errors(tiny_dir, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_dir), "--passkey", "--lengths", "128", "--trials", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "passkey retrieval" in out and "chance" in out
    assert main(["eval", "--model", str(tiny_dir)]) == 2  # nothing to evaluate
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--passkey", "--lengths", "12,x"]) == 2
    capsys.readouterr()


def test_eval_cli_include_exclude_and_held_out(tiny_dir, tmp_path, capsys):
    root = tmp_path / "src"
    (root / "pkg" / "test").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n" * 50)
    (root / "b.txt").write_text("not python\n" * 50)
    (root / "pkg" / "c.py").write_text("y = 2\n" * 50)
    (root / "pkg" / "test" / "t.py").write_text("assert 0\n" * 50)
    code = main(["eval", "--model", str(tiny_dir), "--data", str(root), "--include", "*.py",
                 "--exclude", "test", "--lanes", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["bytes"] == 600 - 1 and res["include"] == ["*.py"] and res["exclude"] == ["test"]
    code = main(["eval", "--model", str(tiny_dir), "--data", str(root), "--include", "*.py",
                 "--exclude", "test", "--held-out", "0.5", "--lanes", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["bytes"] == 300 - 1  # the last half: pkg/c.py


def test_train_cli_include_exclude_reads_only_the_selected_files(tmp_path, capsys):
    from thl_np.training.data import list_text_files

    root = tmp_path / "src"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "a.py").write_text("def f(x):\n    return x + 1\n" * 20)
    (root / "notes.txt").write_text("prose " * 200)
    (root / "pkg" / "b.py").write_text("class A:\n    pass\n" * 20)
    (root / "pkg" / "tests" / "test_b.py").write_text("assert True\n" * 50)
    picked = list_text_files(str(root), ["*.py"], ["tests"])
    assert [p[len(str(root)) + 1:] for p in picked] == ["a.py", "pkg/b.py"]
    assert list_text_files(str(root), ["pkg/*"], None)[-1].endswith("test_b.py")  # a '/' pattern: the path
    code = main(["train", "--data", str(root), "--include", "*.py", "--exclude", "tests", "--out",
                 str(tmp_path / "run"), "--steps", "1", "--dim", "16", "--memory-slots", "8", "--seq-len", "16",
                 "--batch-size", "2", "--eval-every", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    total = 20 * len("def f(x):\n    return x + 1\n") + 20 * len("class A:\n    pass\n")
    assert f"{total - round(total * 0.1):,} training bytes" in out
    code = main(["train", "--data", str(root), "--include", "*.rs", "--out", str(tmp_path / "run2")])
    assert code == 1 and "no text files matching" in capsys.readouterr().err
