"""benchmarks/passkey_batched.py: all of a length's passkey trials in one batch give `thl-np eval --passkey`'s
row (the same keys, prompts, answers, teacher-forced bits and control), on the fast path and on the plain
path of a variant without kernels."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config

from thl_np import THLModel
from thl_np.config import parse_overrides
from thl_np.errors import ConfigError
from thl_np.eval.long_context import passkey_eval

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "passkey_batched.py"


@pytest.fixture(scope="module")
def batched():
    spec = importlib.util.spec_from_file_location("passkey_batched", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("components", [None, {"memory_write": "decay_on_write"}])
def test_batched_rows_equal_passkey_eval(batched, components):
    model = THLModel(tiny_config(vocab_size=256, components=components, memory_decay=0.9), seed=4)
    want = passkey_eval(model, lengths=[300], trials=3, depth=(0.1, 0.9), seed=7, filler="source")["results"][0]
    have = batched.evaluate(model, 300, 3, 7)
    for key in ("correct", "digit_accuracy", "forced_digit_accuracy"):
        assert have[key] == want[key], key
    for key in ("key_bits_per_digit", "control_bits_per_digit"):
        np.testing.assert_allclose(have[key], want[key], rtol=1e-5, err_msg=key)
    assert [s["answer"] for s in want["samples"]] == have["answers"][:len(want["samples"])]


def test_overrides_are_json_or_strings():
    assert parse_overrides(['components={"memory_write": "decay_on_write"}', "memory_decay=1", "x=abc"]) == {
        "components": {"memory_write": "decay_on_write"}, "memory_decay": 1, "x": "abc"}
    for bad in (["memory_decay"], ["=1"]):
        with pytest.raises(ConfigError, match="FIELD=VALUE"):
            parse_overrides(bad)
