"""benchmarks/ablation.py: every row is a valid `thl-np train` command that changes what it says, and the
script runs end to end (--quick), writes its table with finite figures, and resumes (done rows skipped)."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

from thl_np.cli.train import train as train_command
from thl_np.cli.train_init import parse_sets, start_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
CORPUS = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 1200).encode()


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = module   # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("ablation", None)


def row_setup(ablation, row, tmp_path):
    """(model config, the flags click parsed) of a row's `thl-np train` command, without training."""
    args = ablation.parse_args(["--data", "x", "--out", str(tmp_path)])
    argv = ablation.train_argv(args, row, str(tmp_path / "run"))[1:]
    ctx = train_command.make_context("train", list(argv))
    p = ctx.params
    config = start_model(p["init"], p["config_file"], p["dim"], p["memory_slots"], p["write_rate"], p["dtype"],
                         parse_sets(p["sets"]))
    return config, p


def test_every_row_is_a_valid_command_that_changes_what_it_names(ablation, tmp_path):
    names = [r.name for r in ablation.ROWS]
    assert len(set(names)) == len(names) and names[0] == "baseline"
    base_config, base_flags = row_setup(ablation, ablation.ROWS[0], tmp_path)
    assert (base_config.embedding_dim, base_config.memory_slots, base_config.memory_decay) == (64, 16, 1.0)
    assert base_flags["task_mix"] == 0.9 and base_flags["seq_len_text"] == "128:1024"
    fields = ("local_window", "memory_slots", "write_rate", "novelty_theta", "memory_decay", "components",
              "underuse_weight")
    unit_keys = ("components", {"router": "unit_keys"})
    want = {"no_local": [("local_window", 0)], "J64": [("memory_slots", 64)], "J256": [("memory_slots", 256)],
            "write_rate_0.2": [("write_rate", 0.2)], "theta_0.6": [("novelty_theta", 0.6)],
            "gamma_0.9995": [("memory_decay", 0.9995)], "unit_keys": [unit_keys],
            "unit_keys_protect": [unit_keys, ("underuse_weight", -1)]}
    for row in ablation.ROWS[1:]:
        config, flags = row_setup(ablation, row, tmp_path)
        changed = {f: getattr(config, f) for f in fields if getattr(config, f) != getattr(base_config, f)}
        if row.name == "hard_routing":
            assert not changed and flags["routing"] == "hard" and base_flags["routing"] is None
        else:
            assert changed == dict(want[row.name]), row.name


def test_set_can_name_component_variants(ablation, tmp_path):
    from thl_np.components import router
    from thl_np.components.registry import register

    # a variant as a plugin would register it (here the spec's own functions under another name)
    register("router", "ablation_router", router.router_forward, router.router_backward, replace=True)
    row = ablation.Row("variant", "a router variant", ["--set", 'components={"router": "ablation_router"}'])
    config, _ = row_setup(ablation, row, tmp_path)
    assert config.components == {"router": "ablation_router"}


def test_quick_runs_end_to_end_and_resumes(ablation, tmp_path):
    data = tmp_path / "corpus.py"
    data.write_bytes(CORPUS)
    out = tmp_path / "abl"
    said = []
    args = ["--data", str(data), "--out", str(out), "--quick", "--no-plot"]
    assert ablation.main(args + ["--rows", "baseline"], say=said.append) == 0
    assert ablation.main(args + ["--rows", "baseline,hard_routing"], say=said.append) == 0
    assert any("[baseline] done before: skipped" in s for s in said)
    assert sum("[baseline] training" in s for s in said) == 1                # trained once
    table = (out / "ablation.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| baseline") or ln.startswith("| hard_routing")]
    assert len(lines) == 2 and "| 2 |" in lines[0] and "0.1, 0.9" in table
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["baseline", "hard_routing"]
    for r in rows:
        assert r["steps"] == 2 and r["train_wall_s"] > 0
        for name in ("bpb_carried", "bpb_fresh", "train_loss"):
            assert math.isfinite(r[name]) and r[name] > 0
        pk = r["passkey"]["200"]
        assert pk["trials"] == 2 and 0 <= pk["accuracy"] <= 1 and math.isfinite(pk["key_bits_per_digit"])
        assert all(0.1 <= d <= 0.9 for d in pk["key_depths"])
    # a row whose figures are lost but whose run is whole: resumed (no new step), the same figures
    first = json.loads((out / "rows" / "hard_routing.json").read_text())
    os.remove(out / "rows" / "hard_routing.json")
    said.clear()
    assert ablation.main(args + ["--rows", "hard_routing"], say=said.append) == 0
    again = json.loads((out / "rows" / "hard_routing.json").read_text())
    assert any("[hard_routing] resuming" in s for s in said)
    for name in ("steps", "bpb_carried", "bpb_fresh", "passkey", "train_loss"):
        assert again[name] == first[name], name


def test_bad_settings_stop_before_any_work(ablation, tmp_path, capsys):
    data = tmp_path / "corpus.py"
    data.write_bytes(CORPUS)
    (tmp_path / "file").write_text("x")
    said = []
    assert ablation.main(["--data", str(data), "--out", str(tmp_path / "file"), "--quick"], say=said.append) == 1
    assert "is a file" in said[-1]
    assert ablation.main(["--data", str(data), "--out", str(tmp_path / "o"), "--lengths", "50"],
                         say=said.append) == 1
    assert "too short" in said[-1] and not (tmp_path / "o").exists()
    assert ablation.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")], say=said.append) == 1
    assert "does not exist" in said[-1]
    with pytest.raises(SystemExit):
        ablation.parse_args(["--data", str(data), "--out", str(tmp_path / "o"), "--rows", "nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
