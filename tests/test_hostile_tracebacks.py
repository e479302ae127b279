"""Issue 24, items 9-17: tracebacks and kills instead of one line, memory that grew with the prompt, claims.

Hostile input, second round (issue 24, items 9-17): each case is reproduced and gets one clear line."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thl_np.cli import main
from thl_np.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 9: a plot's file suffix is checked with its location, before the work ---------------------------------
@pytest.mark.parametrize("argv", [["--memory-plot", "x.jsonl"], ["--diagnostics", "--plot", "out.txt"],
                                  ["--memory-plot", "noext"]])
def test_plot_suffix_checked_before_the_work(capsys, tmp_path, argv):
    argv = [str(tmp_path / a) if "." in a or a == "noext" else a for a in argv]
    code, out, err = run(capsys, "eval", "--model", tmp_path / "missing-model", *argv)
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "image" in err and ".png" in err
    assert not any(tmp_path.iterdir())


# -- 10: TaskModel.save_pretrained: one clear error, checked before writing, nothing left behind -------------
def _task_model():
    from thl_np import THLConfig
    from thl_np.finetune.models import THLForSequenceClassification

    config = THLConfig(dim=8, memory_slots=4, local_window=2, num_tiers=2)
    return THLForSequenceClassification(config, num_labels=2, seed=0)


@pytest.mark.parametrize("where,dtype", [("file", None), ("/proc/x", None), ("/sys/kernel/thl-x", None),
                                         ("new", "int4")])
def test_task_model_save_pretrained_refused_before_writing(tmp_path, monkeypatch, where, dtype):
    from thl_np.errors import WeightsError
    from thl_np.io import folder

    (tmp_path / "file").write_text("x")
    target = where if where.startswith("/") else str(tmp_path / where)
    written = []
    monkeypatch.setattr(folder, "write_safetensors", lambda *a, **k: written.append(a))
    with pytest.raises((InputError, WeightsError)) as info:
        _task_model().save_pretrained(target, dtype=dtype)
    assert "\n" not in str(info.value) and (target in str(info.value) or "int4" in str(info.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and not written
    assert not os.path.lexists("/proc/x")


# -- 11: ragged multiple-choice input: an InputError naming the rule ---------------------------------------
def test_multiple_choice_ragged_choices_name_the_rule():
    from thl_np import THLConfig
    from thl_np.finetune.models import THLForMultipleChoice

    model = THLForMultipleChoice(THLConfig(dim=8, memory_slots=4, local_window=2, num_tiers=2), seed=0)
    with pytest.raises(InputError, match=r"ragged.*\[B, C, T\].*same length"):
        model([[[1, 2], [3]]])
    with pytest.raises(InputError, match="ragged.*labels"):
        model([[[1, 2], [3, 4]]], labels=[[0], []])


# -- 12: Ctrl-C while the command line's imports run: "interrupted", exit 130 ------------------------------
def test_importing_the_entry_point_is_cheap():
    """The console script imports thl_np.cli before main() can catch anything: that import loads neither
    NumPy nor click, so a Ctrl-C in the first second lands inside main's handler."""
    code = "import sys, thl_np.cli; print(sorted(m for m in ('numpy', 'click', 'thl_np.model') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_ctrl_c_during_the_cli_imports_is_one_line_and_130(capsys, monkeypatch):
    import builtins

    import thl_np.cli

    real_import = builtins.__import__

    def interrupted_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name in ("app", "thl_np.cli.app") or (level and name == "" and "app" in (fromlist or ())):
            raise KeyboardInterrupt
        return real_import(name, globals, locals, fromlist, level)

    import importlib

    real_import_module = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, package=None: (_ for _ in ()).throw(
        KeyboardInterrupt) if name.endswith("app") else real_import_module(name, package))
    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    monkeypatch.delitem(sys.modules, "thl_np.cli.app", raising=False)
    monkeypatch.delattr(thl_np.cli, "app", raising=False)
    code = thl_np.cli.main(["info"])
    _, err = capsys.readouterr()
    assert code == 130 and err == "interrupted\n"


# -- 13: finetune from an int8 model: one line ---------------------------------------------------------------
def test_finetune_from_an_int8_model_is_one_line(capsys, tmp_path):
    assert run(capsys, "init", "--out", tmp_path / "m", "--dim", "8", "--memory-slots", "4")[0] == 0
    assert run(capsys, "quantize", "--model", tmp_path / "m", "--out", tmp_path / "m8")[0] == 0
    data = tmp_path / "t.jsonl"
    data.write_text('{"text":"good","label":1}\n{"text":"bad","label":0}\n')
    code, _, err = run(capsys, "finetune", "--task", "sequence-classification", "--model", tmp_path / "m8",
                       "--data", data, "--out", tmp_path / "ft", "--steps", "1", "--batch-size", "2")
    assert code == 1 and err.count("\n") == 1 and len(err) < 300, err
    assert "int8" in err and "float model" in err and "problem(s)" not in err
    assert not (tmp_path / "ft").exists()


# -- 14: an int8 scale whose s·127 overflows float32: refused at load, naming the tensor ---------------------
def test_int8_scale_that_overflows_float32_is_refused_at_load(tmp_path):
    from thl_np import THLConfig, THLModel, WeightsError, quantize_model
    from thl_np.io.safetensors import read_safetensors, write_safetensors

    config = THLConfig(dim=8, memory_slots=4, local_window=2, num_tiers=2, dtype="float32")
    quantize_model(THLModel(config, seed=0)).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors, metadata = read_safetensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors["router.W_q.weight_scale"].flat[0] = 3e38
    write_safetensors(path, tensors, metadata=metadata)
    with pytest.raises(WeightsError, match=r"router\.W_q\.weight_scale.*too large.*float32"):
        THLModel.from_pretrained(tmp_path)


# -- 15: plugins: a file given twice loads once; sys.exit names the plugin; a wrong shape names the variant ---
PLUGIN = '''
from thl_np.components.registry import register
from thl_np.components.router import router_backward, router_forward


def forward(*args, **kwargs):
    r, alpha, idx, cache = router_forward(*args, **kwargs)
    return r[:, :-1], alpha, idx, cache  # one value too few


register("router", "test_short_read", forward, router_backward)
'''


def test_the_same_plugin_twice_loads_once(capsys, tmp_path):
    plugin = tmp_path / "short_read_a.py"
    plugin.write_text(PLUGIN.replace("test_short_read", "test_short_read_a"))
    code, out, err = run(capsys, "--plugin", plugin, "--plugin", plugin, "--plugin", f"{tmp_path}/./short_read_a.py",
                         "info", "--model", tmp_path / "missing")
    assert "already registered" not in err and "plugin '" not in err and "does not exist" in err, err


def test_a_plugin_calling_sys_exit_is_named(capsys, tmp_path):
    plugin = tmp_path / "quitter.py"
    plugin.write_text("import sys\nsys.exit(3)\n")
    code, out, err = run(capsys, "--plugin", plugin, "info")
    assert code != 0 and err.count("\n") == 1 and "quitter.py" in err and "sys.exit(3)" in err, err


def test_a_variant_returning_the_wrong_shape_is_named(tmp_path):
    from thl_np import THLConfig, THLModel
    from thl_np.components.registry import load_plugin
    from thl_np.errors import ConfigError

    plugin = tmp_path / "short_read_b.py"
    plugin.write_text(PLUGIN.replace("test_short_read", "test_short_read_b"))
    load_plugin(str(plugin))
    config = THLConfig(dim=8, memory_slots=4, local_window=2, num_tiers=2, components={"router": "test_short_read_b"})
    model = THLModel(config, seed=0)
    with pytest.raises(ConfigError, match=r"router=test_short_read_b.*the read r of shape \[1, \d+\], expected"):
        model(np.array([[1, 2, 3]]), path="plain")


GRU_PLUGIN = '''
from thl_np.components.gru import gru_backward, gru_forward
from thl_np.components.registry import register


def backward(*args, **kwargs):
    return tuple(o * SCALE if hasattr(o, "shape") else o for o in gru_backward(*args, **kwargs))


register("gru", NAME, gru_forward, backward)
'''


@pytest.mark.parametrize("scale,code", [(1.0, 0), (1.5, 1)])
def test_gradcheck_command_checks_a_plugins_backward(capsys, tmp_path, scale, code):
    plugin = tmp_path / f"gru_{code}.py"
    plugin.write_text(f"SCALE = {scale}\nNAME = 'test_gc_gru_{code}'\n" + GRU_PLUGIN)
    got, out, err = run(capsys, "gradcheck", "--plugin", plugin, "--seq-len", "3")
    assert got == code, out + err
    assert f"gru=test_gc_gru_{code}" in out
    if code:
        assert "does not match" in err and err.count("\n") == 1


# -- 16: prefill keeps only the last logits (generate, eval --passkey, --state-out / --state-in) ------------
def _head_calls(monkeypatch, module):
    shapes = []
    real = module.output_forward

    def recording(params, tier_states, *a, **k):
        shapes.append(tuple(np.shape(tier_states)))
        return real(params, tier_states, *a, **k)

    monkeypatch.setattr(module, "output_forward", recording)
    return shapes


def test_generate_on_the_plain_path_applies_the_head_to_the_last_position_only(monkeypatch):
    import thl_np.model
    from thl_np import THLConfig, THLModel, generate_text

    model = THLModel(THLConfig(vocab_size=259, dim=8, memory_slots=4, local_window=2, num_tiers=2), seed=0)
    shapes = _head_calls(monkeypatch, thl_np.model)
    text, state = generate_text(model, None, "x" * 300, max_length=3, temperature=0, return_state=True,
                                path="plain")
    assert shapes and all(len(s) == 2 for s in shapes), shapes  # [B, D]: never [B, T, D] → [B, T, V]
    again, _ = generate_text(model, None, "y" * 50, max_length=2, state=state, return_state=True, path="plain")
    assert all(len(s) == 2 for s in shapes), shapes
    # the same numbers as the full forward's last row
    logits, _ = model(np.frombuffer(b"x" * 300, np.uint8)[None].astype(np.int64), path="plain")
    last, _ = model.prompt(np.frombuffer(b"x" * 300, np.uint8)[None].astype(np.int64), path="plain")
    np.testing.assert_allclose(last, logits[:, -1], rtol=1e-5, atol=1e-6)  # the head on [B, D] vs [B, T, D]


def test_plain_decoder_prompt_last_keeps_no_per_position_array(monkeypatch):
    pytest.importorskip("numba")  # the decoders' package imports the fast one
    from thl_np import THLConfig, THLModel
    from thl_np.engines import plain_decoder

    model = THLModel(THLConfig(vocab_size=259, dim=8, memory_slots=4, local_window=2, num_tiers=2), seed=0)
    shapes = _head_calls(monkeypatch, plain_decoder)
    ids = np.arange(40)[None] % 250
    last = plain_decoder.PlainDecoder(model, batch_size=1).prompt(ids, logits="last")
    assert shapes == [(1, model.config.total_tier_dim)]
    full = plain_decoder.PlainDecoder(model, batch_size=1).prompt(ids, logits="all")
    np.testing.assert_allclose(last, full[:, -1], rtol=1e-5, atol=1e-6)


def test_a_gru_variant_returning_the_wrong_shape_is_named():
    from thl_np import THLConfig, THLModel
    from thl_np.components.gru import gru_backward, gru_forward
    from thl_np.components.registry import register
    from thl_np.errors import ConfigError

    def short(*args):
        s, cache = gru_forward(*args)
        return s[:, :-1], cache

    register("gru", "test_short_gru", short, gru_backward, replace=True)
    config = THLConfig(dim=8, memory_slots=4, local_window=2, num_tiers=2, components={"gru": "test_short_gru"})
    with pytest.raises(ConfigError, match=r"gru=test_short_gru.*tier 0's state of shape \[1, \d+\], expected"):
        THLModel(config, seed=0)(np.array([[1, 2]]), path="plain")
