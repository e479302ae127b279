"""What a passkey is hidden in: the haystack of ``thl-np eval --passkey`` (and of its trace and diagnostics).

Three kinds (``HAYSTACKS``):

- ``python`` and ``prose``: filler lines (``FILLERS``) drawn uniformly at random, a few repeating sentences;
- ``source``: real Python source, a contiguous span of a corpus of ``.py`` files. By default the corpus is
  a frozen copy of thl-np's own package sources (``thl_np/**/*.py`` at commit 5bec839, 130 files,
  fingerprint ``a22e32e1af82f4d2``; ``FROZEN_SOURCE``), shipped with every install and never trained on by
  the shipped model (its card: CPython's standard library). It is frozen so that editing thl-np's code
  does not change the haystack, and with it every published passkey and recall figure. ``haystack_dir``
  names any other folder (``PACKAGE_DIR`` reads today's sources). The files are read in sorted walk order
  (``thl_np.training.data.list_text_files``: folders recursively, hidden and binary files skipped), each
  ending with a newline, as bytes. Lines that mention "pass key" are left out, so that a prompt holds one
  key line and one question, however the span falls (thl-np's own sources spell the key line and the
  question out). ``freeze_source`` writes such a corpus in the frozen form.

A prompt (``haystack_prompt``) is exactly ``length`` bytes: haystack text, the key line inserted at one of
its line boundaries, and the question at the end, where the key's digits should follow. The haystack text
is a window that ends at a line boundary, so only its first line may be cut and the question starts a line
of its own: for ``source``, the ``n`` bytes before a line end drawn uniformly among those at least ``n``
bytes into the corpus (a span that holds the key's digits is drawn again: a second copy would make the
answer ambiguous); for filler lines, the last ``n`` bytes of lines drawn at random.

The key's depth (``parse_depth``) is one number (the line boundary nearest that fraction of the haystack
text, as always) or a range ``lo:hi``: a depth drawn uniformly in it for each prompt, the key at the line
boundary nearest to it among those inside the range (any boundary if none is). The key line and the
question are phrased as in ``FILLERS`` (``source`` takes the ``python`` phrasing), the phrasing the
training tasks (``thl_np.training.synthetic_tasks``) use too.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..checks import check
from ..errors import InputError

#: Filler lines (ASCII), drawn at random per trial, and how the key and the question are phrased.
FILLERS = {
    "python": {
        "lines": (
            "    total = total + value\n",
            "    if value is None:\n",
            "        continue\n",
            "    result.append(item)\n",
            "    count += 1\n",
            "    for name, value in items.items():\n",
            "    x = compute(x)  # the grass is green\n",
            "    return result\n",
            "    self.data[key] = value\n",
            "    # the sky is blue and the sun is yellow\n",
            "    while i < n:\n",
            "        i += 1\n",
            "    print(name, value)\n",
            "    assert isinstance(item, str)\n",
        ),
        "key": "    # the pass key is {key}. remember it. {key} is the pass key.\n",
        "question": "    # what is the pass key? the pass key is ",
    },
    "prose": {
        "lines": (
            "The grass is green.\n",
            "The sky is blue.\n",
            "The sun is yellow.\n",
            "Here we go.\n",
            "There and back again.\n",
        ),
        "key": "The pass key is {key}. Remember it. {key} is the pass key.\n",
        "question": "What is the pass key? The pass key is ",
    },
}
HAYSTACKS = ("python", "prose", "source")
#: Digits of a pass key.
KEY_DIGITS = 5
#: The folder of this package (thl_np/): its live sources, a corpus for ``haystack_dir``.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The default corpus of the ``source`` haystack: thl-np's sources frozen (module docstring), as the gzipped
#: corpus bytes beside a JSON record of their file count, size and fingerprint.
FROZEN_SOURCE = os.path.join(PACKAGE_DIR, "assets", "haystack", "thl_np_sources")
#: How often a span holding the key's digits is drawn again before giving up.
_REDRAWS = 100
_NEWLINE = ord("\n")


def filler_text(rng: np.random.Generator, lines, n: int) -> str:
    """At least ``n`` characters of lines drawn uniformly at random from ``lines``."""
    mean = sum(map(len, lines)) / len(lines)
    out, size = [], 0
    while size < n:
        picks = rng.integers(0, len(lines), size=int(n / mean) + 8)
        for i in picks:
            out.append(lines[i])
            size += len(lines[i])
    return "".join(out)


def parse_depth(value) -> tuple[float, float]:
    """The key's depth as a range (lo, hi): a number (0.5 → (0.5, 0.5)), ``"lo:hi"`` or a pair; both ends in
    [0, 1] (0 = the start of the haystack, 1 = just before the question) and lo <= hi. InputError otherwise."""
    if isinstance(value, str):
        parts = value.split(":")
        try:
            ends = [float(p) for p in parts]
        except ValueError:
            ends = []
        if len(ends) not in (1, 2):
            raise InputError(f"depth = {value!r}: give a fraction of the haystack (0.5) or a range LO:HI (0.1:0.9)")
    elif isinstance(value, (tuple, list)):
        ends = list(value)
        if len(ends) != 2:
            raise InputError(f"depth = {value!r}: a range is a pair (lo, hi), e.g. (0.1, 0.9)")
    else:
        ends = [value]
    fix = "the fraction of the haystack before the key, in [0, 1]"
    ends = [check("depth", e, fix=fix) for e in ends]
    lo, hi = ends[0], ends[-1]
    if lo > hi:
        raise InputError(f"depth = {value!r}: the range's low end {lo} is above its high end {hi}; give LO:HI "
                         "with LO <= HI")
    return float(lo), float(hi)


def depth_label(depth: tuple[float, float]) -> float | list[float]:
    """How a report records the depth asked for: the number when fixed, [lo, hi] for a range."""
    lo, hi = depth
    return lo if lo == hi else [lo, hi]


@dataclass(frozen=True)
class SourceCorpus:
    """The ``source`` haystack's corpus: ``data`` (bytes), ``line_ends`` (the offset just after each
    newline, ascending), the folder it was read from, its file count and a content fingerprint."""

    data: bytes
    line_ends: np.ndarray
    folder: str
    files: int
    fingerprint: str


def load_source(folder: str | os.PathLike | None = None) -> SourceCorpus:
    """The ``.py`` files of ``folder`` as one corpus; by default the frozen copy of thl-np's own sources
    (module docstring)."""
    from .data import list_text_files

    if folder is None:
        return load_frozen_source(FROZEN_SOURCE)
    where = os.fspath(folder)
    if not os.path.isdir(where):
        raise InputError(f"haystack folder {where!r} is not a folder: give a folder of .py files")
    files = list_text_files(where, include=["*.py"])
    kept = []
    for name in files:
        with open(name, "rb") as f:
            text = f.read()
        if text and not text.endswith(b"\n"):
            text += b"\n"
        kept.extend(line for line in text.splitlines(keepends=True) if b"pass key" not in line.lower())
    data = b"".join(kept)
    if not data:
        raise InputError(f"haystack folder {where!r} holds no .py source (hidden and binary files are skipped): "
                         "give a folder of .py files")
    return _corpus(data, folder=where, files=len(files))


def _corpus(data: bytes, folder: str, files: int) -> SourceCorpus:
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == _NEWLINE) + 1
    return SourceCorpus(data=data, line_ends=ends, folder=folder, files=files,
                        fingerprint=hashlib.sha256(data).hexdigest()[:16])


def freeze_source(corpus: SourceCorpus, path: str) -> None:
    """Write ``corpus`` as ``path.txt.gz`` (its bytes, gzipped with no timestamp, so the file is
    reproducible) and ``path.json`` (files, bytes, fingerprint), the form ``load_frozen_source`` reads."""
    import gzip
    import json

    with open(path + ".txt.gz", "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0,
                                                            compresslevel=9) as f:
        f.write(corpus.data)
    with open(path + ".json", "w") as f:
        json.dump({"files": corpus.files, "bytes": len(corpus.data), "fingerprint": corpus.fingerprint}, f,
                  indent=1)


def load_frozen_source(path: str) -> SourceCorpus:
    """The corpus ``freeze_source`` wrote at ``path``; InputError when its bytes do not match its record (a
    damaged install would otherwise give other figures than the published ones, silently)."""
    import gzip
    import json

    try:
        with open(path + ".json") as f:
            record = json.load(f)
        with gzip.open(path + ".txt.gz", "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise InputError(f"the frozen haystack {path}.txt.gz / .json cannot be read ({e}); reinstall thl-np, or "
                         "give a folder of .py files as the haystack") from e
    corpus = _corpus(data, folder=path + ".txt.gz", files=int(record["files"]))
    if corpus.fingerprint != record["fingerprint"] or len(data) != record["bytes"]:
        raise InputError(f"the frozen haystack {path}.txt.gz is damaged: fingerprint {corpus.fingerprint}, "
                         f"{len(data):,} bytes; its record says {record['fingerprint']}, {record['bytes']:,} bytes. "
                         "Reinstall thl-np")
    return corpus


class Haystack:
    """One kind of haystack (module docstring): ``Haystack("python")``, ``Haystack("source")`` (thl-np's
    sources) or ``Haystack("source", folder)``. ``text(rng, n, avoid)`` draws ``n`` bytes of it."""

    def __init__(self, kind: str = "python", folder: str | os.PathLike | None = None):
        if kind not in HAYSTACKS:
            raise InputError(f"filler = {kind!r} is not known: use one of {', '.join(HAYSTACKS)}")
        if folder is not None and kind != "source":
            raise InputError(f"a haystack folder ({os.fspath(folder)!r}) is read by the 'source' haystack, not "
                             f"{kind!r}: drop the folder or use filler 'source'")
        self.kind = kind
        self.source = load_source(folder) if kind == "source" else None

    @property
    def phrasing(self) -> dict:
        """The key line (``key``, a format with ``{key}``) and the ``question``."""
        return FILLERS["prose" if self.kind == "prose" else "python"]

    def describe(self) -> dict:
        """What a report records about the haystack (JSON-able)."""
        if self.source is None:
            return {"kind": self.kind}
        s = self.source
        return {"kind": "source", "dir": s.folder, "files": s.files, "bytes": len(s.data),
                "fingerprint": s.fingerprint}

    def room(self) -> int:
        """Bytes of a prompt that are not haystack: the key line and the question."""
        f = self.phrasing
        return len(f["key"].format(key="0" * KEY_DIGITS).encode()) + len(f["question"].encode())

    def check_prompt(self, length: int, name: str = "length") -> None:
        """InputError unless a ``length``-byte prompt fits the key line and the question and the haystack
        can fill the rest."""
        if length < self.room():
            raise InputError(f"{name} {length} is too short for a passkey prompt: it needs at least {self.room()} "
                             "bytes for the key line and the question")
        self.check_length(length - self.room(), length)

    def check_length(self, n: int, prompt_length: int | None = None) -> None:
        """InputError unless the haystack can give ``n`` bytes of text (a ``source`` corpus long enough)."""
        if self.source is not None and n > 0 and (len(self.source.line_ends) == 0 or self.source.line_ends[-1] < n):
            what = f"a {prompt_length}-byte prompt" if prompt_length is not None else "the prompt"
            raise InputError(f"haystack folder {self.source.folder!r} holds {len(self.source.data):,} bytes of .py "
                             f"source: too few for {what} ({n:,} bytes of haystack); give a folder with more "
                             "source or a shorter length")

    def text(self, rng: np.random.Generator, n: int, avoid: bytes = b"", boundary_in=None) -> bytes:
        """``n`` bytes of haystack ending at a line boundary (module docstring); a ``source`` span holding
        ``avoid`` is drawn again, and so is one without a line boundary inside ``boundary_in`` = (lo, hi)
        (fractions of n; a short span of long lines may have none, and the key would then land outside the
        depth range asked for) unless every draw lacks one."""
        if self.source is None:
            text = filler_text(rng, FILLERS[self.kind]["lines"], n)
            return text[len(text) - n:].encode("ascii")
        if n <= 0:
            return b""
        self.check_length(n)
        fallback = None
        for _ in range(_REDRAWS):
            span = span_ending_at_line(self.source.data, self.source.line_ends, n, rng)
            if avoid and avoid in span:
                continue
            if boundary_in is None or _has_boundary_in(span, *boundary_in):
                return span
            fallback = span if fallback is None else fallback
        if fallback is not None:
            return fallback
        raise InputError(f"haystack folder {self.source.folder!r}: {_REDRAWS} spans of {n:,} bytes all hold "
                         f"{avoid!r}; give a folder with more (or other) source")


def span_ending_at_line(data, line_ends, n: int, rng: np.random.Generator):
    """The ``n`` items of ``data`` that end at one of ``line_ends`` (offsets just after a newline), drawn
    uniformly among those at least ``n`` in; None when there is none. The haystack's spans and the training
    tasks' corpus filler (thl_np.training.synthetic_tasks) both come from here, so both end at a line boundary."""
    first = int(np.searchsorted(line_ends, n))
    if first >= len(line_ends):
        return None
    e = int(line_ends[first + int(rng.integers(0, len(line_ends) - first))])
    return data[e - n:e]


def _line_boundaries(text: bytes) -> np.ndarray:
    """0, every position just after a newline, and the end."""
    n = len(text)
    ends = np.concatenate([[0], np.flatnonzero(np.frombuffer(text, np.uint8) == _NEWLINE) + 1])
    return ends if ends[-1] == n else np.append(ends, n)


def _has_boundary_in(text: bytes, lo: float, hi: float) -> bool:
    ends = _line_boundaries(text)
    return bool(np.any((ends >= lo * len(text)) & (ends <= hi * len(text))))


def key_position(text: bytes, depth: tuple[float, float], rng: np.random.Generator) -> int:
    """The line boundary of ``text`` (0, just after a newline, or its end) where the key line goes: nearest
    to ``lo · n`` for a fixed depth (ties to the earlier one), else nearest to a depth drawn uniformly in
    [lo, hi] among the boundaries inside [lo · n, hi · n] (all of them if none is)."""
    n = len(text)
    ends = _line_boundaries(text)
    lo, hi = depth
    if lo == hi:
        target, pool = lo * n, ends
    else:
        target = float(rng.uniform(lo, hi)) * n
        pool = ends[(ends >= lo * n) & (ends <= hi * n)]
        pool = pool if len(pool) else ends
    return int(pool[np.argmin(np.abs(pool - target))])   # argmin: the first of equals, the earlier boundary


def haystack_prompt(length: int, key: str, depth, haystack: Haystack, rng: np.random.Generator) -> tuple[bytes, int]:
    """A passkey prompt of exactly ``length`` bytes, and the byte offset where the key line starts: haystack
    text with the key line at one of its line boundaries (``key_position``), then the question."""
    if not (isinstance(key, str) and len(key) == KEY_DIGITS and key.isdigit()):
        raise InputError(f"key = {key!r} must be a string of {KEY_DIGITS} digits")
    depth = parse_depth(depth)
    f = haystack.phrasing
    key_line, question = f["key"].format(key=key).encode(), f["question"].encode()
    n_fill = int(length) - len(key_line) - len(question)
    if n_fill < 0:
        raise InputError(f"length {length} is too short for a passkey prompt: it needs at least "
                         f"{len(key_line) + len(question)} bytes for the key line and the question")
    haystack.check_length(n_fill, int(length))
    text = haystack.text(rng, n_fill, avoid=key.encode(), boundary_in=None if depth[0] == depth[1] else depth)
    at = key_position(text, depth, rng)
    prompt = text[:at] + key_line + text[at:] + question
    assert len(prompt) == length
    return prompt, at
