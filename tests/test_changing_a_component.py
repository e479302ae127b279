"""docs/CHANGING_A_COMPONENT.md runs as written: the variant file, its gradient check, training it with
``thl-np train --path plain``, generating and evaluating with it. Also the registry's rules."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thl_np import THLConfig, THLModel
from thl_np.components.registry import components_for, register
from thl_np.errors import ConfigError, InputError
from thl_np.model import choose_fast

DOC = Path(__file__).resolve().parents[1] / "docs" / "CHANGING_A_COMPONENT.md"


def _blocks():
    return re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_worked_example_runs(tmp_path):
    blocks = _blocks()
    assert [kind for kind, _ in blocks] == ["python", "python", "bash", "bash"]
    (tmp_path / "hard_read.py").write_text(blocks[0][1])
    (tmp_path / "check.py").write_text(blocks[1][1])
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    out = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\d+ OK, 0 NOT OK, 0 skipped", out.stdout, re.M), out.stdout
    script = blocks[2][1] + blocks[3][1]
    out = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done: step 10/10" in out.stdout and "passkey retrieval" in out.stdout
    saved = json.loads((next((tmp_path / "runs" / "hard").glob("step-*")) / "model" / "config.json").read_text())
    assert saved["components"] == {"router": "hard_read"}
    # without the plugin the run's model is refused with the reason, in a fresh process
    out = subprocess.run(["thl-np", "generate", "--model", "runs/hard", "x"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "not registered" in out.stderr and "Traceback" not in out.stderr


def _variant(name="test_scaled_gru"):
    """A GRU variant with the spec's math (so it must agree with the spec everywhere)."""
    from thl_np.components.gru import gru_backward, gru_forward

    return register("gru", name, gru_forward, gru_backward, replace=True)


def test_a_variant_runs_on_the_plain_path_and_equals_the_spec():
    _variant()
    base = dict(dim=8, vocab_size=20, memory_slots=5, num_heads=2, head_dim=3, query_dim=3, local_window=3,
                dtype="float64")
    spec = THLModel(THLConfig(**base), seed=1)
    var = THLModel(THLConfig(**base, components={"gru": "test_scaled_gru"}), params=spec.params)
    ids = np.random.default_rng(0).integers(0, 20, size=(2, 9))
    assert not choose_fast(var.config, "auto") and choose_fast(spec.config, "auto")
    with pytest.raises(InputError, match="no kernels"):
        var(ids, path="fast")
    a, _ = spec(ids)                       # fast path
    b, _ = var(ids)                        # auto -> plain (variant)
    np.testing.assert_allclose(a, b, atol=1e-12)
    dec = var.decoder(batch_size=2)        # the plain decoding session
    np.testing.assert_allclose(dec.prompt(ids), a, atol=1e-12)
    np.testing.assert_allclose(dec.clone().step(ids[:, 0]), spec.decoder(spec(ids)[1]).step(ids[:, 0]), atol=1e-12)


def test_registry_rules():
    with pytest.raises(ConfigError, match="no component kind"):
        register("nope", "x", lambda: 0, lambda: 0)
    with pytest.raises(ConfigError, match="other than 'spec'"):
        register("gru", "spec", lambda: 0, lambda: 0)
    _variant("test_twice")
    with pytest.raises(ConfigError, match="already registered"):
        register("gru", "test_twice", lambda: 0, lambda: 0)
    with pytest.raises(ConfigError, match="not registered"):
        THLConfig(components={"router": "missing"})
    with pytest.raises(ConfigError, match="no component kind"):
        THLConfig(components={"head": "x"})
    c = THLConfig(components={"router": "spec"})
    assert c.components == {} and "components" not in c.to_dict()      # config.json as the PyTorch THL's
    assert components_for(THLConfig(components={"gru": "test_twice"})).custom() == ["gru=test_twice"]
