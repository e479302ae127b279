"""Task data: JSONL files, their labels, and batches of byte ids.

One JSON object per line (blank lines are skipped; other keys are ignored):

==========================  =====================================================================
task                        line
==========================  =====================================================================
sequence-classification     ``{"text": str, "label": str}``
token-classification        ``{"text": str, "labels": [str, ...]}``: one label per UTF-8 *byte* of the
                            text (a character outside ASCII has several); ``null`` = not counted
multiple-choice             ``{"context": str, "choices": [str, ...], "label": int}``: the index of the
                            right choice; every line has the same number of choices (at least 2); each
                            choice is read as the bytes of context + choice
==========================  =====================================================================

A label may also be an integer (it is used as its decimal string). ``label`` / ``labels`` may be left out
where only predictions are wanted (``thl-np predict``). A bad line raises InputError naming the file, the
line and what is wrong.

Batches (``batch``): the text is encoded as bytes (ids 0..255) and padded with the model's
``pad_token_id``. Token classification pads on the right (a position's state is what it would be
unpadded) and cuts a text after ``max_len`` bytes. The pooled heads (sequence classification, multiple
choice) read the top tier, which runs only every τ_{K-1} steps (spec §4.5: 64 for the default model); a row
is therefore padded on the *left* to a length T with (T − 1) mod τ_{K-1} = 0, so its last byte falls on a step
where every tier runs and the pooled state has read the whole row. A row longer than ``max_len`` keeps its
last bytes (its end is what the head reads; a choice follows its context). When ``max_len`` < τ_{K-1} + 1 no
such length fits and rows are padded on the left to the longest one.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..task_fields import CHOICE, SEQUENCE, TASKS, TOKEN

IGNORE = -100


@dataclass
class Example:
    """One line of a task file: ``ids`` the byte ids (one array; C arrays, context + choice, for multiple
    choice), ``label`` a class index (−100 when the line has none), or for tokens an int array per byte."""

    ids: list
    label: object
    line: int
    text: str = ""


@dataclass
class TaskData:
    """The examples of one file, with the label names they use (None for multiple choice)."""

    task: str
    examples: list
    labels: list | None
    source: str
    has_labels: bool = True

    def __len__(self):
        return len(self.examples)

    def fingerprint(self) -> str:
        """A content hash: a resumed run checks it is reading the same examples."""
        h = hashlib.sha256()
        for ex in self.examples:
            for ids in ex.ids:
                h.update(np.asarray(ids, np.int64).tobytes() + b"|")
            h.update(np.asarray(ex.label, np.int64).tobytes() + b"\n")
        return h.hexdigest()[:16]

    def subset(self, index) -> TaskData:
        return TaskData(self.task, [self.examples[i] for i in index], self.labels, self.source, self.has_labels)


# ------------------------------------------------------------------------------------------ reading
def read_task_file(path, task: str, label2id: dict | None = None, require_labels: bool = True) -> TaskData:
    """Read a JSONL file of ``task`` (module docstring). ``label2id`` maps label names to class ids (a
    model's); without it the names found in the file, sorted, are the classes. ``require_labels=False``
    accepts lines without a label (their label is −100)."""
    if task not in TASKS:
        raise InputError(f"task {task!r} is not one of {list(TASKS)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"no data file at {path}: give a JSONL file (one JSON object per line)")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}, line {number}"
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and an int of > 4,300 digits
                raise InputError(f"{where}: not valid JSON ({_short(exc)})") from None
            except RecursionError:
                raise InputError(f"{where}: JSON nested too deeply (thousands of brackets): give one flat object "
                                 f"{_FORMS[task]}") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object {_FORMS[task]}, got {type(obj).__name__}")
            records.append((number, where, obj))
    if not records:
        raise InputError(f"{path} holds no examples: one JSON object per line, {_FORMS[task]}")
    return parse_records(records, task, path, label2id, require_labels)


_FORMS = {SEQUENCE: '{"text": str, "label": str}', TOKEN: '{"text": str, "labels": [str per byte]}',
          CHOICE: '{"context": str, "choices": [str, ...], "label": int}'}


def parse_records(records, task, source, label2id=None, require_labels=True) -> TaskData:
    """(line number, where, object) triples → TaskData (what ``read_task_file`` does after the JSON).
    With ``require_labels`` at least one row must have a label that counts (not −100 / null everywhere)."""
    data = _parse_records(records, task, source, label2id, require_labels)
    if require_labels and not any(np.any(np.asarray(ex.label) != IGNORE) for ex in data.examples):
        raise InputError(f"{source} has no labelled row: every label is {IGNORE} or null (ignored), so there is "
                         "nothing to learn from; label at least one row")
    return data


def _short(exc, limit: int = 120) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _utf8(value: str, where: str) -> str:
    """``value`` if it encodes as UTF-8; a lone surrogate (JSON "\\ud800", an undecodable argument) is refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start:exc.end]
        raise InputError(f"{where} is not valid UTF-8 text (it holds {bad!r} at character {exc.start}: a lone "
                         "surrogate or undecodable bytes)") from None
    return value


def _parse_records(records, task, source, label2id=None, require_labels=True) -> TaskData:
    raw = [_parse(task, where, obj, require_labels) for _, where, obj in records]
    has_labels = any(label is not None for label, _, _ in raw)
    if task == CHOICE:
        counts = {len(ids) for _, ids, _ in raw}
        if len(counts) > 1:
            first = len(raw[0][1])
            bad = next(i for i, (_, ids, _) in enumerate(raw) if len(ids) != first)
            raise InputError(f"{records[bad][1]}: {len(raw[bad][1])} choices, but the first line has {first}: "
                             "give every line the same number of choices")
        examples = [Example(ids, IGNORE if label is None else label, records[i][0], text)
                    for i, (label, ids, text) in enumerate(raw)]
        for ex, (_, where, _) in zip(examples, records, strict=True):
            if ex.label != IGNORE and not 0 <= ex.label < len(ex.ids):
                raise InputError(f"{where}: label {ex.label} is not the index of one of its {len(ex.ids)} choices")
        return TaskData(task, examples, None, source, has_labels)
    names = sorted({n for label, _, _ in raw if label is not None for n in _names(label)})
    if label2id is None:
        label2id = {name: i for i, name in enumerate(names)}
    examples = []
    for (label, ids, text), (number, where, _) in zip(raw, records, strict=True):
        unknown = [n for n in _names(label) if n not in label2id] if label is not None else []
        if unknown:
            raise InputError(f"{where}: label {unknown[0]!r} is not one of the model's labels "
                             f"{list(label2id)}")
        if task == SEQUENCE:
            y = IGNORE if label is None else label2id[label]
        elif label is None:
            y = np.full(len(ids[0]), IGNORE, np.int64)
        else:
            y = np.array([IGNORE if n is None else label2id[n] for n in label], np.int64)
        examples.append(Example(ids, y, number, text))
    return TaskData(task, examples, list(label2id), source, has_labels)


def _names(label):
    return [label] if isinstance(label, str) else [n for n in label if n is not None]


def _label_name(value, where, what):
    if isinstance(value, str) and value:
        return _utf8(value, f"{where}: {what}")
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**63:
            raise InputError(f"{where}: {what} is an integer of {len(str(abs(value) // 10**20))}+ digits: give a "
                             "label name (a string) or a small integer")
        return str(value)
    raise InputError(f"{where}: {what} must be a non-empty string (or an integer), got {value!r}")


def _text(obj, key, where, allow_empty=False):
    value = obj.get(key)
    if not isinstance(value, str):
        raise InputError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}"
                         + (" (missing)" if key not in obj else ""))
    if not value and not allow_empty:
        raise InputError(f"{where}: \"{key}\" is empty: nothing to classify")
    return _utf8(value, f"{where}: \"{key}\"")


def _parse(task, where, obj, require_labels):
    """→ (label as read, list of id arrays, text)."""
    if task == CHOICE:
        context = _text(obj, "context", where, allow_empty=True)
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise InputError(f"{where}: \"choices\" must be a list of at least 2 strings, got {choices!r:.80}")
        for j, c in enumerate(choices):
            _utf8(c, f"{where}: choice {j}")
        if any(not (context + c) for c in choices):
            raise InputError(f"{where}: a choice is empty and so is the context: nothing to score")
        ids = [_encode(context + c) for c in choices]
        label = obj.get("label")
        if label is None:
            if require_labels:
                raise InputError(f"{where}: \"label\" (the index of the right choice) is missing")
        elif isinstance(label, bool) or not isinstance(label, int):
            raise InputError(f"{where}: \"label\" must be the integer index of the right choice, got {label!r:.80}")
        elif label != IGNORE and not 0 <= label < len(choices):
            shown = label if abs(label) < 10**20 else f"of {len(str(abs(label)))} digits"
            raise InputError(f"{where}: label {shown} is not the index of one of its {len(choices)} choices "
                             f"(or {IGNORE}: ignored)")
        return label, ids, context
    text = _text(obj, "text", where)
    ids = [_encode(text)]
    key = "label" if task == SEQUENCE else "labels"
    value = obj.get(key)
    if value is None:
        if require_labels:
            raise InputError(f"{where}: \"{key}\" is missing ({_FORMS[task]})")
        return None, ids, text
    if task == SEQUENCE:
        return _label_name(value, where, '"label"'), ids, text
    if not isinstance(value, list):
        raise InputError(f"{where}: \"labels\" must be a list with one label per byte of the text, got "
                         f"{type(value).__name__}")
    if len(value) != len(ids[0]):
        raise InputError(f"{where}: \"labels\" has {len(value)} entries but the text has {len(ids[0])} UTF-8 bytes: "
                         "give one label (or null) per byte")
    return [None if v is None else _label_name(v, where, f"labels[{i}]") for i, v in enumerate(value)], ids, text


def _encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def texts_as_data(task, texts, choices=None) -> TaskData:
    """Texts given on a command line (no labels): one example per text; for multiple choice, one example
    per context, every context with the same ``choices``."""
    for j, choice in enumerate(choices or [], start=1):
        _utf8(choice, f"--choice {j} ({choice!r:.40})")
    records = []
    for i, text in enumerate(texts, start=1):
        _utf8(text, f"text argument {i} ({text!r:.40})")
        obj = {"context": text, "choices": list(choices or [])} if task == CHOICE else {"text": text}
        records.append((i, f"text {i}", obj))
    return parse_records(records, task, "<command line>", None, require_labels=False)


# ------------------------------------------------------------------------------------------ batches
def aligned_length(n: int, tick: int, max_len: int | None) -> int:
    """The row length a pooled batch uses for a longest row of n bytes: the smallest T ≥ n with
    (T − 1) mod tick = 0, at most ``max_len`` (the largest such T then; n when none fits, capped)."""
    T = n if tick <= 1 else tick * (-(-(n - 1) // tick)) + 1
    if max_len is None or T <= max_len:
        return T
    if tick > 1 and max_len >= tick + 1:
        return tick * ((max_len - 1) // tick) + 1
    return min(n, max_len)


def pad_left(rows, pad: int, T: int) -> np.ndarray:
    """Rows of ids → [N, T], each keeping its last T ids, padded on the left."""
    out = np.full((len(rows), T), pad, np.int64)
    for i, r in enumerate(rows):
        r = r[-T:]
        out[i, T - len(r):] = r
    return out


def batch(data: TaskData, index, config, max_len: int | None = None):
    """The examples ``index`` of ``data`` as model inputs (module docstring) → (input_ids, labels):
    [N, T] and [N] (sequence), [N, T] and [N, T] (tokens), [B, C, T] and [B] (multiple choice)."""
    pad = config.pad_token_id
    if pad is None:
        raise InputError("the model has no pad_token_id, which batches of different lengths need: set it in "
                         "config.json (256, the byte tokenizer's pad, for vocab_size >= 259)")
    exs = [data.examples[i] for i in index]
    if data.task == TOKEN:
        rows = [ex.ids[0][:max_len] for ex in exs]
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), pad, np.int64)
        labels = np.full((len(rows), T), IGNORE, np.int64)
        for i, (r, ex) in enumerate(zip(rows, exs, strict=True)):
            ids[i, :len(r)] = r
            labels[i, :len(r)] = ex.label[:len(r)]
        return ids, labels
    rows = [r for ex in exs for r in ex.ids]
    T = aligned_length(max(len(r) for r in rows), config.tier_timescales[-1], max_len)
    ids = pad_left(rows, pad, T)
    labels = np.array([ex.label for ex in exs], np.int64)
    if data.task == CHOICE:
        ids = ids.reshape(len(exs), len(exs[0].ids), T)
    return ids, labels


def majority_label(data: TaskData):
    """The most frequent label of ``data`` (ties: the lower id): the majority baseline's prediction."""
    if data.task == TOKEN:
        y = np.concatenate([ex.label for ex in data.examples])
    else:
        y = np.array([ex.label for ex in data.examples])
    y = y[y != IGNORE]
    if y.size == 0:
        return None
    return int(np.argmax(np.bincount(y)))


def majority_accuracy(train: TaskData, held: TaskData, max_len: int | None = None) -> float | None:
    """Accuracy on ``held`` of always predicting ``train``'s most frequent label (over the positions the
    fine-tuned model is scored on: the first ``max_len`` bytes for tokens)."""
    label = majority_label(train)
    if label is None:
        return None
    if held.task == TOKEN:
        y = np.concatenate([ex.label[:max_len] for ex in held.examples])
    else:
        y = np.array([ex.label for ex in held.examples])
    y = y[y != IGNORE]
    return float(np.mean(y == label)) if y.size else None


class ExampleOrder:
    """The examples of an epoch in a seeded random order, ``batch_size`` at a time, forever; a batch that
    reaches the end of an epoch continues with the next epoch's order. ``position`` ({"epoch", "offset"})
    is all a resumed run needs."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise InputError("no training examples")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.epoch, self.offset = 0, 0

    def _order(self, epoch):
        return np.random.default_rng([self.seed, 0x7461736B, epoch]).permutation(self.n)

    @property
    def position(self) -> dict:
        return {"epoch": int(self.epoch), "offset": int(self.offset)}

    @position.setter
    def position(self, value):
        try:
            epoch, offset = int(value["epoch"]), int(value["offset"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"example position {value!r} must be {{'epoch': int, 'offset': int}}") from None
        if epoch < 0 or not 0 <= offset < self.n:
            raise InputError(f"example position {value!r} is outside {self.n} examples")
        self.epoch, self.offset = epoch, offset

    def next_batch(self) -> np.ndarray:
        out = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.offset:self.offset + self.batch_size - len(out)]
            out.extend(take.tolist())
            self.offset += len(take)
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.array(out, np.int64)
