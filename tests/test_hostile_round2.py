"""Issue 24, items 1-8: hostile input on the newer surfaces (convert of thl-np folders, run-folder locks,
finetune --out, temporary names, labels, undecodable JSONL and arguments, batch memory, passkey lengths)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from thl_np.config import THLConfig
from thl_np.params import init_params

TINY = dict(vocab_size=256, dim=16, num_tiers=2, tier_dims=[16, 16], tier_timescales=[1, 2], local_window=4,
            memory_slots=8, query_dim=8, num_heads=2, head_dim=8, read_topk=2, write_rate=0.05)


def _cli(args):
    from thl_np.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _model():
    from thl_np.model import THLModel

    config = THLConfig(**TINY)
    return THLModel(config, params=init_params(config, seed=0, dtype=np.float32))


IDS = np.random.default_rng(1).integers(0, 256, size=(1, 12))


# ------------------------------------------------------------------ 1. convert of a thl-np folder
@pytest.mark.parametrize("kind", ["float", "int8", "task"])
def test_convert_of_thl_np_folder_copies_it_unchanged(tmp_path, kind):
    from thl_np.model import THLModel, quantize_model

    src, out = tmp_path / "src", tmp_path / "out"
    if kind == "task":
        from thl_np.finetune.models import THLForSequenceClassification as Loader

        model = Loader(THLConfig(**TINY), num_labels=3)
    else:
        Loader = THLModel
        model = _model() if kind == "float" else quantize_model(_model())
    model.save_pretrained(str(src))
    result = _cli(["convert", src, out])
    assert result.exit_code == 0, result.output
    assert "-> 1.0" not in result.output
    a, b = Loader.from_pretrained(str(src)), Loader.from_pretrained(str(out))
    assert b.config.write_rate == 0.05
    la, lb = a(IDS, path="plain"), b(IDS, path="plain")
    la = la[0] if isinstance(la, tuple) else la
    lb = lb[0] if isinstance(lb, tuple) else lb
    la = getattr(la, "logits", la)
    lb = getattr(lb, "logits", lb)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


# ------------------------------------------------------------------ 4. temporary names unique per process
def test_temporary_names_are_unique_per_process(tmp_path, monkeypatch):
    import thl_np.config as config_module
    import thl_np.state as state_module

    seen = []
    real_open = open

    def spy(path, *a, **k):
        seen.append(os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    THLConfig(**TINY).save(str(tmp_path))
    _model().init_state(1).save(str(tmp_path / "s.npz"))
    monkeypatch.undo()
    temps = [p for p in seen if ".tmp" in p]
    assert temps and all(str(os.getpid()) in os.path.basename(p) for p in temps), temps
    assert config_module and state_module
