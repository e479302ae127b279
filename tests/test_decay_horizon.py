"""benchmarks/decay_horizon.py: the state is carried from block to block (a stream cut into blocks scores
what it scores whole), the block score is the mean negative log2-probability, and bad arguments are refused."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config

from thl_np import THLModel
from thl_np.errors import InputError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decay_horizon.py"


@pytest.fixture(scope="module")
def horizon():
    spec = importlib.util.spec_from_file_location("decay_horizon", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blocks_carry_the_state(horizon):
    model = THLModel(tiny_config(), seed=3)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 301)
    whole = horizon.stream(model, ids, 300)
    blocks = horizon.stream(model, ids, 70)
    assert len(whole) == 1 and len(blocks) == 5 and blocks[-1]["end"] == 300
    sizes = [70, 70, 70, 70, 20]
    mean = sum(b["bits_per_byte"] * n for b, n in zip(blocks, sizes, strict=True)) / 300
    assert mean == pytest.approx(whole[0]["bits_per_byte"], rel=1e-12)
    assert blocks[-1]["norm_max"] == pytest.approx(whole[0]["norm_max"], rel=1e-12)
    # a fresh state per block would score differently: the carry is what the comparison checks
    fresh = sum(horizon.stream(model, ids[s:s + 71], 70)[0]["bits_per_byte"] * n
                for s, n in zip(range(0, 300, 70), sizes, strict=True)) / 300
    assert fresh != pytest.approx(whole[0]["bits_per_byte"], rel=1e-9)


def test_block_bits_is_the_mean_negative_log2_probability(horizon):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 5))
    targets = rng.integers(0, 5, 7)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert horizon.block_bits(logits, targets) == pytest.approx(-np.log2(p[np.arange(7), targets]).mean())
    assert horizon.block_bits(np.zeros((3, 4)), np.array([0, 1, 2])) == pytest.approx(2.0)


@pytest.mark.parametrize("argv", [["default", "--gammas", "0"], ["default", "--gammas", "1.5"],
                                  ["default", "--bytes", "1"], ["default", "--block", "0"]])
def test_bad_arguments_are_refused(horizon, argv):
    with pytest.raises(InputError):
        horizon.main(argv)
