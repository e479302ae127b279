"""thl_np.io.convert and `thl-np convert`: PyTorch checkpoints become thl-np folders without torch and
without running pickled code. The fixtures under tests/fixtures were written by make_torch_fixtures.py."""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thl_np.config import THLConfig
from thl_np.errors import WeightsError
from thl_np.io.convert import convert_pytorch_checkpoint, read_torch_state_dict
from thl_np.io.safetensors import (
    bf16_bits_to_float32,
    float_to_bf16_bits,
    list_tensors,
    read_metadata,
    read_safetensors,
    write_safetensors,
)
from thl_np.params import init_params, param_shapes

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "torch_tiny"


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "torch_tiny_expected.npz") as data:
        return {name: data[name] for name in data.files}


def converted(tmp_path, src=TINY, **kwargs):
    out = tmp_path / "out"
    lines = []
    config = convert_pytorch_checkpoint(src, out, log=lines.append, **kwargs)
    return out, config, lines


# ---------------------------------------------------------------------------------------------- good files
def test_converted_tensors_equal_the_originals_exactly(tmp_path, expected):
    out, config, _ = converted(tmp_path)
    tensors, _ = read_safetensors(out / "model.safetensors")
    assert list(tensors) == list(param_shapes(config))  # checkpoint order
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32, name
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_strided_and_shared_storages_are_rebuilt(expected):
    """The fixture stores router.W_k.weight as a transposed view and three biases as views of one
    storage at offsets 0, d, 2d: a reader ignoring strides or offsets would get these wrong."""
    tensors = read_torch_state_dict(TINY / "pytorch_model.bin")
    for name in ("router.W_k.weight", "tiers.cells.0.W_r.bias", "tiers.cells.0.W_h.bias"):
        np.testing.assert_array_equal(tensors[name], expected[name], err_msg=name)
        assert tensors[name].flags.c_contiguous and tensors[name].flags.owndata


def test_config_gets_write_rate_one_and_says_so(tmp_path):
    source = json.loads((TINY / "config.json").read_text())
    assert source["write_rate"] != 1.0
    out, config, lines = converted(tmp_path)
    assert config.write_rate == 1.0
    assert THLConfig.load(str(out)) == config
    assert config == THLConfig(**{**source, "write_rate": 1.0})
    assert any("write_rate" in line and "1.0" in line for line in lines)


def test_metadata_records_format_and_config(tmp_path):
    out, config, _ = converted(tmp_path)
    metadata = read_metadata(out / "model.safetensors")
    assert metadata["format"] == "thl-np" and metadata["format_version"] == "1"
    assert THLConfig.from_dict(json.loads(metadata["config"])) == config


@pytest.mark.parametrize("dtype,code", [("float32", "F32"), ("float16", "F16"), ("float64", "F64"),
                                        ("bfloat16", "BF16")])
def test_storage_dtype_option(tmp_path, expected, dtype, code):
    out, _, _ = converted(tmp_path, dtype=dtype)
    assert {t.dtype for t in list_tensors(out / "model.safetensors")} == {code}
    tensors, _ = read_safetensors(out / "model.safetensors")
    for name, value in expected.items():
        if dtype == "bfloat16":
            want = bf16_bits_to_float32(float_to_bf16_bits(value))
        else:
            want = value.astype(dtype)
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)


def test_bfloat16_checkpoint_is_widened_exactly(expected):
    """torch rounded the fixture to bf16; widening must give back exactly those values (and our own
    rounding of the float32 originals must agree with torch's)."""
    tensors = read_torch_state_dict(FIXTURES / "torch_tiny_bf16" / "pytorch_model.bin")
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], bf16_bits_to_float32(float_to_bf16_bits(value)))


def test_fixture_script_and_fixtures_agree(expected):
    """The committed npz is what make_torch_fixtures.tiny_weights() computes (the script imports without
    torch; torch is only needed to run it)."""
    spec = importlib.util.spec_from_file_location("make_torch_fixtures", FIXTURES / "make_torch_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = module.tiny_weights()
    assert set(weights) == set(expected)
    for name, value in weights.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_safetensors_source_folder_is_accepted(tmp_path, expected):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text((TINY / "config.json").read_text())
    write_safetensors(src / "model.safetensors", expected)
    out, _, _ = converted(tmp_path, src=src)
    tensors, _ = read_safetensors(out / "model.safetensors")
    np.testing.assert_array_equal(tensors["embedding.weight"], expected["embedding.weight"])


# ---------------------------------------------------------------------------------------------- the model
def test_converted_model_computes_the_plain_forward(tmp_path, expected):
    model_module = pytest.importorskip("thl_np.model")
    out, config, _ = converted(tmp_path)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 12))
    loaded = model_module.THLModel.from_pretrained(str(out))
    direct = model_module.THLModel(config, params={k: v.copy() for k, v in expected.items()})
    logits, _ = loaded(ids)
    want, _ = direct(ids)
    np.testing.assert_array_equal(logits, want)


def storage_precision_errors(tmp_path):
    """Max |logit - float64 logit| for a small float64 model whose weights are stored in each precision."""
    model_module = pytest.importorskip("thl_np.model")
    config = THLConfig(vocab_size=50, dim=16, num_tiers=2, tier_dims=[16, 16], tier_timescales=[1, 2],
                       local_window=4, memory_slots=16, query_dim=8, num_heads=2, head_dim=8, read_topk=2,
                       dtype="float64")
    model = model_module.THLModel(config, params=init_params(config, seed=0, dtype=np.float64))
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 24))
    reference, _ = model(ids)
    errors = {}
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        folder = tmp_path / dtype
        model.save_pretrained(str(folder), dtype=dtype)
        logits, _ = model_module.THLModel.from_pretrained(str(folder), dtype="float64")(ids)
        errors[dtype] = float(np.max(np.abs(logits - reference)))
    return errors


def test_storage_precision_costs(tmp_path):
    """Each narrower storage costs more logit accuracy, and even bfloat16 stays usable."""
    errors = storage_precision_errors(tmp_path)
    assert errors["float64"] == 0.0
    assert 0.0 <= errors["float32"] < 1e-5
    assert errors["float32"] < errors["float16"] < errors["bfloat16"] < 0.5


# ------------------------------------------------------------------------------------------ bad checkpoints
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch):
    marker = "thl_np_pwned_marker"  # make_torch_fixtures.MARKER: the payload would create it in the cwd
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError) as err:
        convert_pytorch_checkpoint(FIXTURES / "torch_malicious", tmp_path / "out")
    message = str(err.value)
    assert "torch_malicious" in message and "posix.system" in message
    assert not (tmp_path / marker).exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_tensor_is_listed(tmp_path):
    with pytest.raises(WeightsError) as err:
        convert_pytorch_checkpoint(FIXTURES / "torch_missing", tmp_path / "out")
    message = str(err.value)
    assert "torch_missing" in message and "missing tensor writer.W_r.weight" in message


def test_misshaped_and_extra_tensors_are_listed(tmp_path):
    with pytest.raises(WeightsError) as err:
        convert_pytorch_checkpoint(FIXTURES / "torch_misshaped", tmp_path / "out")
    message = str(err.value)
    assert "torch_misshaped" in message
    assert "local_attn.q.weight has shape [8, 4], expected [4, 8]" in message
    assert "unexpected tensor extra.weight" in message


def test_legacy_torch_format_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="legacy") as err:
        convert_pytorch_checkpoint(FIXTURES / "torch_legacy", tmp_path / "out")
    assert "torch_legacy" in str(err.value)


def test_folder_problems(tmp_path):
    with pytest.raises(WeightsError, match="not a folder"):
        convert_pytorch_checkpoint(tmp_path / "absent", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((TINY / "config.json").read_text())
    with pytest.raises(WeightsError, match="neither pytorch_model.bin nor model.safetensors"):
        convert_pytorch_checkpoint(empty, tmp_path / "out")
    with pytest.raises(WeightsError, match="choose a new folder"):
        convert_pytorch_checkpoint(TINY, TINY)
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="is a file"):
        convert_pytorch_checkpoint(TINY, tmp_path / "file")


def test_non_finite_weights_are_refused(tmp_path, expected):
    src = tmp_path / "nan"
    src.mkdir()
    (src / "config.json").write_text((TINY / "config.json").read_text())
    bad = dict(expected)
    bad["writer.W_w.bias"] = bad["writer.W_w.bias"].copy()
    bad["writer.W_w.bias"][3] = np.nan
    write_safetensors(src / "model.safetensors", bad)
    with pytest.raises(WeightsError, match="writer.W_w.bias"):
        convert_pytorch_checkpoint(src, tmp_path / "out")


# ---------------------------------------------------------------------------------------- hand-made pickles
class _Global:
    """A reference to module.name, written into the pickle verbatim (no import needed to write it)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only accepts callables as the function of a reduce
        raise NotImplementedError


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Pid:
    def __init__(self, pid):
        self.pid = pid


class _TorchLikePickler(pickle._Pickler):
    """Writes pickles shaped like torch.save's, from stand-ins, so tests need no torch."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
ODICT = _Global("collections", "OrderedDict")


def tensor(key, numel, offset, size, stride, storage="FloatStorage"):
    pid = _Pid(("storage", _Global("torch", storage), key, "cpu", numel))
    return _Call(REBUILD, pid, offset, size, stride, False, _Call(ODICT))


def checkpoint(path, obj, storages, byteorder=b"little", prefix="archive/"):
    buffer = io.BytesIO()
    _TorchLikePickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(prefix + "data.pkl", buffer.getvalue())
        archive.writestr(prefix + "byteorder", byteorder)
        for key, data in storages.items():
            archive.writestr(f"{prefix}data/{key}", data)
    return path


def test_hand_made_checkpoint_round_trip(tmp_path):
    data = np.arange(12, dtype=np.float32)
    state = {"a": tensor("0", 12, 2, (2, 3), (1, 2)), "s": tensor("0", 12, 11, (), ())}
    path = checkpoint(tmp_path / "c.bin", state, {"0": data.tobytes()})
    tensors = read_torch_state_dict(path)
    np.testing.assert_array_equal(tensors["a"], np.lib.stride_tricks.as_strided(data[2:], (2, 3), (4, 8)))
    assert tensors["s"].shape == () and tensors["s"] == 11.0


def test_big_endian_storage(tmp_path):
    data = np.array([1.5, -2.0, 3.25], dtype=">f8")
    path = checkpoint(tmp_path / "c.bin", {"a": tensor("0", 3, 0, (3,), (1,), "DoubleStorage")},
                      {"0": data.tobytes()}, byteorder=b"big")
    np.testing.assert_array_equal(read_torch_state_dict(path)["a"], [1.5, -2.0, 3.25])


@pytest.mark.parametrize("module,name", [
    ("posix", "system"), ("os", "system"), ("builtins", "eval"), ("builtins", "getattr"),
    ("subprocess", "Popen"), ("torch", "load"), ("numpy.core.multiarray", "_reconstruct"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("collections", "namedtuple"),
])
def test_any_other_global_is_refused(tmp_path, module, name):
    path = checkpoint(tmp_path / "c.bin", {"a": _Call(_Global(module, name), "echo pwned")}, {})
    with pytest.raises(WeightsError, match=f"refers to {module}.{name}") as err:
        read_torch_state_dict(path)
    assert str(path) in str(err.value)


BAD_CHECKPOINTS = {
    "past the storage": (lambda: {"a": tensor("0", 4, 2, (3,), (1,))}, {"0": bytes(16)}, "reaches element"),
    "stride past it": (lambda: {"a": tensor("0", 4, 0, (2, 2), (3, 1))}, {"0": bytes(16)}, "reaches element"),
    "negative stride": (lambda: {"a": tensor("0", 4, 3, (2,), (-1,))}, {"0": bytes(16)}, "invalid layout"),
    "size not tuple": (lambda: {"a": tensor("0", 4, 0, [4], (1,))}, {"0": bytes(16)}, "invalid layout"),
    "rank mismatch": (lambda: {"a": tensor("0", 4, 0, (2, 2), (1,))}, {"0": bytes(16)}, "invalid layout"),
    "short storage": (lambda: {"a": tensor("0", 4, 0, (4,), (1,))}, {"0": bytes(12)}, "holds 12 bytes"),
    "no storage entry": (lambda: {"a": tensor("7", 4, 0, (4,), (1,))}, {}, "no archive/data/7"),
    "unknown storage": (lambda: {"a": tensor("0", 4, 0, (4,), (1,), "ComplexFloatStorage")}, {"0": bytes(32)},
                        "torch.ComplexFloatStorage"),
    "numel clash": (lambda: {"a": tensor("0", 4, 0, (4,), (1,)), "b": tensor("0", 2, 0, (2,), (1,))},
                    {"0": bytes(16)}, "both"),
    "odd persistent id": (lambda: {"a": _Pid(("storage", "x"))}, {}, "persistent id"),
    "not a tensor": (lambda: {"a": 3}, {}, "'a' is a int"),
    "non-string key": (lambda: {5: tensor("0", 1, 0, (1,), (1,))}, {"0": bytes(4)}, "key 5"),
    "not a dict": (lambda: [tensor("0", 1, 0, (1,), (1,))], {"0": bytes(4)}, "not a state_dict"),
    "call a storage type": (lambda: {"a": _Call(_Global("torch", "FloatStorage"), 1)}, {}, "malformed"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_hand_made_checkpoint(tmp_path, case):
    make, storages, words = BAD_CHECKPOINTS[case]
    path = checkpoint(tmp_path / "c.bin", make(), storages)
    with pytest.raises(WeightsError) as err:
        read_torch_state_dict(path)
    assert str(err.value).count(str(path)) == 1, str(err.value)
    assert words in str(err.value), str(err.value)


def test_build_cannot_rewrite_the_stand_ins(tmp_path):
    """BUILD (setstate) on a resolved global must fail instead of changing our functions."""
    buffer = io.BytesIO(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__N"
                        b"sb.")
    with zipfile.ZipFile(tmp_path / "c.bin", "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
    with pytest.raises(WeightsError, match="refusing"):
        read_torch_state_dict(tmp_path / "c.bin")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x80\x02}q\x00."])
def test_not_a_zip(tmp_path, content):
    path = tmp_path / "c.bin"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as err:
        read_torch_state_dict(path)
    assert str(path) in str(err.value)


def test_zip_without_a_pickle_or_with_a_broken_one(tmp_path):
    path = tmp_path / "c.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/other", b"x")
    with pytest.raises(WeightsError, match="data.pkl"):
        read_torch_state_dict(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02(((")
    with pytest.raises(WeightsError, match="malformed") as err:
        read_torch_state_dict(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("pickle_bytes", [
    b"\x80\x02N\x8a\x01\x00r\xff\xff\xff\x7f.",  # LONG_BINPUT 2**31 - 1: a 16 GiB memo table
    b"\x80\x02p99999999999\n.",                    # PUT with a huge decimal index
    b"\x80\x04\x8e\xff\xff\xff\xff\xff\x00\x00\x00.",  # BYTES8 promising a terabyte
])
def test_pickles_that_would_allocate_absurd_memory_are_refused(tmp_path, pickle_bytes):
    with zipfile.ZipFile(tmp_path / "c.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
    with pytest.raises(WeightsError, match="memo slot|malformed"):
        read_torch_state_dict(tmp_path / "c.bin")


def test_unwraps_a_nested_state_dict(tmp_path):
    state = {"state_dict": collections.OrderedDict(a=tensor("0", 1, 0, (1,), (1,)))}
    path = checkpoint(tmp_path / "c.bin", state, {"0": np.float32(7).tobytes()})
    assert read_torch_state_dict(path)["a"][0] == 7.0


def _tiny_archive_entries():
    with zipfile.ZipFile(TINY / "pytorch_model.bin") as archive:
        return {name: archive.read(name) for name in archive.namelist()}


TINY_ENTRIES = _tiny_archive_entries()
TINY_PICKLE = next(name for name in TINY_ENTRIES if name.endswith("/data.pkl"))
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(TINY_ENTRIES[TINY_PICKLE]) - 1), st.integers(0, 255)),
                      max_size=4),
       cut=st.one_of(st.none(), st.integers(0, len(TINY_ENTRIES[TINY_PICKLE]))))
def test_fuzz_mutated_pickle(tmp_path, flips, cut):
    """Damage the real state_dict pickle (re-zipped with a valid CRC, so the damage reaches the
    unpickler): the result is a WeightsError or a state_dict, never another exception or a hang."""
    data = bytearray(TINY_ENTRIES[TINY_PICKLE])
    for position, value in flips:
        data[position] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path / "c.bin"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in TINY_ENTRIES.items():
            archive.writestr(name, bytes(data) if name == TINY_PICKLE else content)
    try:
        tensors = read_torch_state_dict(path)
    except WeightsError:
        return
    assert all(isinstance(v, np.ndarray) for v in tensors.values())


# ---------------------------------------------------------------------------------------------- the command
def test_cli_convert(tmp_path, expected):
    from click.testing import CliRunner

    from thl_np.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(TINY), str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "write_rate" in result.output and "1.0" in result.output
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    tensors, _ = read_safetensors(out / "model.safetensors")
    np.testing.assert_array_equal(tensors["output_head.weight"], expected["output_head.weight"])


def test_cli_convert_help_has_an_example():
    from click.testing import CliRunner

    from thl_np.cli import cli

    result = CliRunner().invoke(cli, ["convert", "--help"])
    assert result.exit_code == 0 and "thl-np convert" in result.output and "--dtype" in result.output


def test_cli_lists_the_storage_dtypes_the_writer_accepts():
    from thl_np.cli import weights
    from thl_np.io.safetensors import STORAGE_DTYPES

    assert weights.STORAGE_DTYPES == STORAGE_DTYPES


def test_cli_convert_error_is_one_line(tmp_path, capsys):
    from thl_np.cli import main

    assert main(["convert", str(FIXTURES / "torch_malicious"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "posix.system" in err and "Traceback" not in err


def test_recorded_pytorch_thl_checkpoint_reproduces_its_logits(tmp_path):
    """A PyTorch-format checkpoint (torch.save of the state_dict + config.json) holding the weights of a
    recorded PyTorch THL run converts without torch and reproduces that run's own logits: float64 to 1e-9,
    float32 compute to 1e-4."""
    import thl_np

    src = FIXTURES / "pytorch_thl_recorded"
    convert_pytorch_checkpoint(src, tmp_path / "converted")
    run = np.load(src / "recorded_run.npz")
    state = thl_np.InferenceState(
        timestep=int(run["state_in.timestep"]),
        tiers=[run[k] for k in sorted(run.files) if k.startswith("state_in.tier_state_")],
        memory=run["state_in.memory"], read_ema=run["state_in.read_ema"], write_ema=run["state_in.write_ema"],
        last_read=run["state_in.last_read"], last_write=run["state_in.last_write"],
        local_buffer=run["state_in.local_buffer"], local_valid=int(run["state_in.local_valid"]))
    for dtype, tol in (("float64", 1e-9), ("float32", 1e-4)):
        model = thl_np.THLModel.from_pretrained(tmp_path / "converted", dtype=dtype)
        logits, _ = model(run["input_ids"], state=state)
        assert np.abs(logits - run["logits"]).max() < tol, dtype
