"""``thl-np eval --recall``: associative recall in named cells, scored by exact value and a correct stop.

A trial (``recall_prompt``) draws a context (``thl_np.training.recall_tasks.draw_context``: 1-8 labels
stated with values by one template, maybe updates and look-alike distractors), hides its statements at
line boundaries of real Python source (``thl_np.training.haystack``'s ``source`` haystack: thl-np's own
sources by default, never trained on) at sorted depths drawn uniformly in [0.1, 0.9], and ends with the
question for one label. The prompt is exactly the cell's length in bytes.

**The scorer** (``score_answer``): the model greedily writes len(value) + 1 bytes; the trial is right when
the first len(value) bytes are the value and the next byte is the template's stop byte (the byte that
follows the value in the question's form: a closing quote, a newline, a period, a space or a ``<``; no
value holds any of them). ``value_exact`` counts the value alone (without the stop), ``char_accuracy``
the value's bytes in the right place. A finer signal: the answer's teacher-forced bits per byte (value
and stop byte, over all 256 bytes), to set beside the same figure with the writer off.

**Cells** (``CELLS``): each a ``Spec`` (which halves of templates, labels and value formats; pairs,
updates, distractors; value formats and length), a length and the writer on or off. "held" means all three
held out of training. ``writer-off`` is the control: the model with write rate η = 0, so nothing reaches
the memory (the local window and the recurrent tiers still see the text).

Trials are seeded per cell and length (``np.random.default_rng([seed, crc32(cell), length])``), so a cell's
trials do not depend on the other cells asked for (``writer-off`` runs the prompts of ``held``, so the two
differ only in the writer); the training tasks draw from their own generator.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import numpy as np

from ..checks import check_seed
from ..errors import InputError
from ..training.haystack import Haystack
from ..training.recall_tasks import Context, Spec, draw_context

DEPTH = (0.1, 0.9)
#: How often a trial's context is drawn again when the haystack happens to hold its answer.
_REDRAWS = 20

_HELD = dict(templates="held", labels="held", formats="held")
_ONE = dict(pairs=1, updates=0, distractors=0)
_STATED_HELD = Spec(templates="held", questions="train", **_ONE)   # a held-out statement, a trained question
_ASKED_HELD = Spec(templates="train", questions="held", **_ONE)    # a trained statement, a held-out question


@dataclass(frozen=True)
class Cell:
    spec: Spec
    length: int = 4096
    writer: bool = True
    fixed_length: bool = False   # a length cell keeps its length whatever --recall-length says
    about: str = ""
    prompts_of: str | None = None   # another cell whose prompts this one reuses (the control: the same trials)


CELLS = {
    "trained": Cell(Spec(**_ONE), about="one pair; templates, labels and value formats of the training half"),
    "held-templates": Cell(Spec(templates="held", **_ONE), about="one pair; held-out templates only"),
    "held-labels": Cell(Spec(labels="held", **_ONE), about="one pair; held-out labels only"),
    "held-formats": Cell(Spec(formats="held", **_ONE), about="one pair; held-out value formats only"),
    "held": Cell(Spec(**_HELD, **_ONE), about="one pair; templates, labels and value formats all held out"),
    # Where an unseen form fails: a held-out statement asked in a trained form (the write of an unseen
    # statement), and a trained statement asked in a held-out form (the read at an unseen question).
    "held-statements": Cell(_STATED_HELD,
                            about="one pair; a held-out template's statement, a trained template's question"),
    "held-questions": Cell(_ASKED_HELD,
                           about="one pair; a trained template's statement, a held-out template's question"),
    # In distribution: whether several pairs and updates are learnt, apart from the held-out forms.
    "trained-pairs-4": Cell(Spec(pairs=4, updates=0, distractors=0),
                            about="the training half; 4 labels stated, one asked"),
    "trained-pairs-8": Cell(Spec(pairs=8, updates=0, distractors=0),
                            about="the training half; 8 labels stated, one asked"),
    "trained-update": Cell(Spec(pairs=1, updates=1, distractors=0),
                           about="the training half; the label restated with a new value: the latest is the answer"),
    **{f"alphabet-{f}": Cell(Spec(**_HELD, **_ONE, value_formats=(f,)),
                             about=f"held-out templates and labels; {f} values")
       for f in ("digits", "letters", "word", "ident", "code", "hex", "kebab")},
    **{f"value-{n}": Cell(Spec(**_HELD, **_ONE, value_length=n), about=f"all held out; values of {n} characters")
       for n in (3, 6, 12)},
    **{f"pairs-{k}": Cell(Spec(**_HELD, pairs=k, updates=0, distractors=0),
                          about=f"all held out; {k} labels stated, one asked")
       for k in (1, 4, 8)},
    "update": Cell(Spec(**_HELD, pairs=1, updates=1, distractors=0),
                   about="all held out; the label restated with a new value: the latest is the answer"),
    "distractors": Cell(Spec(**_HELD, pairs=1, updates=0, distractors=2),
                        about="all held out; two look-alike labels stated too"),
    **{f"len-{n // 1024}K": Cell(Spec(**_HELD, **_ONE), length=n, fixed_length=True,
                                 about=f"all held out; one pair in {n:,} bytes")
       for n in (1024, 4096, 16384, 65536, 262144)},
    "writer-off": Cell(Spec(**_HELD, **_ONE), writer=False, prompts_of="held",
                       about="the control: cell 'held''s prompts with the writer off (write rate 0)"),
    "trained-writer-off": Cell(Spec(**_ONE), writer=False, prompts_of="trained",
                               about="cell 'trained''s prompts with the writer off: what the memory adds in "
                                     "distribution"),
    "held-templates-writer-off": Cell(Spec(templates="held", **_ONE), writer=False, prompts_of="held-templates",
                                      about="cell 'held-templates''s prompts with the writer off: what the "
                                            "memory adds at a form never trained"),
    **{f"{c}-writer-off": Cell(spec, writer=False, prompts_of=c,
                               about=f"cell '{c}''s prompts with the writer off")
       for c, spec in (("held-statements", _STATED_HELD), ("held-questions", _ASKED_HELD))},
}
#: The cells ``thl-np eval --recall`` runs when none are named: everything up to 16K bytes.
#: The statement/question crosses are a diagnosis of the held-out forms, not a target: asked for by name.
DEFAULT_CELLS = tuple(c for c in CELLS if c not in ("len-64K", "len-256K")
                      and not c.startswith(("held-statements", "held-questions")))


def parse_cells(text) -> tuple[str, ...]:
    """``"held,update"`` → ("held", "update"); ``all`` → every cell; unknown names are an InputError."""
    if text is None or str(text).strip() == "":
        return DEFAULT_CELLS
    if str(text).strip() == "all":
        return tuple(CELLS)
    names = tuple(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    bad = [t for t in names if t not in CELLS]
    if not names or bad:
        raise InputError(f"recall cells {text!r}: name one or more of {', '.join(CELLS)} (or 'all'), "
                         "comma-separated")
    return names


def cell_length(name: str, length: int | None) -> int:
    """The prompt length of cell ``name``: its own, or ``length`` when given (except for the len-* cells)."""
    cell = CELLS[name]
    return cell.length if (length is None or cell.fixed_length) else int(length)


def _cell_rng(seed: int, name: str, length: int) -> np.random.Generator:
    name = CELLS[name].prompts_of or name
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(length)])


def _boundaries(text: bytes) -> np.ndarray:
    ends = np.concatenate([[0], np.flatnonzero(np.frombuffer(text, np.uint8) == 10) + 1])
    return ends if ends[-1] == len(text) else np.append(ends, len(text))


def recall_prompt(ctx: Context, length: int, haystack: Haystack, rng: np.random.Generator) -> dict:
    """A ``length``-byte prompt of ``ctx``: haystack text with the statements at the line boundaries nearest
    sorted depths drawn in [0.1, 0.9] (the nearest boundary inside that range), then the question. Returns
    the prompt and where the asked label's last statement (the one holding the answer) sits."""
    lines = [s.encode() for s in ctx.statements]
    question = ctx.question.encode()
    n_fill = int(length) - sum(map(len, lines)) - len(question)
    if n_fill < 0:
        raise InputError(f"length {length} is too short for this recall context: it needs at least "
                         f"{length - n_fill} bytes for the statements and the question")
    text = haystack.text(rng, n_fill, boundary_in=DEPTH)
    ends = _boundaries(text)
    inside = ends[(ends >= DEPTH[0] * n_fill) & (ends <= DEPTH[1] * n_fill)]
    pool = inside if len(inside) else ends
    depths = np.sort(rng.uniform(*DEPTH, size=len(lines)))
    at = [int(pool[np.argmin(np.abs(pool - d * n_fill))]) for d in depths]
    parts, prev, starts, pos = [], 0, [], 0
    for a, line in zip(at, lines, strict=True):
        parts.append(text[prev:a])
        pos += a - prev
        starts.append(pos)
        parts.append(line)
        pos += len(line)
        prev = a
    parts.append(text[prev:])
    prompt = b"".join(parts) + question
    assert len(prompt) == length
    value = ctx.value.encode()
    last = ctx.answer_index
    v0 = starts[last] + lines[last].index(value)
    return {"prompt": prompt, "key_start": starts[last], "key_end": starts[last] + len(lines[last]),
            "value_steps": list(range(v0, v0 + len(value))), "question_start": length - len(question),
            "key_depth": round(at[last] / max(1, n_fill), 4), "haystack_text": text}


def draw_trial(rng: np.random.Generator, cell: Cell, length: int, haystack: Haystack) -> tuple[Context, dict]:
    """One trial of ``cell``: a context and its prompt; drawn again (up to 20 times) while the haystack text
    holds the answer (value and stop byte), which would make it ambiguous."""
    for _ in range(_REDRAWS):
        ctx = draw_context(rng, cell.spec)
        trial = recall_prompt(ctx, length, haystack, rng)
        if ctx.answer.encode() not in trial.pop("haystack_text"):
            break
    return ctx, trial


def score_answer(answer: bytes, value: str, stop: str) -> dict:
    """The scorer: ``exact`` (the value, then the stop byte: both needed), ``value_exact`` (the value's
    bytes, whatever follows) and ``chars`` (the value's bytes in the right place). ``answer`` is what the
    model wrote: at least len(value) + 1 bytes are needed for ``exact``."""
    v, s = value.encode(), stop.encode()
    if len(s) != 1:
        raise InputError(f"stop = {stop!r} must be one byte")
    head = answer[:len(v)]
    return {"exact": head == v and answer[len(v):len(v) + 1] == s, "value_exact": head == v,
            "chars": sum(a == b for a, b in zip(head, v, strict=False))}


def writer_off(model):
    """The same weights with the memory's write rate η set to 0: nothing is ever written to the memory."""
    from ..model import THLModel

    return THLModel(model.config.replace(write_rate=0.0), params=model.params)


def _answer_bits(decoder, logits, answer: bytes, limit: int) -> float:
    """Teacher-forced −log2 p of ``answer``'s bytes (over the first ``limit`` ids, the bytes), in bits."""
    from ..components.output import log_softmax

    bits = 0.0
    for i, b in enumerate(answer):
        logp = log_softmax(np.asarray(logits, dtype=np.float64)[0, :limit])
        bits -= logp[b] / math.log(2)
        if i < len(answer) - 1:
            logits = decoder.step(np.array([b], dtype=np.int64))
    return float(bits)


def _tally(table: dict, key: str, scored: dict, value_bytes: int, bits: float, answer_bytes: int) -> None:
    """Adds one scored trial to ``table[key]`` (a breakdown of a cell by template or by value format)."""
    t = table.setdefault(key, [0, 0, 0, 0, 0, 0.0, 0])
    for i, add in enumerate((1, scored["exact"], scored["value_exact"], scored["chars"], value_bytes, bits,
                             answer_bytes)):
        t[i] += add


def _rates(table: dict) -> dict:
    """A breakdown's counts as the cell's own figures (``trials``, ``correct``, ``value_exact``,
    ``char_accuracy``, ``answer_bits_per_byte``), by key in sorted order."""
    return {key: {"trials": n, "correct": int(right), "value_exact": value / n, "char_accuracy": chars / vbytes,
                  "answer_bits_per_byte": bits / abytes}
            for key, (n, right, value, chars, vbytes, bits, abytes) in sorted(table.items())}


def recall_eval(model, cells=DEFAULT_CELLS, trials: int = 10, seed: int = 0, length: int | None = None,
                haystack_dir=None, path: str = "auto", keep_samples: int = 3, on_trial=None) -> dict:
    """Every cell of ``cells`` (names of ``CELLS``), ``trials`` trials each (module docstring); ``length``
    replaces the cells' own length (4,096) except for the len-* cells. ``on_trial(done, total)`` after
    every trial. Returns a JSON-able report: per cell, ``exact`` (the score), ``value_exact``,
    ``char_accuracy``, ``answer_bits_per_byte``, the same figures by template (``by_template``) and by
    value format (``by_format``), samples and timing."""
    from ..tokenizer import Tokenizer
    from .long_context import decoding_session, greedy_bytes

    names = parse_cells(",".join(cells) if not isinstance(cells, str) else cells)
    check_seed(seed)
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise InputError(f"trials = {trials!r} must be an integer >= 1")
    hay = Haystack("source", haystack_dir)
    for name in names:   # every cell's haystack checked before the first trial runs
        hay.check_length(cell_length(name, length))
    tok = Tokenizer()
    limit = min(256, model.config.vocab_size)
    off = None
    rows, done = [], 0
    for name in names:
        cell = CELLS[name]
        n = cell_length(name, length)
        m = model if cell.writer else (off := off or writer_off(model))
        rng = _cell_rng(seed, name, n)
        t0 = time.perf_counter()
        exact = value_exact = chars = value_bytes = 0
        bits = answer_bytes = 0.0
        samples, depths = [], []
        parts = {"template": {}, "format": {}}
        for _ in range(trials):
            ctx, trial = draw_trial(rng, cell, n, hay)
            dec = decoding_session(m, path)
            logits = dec.prompt(tok.encode(trial["prompt"])[None, :], logits="last")
            forced = dec.clone()
            answer = bytes(greedy_bytes(dec, logits, len(ctx.answer), limit))
            s = score_answer(answer, ctx.value, ctx.stop)
            exact += s["exact"]
            value_exact += s["value_exact"]
            chars += s["chars"]
            value_bytes += len(ctx.value)
            trial_bits = _answer_bits(forced, logits, ctx.answer.encode(), limit)
            bits += trial_bits
            answer_bytes += len(ctx.answer)
            for kind, key in (("template", ctx.template), ("format", ctx.value_format)):
                _tally(parts[kind], key, s, len(ctx.value), trial_bits, len(ctx.answer))
            depths.append(trial["key_depth"])
            if len(samples) < keep_samples:
                samples.append({"label": ctx.label, "value": ctx.value, "stop": ctx.stop, "template": ctx.template,
                                "format": ctx.value_format, "answer": answer.decode("latin-1"),
                                "right": bool(s["exact"]), "depth": trial["key_depth"]})
            done += 1
            if on_trial is not None:
                on_trial(done, len(names) * trials)
        rows.append({"cell": name, "about": cell.about, "length": n, "writer": cell.writer, "trials": trials,
                     "correct": exact, "exact": exact / trials, "value_exact": value_exact / trials,
                     "char_accuracy": chars / max(1, value_bytes), "answer_bits_per_byte": bits / answer_bytes,
                     "by_template": _rates(parts["template"]), "by_format": _rates(parts["format"]),
                     "depths": depths, "samples": samples, "seconds": time.perf_counter() - t0})
    return {"task": "recall", "haystack": hay.describe(), "depth": list(DEPTH), "trials": trials, "seed": int(seed),
            "scorer": "greedy bytes; right = the whole value, then the template's stop byte",
            "decoding": "greedy, bytes only, fresh state per trial", "results": rows}


def recall_lines(report: dict) -> list[str]:
    """The report as a table."""
    width = max([18] + [len(r["cell"]) + 2 for r in report["results"]])
    out = [f"recall ({report['haystack']['kind']} haystack, statements at depths {report['depth'][0]}-"
           f"{report['depth'][1]}, {report['trials']} trials a cell, seed {report['seed']}; right = the value and "
           "its stop byte):",
           f"  {'cell':<{width}}{'length':>8}  {'right':>12}  {'value':>6}  {'chars':>6}  {'bits/B':>7}"]
    for r in report["results"]:
        out.append(f"  {r['cell']:<{width}}{r['length']:>8}  {r['correct']:>3}/{r['trials']:<3} {r['exact']:>4.0%}  "
                   f"{r['value_exact']:>6.0%}  {r['char_accuracy']:>6.0%}  {r['answer_bits_per_byte']:>7.2f}")
    return out


def recall_trace(model, name: str, seed: int = 0, length: int | None = None, haystack_dir=None,
                 path: str = "auto") -> dict:
    """The first trial of cell ``name`` (the same as ``recall_eval``'s) followed through the memory
    (``thl_np.eval.trace.trace_prompt``): the asked label's last statement is the "key line", the value's
    bytes its "digits"; ``thl_np.eval.trace.trace_lines`` prints it."""
    from ..tokenizer import Tokenizer
    from .trace import trace_prompt

    parse_cells(name)
    cell = CELLS[name]
    n = cell_length(name, length)
    hay = Haystack("source", haystack_dir)
    hay.check_length(n)
    ctx, trial = draw_trial(_cell_rng(seed, name, n), cell, n, hay)
    m = model if cell.writer else writer_off(model)
    tr = trace_prompt(m, Tokenizer().encode(trial["prompt"]), trial["key_start"], trial["key_end"],
                      trial["question_start"], trial["value_steps"], len(ctx.answer), path)
    right = score_answer(tr["answer"].encode("latin-1"), ctx.value, ctx.stop)["exact"]
    return {"cell": name, "length": n, "seed": int(seed), "haystack": hay.describe(), "key_depth": trial["key_depth"],
            "key": ctx.value, "stop": ctx.stop, "label": ctx.label, "template": ctx.template,
            "statements": list(ctx.statements), "question": ctx.question, "correct": bool(right), **tr}
