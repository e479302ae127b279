"""Byte-level data: loading files and folders, the held-out split, and the truncated-BPTT lanes."""
import numpy as np
import pytest

from thl_np.errors import InputError
from thl_np.training.data import LaneBatches, eval_lanes, fingerprint, load_bytes, split_bytes


def test_load_file_and_folder_sorted_recursive_text_only(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"BBB")
    (tmp_path / "a.txt").write_bytes(b"AA")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_bytes(b"C")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").write_bytes(b"secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"ref")
    assert load_bytes(tmp_path).tobytes() == b"AABBBC"
    assert load_bytes(tmp_path / "b.txt").tobytes() == b"BBB"
    assert load_bytes(str(tmp_path / "a.txt")).dtype == np.uint8


@pytest.mark.parametrize("case", ["missing", "empty_file", "empty_folder", "binary_only"])
def test_load_errors_are_clear(tmp_path, case):
    if case == "missing":
        path, words = tmp_path / "nope.txt", "does not exist"
    elif case == "empty_file":
        path, words = tmp_path / "e.txt", "empty"
        path.write_bytes(b"")
    elif case == "empty_folder":
        path, words = tmp_path, "no text files"
    else:
        (tmp_path / "x.bin").write_bytes(b"\x00\x00")
        path, words = tmp_path, "no text files"
    with pytest.raises(InputError, match=words):
        load_bytes(path)


def test_split_is_on_the_concatenated_stream():
    data = np.arange(100, dtype=np.uint8)
    train, held = split_bytes(data)
    assert train.tolist() == list(range(90)) and held.tolist() == list(range(90, 100))
    train, held = split_bytes(data, 0.0)
    assert len(train) == 100 and len(held) == 0
    with pytest.raises(InputError):
        split_bytes(data, 1.0)


def test_lanes_targets_are_inputs_shifted_and_chunks_continue():
    data = np.arange(250, dtype=np.uint8)  # 250 // 3 = 83 bytes per lane
    it = LaneBatches(data, batch_size=3, seq_len=10)
    lanes = data[: 3 * 83].reshape(3, 83)
    first = it.next_batch()
    assert first.reset and first.inputs.shape == (3, 10) and first.inputs.dtype == np.int64
    np.testing.assert_array_equal(first.inputs, lanes[:, :10])
    np.testing.assert_array_equal(first.targets, lanes[:, 1:11])
    second = it.next_batch()
    assert not second.reset
    np.testing.assert_array_equal(second.inputs, lanes[:, 10:20])  # lane b continues lane b
    assert (second.inputs[:, 0] == first.targets[:, -1]).all()


def test_lanes_wrap_together_with_reset_and_epoch():
    it = LaneBatches(np.arange(50, dtype=np.uint8), batch_size=2, seq_len=8)  # lanes of 25: 3 chunks
    assert it.chunks_per_epoch == 3
    resets = [it.next_batch().reset for _ in range(7)]
    assert resets == [True, False, False, True, False, False, True]
    assert it.position == {"offset": 8, "epoch": 2}


def test_position_round_trip_resumes_exactly():
    data = np.random.default_rng(0).integers(0, 256, 500).astype(np.uint8)
    a = LaneBatches(data, 4, 7)
    for _ in range(5):
        a.next_batch()
    b = LaneBatches(data, 4, 7, position=dict(a.position))
    for _ in range(30):
        x, y = a.next_batch(), b.next_batch()
        np.testing.assert_array_equal(x.inputs, y.inputs)
        assert x.reset == y.reset


def test_too_little_data_or_bad_sizes():
    with pytest.raises(InputError, match="too few"):
        LaneBatches(np.zeros(20, np.uint8), batch_size=4, seq_len=8)
    with pytest.raises(InputError, match="seq_len"):
        LaneBatches(np.zeros(20, np.uint8), batch_size=1, seq_len=0)
    with pytest.raises(InputError, match="position"):
        LaneBatches(np.zeros(20, np.uint8), 1, 4, position={"offset": 99, "epoch": 0})


def test_eval_lanes_and_fingerprint():
    ids = eval_lanes(np.arange(11, dtype=np.uint8), lanes=3)
    assert ids.shape == (3, 3) and ids[1].tolist() == [3, 4, 5]
    assert eval_lanes(np.arange(3, dtype=np.uint8), lanes=8).shape == (1, 3)
    assert eval_lanes(np.arange(100, dtype=np.uint8), lanes=1, max_bytes=10).shape == (1, 10)
    with pytest.raises(InputError):
        eval_lanes(np.arange(1, dtype=np.uint8), lanes=1)
    assert fingerprint(np.arange(5, dtype=np.uint8)) != fingerprint(np.arange(6, dtype=np.uint8))
