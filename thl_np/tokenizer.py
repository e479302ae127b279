"""A byte-level, lossless tokenizer: every byte is a token, so any text (or any byte string) round-trips.

Ids 0..255 are the bytes themselves. Three special tokens follow them and never collide with a byte:

=====  ===  ============================================================================
name   id   use
=====  ===  ============================================================================
pad    256  fills short rows of a batch; decodes to nothing
eos    257  end of a document; generation stops when it is sampled; decodes to nothing
unk    258  reserved (a byte tokenizer never needs it; kept so that vocabularies line up)
=====  ===  ============================================================================

A model made for this tokenizer needs ``vocab_size >= 259`` (``thl-np init`` uses exactly 259). A model
with ``vocab_size = 256`` can still use it for plain bytes: build ``Tokenizer(add_specials=False)``, whose
``vocab_size`` is 256 and whose ``pad_id``, ``eos_id`` and ``unk_id`` are ``None`` (generation then simply
never stops early). ``Tokenizer.for_vocab_size(V)`` picks the right one of the two for a model.

Decoding skips special ids. Text decoding uses UTF-8 with ``errors="replace"`` by default, so bytes that
are not valid UTF-8 (an untrained model emits plenty) become U+FFFD instead of raising.
:class:`StreamDecoder` is the incremental form for streaming: it holds back the bytes of a multi-byte
character until the character is complete, so splitting the ids anywhere gives the same text as decoding
them at once.
"""
from __future__ import annotations

import codecs

import numpy as np

from .errors import InputError

NUM_BYTES = 256
PAD_ID = 256
EOS_ID = 257
UNK_ID = 258
SPECIAL_TOKENS = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}


class Tokenizer:
    """Byte-level tokenizer (see the module docstring for the id layout and the special tokens)."""

    def __init__(self, add_specials: bool = True):
        self.add_specials = bool(add_specials)

    @classmethod
    def for_vocab_size(cls, vocab_size: int) -> Tokenizer:
        """The tokenizer a model with this vocabulary can use: with specials iff they fit (V >= 259)."""
        if vocab_size < NUM_BYTES + len(SPECIAL_TOKENS):
            return cls(add_specials=False)
        return cls()

    # ------------------------------------------------------------------ the vocabulary
    @property
    def vocab_size(self) -> int:
        """259 with specials, 256 without: the smallest model vocab_size this tokenizer fits."""
        return NUM_BYTES + (len(SPECIAL_TOKENS) if self.add_specials else 0)

    @property
    def pad_id(self) -> int | None:
        return PAD_ID if self.add_specials else None

    @property
    def eos_id(self) -> int | None:
        return EOS_ID if self.add_specials else None

    @property
    def unk_id(self) -> int | None:
        return UNK_ID if self.add_specials else None

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(SPECIAL_TOKENS.values()) if self.add_specials else frozenset()

    def __repr__(self) -> str:
        return f"Tokenizer(add_specials={self.add_specials})"

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str | bytes, add_eos: bool = False) -> np.ndarray:
        """UTF-8 bytes of ``text`` (or the bytes themselves) as int64 ids, optionally followed by eos."""
        data = _as_bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        if add_eos:
            if self.eos_id is None:
                raise InputError(
                    "add_eos=True, but this tokenizer has no eos token (add_specials=False, for a "
                    "vocab_size-256 model): drop add_eos or use Tokenizer() with a vocab_size >= 259 model"
                )
            ids = np.append(ids, np.int64(self.eos_id))
        return ids

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for; special ids contribute nothing."""
        ids = self.check_ids(ids)
        return ids[ids < NUM_BYTES].astype(np.uint8).tobytes()

    def decode(self, ids, errors: str = "replace") -> str:
        """The text the ids stand for (UTF-8, ``errors`` as in ``bytes.decode``); specials are skipped."""
        return _decode_utf8(self.decode_bytes(ids), errors)

    def stream_decoder(self, errors: str = "replace") -> StreamDecoder:
        return StreamDecoder(self, errors=errors)

    def check_ids(self, ids) -> np.ndarray:
        """Validate ids (integers in [0, vocab_size), a scalar or 1-D) and return them as 1-D int64."""
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError) as exc:
            raise InputError(f"token ids must be a flat sequence of integers ({exc})") from None
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(
                f"token ids must be integers, got dtype {arr.dtype} (e.g. {arr.reshape(-1)[0]!r}): "
                "pass a list or int array of ids"
            )
        if arr.ndim > 1:
            raise InputError(
                f"token ids must be a single sequence (1-D), got shape {list(arr.shape)}: "
                "decode one row at a time"
            )
        arr = arr.reshape(-1).astype(np.int64, copy=False)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            pos = int(np.argmax(bad))
            raise InputError(
                f"token id {int(arr[pos])} at position {pos} is outside this tokenizer's vocabulary "
                f"[0, {self.vocab_size}): the ids were not produced by {self!r}"
            )
        return arr


class StreamDecoder:
    """Incremental decoder: feed ids as they are produced, get back the text that is complete so far.

    Bytes of an unfinished multi-byte UTF-8 character are buffered until the character completes, so
    ``"".join(d.decode(part) for part in parts) + d.flush()`` equals ``tokenizer.decode(all ids)`` for any
    split of the ids into parts.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, errors: str = "replace"):
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self.errors = errors
        _check_errors(errors)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def decode(self, ids, final: bool = False) -> str:
        """Text completed by these ids (possibly ''); with ``final=True``, also flush what is pending."""
        return self._feed(self.tokenizer.decode_bytes(ids), final)

    def push(self, token_id) -> str:
        """Decode one id: shorthand for ``decode([token_id])``."""
        return self.decode([token_id])

    def flush(self) -> str:
        """End of stream: whatever is still buffered (an incomplete character becomes U+FFFD)."""
        return self._feed(b"", final=True)

    @property
    def pending(self) -> bytes:
        """The bytes held back because their character is not complete yet."""
        return self._utf8.getstate()[0]

    def reset(self) -> None:
        self._utf8.reset()

    def _feed(self, data: bytes, final: bool) -> str:
        try:
            return self._utf8.decode(data, final)
        except UnicodeDecodeError as exc:
            raise InputError(f"the ids are not valid UTF-8 ({exc}); decode with errors='replace'") from None


def _as_bytes(text) -> bytes:
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"text contains a lone surrogate {text[exc.start]!r} at index {exc.start}, which has no "
                "UTF-8 encoding: fix the text (e.g. re-decode it with errors='replace')"
            ) from None
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise InputError(f"can only encode str or bytes, got {type(text).__name__}")


def _check_errors(errors: str) -> None:
    try:
        codecs.lookup_error(errors)
    except (LookupError, TypeError):
        raise InputError(
            f"unknown UTF-8 error handler {errors!r}: use 'replace', 'strict', 'ignore' or "
            "'backslashreplace'"
        ) from None


def _decode_utf8(data: bytes, errors: str) -> str:
    _check_errors(errors)
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        raise InputError(f"the ids are not valid UTF-8 ({exc}); decode with errors='replace'") from None
