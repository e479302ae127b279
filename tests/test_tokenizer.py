"""The byte tokenizer: id layout, lossless round trips, streaming decode, and input errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thl_np.errors import InputError
from thl_np.tokenizer import EOS_ID, PAD_ID, UNK_ID, StreamDecoder, Tokenizer

TOK = Tokenizer()
# Every str that has a UTF-8 encoding: all code points except the surrogates.
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
# Ids a decoder may see: bytes and specials mixed.
id_lists = st.lists(st.integers(0, TOK.vocab_size - 1), max_size=60)


def test_id_layout():
    assert TOK.vocab_size == 259
    assert (TOK.pad_id, TOK.eos_id, TOK.unk_id) == (256, 257, 258) == (PAD_ID, EOS_ID, UNK_ID)
    assert TOK.special_ids == {256, 257, 258}
    assert all(i >= 256 for i in TOK.special_ids)


def test_without_specials_for_a_256_vocab():
    tok = Tokenizer(add_specials=False)
    assert tok.vocab_size == 256
    assert tok.pad_id is None and tok.eos_id is None and tok.unk_id is None
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(InputError, match="no eos"):
        tok.encode("x", add_eos=True)
    with pytest.raises(InputError, match="outside"):
        tok.decode([EOS_ID])


def test_for_vocab_size():
    assert Tokenizer.for_vocab_size(256).eos_id is None
    assert Tokenizer.for_vocab_size(258).eos_id is None
    assert Tokenizer.for_vocab_size(259).eos_id == EOS_ID
    assert Tokenizer.for_vocab_size(50257).eos_id == EOS_ID


def test_encode_is_utf8_bytes_as_int64():
    ids = TOK.encode("a€")
    assert ids.dtype == np.int64
    assert ids.tolist() == [0x61, 0xE2, 0x82, 0xAC]
    assert TOK.encode(b"\x00\xff").tolist() == [0, 255]
    assert TOK.encode(bytearray(b"ab")).tolist() == [97, 98]
    assert TOK.encode("").shape == (0,)
    assert TOK.encode("a", add_eos=True).tolist() == [97, EOS_ID]


def test_decode_skips_specials():
    ids = [PAD_ID, 104, EOS_ID, 105, UNK_ID]
    assert TOK.decode(ids) == "hi"
    assert TOK.decode_bytes(ids) == b"hi"
    # A special inside a multi-byte character is skipped, the character still decodes.
    assert TOK.decode([0xE2, EOS_ID, 0x82, 0xAC]) == "€"


def test_decode_invalid_utf8_replaces_by_default():
    assert TOK.decode([0xFF, 0x61]) == "\ufffda"
    with pytest.raises(InputError, match="not valid UTF-8"):
        TOK.decode([0xFF], errors="strict")
    assert TOK.decode([0xFF, 0x61], errors="ignore") == "a"


def test_decode_accepts_arrays_scalars_and_empty():
    assert TOK.decode(np.array([104, 105], dtype=np.int32)) == "hi"
    assert TOK.decode(np.int64(104)) == "h"
    assert TOK.decode([]) == ""
    assert TOK.decode(np.zeros(0)) == ""


@pytest.mark.parametrize(
    "ids, match",
    [
        ([259], "outside"),
        ([-1], "outside"),
        ([97, 1000], "position 1"),
        ([1.0, 2.0], "integers"),
        ([True], "integers"),
        (["a"], "integers"),
        ([[97, 98]], "1-D"),
        ([[1], [2, 3]], "integers"),
    ],
)
def test_bad_ids_raise_input_error(ids, match):
    with pytest.raises(InputError, match=match):
        TOK.decode(ids)


def test_bad_text_raises_input_error():
    with pytest.raises(InputError, match="surrogate"):
        TOK.encode("a\ud800b")
    with pytest.raises(InputError, match="str or bytes"):
        TOK.encode(123)
    with pytest.raises(InputError, match="error handler"):
        TOK.decode([97], errors="nonsense")


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_text_round_trip(s):
    assert TOK.decode(TOK.encode(s)) == s
    assert TOK.decode(TOK.encode(s, add_eos=True)) == s


@pytest.mark.parametrize("s", ["", "\x00", "a\x00b", "😀🎉 emoji", "日本語", "e\u0301", "\U0010ffff"])
def test_text_round_trip_examples(s):
    assert TOK.decode(TOK.encode(s)) == s


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_bytes_round_trip(b):
    assert TOK.decode_bytes(TOK.encode(b)) == b


def _split(seq, cuts):
    points = sorted({c % (len(seq) + 1) for c in cuts})
    bounds = [0, *points, len(seq)]
    return [seq[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@settings(max_examples=300, deadline=None)
@given(id_lists, st.lists(st.integers(0, 1000), max_size=10))
def test_streaming_any_split_equals_one_shot(ids, cuts):
    decoder = TOK.stream_decoder()
    streamed = "".join(decoder.decode(part) for part in _split(ids, cuts)) + decoder.flush()
    assert streamed == TOK.decode(ids)


@settings(max_examples=100, deadline=None)
@given(unicode_text)
def test_streaming_one_id_at_a_time(s):
    decoder = StreamDecoder(TOK)
    pieces = [decoder.push(i) for i in TOK.encode(s)]
    assert "".join(pieces) + decoder.flush() == s


def test_stream_buffers_incomplete_characters():
    decoder = StreamDecoder()
    assert decoder.push(0xF0) == ""  # first byte of a 4-byte emoji
    assert decoder.decode([0x9F, 0x98]) == ""
    assert decoder.pending == b"\xf0\x9f\x98"
    assert decoder.push(0x80) == "😀"
    assert decoder.pending == b""
    assert decoder.push(0xE2) == ""
    assert decoder.flush() == "\ufffd"  # truncated character at the end of the stream
    decoder.reset()
    assert decoder.decode([104, 105], final=True) == "hi"
