"""Associative recall as a key-value store: labels, values, templates, and the contexts built from them.

One context states 1-8 (label, value) pairs with one **template** (a statement form and a question form),
hides the statements at line boundaries of real text, and ends with the question for one label; the
answer is that label's value followed by the template's **stop byte** (the byte that follows the value
in the question's form: a closing quote, a newline, a period...). The scorer of ``thl-np eval --recall``
(``thl_np.eval.recall.score_answer``) counts an answer right when the value is written exactly and the
next byte is the stop byte; training puts both in the answer's weighted targets, so the model learns where
a value ends.

Everything comes in two disjoint halves, **train** and **held-out** (``SPLITS``): training rows
(``kv_task``, the ``kv`` task of ``thl-np train --tasks``) draw only from the train half; the evaluation's
held-out cells draw from the other half:

- **templates** (``TEMPLATES``): comment lines, assignments, dict and JSON entries, prose sentences, config
  and log lines; the held-out ones are other forms (annotated assignments, XML elements, exports, table
  rows, ...), never seen in training; a training context may instead take a **procedural** template
  (``procedural_template``: a lead, the label, a separator and the value's quotes drawn from small sets of
  parts, thousands of forms, none with a held-out form's syntax), so that what is learnt is the statement's
  shape rather than nine phrasings; a procedural template's question may take a form of its own (its own
  separator or frame and quotes), as a held-out form's question does;
- **labels**: words, multi-word names, snake_case and camelCase identifiers, a word with a digit, all built
  from the word list ``WORDS``, whose every fourth word is held out (a held-out label is made of held-out
  words only, so no training label equals or contains it);
- **value formats** (``VALUE_FORMATS``, 3-12 characters): digits, lowercase letters, a word, a snake_case
  identifier for training; upper-case codes (letters and digits), hexadecimal and kebab-case words held
  out.

A context may **update** a label (restate it with a new value later in the text: the latest value is the
answer) and carry **look-alike distractors**: labels one edit away from the asked one (a letter changed, a
digit appended, a word swapped), stated with values of the same format. The statements keep their order
in the text (their depths are sorted), so "latest" is well defined.

All draws come from the caller's ``np.random.Generator``: the training rows are the ``WindowBatches``
generator's (``thl_np.training.synthetic_tasks``: its state is the run's data position, so a resumed run
reads the same rows bit for bit), the evaluation's are seeded per cell.
"""
from __future__ import annotations

import functools
import string
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

SPLITS = ("train", "held")
MIN_VALUE, MAX_VALUE = 3, 12
MAX_PAIRS = 8

# Short common words, in a fixed order: index % 4 == 3 is held out (labels and word values of held-out cells).
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "silver", "rocket",
    "garden", "window", "pencil", "marble", "falcon", "copper", "meadow", "anchor", "basket", "bridge",
    "cactus", "dragon", "engine", "feather", "glacier", "harbor", "island", "jacket", "kettle", "ladder",
    "magnet", "needle", "orange", "pepper", "quartz", "rabbit", "saddle", "tunnel", "violet", "walnut",
    "yellow", "zebra", "amber", "badge", "cedar", "daisy", "ember", "flint", "grape", "hazel", "ivory",
    "jewel", "koala", "lilac", "mango", "noble", "olive", "pearl", "quill", "raven", "spice", "thorn",
    "umber", "vapor", "wheat", "yacht", "zinc", "acorn", "blade", "crane", "delta", "eagle", "frost",
    "ghost", "honey", "index", "joker", "knife", "lunar", "maple", "north", "ocean", "prism", "queen",
    "ridge", "solar", "torch", "urban", "vivid", "wagon", "xenon", "young", "alpha", "bravo", "comet",
    "dune", "echo", "fable", "gamma", "hotel", "iris", "jade", "karma", "lotus", "metro", "nova", "orbit",
    "pixel", "quota", "radar", "sigma", "tango", "ultra", "vector", "whale", "yarn", "zone", "atlas",
    "blue", "coral", "dusk", "field", "green", "heron", "inlet", "jolly", "kite", "lake", "moss", "nest",
    "oak", "pine", "quiet", "reed", "sand", "tide", "vale", "wind", "birch", "cove", "dawn", "elm", "fern",
    "glen", "hill", "ink", "jam", "keel", "lark", "mint", "nut", "opal", "plum", "rain", "salt", "tea",
    "vine", "wolf", "yew", "bolt", "cart", "desk", "fork", "gear", "hook", "jar", "key", "lamp", "mask",
    "nail", "oven", "pump", "ring", "sock", "tray", "vase", "wire", "box", "cup", "drum", "flag", "gate",
    "horn", "lock", "mug", "net", "pot", "rope", "seal", "tent", "valve", "wheel", "red", "swift", "brave",
    "calm", "dark", "eager", "fast", "grand", "happy", "keen", "loud", "merry", "neat", "proud", "rapid",
    "sharp", "tall", "warm", "wild", "bold", "cool", "deep", "fair", "gold", "high", "kind", "lean",
    "main", "new", "old", "prime", "raw", "soft", "true", "vast", "west", "east", "south", "upper", "lower",
)


def split_words(split: str) -> tuple[str, ...]:
    """The words of ``split``: "train" (three in four of ``WORDS``) or "held" (every fourth)."""
    _check_split(split)
    return tuple(w for i, w in enumerate(WORDS) if (i % 4 == 3) == (split == "held"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"split = {split!r}: use one of {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------- labels
LABEL_KINDS = ("word", "name", "snake", "camel", "numbered")


def make_label(rng: np.random.Generator, split: str) -> str:
    """A label of ``split``'s words: a word, a two-word name ("red fox"), snake_case, camelCase or a word
    with a digit. Labels always start with a lowercase letter and hold letters, digits, "_" and " " only."""
    words = split_words(split)
    kind = LABEL_KINDS[int(rng.integers(0, len(LABEL_KINDS)))]
    a, b = (words[int(i)] for i in rng.integers(0, len(words), size=2))
    if kind == "word":
        return a
    if kind == "name":
        return f"{a} {b}"
    if kind == "snake":
        return f"{a}_{b}"
    if kind == "camel":
        return a + b.capitalize()
    return f"{a}{int(rng.integers(0, 10))}"


def look_alike(rng: np.random.Generator, label: str, split: str) -> str:
    """A label one edit away from ``label``: a letter changed, a digit appended, or a word swapped."""
    how = int(rng.integers(0, 3))
    if how == 0:
        letters = [i for i, c in enumerate(label) if c.isalpha() and c.islower()]
        i = letters[int(rng.integers(0, len(letters)))]
        options = [c for c in string.ascii_lowercase if c != label[i]]
        return label[:i] + options[int(rng.integers(0, len(options)))] + label[i + 1:]
    if how == 1:
        return label + str(int(rng.integers(0, 10)))
    words = split_words(split)
    last = label.split(" ")[-1].split("_")[-1]
    return words[int(rng.integers(0, len(words)))] + (" " if " " in label else "_") + last


def as_identifier(label: str) -> str:
    """The label as a Python identifier: spaces become underscores."""
    return label.replace(" ", "_")


# ----------------------------------------------------------------------------------------------- values
VALUE_FORMATS = {
    "train": ("digits", "letters", "word", "ident"),
    "held": ("code", "hex", "kebab"),
}
_LOWER = string.ascii_lowercase
_CODE = string.ascii_uppercase + string.digits
_HEX = "0123456789abcdef"


def _chars(rng, alphabet: str, n: int) -> str:
    return "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), size=n))


def _joined_words(rng, sep: str, n: int) -> str:
    """Words (any split: a value's words are not labels) joined by ``sep``, cut to at most ``n`` characters
    without ending on the separator."""
    out = WORDS[int(rng.integers(0, len(WORDS)))]
    while len(out) < n:
        out += sep + WORDS[int(rng.integers(0, len(WORDS)))]
    return out[:n].rstrip(sep) if sep else out[:n]


def make_value(rng: np.random.Generator, fmt: str, length: int | None = None) -> str:
    """A value of format ``fmt`` (``VALUE_FORMATS``), 3-12 characters (``length`` exactly when given, except
    for a word, which is a whole word of 3-12 letters). Values hold letters, digits, "_" and "-" only, so no
    template's stop byte can occur inside one."""
    n = int(rng.integers(MIN_VALUE, MAX_VALUE + 1)) if length is None else int(length)
    if not MIN_VALUE <= n <= MAX_VALUE:
        raise InputError(f"value length {n}: use {MIN_VALUE}-{MAX_VALUE} characters")
    if fmt == "digits":
        return _chars(rng, string.digits, n)
    if fmt == "letters":
        return _chars(rng, _LOWER, n)
    if fmt == "code":
        return _chars(rng, _CODE, n)
    if fmt == "hex":
        return _chars(rng, _HEX, n)
    if fmt == "word":   # one word, or (for a length no word has) words run together, cut to the length
        if length is None:
            return WORDS[int(rng.integers(0, len(WORDS)))]
        fitting = [w for w in WORDS if len(w) == n]
        return fitting[int(rng.integers(0, len(fitting)))] if fitting else _joined_words(rng, "", n)
    if fmt in ("ident", "kebab"):
        v = _joined_words(rng, "_" if fmt == "ident" else "-", n)
        while len(v) < n:   # cut at a separator: pad with letters to the length asked for
            v += _LOWER[int(rng.integers(0, 26))]
        return v
    raise InputError(f"value format {fmt!r}: use one of {', '.join(VALUE_FORMATS['train'] + VALUE_FORMATS['held'])}")


# -------------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    """A statement line (``{L}``: the label as written, ``{I}``: as an identifier, ``{V}``: the value) and a
    question that ends where the value goes; ``stop`` is the byte that must follow the value."""

    name: str
    statement: str
    question: str
    stop: str

    def state(self, label: str, value: str) -> str:
        return self.statement.format(L=label, I=as_identifier(label), V=value)

    def ask(self, label: str) -> str:
        return self.question.format(L=label, I=as_identifier(label))


TEMPLATES = {
    "train": (
        Template("comment", "# {L}: {V}\n", "# {L}: ", "\n"),
        Template("remember", "# remember: {L} is {V}.\n", "# what is {L}? {L} is ", "."),
        Template("assign", '{I} = "{V}"\n', 'assert {I} == "', '"'),
        Template("dict", '    "{L}": "{V}",\n', 'print(table["{L}"])  # "', '"'),
        Template("json", '{{"{L}": "{V}"}}\n', '{{"{L}": "', '"'),
        Template("prose", "The {L} is {V}.\n", "What is the {L}? The {L} is ", "."),
        Template("config", "{I}={V}\n", "# {I} is set to ", "\n"),
        Template("log", "INFO set {L} to {V}\n", "INFO {L} is now ", "\n"),
        Template("kwarg", "    configure({I}='{V}')\n", "    # configure was called with {I}='", "'"),
    ),
    "held": (
        Template("annotated", "{I}: str = '{V}'\n", "print(repr({I}))  # '", "'"),
        Template("xml", "<{I}>{V}</{I}>\n", "<!-- the {I} element holds --> <{I}>", "<"),
        Template("export", 'export {I}="{V}"\n', 'echo "${I}"  # prints "', '"'),
        Template("table", "| {L} | {V} |\n", "| {L} | ", " "),
        Template("sentence", "Note that {L} was set to {V} earlier.\n",
                 "Question: what was {L} set to? Answer: {L} was set to ", " "),
    ),
}


def templates(split: str) -> tuple[Template, ...]:
    _check_split(split)
    return TEMPLATES[split]


# The parts of a procedural template. None is a held-out form's distinctive syntax: no "<", "|", "export",
# "str", "Note that" or "set to" (``test_procedural_templates_never_take_a_held_out_form``).
PROCEDURAL_LEADS = ("", "# ", "// ", "-- ", "; ", "> ", "* ", "    ", "note: ", "@")
PROCEDURAL_SEPARATORS = (": ", " = ", "=", " -> ", " => ", " := ", " is ", " was ", " : ", "\t", " == ",
                         " equals ")
#: (opening, closing) around the value; the closing's first byte is the stop.
PROCEDURAL_QUOTES = (("", "\n"), ('"', '"'), ("'", "'"), ("[", "]"), ("(", ")"), ("`", "`"), ("{{", "}}"),
                     ("", "."), ("", ";"), ("", ","))
PROCEDURAL_ASKS = ("", "# ", "? ", "Q: ", "lookup: ", "recall ", ">>> ", "// ")
#: What a free question may put between the label and the value's opening instead of a separator: the
#: question then ends in words the statement never had, as a held-out form's may. None shares 4 bytes with
#: what a held-out question puts after its label (``test_free_question_frames_share_nothing_with_held_out_
#: questions``; the first set had ``)  # ``, `` holds `` and ``? answer: ``, pieces of ``annotated``'s, ``xml``'s and
#: ``sentence``'s).
PROCEDURAL_FRAMES = (") -> ", "? ", " (now) = ", " now: ", " reads ", " value: ", "] == ", " gives ",
                     " (current): ", " => value ")
#: What a wild separator is made of (``procedural_template(wild=True)``): punctuation that no held-out form
#: has for its own ("<", ">", "|" and "$" are theirs) and no value holds ("-", "_"). One to three of them,
#: a space before or after or not: "~", " %: ", "#@ " ... hundreds of separators, so that what marks a value
#: is where it stands after its label, not which separator came between.
WILD_MARKS = ":=~+*^%&!?;/\\#@.,"


def _pick(rng: np.random.Generator, parts):
    """One of ``parts``, uniformly: the one draw every part of a form is made by."""
    return parts[int(rng.integers(0, len(parts)))]


def wild_separator(rng: np.random.Generator) -> str:
    """One to three of ``WILD_MARKS``, with a space before and after each at even odds."""
    marks = "".join(WILD_MARKS[int(i)] for i in rng.integers(0, len(WILD_MARKS), int(rng.integers(1, 4))))
    before, after = rng.random(2) < 0.5
    return (" " if before else "") + marks + (" " if after else "")


def wide_template(rng: np.random.Generator, spaced: bool = False) -> Template:
    """``kv1w``'s form: ``LEAD LABEL SEP OPEN {V} CLOSE``, SEP a ``wild_separator`` (half the time two of
    them around a word of the training half: `` (cedar) ``, ``: river = ``), OPEN/CLOSE a pair of quotes or
    (half the time) no opening and a single mark; the question ``ASK LABEL SEP2 OPEN`` has a separator of its
    own (wild, or a frame) and the statement's opening. So the answer is always the value and the byte that
    followed it in the statement, as at every held-out form, while what stands between the label and the
    value is new in nearly every context. ``spaced``: a quarter of the closings are instead a space and a
    word of the training half (``x ;cedar@ V river``; the stop a space, as in the held-out ``table`` and
    ``sentence``; no value holds a space). Training half only (name ``procedural``)."""
    pick = functools.partial(_pick, rng)
    lead, ask = pick(PROCEDURAL_LEADS), pick(PROCEDURAL_ASKS)
    label = "{L}" if rng.random() < 0.5 else "{I}"
    sep = wild_separator(rng)
    if rng.random() < 0.5:
        sep = sep + pick(split_words("train")) + wild_separator(rng)
    if rng.random() < 0.5:
        open_, close = pick(PROCEDURAL_QUOTES)
    else:
        open_, close = "", pick(WILD_MARKS)
    ask_sep = wild_separator(rng) if rng.random() < 0.5 else pick(PROCEDURAL_FRAMES)
    if spaced and rng.random() < 0.25:   # drawn last: the tapes of kv1w stay as they were
        open_, close = "", " " + pick(split_words("train"))
    end = close if close.endswith("\n") else close + "\n"
    return Template("procedural", f"{lead}{label}{sep}{open_}{{V}}{end}", f"{ask}{label}{ask_sep}{open_}",
                    close.format()[0])


#: The tags of a twice-named form (``twice_template``): what stands before the label and after it. None holds
#: ``<`` or ``>`` (``xml``'s own), ``|`` or ``$``; every opening is a mark, so the stop (the closing tag's first
#: byte) is never a value's byte.
TWICE_TAGS = (("[", "]"), ("(", ")"), ("{{", "}}"), ("@", ":"), ("%", "%"), ("#", "#"), ("(", "):"), ("[", "]="))
#: What marks the closing tag, between its opening and the label: ``[/name]``, ``(end name)``, ``#!name#``...
TWICE_ENDS = ("/", "\\", "end ", "!", "~", "")


def twice_template(rng: np.random.Generator) -> Template:
    """A form that names the label twice, around the value, as the held-out ``xml`` does, in none of its
    syntax: ``LEAD A LABEL B {V} A END LABEL B`` (``[red_key]V[/red_key]``, ``@red key:V@end red key:``); A and
    B a pair of ``TWICE_TAGS`` or (half the time) single ``WILD_MARKS``. The question names the label, then
    a separator of its own (wild, or a frame), then the opening tag: ``ASK LABEL SEP A LABEL B``, so it ends
    where the value starts and the stop is the closing tag's first byte. Training half only (name
    ``procedural``)."""
    pick = functools.partial(_pick, rng)
    lead, ask, end = pick(PROCEDURAL_LEADS), pick(PROCEDURAL_ASKS), pick(TWICE_ENDS)
    label = "{L}" if rng.random() < 0.5 else "{I}"
    if rng.random() < 0.5:
        a, b = pick(TWICE_TAGS)
    else:
        a, b = pick(WILD_MARKS), pick(WILD_MARKS)
    ask_sep = wild_separator(rng) if rng.random() < 0.5 else pick(PROCEDURAL_FRAMES)
    opening, closing = f"{a}{label}{b}", f"{a}{end}{label}{b}"
    return Template("procedural", f"{lead}{opening}{{V}}{closing}\n", f"{ask}{label}{ask_sep}{opening}",
                    a.format()[0])


def procedural_template(rng: np.random.Generator, free_question: bool = False, wild: bool = False) -> Template:
    """A statement form assembled from parts: ``LEAD LABEL SEP OPEN {V} CLOSE``, the label as written or as an
    identifier; the question is ``ASK LABEL SEP OPEN`` (the same label form and separator, its own lead), and
    the stop is the closing's first byte. A ``free_question`` draws its own separator or frame and its own
    quotes (``ASK LABEL SEP2 OPEN2``, the stop CLOSE2's first byte): only the label ties it to the statement.
    ``wild``: the separators are ``wild_separator``s instead (the question's its own when it is free), and
    half the time the value's closing is a single mark of ``WILD_MARKS`` with no opening (the stop).
    Training half only (name ``procedural``)."""
    pick = functools.partial(_pick, rng)
    lead, sep, (open_, close), ask = (pick(PROCEDURAL_LEADS), pick(PROCEDURAL_SEPARATORS),
                                      pick(PROCEDURAL_QUOTES), pick(PROCEDURAL_ASKS))
    label = "{L}" if rng.random() < 0.5 else "{I}"
    end = close if close.endswith("\n") else close + "\n"
    ask_sep, ask_open, stop = sep, open_, close
    if free_question:   # drawn after the mirrored form's parts, so the tapes without free questions stay
        ask_sep = pick(PROCEDURAL_SEPARATORS + PROCEDURAL_FRAMES)
        ask_open, stop = pick(PROCEDURAL_QUOTES)
    if wild:            # drawn after everything above, so the tapes without wild separators stay
        sep = wild_separator(rng)
        ask_sep = wild_separator(rng) if free_question else sep
        if rng.random() < 0.5:
            open_, close = "", WILD_MARKS[int(rng.integers(0, len(WILD_MARKS)))]
            end = close + "\n"
            if not free_question:
                ask_open, stop = open_, close
        if free_question and rng.random() < 0.5:
            ask_open, stop = "", WILD_MARKS[int(rng.integers(0, len(WILD_MARKS)))]
    return Template("procedural", f"{lead}{label}{sep}{open_}{{V}}{end}", f"{ask}{label}{ask_sep}{ask_open}",
                    stop.format()[0])


# -------------------------------------------------------------------------------------------- contexts
@dataclass(frozen=True)
class Spec:
    """What one context is drawn from: each of templates, labels and value formats from the "train" or the
    "held" half; ``pairs`` (1-8 labels stated) or None (1-8 at random); ``updates``: how many times the asked
    label is restated with a new value (None: 0 or 1-2 at random); ``distractors`` (look-alike labels, None:
    0-2 at random); ``value_formats`` narrows the formats, ``value_length`` fixes the length (3-12);
    ``procedural``: the share of contexts whose template is a ``procedural_template`` (train half only);
    ``free_questions``: the share of those whose question takes a form of its own (``free_question``);
    ``wild``: the share of them whose separators are wild (``wild_separator``); ``wide``: the share of them
    that are ``wide_template``s instead, ``spaced`` ones (closed by a space, a quarter of the time) or not;
    ``twice``: the share of those wide ones that name the label twice instead (``twice_template``);
    ``questions``: the half the question (and its stop byte) comes from when it is not the statement's own
    template's (None): a held-out statement asked in a trained form, or the other way round, tells whether
    the write or the read is what does not carry over to an unseen form (evaluation only)."""

    templates: str = "train"
    labels: str = "train"
    formats: str = "train"
    pairs: int | None = None
    updates: int | None = None
    distractors: int | None = None
    value_formats: tuple[str, ...] | None = None
    value_length: int | None = None
    procedural: float = 0.0
    free_questions: float = 0.0
    wild: float = 0.0
    wide: float = 0.0
    spaced: bool = False
    twice: float = 0.0
    questions: str | None = None

    def check(self) -> None:
        for what in ("templates", "labels", "formats"):
            _check_split(getattr(self, what))
        if self.questions is not None:
            _check_split(self.questions)
            if self.procedural:
                raise InputError("questions from another template and procedural templates do not mix")
        if self.pairs is not None and not 1 <= int(self.pairs) <= MAX_PAIRS:
            raise InputError(f"pairs = {self.pairs}: use 1-{MAX_PAIRS}")
        if self.value_length is not None and not MIN_VALUE <= int(self.value_length) <= MAX_VALUE:
            raise InputError(f"value length {self.value_length}: use {MIN_VALUE}-{MAX_VALUE} characters")
        if not 0.0 <= float(self.procedural) <= 1.0:
            raise InputError(f"procedural = {self.procedural}: a share, in [0, 1]")
        if not 0.0 <= float(self.free_questions) <= 1.0:
            raise InputError(f"free_questions = {self.free_questions}: a share, in [0, 1]")
        for share in ("wild", "wide", "twice"):
            if not 0.0 <= float(getattr(self, share)) <= 1.0:
                raise InputError(f"{share} = {getattr(self, share)}: a share, in [0, 1]")
            if getattr(self, share) and not self.procedural:
                raise InputError(f"{share} is a share of the procedural templates: give procedural > 0")
        if self.spaced and not self.wide:
            raise InputError("spaced is a kind of wide form: give wide > 0")
        if self.twice and not self.wide:
            raise InputError("twice is a share of the wide forms: give wide > 0")
        if self.free_questions and not self.procedural:
            raise InputError("free_questions is a share of the procedural templates: give procedural > 0")
        if self.procedural and self.templates != "train":
            raise InputError("procedural templates are a training form: use them with the train half only")


@dataclass(frozen=True)
class Context:
    """One drawn context: ``statements`` (lines, in the order they must appear), the ``question``, the
    ``value`` asked for (the latest one stated for the label) and the template's ``stop`` byte."""

    statements: tuple[str, ...]
    question: str
    value: str
    stop: str
    label: str
    template: str
    value_format: str
    answer_index: int = -1   # the statement holding the answer (the asked label's last)
    form: Template | None = None   # the template itself (a procedural one has no table entry)

    @property
    def answer(self) -> str:
        """What the model should write: the value, then the stop byte."""
        return self.value + self.stop


def draw_context(rng: np.random.Generator, spec: Spec = Spec()) -> Context:
    """A context of ``spec`` (module docstring). The asked label's statements come in the order given, the
    last one holding the answer; the other statements are shuffled among them."""
    spec.check()
    tpl_pool = templates(spec.templates)
    tpl = tpl_pool[int(rng.integers(0, len(tpl_pool)))]
    if spec.procedural and rng.random() < spec.procedural:   # no draw at 0: the fixed-template tapes stay
        if spec.wide and rng.random() < spec.wide:            # likewise: no draw at 0
            if spec.twice and rng.random() < spec.twice:      # likewise
                tpl = twice_template(rng)
            else:
                tpl = wide_template(rng, bool(spec.spaced))
        else:
            free = bool(spec.free_questions) and rng.random() < spec.free_questions   # no draw at 0, as above
            wild = bool(spec.wild) and rng.random() < spec.wild                        # likewise
            tpl = procedural_template(rng, free, wild)
    if spec.questions is not None:   # drawn only here: the tapes of specs without it stay as they were
        asking = templates(spec.questions)
        other = asking[int(rng.integers(0, len(asking)))]
        tpl = Template(f"{tpl.name}/{other.name}", tpl.statement, other.question, other.stop)
    formats = spec.value_formats or VALUE_FORMATS[spec.formats]
    fmt = formats[int(rng.integers(0, len(formats)))]
    pairs = int(rng.integers(1, MAX_PAIRS + 1)) if spec.pairs is None else int(spec.pairs)
    if spec.updates is None:
        updates = 0 if rng.random() < 0.6 else int(rng.integers(1, 3))
    else:
        updates = int(spec.updates)
    distractors = int(rng.integers(0, 3)) if spec.distractors is None else int(spec.distractors)

    labels = []
    while len(labels) < pairs:
        lab = make_label(rng, spec.labels)
        if lab not in labels:
            labels.append(lab)
    asked = labels[0]
    tries = 0
    while distractors and tries < 20:   # look-alikes of the asked label, unlike every other label
        tries += 1
        lab = look_alike(rng, asked, spec.labels)
        if lab not in labels:
            labels.append(lab)
            distractors -= 1
    used: set[str] = set()
    # The labels, each one's statement with the value left out ("\0": no value holds it) and its question:
    # a value found in one (inside "remember", say) would be in the text more than once.
    fixed_text = labels + [tpl.state(lab, "\0") for lab in labels] + [tpl.ask(lab) for lab in labels]

    def fresh_value() -> str:
        while True:
            v = make_value(rng, fmt, spec.value_length)
            # distinct values, none inside another, a label or a template's own words: the answer is never
            # in the text twice
            if all(v not in u and u not in v for u in used) and all(v not in t for t in fixed_text):
                used.add(v)
                return v

    asked_values = [fresh_value() for _ in range(updates + 1)]
    others = [(lab, fresh_value()) for lab in labels[1:]]
    slots = ["asked"] * len(asked_values) + list(range(len(others)))
    order = rng.permutation(len(slots))
    lines, k, last = [], 0, -1
    for i in order:
        s = slots[int(i)]
        if s == "asked":
            lines.append(tpl.state(asked, asked_values[k]))
            k += 1
            last = len(lines) - 1
        else:
            lines.append(tpl.state(*others[s]))
    return Context(statements=tuple(lines), question=tpl.ask(asked), value=asked_values[-1], stop=tpl.stop,
                   label=asked, template=tpl.name, value_format=fmt, answer_index=last, form=tpl)


def context_bytes(ctx: Context) -> int:
    """Bytes the context adds to a window: its statements, its question and its answer."""
    return sum(len(s) for s in ctx.statements) + len(ctx.question) + len(ctx.answer)


def fit_context(ctx: Context, room: int) -> Context | None:
    """``ctx`` with non-asked statements dropped (from the end) until statements, question and answer fit in
    ``room`` bytes; None when even the asked label's own statements do not fit."""
    lines = list(ctx.statements)
    need = context_bytes(ctx)
    answer_index = ctx.answer_index
    i = len(lines) - 1
    while need > room and i >= 0:
        if not _states_label(ctx, lines[i]):
            need -= len(lines[i])
            lines.pop(i)
            answer_index -= i < answer_index
        i -= 1
    if need > room:
        return None
    return Context(statements=tuple(lines), question=ctx.question, value=ctx.value, stop=ctx.stop,
                   label=ctx.label, template=ctx.template, value_format=ctx.value_format,
                   answer_index=answer_index, form=ctx.form)


def _states_label(ctx: Context, line: str) -> bool:
    """Whether ``line`` is a statement of the asked label (one of its template's statements for it)."""
    return line.startswith(_statement_head(ctx))


#: The training tasks' specs: ``kv`` the whole task, ``kv1`` its easiest part (one pair, no update, no
#: distractor: evaluation cell ``trained``'s contexts), a curriculum's first stage; ``kvp`` and ``kv1p`` the
#: same with half the contexts in procedural templates; ``kvq`` and ``kv1q`` those with every procedural
#: question in a form of its own; ``kv2p``, ``kv4p`` and ``kv8p`` ``kv1p`` with 2, 4 and 8 pairs (a pair-count
#: curriculum); ``kv1r`` ``kv1q`` with wild separators in every procedural form (``wild_separator``);
#: ``kv1w`` one pair in the fixed templates or (half the contexts) ``wide_template``s; ``kv1ws`` the same with
#: spaced wide forms (a quarter of their values closed by a space); ``kv1wst`` ``kv1ws`` with a quarter of the
#: wide forms naming the label twice (``twice_template``).
KV_TASKS = {"kv": Spec(), "kv1": Spec(pairs=1, updates=0, distractors=0),
            "kvp": Spec(procedural=0.5), "kv1p": Spec(pairs=1, updates=0, distractors=0, procedural=0.5),
            "kvq": Spec(procedural=0.5, free_questions=1.0),
            "kv1q": Spec(pairs=1, updates=0, distractors=0, procedural=0.5, free_questions=1.0),
            "kv1r": Spec(pairs=1, updates=0, distractors=0, procedural=0.5, free_questions=1.0, wild=1.0),
            "kv1w": Spec(pairs=1, updates=0, distractors=0, procedural=0.5, wide=1.0),
            "kv1ws": Spec(pairs=1, updates=0, distractors=0, procedural=0.5, wide=1.0, spaced=True),
            "kv1wst": Spec(pairs=1, updates=0, distractors=0, procedural=0.5, wide=1.0, spaced=True, twice=0.25),
            "kv2p": Spec(pairs=2, updates=0, distractors=0, procedural=0.5),
            "kv4p": Spec(pairs=4, updates=0, distractors=0, procedural=0.5),
            "kv8p": Spec(pairs=8, updates=0, distractors=0, procedural=0.5)}


def kv_task(rng: np.random.Generator, room: int,
            spec: Spec = KV_TASKS["kv"]) -> tuple[list[bytes], bytes, bytes, tuple[int, int, int]] | None:
    """(statement lines in order, question, answer = value and stop byte, where the answer's value is stated:
    (line index, byte offset in the line, byte length)) of a training context of ``spec`` (the train half), its
    statements, question and answer within ``room`` bytes (``fit_context``); None when ``room`` is too small.
    ``WindowBatches`` (``thl_np.training.synthetic_tasks``, tasks ``kv`` and ``kv1``) puts the lines at sorted
    depths of its filler, then the question and the answer."""
    if "held" in (spec.templates, spec.labels, spec.formats, spec.questions):
        raise InputError("a training context comes from the train half only: the held half is for evaluation")
    ctx = fit_context(draw_context(rng, spec), room)
    if ctx is None:
        return None
    lines = [s.encode() for s in ctx.statements]
    stated = ctx.answer_index % len(lines)
    return lines, ctx.question.encode(), ctx.answer.encode(), (stated, *_value_span(ctx, ctx.statements[stated]))


def _value_span(ctx: Context, line: str) -> tuple[int, int]:
    """(byte offset, byte length) of the asked value in ``line``, its statement: where the template puts
    ``{V}``, so a label that happens to contain the value (before it, or after it in a form naming the label
    twice) is never taken for it."""
    head = _statement_head(ctx)
    value = ctx.value
    if not (line.startswith(head) and line[len(head):].startswith(value)):
        raise AssertionError(f"statement {line!r} does not state {value!r} after {head!r}")
    return len(head.encode()), len(value.encode())


def _statement_head(ctx: Context) -> str:
    """The asked label's statement up to its value (its template's text before ``{V}``)."""
    tpl = ctx.form or next(t for split in SPLITS for t in TEMPLATES[split] if t.name == ctx.template)
    return tpl.statement.split("{V}")[0].format(L=ctx.label, I=as_identifier(ctx.label))
