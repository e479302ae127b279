"""Long-range training data: synthetic retrieval tasks mixed into a text corpus, and a sequence-length curriculum.

``WindowBatches`` is the trainer's batch source for whole-sequence training (``thl-np train --full-bptt``,
implied by ``--task-mix`` and ``--seq-len A:B``): every row of every batch is an independent window of L + 1
bytes, read from an empty state with the gradient through all L steps (the tape keeps only the rows read and
written, so long windows fit). A row is, with probability ``task_mix``, a synthetic task, otherwise a random
window of the corpus. The tasks, each ending with its answer (the last bytes of the window):

- ``passkey``: a key line holding a 5-digit key at a uniform random depth of filler, then the question; the
  phrasing is ``thl_np.training.haystack``'s (``FILLERS``), so ``thl-np eval --passkey`` asks what was trained;
- ``recall`` (associative recall): 2-6 lines ``# remember: NAME is VALUE.`` (4 letters, 5 digits) at random
  depths, then ``# what is NAME? NAME is `` for one of them, and its value;
- ``copy`` (delayed copy): ``# copy this: S`` (8-16 letters and digits) early in the window, ``# paste it: S``
  at its end;
- ``kv`` (key-value recall, ``thl_np.training.recall_tasks``): 1-8 labels stated with values by one of many
  templates, updates (the latest value is the answer) and look-alike distractors, all from the training
  half of the templates, labels and value formats; the statements keep their order (sorted depths) and the
  answer is the value and the template's stop byte; ``kv1``: the same with one pair, no update and no
  distractor (evaluation cell ``trained``), a curriculum's first stage; ``kvp`` and ``kv1p``: ``kv`` and
  ``kv1`` with half the contexts in procedural templates (assembled from parts: thousands of statement forms);
  ``kvq`` and ``kv1q``: those with each procedural question in a form of its own (its own separator or frame
  and quotes: only the label ties it to the statement); ``kv1r``: ``kv1q`` with wild separators (one to three
  punctuation marks no held-out form uses); ``kv1w``: one pair, half the contexts in wide forms (wild
  separators, maybe around a word; the question its own separator and the statement's opening, so the
  answer ends in the statement's closing byte); ``kv1ws``: ``kv1w`` with a quarter of the wide forms' values
  closed by a space and a word; ``kv1wst``: ``kv1ws`` with a quarter of the wide forms naming the label
  twice, before and after the value (``[name]V[/name]``: the held-out ``xml``'s shape, not its syntax);
  ``kv2p``, ``kv4p`` and ``kv8p``: ``kv1p`` with 2, 4 and 8 pairs.

Filler (``filler``): ``corpus`` (a random window of the training bytes that ends at a line boundary, so the
haystack is real text), the evaluation's ``python`` or ``prose`` lines, or ``mixed`` (one of the three per
row). Inserted lines go to the filler's line boundary nearest their depth, and the question starts a line of
its own: the prompt of ``thl-np eval --passkey --filler source`` (``thl_np.training.haystack``: real Python source, the
key line and the question phrased alike), except that the evaluation keeps the key within a depth range
(``--depth 0.1:0.9``) and draws from its own generators (``[seed, length]``), never this one's.
``answer_weight`` w > 1 gives the answer bytes' targets weight w in the loss (every other target 1;
``Batch.weights``). A key-value row also marks the input positions that read its value in the statement
stating it and those that answer (``Batch.sources``, ``Batch.asks``: the read-target term's ids, byte k of the
value and the answer step that writes it both k), drawing nothing.

The sequence length follows ``seq_len_at``: from ``start`` it doubles in equal stages over ``ramp`` steps up
to ``final`` (``128:4096`` over 6,000 steps: 128, 256, ..., 4096, 1,000 steps each). Everything is drawn from
one seeded ``np.random.Generator`` whose state is the batch source's ``position``, so a resumed run reads the
same rows as an uninterrupted one.
"""
from __future__ import annotations

import math
import string

import numpy as np

from ..errors import InputError
from .data import Batch, as_byte_array

#: The key-value tasks (``thl_np.training.recall_tasks.KV_TASKS``).
KV_TASK_NAMES = ("kv", "kv1", "kvp", "kv1p", "kvq", "kv1q", "kv1r", "kv1w", "kv1ws", "kv1wst", "kv2p", "kv4p", "kv8p")
TASKS = ("passkey", "recall", "copy") + KV_TASK_NAMES
#: What a run mixes in when it names no tasks (``TrainConfig.tasks`` too): the tasks before ``kv``.
DEFAULT_TASKS = ("passkey", "recall", "copy")
FILLER_SOURCES = ("corpus", "python", "prose", "mixed")
KEY_DIGITS = 5
_NAME_LETTERS = np.frombuffer(string.ascii_lowercase.encode(), dtype=np.uint8)
_COPY_CHARS = np.frombuffer((string.ascii_lowercase + string.digits).encode(), dtype=np.uint8)
_NEWLINE = ord("\n")


def seq_len_at(step: int, start: int, final: int | None = None, ramp: int = 1) -> int:
    """The window length at training step ``step`` (0-based): ``start`` doubled once per stage, in
    ⌈log2(final/start)⌉ + 1 equal stages over ``ramp`` steps, never above ``final`` (None: always ``start``)."""
    if final is None or final <= start:
        return int(start)
    doublings = math.ceil(math.log2(final / start))
    stage = min(doublings, int(step) * (doublings + 1) // max(1, int(ramp)))
    return int(min(final, start * 2**stage))


def parse_seq_len(text) -> tuple[int, int | None]:
    """``"128"`` → (128, None); ``"128:4096"`` → (128, 4096). An InputError naming the form otherwise."""
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1 or (len(values) == 2 and values[1] < values[0]):
        raise InputError(f"--seq-len {text!r}: give a length (128) or a schedule START:FINAL with "
                         "1 <= START <= FINAL (128:4096)")
    return values[0], (values[1] if len(values) == 2 else None)


def parse_tasks(text) -> tuple[str, ...]:
    """``"passkey,recall"`` → ("passkey", "recall"); unknown names are an InputError listing the known ones."""
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in names if t not in TASKS]
    if not names or bad:
        raise InputError(f"tasks = {text!r}: name one or more of {', '.join(TASKS)}, comma-separated")
    return names


# ----------------------------------------------------------------------------------------- the tasks
def _digits(rng, n=KEY_DIGITS) -> bytes:
    return bytes(ord("0") + rng.integers(0, 10, size=n).astype(np.uint8))


def _phrasing(style: str) -> dict:
    from .haystack import FILLERS

    return FILLERS["prose" if style == "prose" else "python"]


def passkey_task(rng, style: str) -> tuple[list[bytes], bytes, bytes]:
    """(lines to hide, question, answer) of a passkey sample (``thl_np.eval.long_context``'s phrasing)."""
    f = _phrasing(style)
    key = _digits(rng).decode()
    return [f["key"].format(key=key).encode()], f["question"].encode(), key.encode()


def recall_task(rng, style: str, pairs: int | None = None) -> tuple[list[bytes], bytes, bytes]:
    """(lines, question, answer) of an associative-recall sample: ``pairs`` (2-6) name/value lines, one asked."""
    n = int(rng.integers(2, 7)) if pairs is None else int(pairs)
    names = set()
    while len(names) < n:
        names.add(bytes(rng.choice(_NAME_LETTERS, size=4)).decode())
    names = sorted(names)
    rng.shuffle(names)
    values = [_digits(rng).decode() for _ in names]
    lead = "" if style == "prose" else "    # "
    # the asked pair first: a window too short for every pair drops pairs from the end
    lines = [f"{lead}remember: {k} is {v}.\n".encode() for k, v in zip(names, values, strict=True)]
    return lines, f"{lead}what is {names[0]}? {names[0]} is ".encode(), values[0].encode()


def copy_task(rng, style: str) -> tuple[list[bytes], bytes, bytes]:
    """(lines, question, answer) of a delayed-copy sample: a string of 8-16 letters and digits."""
    s = bytes(rng.choice(_COPY_CHARS, size=int(rng.integers(8, 17)))).decode()
    lead = "" if style == "prose" else "    # "
    return [f"{lead}copy this: {s}\n".encode()], f"{lead}paste it: ".encode(), s.encode()


TASK_MAKERS = {"passkey": passkey_task, "recall": recall_task, "copy": copy_task}


def insert_lines(filler: bytes, lines: list[bytes], depths) -> bytes:
    """``filler`` with each of ``lines`` inserted at the line boundary (0, after a newline, or the end)
    nearest to its depth × len(filler); lines at the same boundary keep their order."""
    return insert_lines_at(filler, lines, depths)[0]


def insert_lines_at(filler: bytes, lines: list[bytes], depths) -> tuple[bytes, list[int]]:
    """``insert_lines`` and where each line starts in its result."""
    n = len(filler)
    ends = np.concatenate([[0], np.flatnonzero(np.frombuffer(filler, np.uint8) == _NEWLINE) + 1, [n]])
    at = [int(ends[np.argmin(np.abs(ends - d * n))]) for d in depths]
    order = sorted(range(len(lines)), key=lambda i: (at[i], i))
    out, prev, size, starts = [], 0, 0, [0] * len(lines)
    for i in order:
        out.append(filler[prev:at[i]])
        size += at[i] - prev
        starts[i] = size
        out.append(lines[i])
        size += len(lines[i])
        prev = at[i]
    out.append(filler[prev:])
    return b"".join(out), starts


class WindowBatches:
    """Independent windows of the corpus mixed with synthetic tasks (module docstring), one batch a call.

    ``next_batch()`` → ``Batch`` (inputs, targets [B, L], ``reset=True``: each row starts from an empty state;
    ``weights`` [B, L] when ``answer_weight != 1``, else None), L = ``seq_len_at(batches so far, ...)``.
    ``position`` (JSON-able) is the generator's state and the batch count: all a resume needs.
    """

    def __init__(self, data, batch_size: int, seq_len: int, seq_len_final: int | None = None,
                 seq_len_ramp: int = 1, task_mix: float = 0.0, tasks=DEFAULT_TASKS, filler: str = "corpus",
                 answer_weight: float = 1.0, seed: int = 0, position: dict | None = None):
        self.data = as_byte_array(data)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seq_len_final, self.seq_len_ramp = seq_len_final, int(seq_len_ramp)
        if not 0.0 <= float(task_mix) <= 1.0:
            raise InputError(f"task_mix = {task_mix} must lie in [0, 1] (the share of rows that are tasks)")
        if filler not in FILLER_SOURCES:
            raise InputError(f"filler = {filler!r}: use one of {', '.join(FILLER_SOURCES)}")
        if not (answer_weight > 0 and math.isfinite(answer_weight)):
            raise InputError(f"answer_weight = {answer_weight} must be a positive number")
        self.task_mix, self.filler, self.answer_weight = float(task_mix), filler, float(answer_weight)
        self.tasks = tuple(tasks) if not isinstance(tasks, str) else parse_tasks(tasks)
        parse_tasks(",".join(self.tasks))
        longest = max(self.seq_len, self.seq_len_final or 0)
        if len(self.data) < longest + 1:
            raise InputError(f"training data has {len(self.data)} bytes: too few for windows of {longest + 1} "
                             "bytes; use more data or a shorter --seq-len")
        self.rng = np.random.default_rng([int(seed), 0x7461736B])   # not passkey_eval's ([seed, length])
        self._line_ends = None
        self.count = 0
        if position is not None:
            self.position = position

    @property
    def position(self) -> dict:
        return {"batches": int(self.count), "rng": self.rng.bit_generator.state}

    @position.setter
    def position(self, value: dict) -> None:
        try:
            count, state = int(value["batches"]), value["rng"]
            self.rng.bit_generator.state = state
        except (KeyError, TypeError, ValueError):
            raise InputError(f"data position {value!r} is not a window-batch position "
                             "({'batches': int, 'rng': generator state})") from None
        self.count = count

    def current_seq_len(self) -> int:
        return seq_len_at(self.count, self.seq_len, self.seq_len_final, self.seq_len_ramp)

    def next_batch(self) -> Batch:
        L = self.current_seq_len()
        rows = np.empty((self.batch_size, L + 1), np.int64)
        weights = np.ones((self.batch_size, L), np.float64)
        sources, asks = np.zeros((self.batch_size, L), np.int64), np.zeros((self.batch_size, L), np.int64)
        for b in range(self.batch_size):
            window, answer, value = self.sample(L + 1)
            rows[b] = np.frombuffer(window, np.uint8)
            if answer:
                weights[b, L - answer:] = self.answer_weight   # targets of the last `answer` bytes
            if value is not None:   # the steps that read the value's bytes k = 1.., and those that write them
                sources[b, value[0]:value[0] + value[1]] = np.arange(1, value[1] + 1)
                asks[b, L - answer:] = np.arange(1, answer + 1)   # the stop's id, n + 1, has no source
        self.count += 1
        w = None if self.answer_weight == 1.0 else weights
        spans = asks.any()
        return Batch(inputs=rows[:, :-1], targets=rows[:, 1:], reset=True, weights=w,
                     sources=sources if spans else None, asks=asks if spans else None)

    # ------------------------------------------------------------------ one row
    def _corpus(self, n: int) -> bytes:
        start = int(self.rng.integers(0, len(self.data) - n + 1))
        return self.data[start:start + n].tobytes()

    def _corpus_lines(self, n: int) -> bytes:
        """``n`` corpus bytes ending at a line boundary (the question then starts a line of its own, as in
        ``thl-np eval --passkey``'s haystacks): the ``n`` bytes before a line end drawn uniformly among those
        at least ``n`` bytes in; a plain window when the corpus has no such line end."""
        from .haystack import span_ending_at_line

        if self._line_ends is None:
            self._line_ends = np.flatnonzero(self.data == _NEWLINE) + 1
        span = span_ending_at_line(self.data, self._line_ends, n, self.rng)
        return self._corpus(n) if span is None else span.tobytes()

    def _filler(self, n: int, style: str) -> bytes:
        if n <= 0:
            return b""
        if style == "corpus":
            return self._corpus_lines(n)
        from .haystack import FILLERS, filler_text

        text = filler_text(self.rng, FILLERS[style]["lines"], n)
        return text[len(text) - n:].encode()

    def sample(self, n: int) -> tuple[bytes, int, tuple[int, int] | None]:
        """One row of ``n`` bytes → (bytes, how many of its last bytes are the answer (0 for corpus text), and
        for a key-value task (start, length) of the answer's value in the statement that states it, else None)."""
        if self.task_mix == 0.0 or self.rng.random() >= self.task_mix:
            return self._corpus(n), 0, None
        task = self.tasks[int(self.rng.integers(0, len(self.tasks)))]
        style = self.filler if self.filler != "mixed" else FILLER_SOURCES[int(self.rng.integers(0, 3))]
        if task in KV_TASK_NAMES:
            from .recall_tasks import KV_TASKS, kv_task

            made = kv_task(self.rng, n, KV_TASKS[task])
            if made is None:   # the window cannot hold the task at all: corpus text instead
                return self._corpus(n), 0, None
            lines, question, answer, stated = made
            need = sum(map(len, lines)) + len(question) + len(answer)
            depths = np.sort(self.rng.random(len(lines)))   # in order: an update's latest value comes last
        else:
            stated = None
            lines, question, answer = TASK_MAKERS[task](self.rng, style)
            need = sum(map(len, lines)) + len(question) + len(answer)
            while need > n and len(lines) > 1:   # too short a window for every pair: fewer pairs
                need -= len(lines.pop())
            if need > n:   # the window cannot hold the task at all: corpus text instead
                return self._corpus(n), 0, None
            depths = self.rng.random(len(lines))
        body, starts = insert_lines_at(self._filler(n - need, style), lines, depths)
        out = body + question + answer
        assert len(out) == n
        value = None if stated is None else (starts[stated[0]] + stated[1], stated[2])
        return out, len(answer), value
