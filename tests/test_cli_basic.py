"""`thl-np init`, `info` and `generate`, driven through click's CliRunner and `thl_np.cli.main`."""
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from thl_np import InferenceState, THLConfig, THLModel
from thl_np.cli import basic, cli, main
from thl_np.generation import generate_ids, generate_text
from thl_np.io import folder
from thl_np.params import num_parameters, param_shapes
from thl_np.tokenizer import Tokenizer

TINY = ["--dim", "16", "--memory-slots", "8", "--local-window", "4", "--num-tiers", "2", "--head-dim", "8",
        "--read-topk", "2", "--seed", "0"]


def run(*args, input=None):
    """Invoke the CLI in-process; THLErrors propagate (use `main` to see the one-line form)."""
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(capsys, *args):
    """Run `thl-np ARGS` via main(): it must fail with exactly one line on stderr and no traceback."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny"
    run("init", "--out", str(out), *TINY)
    return out


# ---------------------------------------------------------------------------------------- init


def test_init_writes_a_loadable_model(model_dir):
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    config = THLConfig.load(str(model_dir))
    assert config.vocab_size == 259  # the byte tokenizer's vocabulary by default
    assert (config.embedding_dim, config.memory_slots, config.local_window) == (16, 8, 4)
    assert config.tier_dims == [16, 16] and config.tier_timescales == [1, 8]
    model = THLModel.from_pretrained(str(model_dir))
    fresh = THLModel(config, seed=0)
    for name, value in fresh.params.items():
        np.testing.assert_array_equal(model.params[name], value)


def test_init_refuses_a_non_empty_folder(model_dir, capsys):
    err = one_line_error(capsys, "init", "--out", str(model_dir), *TINY)
    assert "--force" in err
    run("init", "--out", str(model_dir), *TINY, "--force")


def test_init_refuses_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert "not a folder" in one_line_error(capsys, "init", "--out", str(target))


def test_init_from_config_file_with_overrides(tmp_path):
    THLConfig(dim=32, vocab_size=256, memory_slots=16, num_tiers=3).save(str(tmp_path))
    out = tmp_path / "m"
    result = run("init", "--out", str(out), "--config", str(tmp_path / "config.json"), "--dim", "8",
                 "--num-tiers", "2", "--dtype", "float64")
    config = THLConfig.load(str(out))
    assert config.vocab_size == 256 and config.memory_slots == 16  # from the file
    assert config.embedding_dim == 8 and config.tier_dims == [8, 8] and config.dtype == "float64"  # flags
    assert f"{num_parameters(config):,} parameters" in result.stdout


def test_init_bad_config_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, "init", "--out", str(tmp_path / "m"), "--dim", "10", "--num-heads", "4")
    assert "value_dim" in err


# ---------------------------------------------------------------------------------------- info


def test_info_text(model_dir):
    out = run("info", "--model", str(model_dir)).stdout
    config = THLConfig.load(str(model_dir))
    assert f"parameters: {num_parameters(config):,}" in out
    assert f"{InferenceState.init(1, config).nbytes:,} bytes float32" in out
    for name in param_shapes(config):
        assert name in out


def test_info_json(model_dir):
    info = json.loads(run("info", "--model", str(model_dir), "--json").stdout)
    config = THLConfig.load(str(model_dir))
    n = num_parameters(config)
    assert info["num_parameters"] == n
    assert info["parameter_bytes"] == {"float32": 4 * n, "float64": 8 * n}
    assert info["state_bytes_per_sequence"]["float32"] == InferenceState.init(1, config).nbytes
    assert info["config"] == config.to_dict()
    shapes = param_shapes(config)
    assert [t["name"] for t in info["tensors"]] == list(shapes)
    assert all(tuple(t["shape"]) == shapes[t["name"]] for t in info["tensors"])
    assert sum(t["nbytes"] for t in info["tensors"]) == 4 * n


# ---------------------------------------------------------------------------------------- generate


def test_generate_greedy_matches_the_library(model_dir):
    args = ("generate", "Hello", "--model", str(model_dir), "--max-length", "12", "--temperature", "0")
    out = run(*args).stdout
    model = THLModel.from_pretrained(str(model_dir))
    assert out == generate_text(model, Tokenizer(), "Hello", max_length=12, temperature=0)
    assert run(*args).stdout == out


def test_generate_seed_reproduces(model_dir):
    args = ("generate", "abc", "--model", str(model_dir), "--max-length", "30", "--top-k", "40",
            "--top-p", "0.9")
    a = run(*args, "--seed", "5").stdout
    assert a == run(*args, "--seed", "5").stdout
    assert a != run(*args, "--seed", "6").stdout
    assert len(a) > 0


def test_generate_reads_stdin(model_dir):
    args = ("--model", str(model_dir), "--max-length", "10", "--temperature", "0")
    assert run("generate", "-", *args, input="Hi there").stdout == run("generate", "Hi there", *args).stdout


def test_generate_float64(model_dir):
    out = run("generate", "x", "--model", str(model_dir), "--max-length", "5", "--dtype", "float64",
              "--seed", "0").stdout
    assert isinstance(out, str)


def test_pieces_are_written_as_they_are_produced(capsys):
    def pieces():
        yield "a"
        assert capsys.readouterr().out == "a"  # already on stdout before the next piece is asked for
        yield "b"
        return "final"

    assert basic.yield_to_stdout(pieces()) == "final"
    assert capsys.readouterr().out == "b"


def test_state_out_then_state_in_continues(model_dir, tmp_path):
    s1, s2 = tmp_path / "s1.npz", tmp_path / "s2.npz"
    common = ("--model", str(model_dir), "--temperature", "0")
    first = run("generate", "ab", *common, "--max-length", "5", "--state-out", str(s1)).stdout
    second = run("generate", "cd", *common, "--max-length", "4", "--state-in", str(s1),
                 "--state-out", str(s2)).stdout

    model = THLModel.from_pretrained(str(model_dir))
    tok = Tokenizer()
    ref1 = generate_ids(model, tok.encode("ab"), max_length=5, temperature=0, eos_id=tok.eos_id,
                        vocab_limit=259, return_state=True)
    assert first == tok.decode(ref1.ids)
    loaded1 = InferenceState.load(str(s1))
    assert loaded1.timestep == 2 + len(ref1.ids)
    for key, value in ref1.state.arrays().items():  # the state file holds exactly the returned state
        loaded = loaded1.arrays()[key]
        np.testing.assert_array_equal(loaded, value.astype(loaded.dtype))

    assert second == generate_text(model, tok, "cd", max_length=4, temperature=0, state=loaded1)
    loaded2 = InferenceState.load(str(s2))
    assert loaded2.timestep > loaded1.timestep + 2


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--temperature", "-1"], "--temperature = -1.0 must be a finite number >= 0"),
        (["--top-k", "0"], "--top-k = 0 must be an integer >= 1"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-length", "-3"], "--max-length"),
    ],
)
def test_bad_generate_flags_are_one_line(model_dir, capsys, flags, match):
    assert match in one_line_error(capsys, "generate", "hi", "--model", str(model_dir), *flags)


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, "generate", "hi", "--model", str(tmp_path / "nope"))
    assert err.startswith("error: ") and "does not exist" in err
    assert "config.json" in one_line_error(capsys, "info", "--model", str(tmp_path))


def test_missing_default_model_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(folder, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    err = one_line_error(capsys, "generate", "hi")
    assert "--model" in err and "thl-np init" in err


def test_mismatched_state_is_one_line(model_dir, tmp_path, capsys):
    other = THLConfig.load(str(model_dir)).replace(memory_slots=4)
    path = tmp_path / "other.npz"
    InferenceState.init(1, other).save(str(path))
    err = one_line_error(capsys, "generate", "hi", "--model", str(model_dir), "--state-in", str(path))
    assert "another config" in err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    err = one_line_error(capsys, "generate", "hi", "--model", str(model_dir), "--state-in", str(bad))
    assert "not a readable state" in err


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "thl_np.cli", "info", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["init", "info", "generate"])
def test_help_shows_examples(command):
    out = run(command, "--help").stdout
    assert "Examples:" in out
    assert f"\n    thl-np {command} " in out  # the \b block keeps each example on its own line


def test_empty_prompt_and_foreign_vocab(tmp_path):
    out = tmp_path / "big"
    run("init", "--out", str(out), *TINY, "--vocab-size", "300")
    result = run("generate", "--model", str(out), "--max-length", "8", "--seed", "0")  # no prompt
    assert "warning: the model's vocab_size 300" in result.stderr
    model = THLModel.from_pretrained(str(out))
    assert result.stdout == generate_text(model, Tokenizer(), "", max_length=8, seed=0)


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_generate_path_option(model_dir, path):
    args = ("generate", "Hello", "--model", str(model_dir), "--max-length", "12", "--temperature", "0")
    assert run(*args, "--path", path).stdout == run(*args).stdout
