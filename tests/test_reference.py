"""Reference vectors for ports: the committed reference/ folder, `thl-np golden`, `thl-np check-port`,
and the two documents built on them (docs/PORTING.md runs as written, docs/SPEC_MAP.md is up to date)."""
import importlib.util
import itertools
import json
import math
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from thl_np import reference as R
from thl_np.cli import cli, main
from thl_np.io.safetensors import read_safetensors

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "reference"
DOCS = ROOT / "docs"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((REF / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A fresh `thl-np golden` run (once per module: it takes a few seconds)."""
    out = tmp_path_factory.mktemp("golden") / "reference"
    result = invoke("golden", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "wrote 26 reference cases" in result.output
    return out


# ------------------------------------------------------------------------------------------ regeneration
def _files(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _close(a: np.ndarray, b: np.ndarray, what: str):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
    if a.dtype.kind != "f":
        assert np.array_equal(a, b), f"{what} differs"
        return
    scale = max(1.0, float(np.abs(b).max()) if b.size else 0.0)
    tol = 1e-12 if a.dtype == np.float64 else 1e-5   # float32 runs may differ in the last bits elsewhere
    err = float(np.abs(a.astype(np.float64) - b).max()) if b.size else 0.0
    assert err <= tol * scale, f"{what} differs by {err:.2e} (scale {scale:.2e})"


def _json_close(a, b, where="manifest"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _json_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _json_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_committed_reference_equals_a_fresh_generation(fresh):
    assert _files(fresh) == _files(REF), "file sets differ: regenerate with `thl-np golden --out reference`"
    identical = 0
    for rel in sorted(_files(REF)):
        a, b = fresh / rel, REF / rel
        if a.read_bytes() == b.read_bytes():
            identical += 1
            continue
        if rel.endswith(".npz"):
            za, zb = R.load_npz(a), R.load_npz(b)
            assert za.keys() == zb.keys(), rel
            for k in za:
                _close(za[k], zb[k], f"{rel}:{k}")
        elif rel.endswith(".safetensors"):
            ta, tb = read_safetensors(a)[0], read_safetensors(b)[0]
            assert ta.keys() == tb.keys(), rel
            for k in ta:
                _close(np.asarray(ta[k]), np.asarray(tb[k]), f"{rel}:{k}")
        elif rel.endswith(".json"):
            _json_close(json.loads(a.read_text(encoding="utf-8")), json.loads(b.read_text(encoding="utf-8")),
                        rel)
        else:
            assert a.read_text(encoding="utf-8") == b.read_text(encoding="utf-8"), rel
    assert identical > 0


# ------------------------------------------------------------------------------------------ the folder
def test_manifest_describes_every_file_and_key(manifest):
    listed = {"manifest.json", "README.md"}
    for cid, case in manifest["cases"].items():
        for name in case["inputs"]:
            listed.add(f"{cid}/{name}")
        for dt in R.DTYPES:
            listed.add(f"{cid}/outputs_{dt}.npz")
            arrays = R.load_npz(REF / cid / f"outputs_{dt}.npz")
            assert arrays.keys() == case["outputs"].keys(), cid
            for key, info in case["outputs"].items():
                assert list(arrays[key].shape) == info["shape"], f"{cid}:{key}"
                assert (arrays[key].dtype.kind == "i") == (info["kind"] == "exact"), f"{cid}:{key}"
                if info["kind"] != "exact":
                    assert arrays[key].dtype == np.dtype(dt), f"{cid}:{key}"
        if "inputs.npz" in case["inputs"]:
            arrays = R.load_npz(REF / cid / "inputs.npz")
            assert {k: list(v.shape) for k, v in arrays.items()} == {
                k: v["shape"] for k, v in case["inputs"]["inputs.npz"].items()}, cid
    assert listed == _files(REF)
    size = sum((REF / f).stat().st_size for f in listed)
    assert size < 3_000_000, f"reference/ is {size / 1e6:.2f} MB"
    assert manifest["tolerances"] == {"float64": {"atol": 1e-9, "rtol": 1e-8},
                                      "float32": {"atol": 2e-3, "rtol": 3e-2}}


def test_every_discrete_choice_is_far_from_a_tie_and_every_branch_is_reached(manifest):
    thresholds = manifest["margins"]["thresholds"]
    for case in R.SEQUENCE_CASES:
        entry = manifest["cases"][f"cases/{case.name}"]
        for key, value in entry["margins"].items():
            assert value is None or value >= thresholds[key], (case.name, key, value)   # None: never decided
        for key, need in case.require.items():
            assert entry["counts"][key] >= need, (case.name, key)
    counts = {c.name: manifest["cases"][f"cases/{c.name}"]["counts"] for c in R.SEQUENCE_CASES}
    assert counts["long_lru"]["novel_lru"] >= 20 and counts["small_default"]["novel_empty"] >= 1
    assert counts["multi_write_capacity"]["capacity_fallback_heads"] >= 1
    assert manifest["cases"]["training/adamw_10"]["margins"]["grad_clip"] >= thresholds["grad_clip"]
    norms = R.load_npz(REF / "training/adamw_10/outputs_float64.npz")["grad_norm"]
    clip = manifest["cases"]["training/adamw_10"]["inputs"]["train.json"]["grad_clip"]
    assert (norms > clip).any() and (norms < clip).any(), "the trajectory should clip some steps, not all"


def test_float32_reference_sits_well_inside_the_float32_tolerance_of_float64(manifest):
    tol = manifest["tolerances"]["float32"]
    for cid, case in manifest["cases"].items():
        a64 = R.load_npz(REF / cid / "outputs_float64.npz")
        a32 = R.load_npz(REF / cid / "outputs_float32.npz")
        for key, info in case["outputs"].items():
            ok, d_abs, d_rel, msg = R.compare_arrays(a32[key], a64[key], info["kind"], tol["atol"] / 10,
                                                     tol["rtol"] / 10)
            assert ok, f"{cid}:{key} float32 is {d_abs:.1e} / {d_rel:.1e} from float64 {msg}"


# ------------------------------------------------------------------------------------------ check-port
def test_check_port_on_the_reference_itself_passes(manifest):
    total = sum(len(c["outputs"]) for c in manifest["cases"].values())
    for dt in R.DTYPES:
        report = R.compare_results(REF, REF, dtype=dt)
        assert report.ok and report.failed == 0 and report.passed == total
    result = invoke("check-port", REF, "--reference", REF, "--case", "components/writer_*",
                    "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("44 passed, 0 failed")
    assert result.output.count("components/writer_") == 4


def _copy_case(case: str, results: Path, dtype="float64") -> Path:
    dst = results / case / f"outputs_{dtype}.npz"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REF / case / f"outputs_{dtype}.npz", dst)
    return dst


def test_a_gradient_off_by_one_part_in_a_million_fails_and_is_named(tmp_path, manifest):
    case, key = "cases/small_default", "grad.router.W_q.weight"
    path = _copy_case(case, tmp_path)
    arrays = R.load_npz(path)
    arrays[key] = arrays[key] * (1 + 1e-6)
    R.save_npz(path, arrays)
    result = invoke("check-port", tmp_path, "--case", case)
    assert result.exit_code == 1, result.output
    failing = [ln for ln in result.output.splitlines() if "NOT OK" in ln]
    assert len(failing) == 1, result.output
    assert re.match(r"\s+NOT OK\s+grad\.router\.W_q\.weight\s", failing[0]), result.output
    assert "max rel 1.0e-06" in failing[0]
    n = len(manifest["cases"][case]["outputs"])
    assert result.output.rstrip().endswith(f"{n - 1} passed, 1 failed")
    # the same key, off by 1e-10 relative, is within the float64 gradient tolerance (1e-8)
    arrays[key] = R.load_npz(REF / case / "outputs_float64.npz")[key] * (1 + 1e-10)
    R.save_npz(path, arrays)
    assert invoke("check-port", tmp_path, "--case", case).exit_code == 0
    # ... and --rtol tightens it
    assert invoke("check-port", tmp_path, "--case", case, "--rtol", "1e-12").exit_code == 1


def test_missing_files_and_keys_are_reported_with_the_expected_path(tmp_path):
    path = _copy_case("components/gru_cell", tmp_path)
    arrays = R.load_npz(path)
    del arrays["grad.W_h"], arrays["z"]            # a required key and an optional one
    R.save_npz(path, arrays)
    result = invoke("check-port", tmp_path, "--case", "gru_cell", "--case", "components/router")
    assert result.exit_code == 1
    out = result.output
    expected = tmp_path / "components" / "router" / "outputs_float64.npz"
    assert f"missing file: expected {expected}" in out
    assert re.search(r"NOT OK\s+grad\.W_h\s.*key 'grad\.W_h' not in", out), out
    assert re.search(r"--\s+z\s+\(optional, not provided\)", out), out
    # passed: gru_cell's other 8 required and its 2 remaining optional keys; failed: grad.W_h + the router's 9
    assert out.rstrip().endswith("10 passed, 10 failed")


def test_check_port_errors_are_one_line(tmp_path, capsys):
    assert main(["check-port", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "outputs_float64.npz" in err and len(err.strip().splitlines()) == 1
    assert main(["check-port", str(tmp_path), "--case", "no_such_case"]) == 1
    err = capsys.readouterr().err
    assert "no reference case matches 'no_such_case'" in err and "components/gru_cell" in err
    assert main(["check-port", str(tmp_path), "--reference", str(tmp_path)]) == 1
    assert "no manifest.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the int8 case
INT8 = "cases/small_int8"


def _run_case_as_port(params, case_dir: Path, dtype: str, path="plain") -> dict:
    """thl-np plays a port on a sequence case: the outputs_<dtype>.npz keys from ``params`` (a float dict,
    or the QuantizedParams of a loaded int8 model)."""
    import thl_np

    config = thl_np.THLConfig.load(case_dir).replace(dtype=dtype)
    if not isinstance(params, dict):
        model = thl_np.THLModel(config, params=params, dtype=dtype)
    else:
        model = thl_np.THLModel(config.replace(quantization=None), params=params, dtype=dtype)
    inputs = R.load_npz(case_dir / "inputs.npz")
    state = thl_np.InferenceState.load(case_dir / "state_in.npz").copy(dtype)
    logits, state_out = model(inputs["input_ids"], state=state, path=path)
    loss, grads, d_state = thl_np.value_and_grad(model, inputs["input_ids"], inputs["targets"], state=state,
                                                 return_state_grad=True, path=path)
    out = {"logits": logits, "loss": loss}
    out.update({f"state_out.{k}": v for k, v in state_out.arrays().items()})
    out.update({f"grad.{k}": v for k, v in grads.items()})
    out.update({f"grad_state.{k}": v for k, v in d_state.items()})
    return out


def _write_results(results: Path, case: str, dtype: str, arrays: dict) -> None:
    (results / case).mkdir(parents=True, exist_ok=True)
    np.savez(results / case / f"outputs_{dtype}.npz", **arrays)


def test_int8_case_stores_the_quantization_format(manifest):
    from thl_np.quant import SCALE_SUFFIX

    tensors, meta = read_safetensors(REF / INT8 / "model.safetensors")
    config = json.loads((REF / INT8 / "config.json").read_text(encoding="utf-8"))
    assert config["quantization"] == {"method": "int8", "block_size": None}
    assert json.loads(meta["config"])["quantization"] == config["quantization"]
    entry = manifest["cases"][INT8]
    assert entry["quantization"]["scheme"] == "int8-row"
    described = entry["inputs"]["model.safetensors"]
    assert {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()} == described
    matrices = [k for k, v in tensors.items() if v.ndim == 2 and not k.endswith(SCALE_SUFFIX)]
    assert len(matrices) == 16 and "output_head.weight" in matrices and "embedding.weight" in matrices
    for name in matrices:
        q, s = tensors[name], tensors[name + SCALE_SUFFIX]
        assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (q.shape[0], 1), name
        assert np.abs(q).max(axis=1).tolist() == [127] * q.shape[0], name     # max |W| of a row sits on ±127
        assert np.all(s > 0), name
    for name, v in tensors.items():
        if v.ndim == 1:
            assert v.dtype == np.float64, name
    # gradients are diagnostics here (an int8 port may be inference-only); forward values are required
    required = {k for k, v in entry["outputs"].items() if v["required"]}
    assert "logits" in required and "loss" in required and "state_out.memory" in required
    assert not any(k.startswith("grad") for k in required)
    counts = entry["counts"]
    assert counts["novel_empty"] >= 1 and counts["novel_lru"] >= 2 and counts["refine"] >= 2


def test_int8_case_a_port_that_dequantizes_passes(tmp_path):
    """A port's own reader (s·q by hand, per row) and thl-np's int8 loader both pass check-port on the
    int8 case, in both precisions, with every optional gradient too."""
    from thl_np import THLModel
    from thl_np.quant import SCALE_SUFFIX

    tensors, _ = read_safetensors(REF / INT8 / "model.safetensors")
    by_hand = {}
    for name, v in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        by_hand[name] = v.astype(np.float64) if scale is None else scale.astype(np.float64) * v.astype(np.float64)
    n = 0
    for dtype in R.DTYPES:
        port = {k: v.astype(dtype) for k, v in by_hand.items()}   # float32: W rounded once, as the doc says
        _write_results(tmp_path / "hand", INT8, dtype, _run_case_as_port(port, REF / INT8, dtype))
        report = R.compare_results(tmp_path / "hand", REF, cases=[INT8], dtype=dtype)
        skipped = {c.key for c in report.checks if c.status == "SKIPPED"}
        assert report.ok and all(k == "tier_states" or k.startswith("trace.") for k in skipped), skipped
        n = report.passed
        loaded = THLModel.from_pretrained(REF / INT8, dtype=dtype)
        assert loaded.params.quantized_names() == [k for k in tensors if tensors[k].dtype == np.int8]
        for path in ("plain", "auto"):   # the plain path dequantizes; auto runs the int8 kernels in float32
            _write_results(tmp_path / path, INT8, dtype, _run_case_as_port(loaded.params, REF / INT8, dtype, path))
            report = R.compare_results(tmp_path / path, REF, cases=[INT8], dtype=dtype)
            assert report.ok and report.passed == n, (path, R.format_report(report))
    result = invoke("check-port", tmp_path / "plain", "--case", "small_int8", "--quiet")
    assert result.exit_code == 0 and result.output.rstrip().endswith(f"{n} passed, 0 failed"), result.output


def test_int8_case_a_port_that_ignores_the_scales_fails(tmp_path):
    tensors, _ = read_safetensors(REF / INT8 / "model.safetensors")
    wrong = {k: v.astype(np.float64) for k, v in tensors.items() if not k.endswith("_scale")}  # W = q
    arrays = _run_case_as_port(wrong, REF / INT8, "float64")
    _write_results(tmp_path, INT8, "float64", {k: v for k, v in arrays.items() if not k.startswith("grad")})
    result = invoke("check-port", tmp_path, "--case", INT8)
    assert result.exit_code == 1, result.output
    failing = {ln.split()[2] for ln in result.output.splitlines() if ln.strip().startswith("NOT OK")}
    assert {"logits", "loss", "state_out.memory", "state_out.tier_state_0"} <= failing, result.output
    # the row scales laid along the columns instead (a transposed reading of the layout) fails as well
    per_column = {}
    for name, v in tensors.items():
        if name.endswith("_scale"):
            continue
        s = tensors.get(name + "_scale")
        if s is None:
            per_column[name] = v.astype(np.float64)
        else:
            cols = np.resize(s[:, 0].astype(np.float64), v.shape[1])
            per_column[name] = v.astype(np.float64) * cols[None, :]
    _write_results(tmp_path, INT8, "float64", {k: v for k, v in _run_case_as_port(per_column, REF / INT8,
                                                                                   "float64").items()
                                               if not k.startswith("grad")})
    result = invoke("check-port", tmp_path, "--case", INT8)
    assert result.exit_code == 1 and "NOT OK  logits" in result.output, result.output


def test_compare_arrays_kinds():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]])
    assert R.compare_arrays(ref + 1e-10, ref, "value", 1e-9, 1e-8)[0]
    assert not R.compare_arrays(ref + 1e-8, ref, "value", 1e-9, 1e-8)[0]
    ok, d_abs, d_rel, _ = R.compare_arrays(ref + 2e-8, ref, "grad", 1e-9, 1e-8)
    assert ok and d_abs == pytest.approx(2e-8) and d_rel == pytest.approx(5e-9)   # relative to max|ref| = 4
    assert not R.compare_arrays(ref + 1e-7, ref, "grad", 1e-9, 1e-8)[0]
    ok, _, _, msg = R.compare_arrays(ref[:1], ref, "value", 1, 1)
    assert not ok and "shape [1, 2], expected [2, 2]" in msg
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert "non-finite" in R.compare_arrays(bad, ref, "value", 1, 1)[3]
    idx = np.array([3, 1, 2])
    assert R.compare_arrays(idx.astype(np.float32), idx, "exact", 0, 0)[0]
    assert not R.compare_arrays(np.array([3, 2, 1]), idx, "exact", 0, 0)[0]
    assert R.compare_arrays(np.array([0.5]), np.array(0.5), "value", 1e-9, 1e-8)[0]   # 1-element "scalar"
    assert R.compare_arrays(np.zeros(3), np.zeros(3), "grad", 1e-9, 1e-8)[0]           # all-zero gradient


def test_the_checker_stands_alone():
    """check.py is the file a porter reads (docs/PORTING.md): NumPy, the standard library and thl-np's
    errors only, so it can be read in one sitting and its rule copied."""
    import ast

    tree = ast.parse((ROOT / "thl_np" / "reference" / "check.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    outside = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names | {"numpy", "__future__"}}
    assert outside == {"..errors"}, outside


def test_select_cases(manifest):
    assert R.select_cases(manifest, ["gru_cell"]) == ["components/gru_cell"]
    assert R.select_cases(manifest, ["cases/*"]) == [f"cases/{c.name}" for c in R.SEQUENCE_CASES]
    assert len(R.select_cases(manifest, ["router*"])) == 3
    assert R.select_cases(manifest, None) == list(manifest["cases"])


# ------------------------------------------------------------------------------------------ the docs
def _expand(text: str) -> set:
    """`a.{x,y}.b, c` → {a.x.b, a.y.b, c}: the PORTING.md table's shorthand."""
    out = set()
    for item in re.split(r",\s*(?![^{]*\})", text):
        item = item.strip()
        if not item:
            continue
        parts = re.split(r"(\{[^}]*\})", item)
        choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
        out |= {"".join(c) for c in itertools.product(*choices)}
    return out


def test_porting_doc_component_table_matches_the_manifest(manifest):
    text = (DOCS / "PORTING.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(components/\w+)` \| (§[\w.]+) \|(.*?)\|(.*?)\|(.*?)\|$", text, re.M)
    components = [cid for cid, c in manifest["cases"].items() if c["kind"] == "component"]
    assert [r[0] for r in rows] == components
    for cid, spec, inputs, required, optional in rows:
        case = manifest["cases"][cid]
        assert case["spec"] == [spec], cid
        assert _expand(inputs) == set(case["inputs"]["inputs.npz"]), cid
        assert _expand(required) == {k for k, v in case["outputs"].items() if v["required"]}, cid
        assert _expand(optional) == {k for k, v in case["outputs"].items() if not v["required"]}, cid


def test_porting_doc_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (DOCS / "PORTING.md").read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference").symlink_to(REF, target_is_directory=True)
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, str(DOCS / "PORTING.md"), "exec"), {"__name__": "porting_doc"})
    commands = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()
                if ln.startswith("thl-np ")]
    assert len(commands) >= 3
    for line in commands:
        assert main(shlex.split(line)[1:]) == 0, line
        out = capsys.readouterr().out
        assert ", 0 failed" in out and "NOT OK" not in out, out
    # the listing the doc shows is the one the command prints (up to the last digits)
    shown = re.search(r"```text\nreference /path/to/thl-np/reference\n(.*?)```", text, re.S).group(1)
    main(["check-port", "my_port_results", "--case", "components/gru_cell"])
    printed = capsys.readouterr().out.split("\n", 1)[1]

    def shape(s):
        return re.sub(r"\d\.\de[+-]\d\d", "#", s)

    assert shape(printed.strip()) == shape(shown.strip())


def test_spec_map_is_up_to_date():
    spec = importlib.util.spec_from_file_location("make_spec_map", DOCS / "make_spec_map.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module           # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    expected = module.render()
    current = (DOCS / "SPEC_MAP.md").read_text(encoding="utf-8")
    assert current == expected, "docs/SPEC_MAP.md is out of date: run `python docs/make_spec_map.py`"
    for section in ("§4.1", "§4.2", "§4.3", "§4.4", "§4.5", "§4.6", "§4.7", "§4.8", "§4.9", "§5"):
        assert f"\n## {section} " in current


def test_default_reference_dir_after_a_plain_install(tmp_path, monkeypatch):
    """Installed away from the checkout (`pip install .`), check-port finds reference/ in the working
    directory, the checkout's root; with neither, it names the folder beside the package."""
    from thl_np.reference import check

    site = tmp_path / "site-packages" / "thl_np" / "reference"
    site.mkdir(parents=True)
    monkeypatch.setattr(check, "__file__", str(site / "check.py"))
    root = tmp_path / "checkout"
    (root / "reference").mkdir(parents=True)
    monkeypatch.chdir(root)
    beside = str(tmp_path / "site-packages" / "reference")
    assert check.default_reference_dir() == beside          # no manifest anywhere yet
    (root / "reference" / "manifest.json").write_text("{}")
    assert check.default_reference_dir() == str(root / "reference")
    (tmp_path / "site-packages" / "reference").mkdir()
    (tmp_path / "site-packages" / "reference" / "manifest.json").write_text("{}")
    assert check.default_reference_dir() == beside          # beside the package wins
