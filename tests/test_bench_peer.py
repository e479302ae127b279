"""`python benchmarks/bench_peer.py --peer PATH` (`thl-np bench` with the PyTorch THL harness): the PyTorch THL
measured beside thl-np in the same run.

The error paths run everywhere; the runs need torch and the PyTorch THL's folder (../shared/peer beside the
checkout, or THL_PEER) and are skipped without them (CI installs no torch). Nothing here asserts a speed."""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from thl_np import THLConfig, THLModel
from thl_np.cli import main
from thl_np.errors import ConfigError

PEER = Path(os.environ.get("THL_PEER", Path(__file__).resolve().parents[2] / "shared" / "peer"))


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


needs_peer = pytest.mark.skipif(not (_has_torch() and (PEER / "thl" / "__init__.py").is_file()),
                                reason="needs torch and the PyTorch THL's folder (THL_PEER)")


@pytest.fixture(autouse=True)
def harness(monkeypatch):
    """What benchmarks/bench_peer.py does before it runs `thl-np bench`."""
    import thl_np.cli.bench
    from benchmarks import bench_peer

    monkeypatch.setattr(thl_np.cli.bench, "PEER_HARNESS", bench_peer)


def _run(capsys, *argv):
    code = main(["bench", "--dim", "16", "--memory-slots", "8", "--decode-steps", "2", "--prompt-len", "4",
                 "--no-train", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ refused early
def test_a_folder_without_thl_is_refused_before_any_work(tmp_path, capsys):
    code, out, err = _run(capsys, "--peer", tmp_path)
    assert code == 1 and out == "", out                       # nothing built, nothing measured
    assert len(err.strip().splitlines()) == 1
    assert "holds no thl/ package" in err and str(tmp_path / "thl" / "__init__.py") in err


def test_no_torch_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "thl").mkdir()
    (tmp_path / "thl" / "__init__.py").write_text("")
    monkeypatch.setitem(sys.modules, "torch", None)           # `import torch` raises ImportError
    code, out, err = _run(capsys, "--peer", tmp_path)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--peer needs torch" in err and "thl-np[torch]" in err


def test_a_thl_package_that_is_not_the_peer_is_refused_and_forgotten(tmp_path, capsys, monkeypatch):
    import types

    (tmp_path / "thl").mkdir()
    (tmp_path / "thl" / "__init__.py").write_text("")         # imports, but has no inference.state / THLModel
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    for name in [m for m in sys.modules if m == "thl" or m.startswith("thl.")]:   # a real one, restored after
        monkeypatch.delitem(sys.modules, name)
    code, out, err = _run(capsys, "--peer", tmp_path)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert f"--peer {tmp_path}: its thl package does not import" in err
    assert "thl" not in sys.modules                            # the fake is not left under the name thl
    assert str(tmp_path) not in sys.path


def test_float64_is_refused(capsys):
    code, out, err = _run(capsys, "--peer", PEER, "--dtype", "float64")
    assert code == 1 and out == "" and "--peer compares float32 with float32" in err


def test_component_variants_and_task_models_have_no_peer():
    from types import SimpleNamespace

    from benchmarks.bench_peer import check_config

    with pytest.raises(ConfigError, match="component variants"):
        check_config(SimpleNamespace(components={"gru": "a_variant"}, task=None))
    with pytest.raises(ConfigError, match="no PyTorch THL counterpart"):
        check_config(SimpleNamespace(components={}, task="sequence_classification"))
    check_config(THLConfig(dim=16, memory_slots=8))


# ------------------------------------------------------------------------------------------ with the peer
@needs_peer
def test_peer_gets_the_same_weights_or_says_it_did_not():
    import torch

    from benchmarks.bench_peer import PeerModel, load_peer

    peer = load_peer(PEER)
    config = THLConfig(dim=16, memory_slots=8, vocab_size=40)
    model = THLModel(config, seed=3)
    pm = PeerModel(peer, config, model.params)
    assert pm.weights == "the same weights as thl-np"
    state = pm.model.state_dict()
    assert set(state) == set(model.params)
    for name, value in model.params.items():
        assert np.array_equal(state[name].numpy(), np.asarray(value, np.float32)), name
    # a decoder runs the peer's steps: logits [B, V] for B sequences, finite
    dec = pm.decoder(3)
    for _ in range(3):
        logits = dec.step(np.array([1, 2, 3]))
    assert tuple(logits.shape) == (3, 40) and bool(torch.isfinite(logits).all())
    # a weight it cannot take: its own init, said so
    params = dict(model.params)
    del params["output_head.bias"]
    other = PeerModel(peer, config, params)
    assert other.weights.startswith("its own random init (same config): it refused") and "output_head.bias" in \
        other.weights


@needs_peer
def test_peer_training_step_is_forward_and_backward():
    from benchmarks.bench_peer import load_peer, train_tokens_per_s

    tps, weights = train_tokens_per_s(load_peer(PEER), THLConfig(dim=16, memory_slots=8, vocab_size=40),
                                      seq_len=6, batch_size=2, repeats=1)
    assert math.isfinite(tps) and tps > 0 and weights == "the same weights as thl-np"


@needs_peer
def test_bench_prints_the_peer_beside_thl_np(capsys):
    code, out, err = _run(capsys, "--int8", "none", "--peer", PEER, "--json")
    assert code == 0, err
    figures, text = json.loads(out), err
    assert "the same weights as thl-np" in text and figures["peer_weights"] == "the same weights as thl-np"
    for B in (1, 8):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"PyTorch THL decode batch {B}:"))
        peer, ours = figures[f"peer_decode_b{B}_tok_s"], figures[f"decode_b{B}_tok_s"]
        ratio = figures[f"decode_b{B}_vs_peer"]
        assert peer > 0 and math.isfinite(ratio) and ratio == pytest.approx(ours / peer)
        assert f"float32 {ratio:.2f}x" in line
    assert figures["prompt_vs_peer"] == pytest.approx(figures["prompt_tok_s"] / figures["peer_prompt_tok_s"])
    assert "PyTorch THL prompt (4 tokens, all logits)" in text
    assert "PyTorch THL training not measured (--no-train)" in text and "peer_train_tok_s" not in figures
    assert not any(k.startswith("int8_") for k in figures)


def test_the_installed_cli_points_to_the_harness(tmp_path, capsys, monkeypatch):
    """The harness is not in the package: `thl-np bench --peer` alone says where it is, in one line."""
    import thl_np.cli.bench

    monkeypatch.setattr(thl_np.cli.bench, "PEER_HARNESS", None)
    code, out, err = _run(capsys, "--peer", tmp_path)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "python benchmarks/bench_peer.py --peer PATH" in err


def test_the_harness_runs_as_a_script(tmp_path):
    """`python benchmarks/bench_peer.py --peer PATH` is `thl-np bench --peer PATH` with the harness set."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_peer.py"), "--dim", "16",
                          "--memory-slots", "8", "--peer", str(tmp_path)], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert run.returncode == 1 and "holds no thl/ package" in run.stderr, run.stderr[-2000:]
