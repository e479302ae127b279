"""The task fields of a THLConfig (``task``, ``num_labels``, ``id2label``, ``label2id``, ``classifier_dropout``):
their validation and defaults. A config without a task has none of them (a language model)."""
from __future__ import annotations

from .checks import check
from .errors import ConfigError

TASK_FIELDS = ("task", "num_labels", "id2label", "label2id", "classifier_dropout")
SEQUENCE = "sequence-classification"
TOKEN = "token-classification"
CHOICE = "multiple-choice"
TASKS = (SEQUENCE, TOKEN, CHOICE)
DEFAULT_DROPOUT = 0.1  # the PyTorch THL's nn.Dropout(0.1)
#: The model class of each task (``thl_np.finetune.models``), by name: what an error tells a user to load.
CLASS_NAMES = {SEQUENCE: "THLForSequenceClassification", TOKEN: "THLForTokenClassification",
               CHOICE: "THLForMultipleChoice"}


def class_name_for(task: str) -> str:
    return CLASS_NAMES[task]


def check_task_fields(config) -> None:
    """Validate and normalise the task fields in place: ``id2label`` gets int keys 0..L−1 (config.json's are
    strings, as Hugging Face writes them), ``label2id`` its inverse, ``num_labels`` its length."""
    if config.task is None:
        stray = [name for name in TASK_FIELDS if getattr(config, name) is not None]
        if stray:
            raise ConfigError(f"{stray} are set but task is not: set task to one of {list(TASKS)}, or remove them "
                              "(a language model has no head)")
        return
    if config.task not in TASKS:
        raise ConfigError(f"task = {config.task!r} is not a task thl-np knows: use one of {list(TASKS)}")
    p = DEFAULT_DROPOUT if config.classifier_dropout is None else config.classifier_dropout
    config.classifier_dropout = check("classifier_dropout", p, ConfigError)
    if config.task == CHOICE:
        for name in ("num_labels", "id2label", "label2id"):
            if getattr(config, name) is not None:
                raise ConfigError(f"{name} is set for task 'multiple-choice', which scores each choice with one "
                                  "output: remove it")
        return
    config.id2label = _id2label(config)
    config.num_labels = len(config.id2label)
    inverse = {label: i for i, label in config.id2label.items()}
    if config.label2id is not None:
        given = config.label2id
        if not isinstance(given, dict) or {str(k): v for k, v in given.items()} != inverse:
            raise ConfigError(f"label2id = {given!r} is not the inverse of id2label {config.id2label!r}: "
                              "remove label2id (it is derived) or make the two agree")
    config.label2id = inverse


def _id2label(config) -> dict:
    n, given = config.num_labels, config.id2label
    if n is not None:
        n = check("num_labels", n, ConfigError)
    if given is None:
        if n is None:
            raise ConfigError(f"task {config.task!r} needs num_labels or id2label: how many classes the head has")
        return {i: f"LABEL_{i}" for i in range(n)}
    if not isinstance(given, dict) or not given:
        raise ConfigError(f"id2label = {given!r} must be a non-empty object {{\"0\": label, \"1\": label, ...}}")
    try:
        out = {int(k): v for k, v in given.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"id2label keys {list(given)} must be the integers 0..L-1 (as strings in JSON)") from None
    if sorted(out) != list(range(len(out))):
        raise ConfigError(f"id2label keys {sorted(out)} must be exactly 0..{len(out) - 1}")
    if not all(isinstance(v, str) and v for v in out.values()) or len(set(out.values())) != len(out):
        raise ConfigError(f"id2label values {list(out.values())} must be distinct non-empty strings")
    if n is not None and n != len(out):
        raise ConfigError(f"num_labels = {n} but id2label has {len(out)} labels: make them agree")
    return dict(sorted(out.items()))
