"""`thl-np export` and `thl-np check-port FILE.onnx`: the files written, check-port passing on the export and
naming the first divergent step and array on a perturbed one, the ORT format, and bad input (one line each,
before any work)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from thl_np.cli import cli, main  # noqa: E402
from thl_np.errors import InputError  # noqa: E402
from thl_np.onnx.runtime import OnnxStep, read_metadata  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
SMALL = os.path.join(ROOT, "reference", "cases", "small_default")   # a float64-trained model folder


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def one_line_error(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "small.onnx")
    result = run("export", "--model", SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_the_file_and_its_layout(small_export):
    assert os.path.getsize(small_export) > 0
    side = json.load(open(small_export + ".json"))
    assert side["thl_np.format"] == "thl-np-onnx-step" and side["thl_np.weights"] == "float32"
    assert side["thl_np.config"]["dtype"] == "float32" and side["thl_np.config"]["memory_slots"] == 16
    assert [r["name"] for r in side["thl_np.state_layout"]][:2] == ["timestep", "tier_state_0"]


def test_check_port_passes_on_the_export(small_export, capsys):
    assert main(["check-port", small_export, "--model", SMALL, "--steps", "66"]) == 0
    out = capsys.readouterr().out
    assert "OK: the export equals thl-np over 66 steps" in out and "NOT OK" not in out


@pytest.mark.parametrize("weight,index,array", [
    ("tiers.cells.0.W_h.bias", 0, "next_state.tier_state_0"),   # the tier state moves at step 0
    ("writer.W_w.bias", 3, "next_state.memory"),                # the write vector: the memory moves first
])
def test_check_port_names_the_first_divergence(small_export, tmp_path, capsys, weight, index, array):
    proto = onnx.load(small_export)
    init = next(t for t in proto.graph.initializer if t.name == weight)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[index] += 1e-3
    init.CopyFrom(onnx.numpy_helper.from_array(arr, weight))
    bad = str(tmp_path / "perturbed.onnx")
    onnx.save(proto, bad)
    with pytest.raises(SystemExit) as stop:   # check-port's status 1 for a failed check
        main(["check-port", bad, "--model", SMALL])
    out = capsys.readouterr().out
    assert stop.value.code == 1
    assert f"NOT OK: first divergence at step 0, array {array}" in out, out


def test_truncated_export_is_refused(small_export, tmp_path, capsys):
    cut = str(tmp_path / "cut.onnx")
    data = open(small_export, "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable ONNX model"):
        OnnxStep(cut)
    assert "not a readable ONNX model" in one_line_error(capsys, "check-port", cut, "--model", SMALL)


def _edited(small_export, tmp_path, edit):
    proto = onnx.load(small_export)
    edit(proto)
    path = str(tmp_path / "edited.onnx")
    onnx.save(proto, path)
    return path


def test_metadata_that_disagrees_with_the_graph_is_refused(small_export, tmp_path, capsys):
    def more_slots(proto):
        for p in proto.metadata_props:
            if p.key == "thl_np.config":
                cfg = json.loads(p.value)
                cfg["memory_slots"] = 17
                p.value = json.dumps(cfg)

    def renamed_output(proto):
        proto.graph.output[2].name = "next_state.something_else"

    for edit, match in ((more_slots, "disagrees with its config"), (renamed_output, "does not have")):
        path = _edited(small_export, tmp_path, edit)
        with pytest.raises(InputError, match=match):
            read_metadata(path)
        assert match in one_line_error(capsys, "check-port", path, "--model", SMALL)


def test_check_port_refuses_an_export_of_another_model(small_export, capsys):
    err = one_line_error(capsys, "check-port", small_export)   # against the shipped model
    assert "exported from another model" in err


# ------------------------------------------------------------------------------------------ bad input
def test_export_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    from thl_np import THLConfig, THLModel
    from thl_np.components import router
    from thl_np.components.registry import register
    from thl_np.model import quantize_model

    out = str(tmp_path / "x.onnx")
    # not a THL folder
    (tmp_path / "empty").mkdir()
    assert "config.json" in one_line_error(capsys, "export", "--model", str(tmp_path / "empty"), "--out", out)
    # an existing output without --force
    open(out, "w").write("keep")
    assert "--force" in one_line_error(capsys, "export", "--model", SMALL, "--out", out)
    assert open(out).read() == "keep"
    # an unwritable output: its folder is a file
    assert "is a file" in one_line_error(capsys, "export", "--model", SMALL, "--out", out + "/y.onnx")
    # a component variant with no lowering
    register("router", "onnx_test_router", router.router_forward, router.router_backward, replace=True)
    tiny = dict(vocab_size=20, embedding_dim=8, hidden_dim=8, num_tiers=2, tier_dims=[8, 8], tier_timescales=[1, 2],
                local_window=2, memory_slots=4, memory_dim=8, query_dim=4, value_dim=8, num_heads=2, head_dim=4,
                read_topk=2)
    folder = str(tmp_path / "variant")
    THLModel(THLConfig(**tiny, components={"router": "onnx_test_router"}), seed=0).save_pretrained(folder)
    err = one_line_error(capsys, "export", "--model", folder, "--out", str(tmp_path / "v.onnx"))
    assert "router=onnx_test_router has no ONNX lowering" in err
    # a quantization scheme with no lowering
    folder = str(tmp_path / "block32")
    quantize_model(THLModel(THLConfig(**tiny), seed=0), "int8-block32").save_pretrained(folder)
    err = one_line_error(capsys, "export", "--model", folder, "--out", str(tmp_path / "q.onnx"))
    assert "int8-block32 has no ONNX lowering" in err
    assert sorted(os.listdir(tmp_path)) == ["block32", "empty", "variant", "x.onnx"]


def test_export_help_has_examples():
    out = run("export", "--help").output
    assert "Examples:" in out and "\n    thl-np export --out thl.onnx" in out


def test_ort_format_loads_and_matches(tmp_path, small_export):
    out = str(tmp_path / "small.ort")
    result = run("export", "--format", "ort", "--model", SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    ops = open(out + ".required_operators.config").read()
    assert "TopK" in ops and "GatherND" in ops
    onnx_step = OnnxStep(small_export)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    state = onnx_step.zero_state(2)
    for t, ids in enumerate(([1, 2], [3, 4], [5, 6])):
        feeds = onnx_step.feeds(np.array(ids), state)
        want = onnx_step.session.run(None, feeds)
        got = sess.run(None, feeds)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"step {t}")
        _, state, _ = onnx_step.step(np.array(ids), state)


def test_bench_decoder_steps_like_the_export(small_export):
    """``thl-np bench --onnx`` times OnnxDecoder (the state kept as the session's own output arrays): its logits
    are the export's, step for step."""
    from thl_np.onnx.bench import OnnxBenchModel

    step = OnnxStep(small_export)
    dec = OnnxBenchModel(step).decoder(batch_size=2)
    state = step.zero_state(2)
    for ids in ([1, 2], [3, 4], [5, 6]):
        want, state, _ = step.step(np.array(ids), state)
        np.testing.assert_array_equal(dec.step(np.array(ids)), want)


def test_bench_onnx_bad_flags_are_one_line(capsys):
    assert "--onnx measures float32" in one_line_error(capsys, "bench", "--onnx", "--dtype", "float64")


def test_missing_onnx_extra_is_one_line(monkeypatch, capsys, tmp_path, small_export):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    for args in (["export", "--out", str(tmp_path / "x.onnx")], ["check-port", small_export],
                 ["bench", "--onnx"]):
        assert "pip install 'thl-np[onnx]'" in one_line_error(capsys, *args)


def test_bench_onnx_reports_onnxruntime_and_node_wasm_beside_thl_np(capsys):
    """`thl-np bench --onnx`: onnxruntime's decode beside the fast path at B = 1 and 8 with their ratios, and
    the Node WASM figure of the same export (web/bench.mjs) when Node and web/node_modules are there (CI has
    both: .ci/run installs them; elsewhere the line says it was not measured)."""
    from thl_np.onnx.bench import WEB_BENCH

    assert main(["bench", "--onnx", "--dim", "16", "--memory-slots", "8", "--decode-steps", "8", "--json"]) == 0
    out, text = capsys.readouterr()
    figures = json.loads(out)
    for B in (1, 8):
        assert figures[f"thl-np_b{B}"] > 0 and figures[f"onnxruntime_b{B}"] > 0
        assert figures[f"ratio_b{B}"] == pytest.approx(figures[f"onnxruntime_b{B}"] / figures[f"thl-np_b{B}"])
    web_ready = os.path.isdir(os.path.join(os.path.dirname(WEB_BENCH), "node_modules", "onnxruntime-web"))
    if os.environ.get("CI") == "true" or web_ready:
        assert figures["wasm_b1"] > 0 and figures["wasm_cpu_ms_per_step"] > 0
        assert figures["wasm_ratio_b1"] == pytest.approx(figures["wasm_b1"] / figures["thl-np_b1"])
        assert "onnxruntime-web WASM in Node" in text
    else:
        assert "wasm_b1" not in figures and "not measured" in text


def test_web_bench_found_in_the_working_directory_after_a_plain_install(tmp_path, monkeypatch):
    """`bench --onnx`'s Node run: web/ beside the package (a checkout), else web/ in the working directory."""
    from thl_np.onnx import bench

    monkeypatch.setattr(bench, "WEB_BENCH", str(tmp_path / "site-packages" / "web" / "bench.mjs"))
    monkeypatch.chdir(tmp_path)
    assert bench.web_bench_script() == bench.WEB_BENCH            # neither has onnxruntime-web
    (tmp_path / "web" / "node_modules" / "onnxruntime-web").mkdir(parents=True)
    assert bench.web_bench_script() == str(tmp_path / "web" / "bench.mjs")
