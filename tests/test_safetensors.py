"""thl_np.io.safetensors: the format round-trips, agrees with the reference package, memory-maps, and
turns every malformed file into a WeightsError that names the file (never an IndexError & co.)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thl_np.config import THLConfig
from thl_np.errors import WeightsError
from thl_np.io.safetensors import (
    bf16_bits_to_float32,
    check_finite,
    float_to_bf16_bits,
    list_tensors,
    read_metadata,
    read_safetensors,
    write_safetensors,
)
from thl_np.params import check_params

FIXTURES = Path(__file__).parent / "fixtures"
CASES = Path("/work/shared/conformance/cases")
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def sample_tensors():
    """One tensor of every dtype the format and NumPy share, including 0-d and empty ones."""
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal((2, 2, 2)),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i32": np.array([[1, -2], [3, 4]], dtype=np.int32),
        "i16": np.array([-5, 5], dtype=np.int16),
        "i8": np.array([-1, 2, 3], dtype=np.int8),
        "u8": np.array([0, 255], dtype=np.uint8),
        "u16": np.array([65535], dtype=np.uint16),
        "u32": np.array([2**32 - 1], dtype=np.uint32),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def small_file(tmp_path, name="w.safetensors"):
    path = tmp_path / name
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                             "b": np.array([1, 2], dtype=np.int64)}, metadata={"k": "v"})
    return path


def raw_file(path, header, data=b"", header_len=None):
    """A file with an arbitrary header (object or raw bytes) and data, for the bad-file tests."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_every_dtype(tmp_path, mmap):
    tensors = sample_tensors()
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"note": "hi"})
    back, metadata = read_safetensors(tmp_path / "x.safetensors", mmap=mmap)
    assert metadata == {"note": "hi"}
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype, name
        assert back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_mmap_views_are_read_only_and_zero_copy(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", sample_tensors())
    back, _ = read_safetensors(tmp_path / "x.safetensors")
    a = back["f32"]
    assert type(a) is np.ndarray and not a.flags.writeable and not a.flags.owndata
    base = a
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    copied, _ = read_safetensors(tmp_path / "x.safetensors", mmap=False)
    assert copied["f32"].flags.writeable


def test_layout_is_aligned_and_header_padded(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, sample_tensors())
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0
    for info in list_tensors(path):
        begin = json.loads(path.read_bytes()[8 : 8 + n])[info.name]["data_offsets"][0]
        assert begin % max(np.dtype(sample_tensors()[info.name].dtype).itemsize, 1) == 0, info


def test_tensors_keep_their_order_within_a_dtype(tmp_path):
    names = [f"t{i}" for i in (3, 1, 2, 0)]
    write_safetensors(tmp_path / "x.safetensors", {n: np.zeros(2, np.float32) for n in names})
    assert list(read_safetensors(tmp_path / "x.safetensors")[0]) == names


def test_list_tensors_and_metadata_read_the_header_only(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"w": np.zeros((2, 3), np.float32), "h": np.zeros(4, np.float16)},
                      metadata={"format": "thl-np"}, dtype=None)
    infos = {i.name: i for i in list_tensors(path)}
    assert infos["w"] == ("w", "F32", (2, 3), 24)
    assert infos["h"].dtype == "F16" and infos["h"].nbytes == 8
    assert read_metadata(path) == {"format": "thl-np"}


def test_empty_file_of_tensors(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {})
    assert read_safetensors(tmp_path / "x.safetensors") == ({}, {})
    write_safetensors(tmp_path / "y.safetensors", {"e": np.zeros((0,), np.float32)})
    assert read_safetensors(tmp_path / "y.safetensors")[0]["e"].shape == (0,)


# ---------------------------------------------------------------------------------------------- precisions
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_write_converts_floating_tensors_only(tmp_path, dtype):
    tensors = {"f": np.linspace(-3, 3, 11), "i": np.arange(4, dtype=np.int32)}
    write_safetensors(tmp_path / "x.safetensors", tensors, dtype=dtype)
    back, _ = read_safetensors(tmp_path / "x.safetensors")
    assert back["f"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back["f"], tensors["f"].astype(dtype))
    assert back["i"].dtype == np.int32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrowing_refuses_to_overflow(tmp_path, dtype):
    big = np.array([1.0, 7e4 if dtype == "float16" else 3.4e38], dtype=np.float32)
    with pytest.raises(WeightsError, match=f"'big'.*beyond {dtype}") as err:
        write_safetensors(tmp_path / "x.safetensors", {"big": big}, dtype=dtype)
    assert str(tmp_path / "x.safetensors") in str(err.value)
    inf = np.array([np.inf, -np.inf, 1.0], dtype=np.float32)  # already infinite: kept, not refused
    write_safetensors(tmp_path / "y.safetensors", {"inf": inf}, dtype=dtype)
    np.testing.assert_array_equal(read_safetensors(tmp_path / "y.safetensors")[0]["inf"], inf)


def test_bfloat16_is_read_as_float32(tmp_path):
    x = np.array([1.0, -2.5, 3.140625, 1e-3, 65504.0], dtype=np.float32)
    write_safetensors(tmp_path / "x.safetensors", {"x": x}, dtype="bfloat16")
    assert list_tensors(tmp_path / "x.safetensors")[0].dtype == "BF16"
    back, _ = read_safetensors(tmp_path / "x.safetensors")
    assert back["x"].dtype == np.float32
    np.testing.assert_array_equal(back["x"], bf16_bits_to_float32(float_to_bf16_bits(x)))
    np.testing.assert_allclose(back["x"], x, rtol=2**-8)


def test_bfloat16_rounding_matches_torch_on_float32():
    """The fixture holds torch's own float32 → bfloat16 results for awkward inputs
    (see make_torch_fixtures.py)."""
    ref = np.load(FIXTURES / "bf16_reference.npz")
    x, expected = ref["inputs"], ref["torch_bits"]
    ours = float_to_bf16_bits(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], expected[~nan])
    assert np.isnan(bf16_bits_to_float32(ours[nan])).all()


def _all_finite_bf16_as_float64():
    with np.errstate(invalid="ignore"):  # signalling-NaN patterns warn when widened
        values = bf16_bits_to_float32(np.arange(2**16, dtype=np.uint32).astype(np.uint16)).astype(np.float64)
    return np.unique(values[np.isfinite(values)])  # sorted; +0 and -0 merge


def test_bfloat16_rounding_from_float64_is_correctly_rounded():
    """From float64, round once: compare with exact midpoints between neighbouring bf16 values (exact in
    float64), ties to the even pattern. Rounding via float32 would be off on values just past a tie."""
    grid = _all_finite_bf16_as_float64()
    rng = np.random.default_rng(3)
    picks = rng.integers(1, grid.size - 1, 3000)
    mid = (grid[picks] + grid[picks + 1]) / 2
    x = np.concatenate([
        mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf),           # ties and just around them
        rng.standard_normal(2000) * 10.0 ** rng.integers(-45, 39, 2000),     # every magnitude
        [1e-50, -1e-50, 3.5e38, -3.5e38, 1e300, np.inf, -np.inf, 0.0],
    ])
    got = bf16_bits_to_float32(float_to_bf16_bits(x)).astype(np.float64)
    for value, result in zip(x, got, strict=True):
        assert result == _round_to_bf16_reference(value, grid), value


def _round_to_bf16_reference(x, grid):
    if not np.isfinite(x) or abs(x) > grid[-1] + (grid[-1] - grid[-2]) / 2:
        return np.copysign(np.inf, x) if not np.isnan(x) else np.nan
    i = int(np.clip(np.searchsorted(grid, x), 1, grid.size - 1))
    lo, hi = grid[i - 1], grid[i]
    if x == hi:
        return hi
    m = (lo + hi) / 2
    if x != m:
        return lo if x < m else hi
    lo_bits = float_to_bf16_bits(np.array([lo]))[0]  # lo is exact, so this is just its pattern
    return lo if lo_bits % 2 == 0 else hi


def test_bfloat16_keeps_nan_and_infinities():
    x = np.array([np.nan, np.inf, -np.inf, 3.4e38], dtype=np.float32)  # 3.4e38 > the largest bf16
    back = bf16_bits_to_float32(float_to_bf16_bits(x))
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf and back[3] == np.inf


# ---------------------------------------------------------------------------------------------- interop
def test_files_we_write_load_in_the_reference_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    write_safetensors(tmp_path / "x.safetensors", tensors)
    theirs = safetensors_numpy.load_file(str(tmp_path / "x.safetensors"))
    assert set(theirs) == set(tensors)
    for name, value in tensors.items():
        assert theirs[name].dtype == value.dtype and theirs[name].shape == value.shape, name
        np.testing.assert_array_equal(theirs[name], value, err_msg=name)


def test_bfloat16_files_we_write_pass_the_reference_parser(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    x = np.linspace(-1, 1, 9, dtype=np.float32)
    write_safetensors(tmp_path / "x.safetensors", {"x": x, "y": x[:3]}, dtype="bfloat16")
    entries = dict(safetensors.deserialize((tmp_path / "x.safetensors").read_bytes()))
    assert entries["x"]["dtype"] == "BF16" and entries["x"]["shape"] == [9]
    assert bytes(entries["x"]["data"]) == float_to_bf16_bits(x).tobytes()


def test_files_the_reference_package_writes_load_with_ours(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    safetensors_numpy.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"a": "b"})
    for mmap in (True, False):
        back, metadata = read_safetensors(tmp_path / "x.safetensors", mmap=mmap)
        assert metadata == {"a": "b"}
        for name, value in tensors.items():
            assert back[name].dtype == value.dtype, name
            np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.skipif(not CASES.is_dir(), reason="shared conformance cases not present")
@pytest.mark.parametrize("case", sorted(p.name for p in CASES.glob("*")) if CASES.is_dir() else [])
def test_conformance_models_load_and_match_their_config(case):
    folder = CASES / case
    tensors, _ = read_safetensors(folder / "model.safetensors")
    check_params(THLConfig.load(str(folder)), tensors, source=str(folder))
    check_finite(tensors, source=str(folder))


# ---------------------------------------------------------------------------------------------- atomic writes
def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def test_failed_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    import thl_np.io.safetensors as module

    def boom(fd):
        raise RuntimeError("disk caught fire")

    monkeypatch.setattr(module.os, "fsync", boom)
    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "x.safetensors", {"a": np.zeros(3)})
    assert not (tmp_path / "x.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import thl_np.io.safetensors as module

    path = small_file(tmp_path)
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.os, "fsync", full_disk)
    with pytest.raises(WeightsError, match="No space left") as err:
        write_safetensors(path, {"a": np.ones(100)})
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_write_refuses_what_it_cannot_store(tmp_path):
    path = tmp_path / "x.safetensors"
    cases = [
        ({"c": np.zeros(2, np.complex64)}, {}, "complex64"),
        ({"o": np.array([object()])}, {}, "object"),
        ({"__metadata__": np.zeros(1)}, {}, "__metadata__"),
        ({"a": np.zeros(1)}, {"dtype": "int8"}, "int8"),
        ({"a": np.zeros(1)}, {"metadata": {"k": 1}}, "metadata"),
    ]
    for tensors, kwargs, word in cases:
        with pytest.raises(WeightsError, match=word) as err:
            write_safetensors(path, tensors, **kwargs)
        assert str(path) in str(err.value) or kwargs.get("dtype")
    assert not path.exists() and _leftovers(tmp_path) == []


def test_write_into_a_missing_folder_or_onto_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="folder"):
        write_safetensors(tmp_path / "nope" / "x.safetensors", {"a": np.zeros(1)})
    with pytest.raises(WeightsError, match="folder"):
        write_safetensors(tmp_path, {"a": np.zeros(1)})


# ---------------------------------------------------------------------------------------------- check_finite
def test_check_finite_names_the_tensor_and_index():
    good = np.zeros((3, 4), np.float32)
    bad = good.copy()
    bad[2, 1] = np.nan
    check_finite({"a": good}, source="m.safetensors")
    with pytest.raises(WeightsError, match=r"m\.safetensors.*'b'.*\(2, 1\)"):
        check_finite({"a": good, "b": bad}, source="m.safetensors")
    with pytest.raises(WeightsError, match="2 non-finite"):
        check_finite({"c": np.array([np.inf, 1.0, -np.inf])}, source="m")


def test_check_finite_is_not_fooled_by_overflowing_sums_or_chunking():
    huge = np.full(1000, 3e38, np.float32)  # its sum overflows, yet every value is finite
    check_finite({"huge": huge, "half": np.full(10, 60000.0, np.float16), "ints": np.arange(3)}, "m")
    late = np.zeros(10_000)
    late[9_999] = -np.inf
    with pytest.raises(WeightsError, match=r"\(9999,\)"):
        check_finite({"late": late}, "m", chunk_elements=1000)


# ---------------------------------------------------------------------------------------------- bad files
def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


Z8 = b"\0" * 8
BAD_FILES = {
    "too short": (lambda p: p.write_bytes(b"\x01\x02\x03"), "shorter than the 8-byte"),
    "empty": (lambda p: p.write_bytes(b""), "shorter than the 8-byte"),
    "header past end": (lambda p: raw_file(p, {"a": _entry()}, b"\0" * 8, header_len=10_000), "past the end"),
    "header absurd": (lambda p: raw_file(p, b"{}", header_len=2**63), "absurd"),
    "not utf-8": (lambda p: raw_file(p, b"\xff\xfe{}"), "not UTF-8"),
    "not json": (lambda p: raw_file(p, b"{'a': 1"), "not valid JSON"),
    "deep json": (lambda p: raw_file(p, b"[" * 100_000 + b"]" * 100_000), "JSON"),
    "huge int": (lambda p: raw_file(p, b'{"a": ' + b"9" * 5000 + b"}"), "JSON"),
    "not an object": (lambda p: raw_file(p, [1, 2]), "JSON object"),
    "entry not object": (lambda p: raw_file(p, {"a": [1]}), "'a'"),
    "no dtype": (lambda p: raw_file(p, {"a": {"shape": [2], "data_offsets": [0, 8]}}, Z8), "'dtype'"),
    "no shape": (lambda p: raw_file(p, {"a": {"dtype": "F32", "data_offsets": [0, 8]}}, Z8), "'shape'"),
    "no offsets": (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}, Z8), "'data_offsets'"),
    "unknown dtype": (lambda p: raw_file(p, {"a": _entry(dtype="F8_E4M3", offsets=(0, 2))}, b"\0" * 2),
                      "not supported"),
    "dtype not string": (lambda p: raw_file(p, {"a": _entry(dtype=4)}, Z8), "not supported"),
    "negative shape": (lambda p: raw_file(p, {"a": _entry(shape=(-2,))}, Z8), "non-negative"),
    "float shape": (lambda p: raw_file(p, {"a": _entry(shape=(2.0,))}, Z8), "non-negative"),
    "bool shape": (lambda p: raw_file(p, {"a": _entry(shape=(True, 2))}, Z8), "non-negative"),
    "shape not list": (lambda p: raw_file(p, {"a": {**_entry(), "shape": 2}}, Z8), "non-negative"),
    "too many dims": (lambda p: raw_file(p, {"a": _entry(shape=(1,) * 40, offsets=(0, 4))}, b"\0" * 4),
                      "dimensions"),
    "huge shape": (lambda p: raw_file(p, {"a": _entry(shape=(0, 2**62, 2**62), offsets=(0, 0))}),
                   "too large"),
    "offsets one": (lambda p: raw_file(p, {"a": _entry(offsets=(8,))}, Z8), "two integers"),
    "offsets negative": (lambda p: raw_file(p, {"a": _entry(offsets=(-8, 0))}, Z8), "0 <= begin"),
    "offsets reversed": (lambda p: raw_file(p, {"a": _entry(offsets=(8, 0))}, Z8), "0 <= begin"),
    "wrong byte count": (lambda p: raw_file(p, {"a": _entry(offsets=(0, 12))}, b"\0" * 12), "needs 8"),
    "overlap": (lambda p: raw_file(p, {"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    "gap": (lambda p: raw_file(p, {"a": _entry(), "b": _entry(offsets=(12, 20))}, b"\0" * 20), "contiguous"),
    "not from zero": (lambda p: raw_file(p, {"a": _entry(offsets=(4, 12))}, b"\0" * 12), "contiguous"),
    "truncated": (lambda p: raw_file(p, {"a": _entry(), "b": _entry(offsets=(8, 16))}, b"\0" * 12),
                  "truncated"),
    "trailing bytes": (lambda p: raw_file(p, {"a": _entry()}, b"\0" * 9), "unaccounted"),
    "metadata list": (lambda p: raw_file(p, {"__metadata__": [1], "a": _entry()}, Z8), "__metadata__"),
    "metadata int": (lambda p: raw_file(p, {"__metadata__": {"k": 1}, "a": _entry()}, Z8), "'k'"),
    "duplicate name": (lambda p: raw_file(p, b'{"a": %s, "a": %s}' % ((json.dumps(_entry()).encode(),) * 2),
                                          Z8), "repeats"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("reader", ["mmap", "copy", "list"])
def test_bad_file_is_a_weights_error_naming_the_file(tmp_path, case, reader):
    make, words = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(WeightsError) as err:
        _read_with(reader, path)
    message = str(err.value)
    assert str(path) in message
    assert words in message, message


def _read_with(reader, path):
    if reader == "list":
        return list_tensors(path)
    return read_safetensors(path, mmap=reader == "mmap")


def test_bad_entry_errors_name_the_tensor(tmp_path):
    path = raw_file(tmp_path / "x.safetensors", {"embedding.weight": _entry(offsets=(0, 12))}, b"\0" * 12)
    with pytest.raises(WeightsError, match="embedding.weight"):
        read_safetensors(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file") as err:
        read_safetensors(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(err.value)
    with pytest.raises(WeightsError, match="is a folder"):
        read_safetensors(tmp_path)


# ---------------------------------------------------------------------------------------------- fuzzing
def _load_all_ways(path):
    """Read the file every way; a success must give arrays whose every byte can be touched."""
    for mmap in (True, False):
        try:
            tensors, _ = read_safetensors(path, mmap=mmap)
        except WeightsError:
            continue
        for array in tensors.values():
            array.tobytes()
    try:
        list_tensors(path)
    except WeightsError:
        pass


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    _load_all_ways(path)


@FUZZ
@given(data=st.binary(max_size=120))
def test_fuzz_random_header_with_plausible_length(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(data)) + data + b"\0" * 16)
    _load_all_ways(path)


def _valid_bytes():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.safetensors"
        write_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                                 "b": np.array([1, 2], np.int16), "h": np.ones(3, np.float16)},
                          metadata={"format": "thl-np"})
        return path.read_bytes()


VALID = _valid_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(VALID))))
def test_fuzz_mutated_valid_file(tmp_path, flips, cut):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(data))
    _load_all_ways(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@FUZZ
@given(tensor=st.sampled_from(["w", "b", "h", "__metadata__", "new"]),
       key=st.sampled_from(["dtype", "shape", "data_offsets", "k", None]), value=JSON_VALUES)
def test_fuzz_header_edits(tmp_path, tensor, key, value):
    n = struct.unpack("<Q", VALID[:8])[0]
    header = json.loads(VALID[8 : 8 + n])
    if key is None:
        header[tensor] = value
    else:
        header.setdefault(tensor, {})
        if isinstance(header[tensor], dict):
            header[tensor][key] = value
    body = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + VALID[8 + n :])
    _load_all_ways(path)


def test_fuzz_fixture_is_valid():
    """The mutation tests start from a file that does load, so their failures are real ones."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "v.safetensors")
        Path(path).write_bytes(VALID)
        tensors, metadata = read_safetensors(path)
        assert metadata == {"format": "thl-np"} and set(tensors) == {"w", "b", "h"}
