"""The task models: ``THLForSequenceClassification``, ``THLForTokenClassification``, ``THLForMultipleChoice``.

Each is a THL body (a ``THLModel``: the spec §2 parameters, under their own names) and a head
(``classifier.weight``, ``classifier.bias``; the equations are in ``thl_np.components.heads``). Calling a
model returns ``(logits, loss)`` as the PyTorch THL's task models do; ``value_and_grad`` gives the loss and
the exact gradient of every parameter: the head's backward gives the gradient of the tier states
[N, T, Σd_k], and the body's BPTT takes it from there, on the fast path (``thl_np.engines.gradient``) or
the plain one (``thl_np.step``), with the same numbers.

Training mode is explicit, never a flag on the model: ``dropout`` (a seeded ``np.random.Generator`` or a
keep-mask) turns the head's dropout on, ``gumbel_uniform`` [T, N, H, J] turns on training-mode routing
(spec §4.3); without them the call is in evaluation mode.

Files: ``save_pretrained`` writes config.json (the THLConfig with ``task``, ``num_labels``, ``id2label``,
``label2id`` and ``classifier_dropout``) and one model.safetensors holding the body and the head.
``from_pretrained`` reads such a folder, a ``thl-np finetune`` output folder (its latest checkpoint), or a
language-model folder, whose head it initialises fresh (and says so).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping

import numpy as np

from ..components import heads as H
from ..config import THLConfig
from ..errors import InputError, WeightsError
from ..model import THLModel, choose_fast
from ..params import check_params
from ..step import add_load_balance
from ..task_fields import CHOICE, SEQUENCE, TOKEN

HEAD_NAMES = ("classifier.weight", "classifier.bias")
FORMAT_VERSION = "1"


class JointParams(MutableMapping):
    """The body's and the head's parameter dicts seen as one (body names first, in checkpoint order).
    Assigning a name replaces the array in whichever dict holds it, as AdamW does."""

    def __init__(self, body: dict, head: dict):
        self.body, self.head = body, head

    def _owner(self, name):
        if name in self.head:
            return self.head
        if name in self.body:
            return self.body
        raise KeyError(name)

    def __getitem__(self, name):
        return self._owner(name)[name]

    def __setitem__(self, name, value):
        self._owner(name)[name] = value

    def __delitem__(self, name):
        raise TypeError("a model's parameters cannot be removed")

    def __iter__(self):
        yield from self.body
        yield from self.head

    def __len__(self):
        return len(self.body) + len(self.head)


class Subset(MutableMapping):
    """Some of a parameter mapping's names (the trainable ones), writing through to it."""

    def __init__(self, params, names):
        self.params, self.names = params, list(names)

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        return self.params[name]

    def __setitem__(self, name, value):
        if name not in self.names:
            raise KeyError(name)
        self.params[name] = value

    def __delitem__(self, name):
        raise TypeError("a model's parameters cannot be removed")

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def language_model_config(config: THLConfig) -> THLConfig:
    """``config`` without its task fields: the body's own config."""
    return config.replace(task=None, num_labels=None, id2label=None, label2id=None, classifier_dropout=None)


# ---------------------------------------------------------------------------------------------------------
class TaskModel:
    """The shared machinery of the three task models (module docstring); use one of the subclasses."""

    task: str = ""
    pooled: bool = True   # reads the top tier at the last position (H.2) rather than every position (H.3)

    def __init__(self, config: THLConfig | None = None, num_labels: int | None = None, *, id2label=None,
                 classifier_dropout: float | None = None, seed: int | None = None, params=None, dtype=None):
        config = THLConfig() if config is None else config
        if not isinstance(config, THLConfig):
            raise InputError(f"{type(self).__name__} needs a THLConfig, got {type(config).__name__}")
        config = self._task_config(config, num_labels, id2label, classifier_dropout)
        params = dict(params) if params is not None else None
        head = None
        if params is not None:
            head = {name: params.pop(name) for name in HEAD_NAMES if name in params}
            if head and len(head) != len(HEAD_NAMES):
                raise WeightsError(f"the head needs both {list(HEAD_NAMES)}, got only {list(head)}")
        self.body = THLModel(config, seed=seed, params=params, dtype=dtype)
        want = self.head_shapes(config)
        if head:
            problems = [f"{n} has shape {list(head[n].shape)}, expected {list(want[n])}" for n in HEAD_NAMES
                        if tuple(head[n].shape) != want[n]]
            if problems:
                raise WeightsError(f"the {self.task} head does not match its config: " + "; ".join(problems))
            head = {n: np.asarray(head[n], dtype=self.body.dtype) for n in HEAD_NAMES}
        else:
            head = init_head(want, seed, self.body.dtype)
        self.head = head
        self.params = JointParams(self.body.params, self.head)

    def _task_config(self, config, num_labels, id2label, classifier_dropout) -> THLConfig:
        """``config`` with this model's task fields: kept when it already is this task (arguments given
        override them), set afresh otherwise."""
        changes = {}
        if classifier_dropout is not None:
            changes["classifier_dropout"] = classifier_dropout
        if self.task != CHOICE:
            if id2label is not None:
                changes.update(id2label=id2label, num_labels=None, label2id=None)
            elif num_labels is not None:
                changes.update(num_labels=num_labels, id2label=None, label2id=None)
        elif num_labels is not None or id2label is not None:
            raise InputError("a multiple-choice model scores each choice with one output: it takes no num_labels "
                             "or id2label")
        if config.task == self.task:
            return config.replace(**changes) if changes else config
        base = language_model_config(config)
        if self.task != CHOICE and "id2label" not in changes and "num_labels" not in changes:
            changes["num_labels"] = 2   # the PyTorch THL's default
        return base.replace(task=self.task, **changes)

    # ------------------------------------------------------------------ descriptions
    @property
    def config(self) -> THLConfig:
        return self.body.config

    @property
    def dtype(self):
        return self.body.dtype

    @property
    def num_labels(self) -> int:
        return 1 if self.task == CHOICE else self.config.num_labels

    @property
    def id2label(self) -> dict | None:
        return self.config.id2label

    @classmethod
    def head_width(cls, config) -> int:
        return config.tier_dims[-1] if cls.pooled else config.total_tier_dim

    @classmethod
    def head_shapes(cls, config) -> dict:
        n = 1 if cls.task == CHOICE else config.num_labels
        return {"classifier.weight": (n, cls.head_width(config)), "classifier.bias": (n,)}

    def trainable_names(self) -> list:
        """The parameters the task's loss reaches: every body parameter but the language-model output
        head, the unused ``writer.W_r.weight`` and (for the pooled heads) the LayerNorm; and the head."""
        frozen = ("output_head.", "writer.W_r.") + (("layer_norm.",) if self.pooled else ())
        return [name for name in self.params if not name.startswith(frozen)]

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def __repr__(self):
        c = self.config
        labels = "" if self.task == CHOICE else f", labels={list(c.id2label.values())}"
        return (f"{type(self).__name__}({self.num_parameters():,} parameters, tiers={c.tier_dims}{labels}, "
                f"dtype={self.dtype})")

    # ------------------------------------------------------------------ input checks
    def _flat_ids(self, input_ids):
        """input_ids → ([N, T] rows for the body, the leading shape of the logits: (N,), or (B, C) for multiple
        choice, which flattens [B, C, T])."""
        ids = self.body._check_ids(input_ids)
        return ids, ids.shape[:1]

    def _align_rows(self, ids, padding, gumbel_uniform):
        """The pooled heads read the top tier at the last position (H.2), which has read that byte only on a
        step where every tier runs ((t − 1) mod τ_{K-1} = 0 for the last position t = T − 1): with ``padding``
        (the default), each row is cut after its last non-pad byte and padded on the left with the pad to
        the smallest such T, as ``thl_np.finetune.examples.batch`` (and so ``thl-np predict``) does. Rows that
        already are so padded are unchanged. Not done for token classification, without a pad_token_id, or
        with ``gumbel_uniform`` (whose [T, ...] shape fixes the rows as given)."""
        pad = self.config.pad_token_id
        if not (padding and self.pooled) or pad is None or gumbel_uniform is not None:
            return ids
        from .examples import aligned_length, pad_left

        last = H.last_positions(ids, pad)
        if (last < 0).any():
            return ids  # _check_rows says which row holds only pads
        T = aligned_length(int(last.max()) + 1, self.config.tier_timescales[-1], None)
        if T == ids.shape[1] and (last == T - 1).all():
            return ids
        return pad_left([row[:n + 1] for row, n in zip(ids, last, strict=True)], pad, T)

    def _check_rows(self, ids):
        """The pooled heads need one real token per row (H.1)."""
        if not self.pooled:
            return None
        last = H.last_positions(ids, self.config.pad_token_id)
        empty = np.flatnonzero(last < 0)
        if empty.size:
            raise InputError(f"row {int(empty[0])} of input_ids holds only pad tokens (pad_token_id = "
                             f"{self.config.pad_token_id}): give every sequence at least one real token")
        return last

    def _check_labels(self, labels, ids, lead):  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def _check_dropout(self, dropout, shape):
        """None (evaluation), a Generator (draw the keep-mask) or a keep-mask of the features' shape."""
        p = self.config.classifier_dropout
        if dropout is None:
            return None
        if isinstance(dropout, np.random.Generator):
            return H.draw_dropout(dropout, shape, p)
        keep = np.asarray(dropout)
        if keep.shape != tuple(shape) or keep.dtype != np.bool_:
            raise InputError(f"dropout must be a np.random.Generator or a bool keep-mask of shape {list(shape)}, "
                             f"got {keep.dtype} {list(keep.shape)}")
        return keep

    def _features_shape(self, ids):
        N, T = ids.shape
        return (N, self.head_width(self.config)) if self.pooled else (N, T, self.config.total_tier_dim)

    # ------------------------------------------------------------------ the body
    def tier_states(self, input_ids, gumbel_uniform=None, path: str = "auto"):
        """The body alone: rows [N, T] from the zero state → tier states [N, T, Σd_k] (the heads' input)."""
        ids = self.body._check_ids(input_ids)
        U = self.body._check_gumbel(gumbel_uniform, *ids.shape)
        return self._tier_states(ids, U, path)

    def _tier_states(self, ids, U, path):
        body = self.body
        N = ids.shape[0]
        if not choose_fast(body.config, path):
            from ..step import run_sequence

            S, _, _ = run_sequence(body.params, body.config, ids, body.init_state(N), U)
            return S
        # the training path's forward (with or without routing noise): it runs a batch of whole sequences with
        # the sequence-wide products batched (FastDecoder is made for one token at a time); its record is dropped
        from .._blas import blas_threads
        from ..engines.gradient import BLAS_THREADS, fast_forward

        with blas_threads(BLAS_THREADS):
            S_tm, _, _ = fast_forward(body.params, body.config, ids, body.init_state(N), U)
        return np.ascontiguousarray(S_tm.transpose(1, 0, 2))

    def _tier_states_for_backward(self, ids, U, path):
        """→ (tier states [N, T, Σd_k], per-step read weights A [T, N, J] or None, backward(dS, d_A) → grads)."""
        body = self.body
        c, P = body.config, body.params
        state0 = body.init_state(ids.shape[0])
        if choose_fast(c, path, gumbel_given=False):
            from ..engines.gradient import fast_backward, fast_forward

            S_tm, _, tape = fast_forward(P, c, ids, state0, U)

            def backward(dS, d_A):
                dS_tm = np.ascontiguousarray(dS.transpose(1, 0, 2))
                return fast_backward(P, c, tape, dS_tm, d_A, ids)[0]

            return S_tm.transpose(1, 0, 2), tape.read_weights, backward
        from ..step import read_weights, run_sequence, sequence_backward

        S, _, tape = run_sequence(P, c, ids, state0, U, record=True)

        def backward(dS, d_A):
            return sequence_backward(P, c, tape, dS, d_A, ids, state0)[0]

        return S, read_weights(c, tape), backward

    # ------------------------------------------------------------------ the head (subclasses)
    def _head_forward(self, S, ids, last, keep):  # pragma: no cover
        raise NotImplementedError

    def _head_backward(self, d_logits, cache):  # pragma: no cover
        raise NotImplementedError

    def _loss(self, logits, labels, ids):
        return H.masked_cross_entropy(logits, labels)

    # ------------------------------------------------------------------ forward, loss and gradients
    def __call__(self, input_ids, labels=None, *, dropout=None, gumbel_uniform=None, path: str = "auto",
                 padding: bool = True):
        """input_ids → ``(logits, loss)`` (loss None without labels): the PyTorch THL's ``model(input_ids,
        labels)``. Evaluation mode unless ``dropout`` / ``gumbel_uniform`` are given (module docstring);
        ``path`` as in ``THLModel`` ("auto", "fast" or "plain": the same numbers). With ``padding`` (the
        default) the pooled heads (sequence, multiple choice) left-pad the rows themselves so that each
        row's last byte is read by every tier (``_align_rows``): short unpadded text gives what
        ``thl-np predict`` gives. ``padding=False`` runs the rows exactly as given."""
        ids, lead = self._flat_ids(input_ids)
        ids = self._align_rows(ids, padding, gumbel_uniform)
        last = self._check_rows(ids)
        y = None if labels is None else self._check_labels(labels, ids, lead)
        U = self.body._check_gumbel(gumbel_uniform, *ids.shape)
        keep = self._check_dropout(dropout, self._features_shape(ids))
        S = self._tier_states(ids, U, path)
        logits, _ = self._head_forward(S, ids, last, keep)
        logits = self._shape_logits(logits, lead)
        if y is None:
            return logits, None
        return logits, float(self._loss(logits, y, ids)[0])

    forward = __call__

    def value_and_grad(self, input_ids, labels, *, dropout=None, gumbel_uniform=None, path: str = "auto",
                       padding: bool = True):
        """The loss (H.6, plus the router load-balance term when ``router_load_balance_lambda`` is non-zero)
        and the exact gradient of every parameter (zero for those the loss does not reach) → (loss, grads).
        ``padding`` as in ``__call__``."""
        ids, lead = self._flat_ids(input_ids)
        ids = self._align_rows(ids, padding, gumbel_uniform)
        last = self._check_rows(ids)
        y = self._check_labels(labels, ids, lead)
        N, T = ids.shape
        U = self.body._check_gumbel(gumbel_uniform, N, T)
        keep = self._check_dropout(dropout, self._features_shape(ids))
        from .._blas import blas_threads
        from ..engines.gradient import BLAS_THREADS

        with blas_threads(BLAS_THREADS if choose_fast(self.config, path) else None):
            S, A, body_backward = self._tier_states_for_backward(ids, U, path)
            logits, cache = self._head_forward(S, ids, last, keep)
            loss, d_logits = self._loss(self._shape_logits(logits, lead), y, ids)
            dS, head_grads = self._head_backward(d_logits.reshape(logits.shape), cache)
            loss, d_A = add_load_balance(self.config, loss, A)
            grads = body_backward(dS, d_A)
        grads.update(head_grads)
        return float(loss), {name: grads[name] for name in self.params}

    def _shape_logits(self, logits, lead):
        return logits

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str, dtype: str | None = None) -> None:
        """Write config.json (with the task fields) and model.safetensors (body under its spec §2 names,
        then ``classifier.weight`` and ``classifier.bias``) into ``directory``."""
        from ..io.folder import write_model_folder

        config = self.config
        if dtype in ("float32", "float64") and dtype != config.dtype:
            config = config.replace(dtype=dtype)
        write_model_folder(directory, dict(self.params.items()), config,
                           metadata={"format": "thl-np", "format_version": FORMAT_VERSION,
                                     "config": config.to_json()}, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory, dtype: str | None = None, verify: bool | None = None, *,
                        num_labels: int | None = None, id2label=None, seed: int | None = None, log=None,
                        pad_token_id: int | None = None):
        """Load a model folder, or a ``thl-np finetune`` output folder (its latest checkpoint).

        A folder of this task loads as saved. A language-model folder (or another task's) gives its body,
        with a new head (Xavier-uniform weight from ``seed``, zero bias) of ``num_labels`` / ``id2label``
        classes (2 by default, as the PyTorch THL); that is said through ``log`` (a callable taking one
        line) or, without it, a ``UserWarning``. ``dtype`` / ``verify`` as ``THLModel.from_pretrained``;
        ``pad_token_id`` sets the config's (batches of different lengths need one: 256 for the byte tokenizer)."""
        from ..io.folder import resolve_model_dir
        from ..io.safetensors import check_finite, read_safetensors
        from ..model import VERIFY_BELOW_BYTES

        directory = resolve_model_dir(directory)
        if not os.path.isdir(directory):
            raise WeightsError(f"no model folder at {directory}: it should hold config.json and model.safetensors")
        config = THLConfig.load(directory)
        if config.quantization:  # one line, as train says it (not a dtype problem per int8 tensor)
            raise InputError(f"{directory} holds int8 (quantized) weights: fine-tune the float model it came "
                             f"from, then quantize the result (thl-np quantize)")
        path = os.path.join(directory, "model.safetensors")
        if not os.path.exists(path):
            raise WeightsError(f"{path} is missing: a model folder needs model.safetensors next to config.json")
        tensors, _ = read_safetensors(path)
        head = {name: tensors.pop(name) for name in HEAD_NAMES if name in tensors}
        check_params(config, tensors, source=path)
        if verify or (verify is None and os.path.getsize(path) < VERIFY_BELOW_BYTES):
            check_finite({**tensors, **head}, source=path)
        compute = dtype or config.dtype
        if compute not in ("float32", "float64"):
            raise InputError(f"dtype {compute!r} is not a compute dtype: use float32 or float64")
        if compute != config.dtype:
            config = config.replace(dtype=compute)
        if pad_token_id is not None and pad_token_id != config.pad_token_id:
            config = config.replace(pad_token_id=pad_token_id)
        if config.task == cls.task:
            if len(head) != len(HEAD_NAMES):
                raise WeightsError(f"{path} lacks {[n for n in HEAD_NAMES if n not in head]}, which its config's "
                                   f"task {cls.task!r} needs")
            if cls.task != CHOICE and not _same_labels(config, num_labels, id2label):
                raise InputError(f"{directory} holds a head for the labels {list(config.id2label.values())}, not "
                                 f"the {id2label or num_labels} asked for: load it without num_labels/id2label")
            return cls(config, params={**tensors, **head}, dtype=compute)
        what = "a language model" if config.task is None else f"a {config.task} model"
        model = cls(language_model_config(config), num_labels, id2label=id2label, seed=seed, params=tensors,
                    dtype=compute)
        W = model.head["classifier.weight"]
        message = (f"{directory} holds {what}: its body is loaded and a new {cls.task} head (classifier.weight "
                   f"{list(W.shape)}, seed {seed}) is initialised; fine-tune it before trusting its outputs")
        if log is not None:
            log(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)
        return model


def _same_labels(config, num_labels, id2label) -> bool:
    """Whether num_labels / id2label arguments (None: not given) agree with a head config's labels."""
    if id2label is not None:
        try:
            return {int(k): v for k, v in dict(id2label).items()} == config.id2label
        except (TypeError, ValueError):
            return False
    return num_labels is None or num_labels == config.num_labels


def init_head(shapes: dict, seed, dtype) -> dict:
    """A fresh head (spec §2's rule for a linear layer): Xavier-uniform weight, zero bias, drawn in float64
    from a generator of its own, so the head of a seed is the same over every body and dtype."""
    rng = np.random.default_rng(None if seed is None else [int(seed), 0x68656164])
    out_dim, in_dim = shapes["classifier.weight"]
    bound = np.sqrt(6.0 / (in_dim + out_dim))
    return {"classifier.weight": rng.uniform(-bound, bound, size=(out_dim, in_dim)).astype(dtype),
            "classifier.bias": np.zeros(out_dim, dtype)}


# ---------------------------------------------------------------------------------------------------------
class THLForSequenceClassification(TaskModel):
    """A label per sequence: the top tier's state at each row's last non-pad position (H.1, H.2), dropout,
    a linear layer to ``num_labels`` (PyTorch THL's ``THLForSequenceClassification``). input_ids [N, T],
    labels [N] (−100: not counted) → logits [N, num_labels]."""

    task = SEQUENCE
    pooled = True

    def _check_labels(self, labels, ids, lead):
        return _int_labels(labels, lead, self.num_labels, "labels", "[N]")

    def _head_forward(self, S, ids, last, keep):
        return H.pooled_head_forward(S, last, self.head["classifier.weight"], self.head["classifier.bias"],
                                     keep, self.config.classifier_dropout)

    def _head_backward(self, d_logits, cache):
        dS, dW, db = H.pooled_head_backward(d_logits, cache, self.head["classifier.weight"])
        return dS, {"classifier.weight": dW, "classifier.bias": db}


class THLForTokenClassification(TaskModel):
    """A label per token: LayerNorm of the concatenated tier states at every step (H.3), dropout, a linear
    layer to ``num_labels`` (PyTorch THL's ``THLForTokenClassification``). input_ids [N, T], labels [N, T]
    (−100 and pad positions: not counted) → logits [N, T, num_labels]."""

    task = TOKEN
    pooled = False

    def _check_labels(self, labels, ids, lead):
        y = _int_labels(labels, ids.shape, self.num_labels, "labels", "[N, T]")
        return H.token_labels(y, ids, self.config.pad_token_id)

    def _head_forward(self, S, ids, last, keep):
        return H.token_head_forward(S, self.params["layer_norm.weight"], self.params["layer_norm.bias"],
                                    self.head["classifier.weight"], self.head["classifier.bias"], keep,
                                    self.config.classifier_dropout)

    def _head_backward(self, d_logits, cache):
        dS, d_lw, d_lb, dW, db = H.token_head_backward(d_logits, cache, self.params["layer_norm.weight"],
                                                       self.head["classifier.weight"])
        return dS, {"layer_norm.weight": d_lw, "layer_norm.bias": d_lb, "classifier.weight": dW,
                    "classifier.bias": db}


class THLForMultipleChoice(THLForSequenceClassification):
    """One of C choices per example: each of the B·C sequences pooled as in sequence classification (H.1,
    H.2), dropout, a linear layer to one score; softmax over the C scores (PyTorch THL's
    ``THLForMultipleChoice``). input_ids [B, C, T], labels [B] (the right choice; −100: not counted) →
    logits [B, C]. Gumbel uniforms, when given, are [T, B·C, H, J]."""

    task = CHOICE
    pooled = True

    def _flat_ids(self, input_ids):
        ids = _as_ids(input_ids, "a multiple-choice model's input_ids [B, C, T]: every example needs the same "
                                 "number of choices C, and every choice the same length T (pad the shorter "
                                 "ones with the config's pad_token_id)")
        if ids.ndim != 3 or 0 in ids.shape:
            raise InputError(f"a multiple-choice model takes input_ids [B, C, T] (C choices per example, none "
                             f"empty), got shape {list(ids.shape)}")
        return self.body._check_ids(ids.reshape(-1, ids.shape[2])), ids.shape[:2]

    def _shape_logits(self, logits, lead):
        return logits.reshape(lead)

    def _check_labels(self, labels, ids, lead):
        return _int_labels(labels, lead[:1], lead[1], "labels", "[B] (the index of the right choice)")


def _as_ids(x, rule: str = "input_ids: every row the same length (pad the shorter ones with the config's "
                            "pad_token_id)"):
    """An array from a list / array / torch tensor; a ragged nesting is an InputError stating ``rule``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except ValueError as exc:  # "inhomogeneous shape": lists of different lengths
        raise InputError(f"ragged input for {rule}") from exc


def _int_labels(labels, shape, n, name, form):
    y = _as_ids(labels, f"{name} {form}: one integer per example")
    if y.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integer class ids (−100 for none), got dtype {y.dtype}")
    if y.shape != tuple(shape):
        raise InputError(f"{name} must have shape {form} = {list(shape)}, got {list(y.shape)}")
    if y.dtype.kind == "u":  # unsigned: no −100 here, and a cast to int64 would wrap 2**64 − 100 to −100
        big = y >= n
        if big.any():
            raise InputError(f"{name} holds {int(y[big].flat[0])}, outside 0..{n - 1} (or −100 for none)")
    y = y.astype(np.int64)
    bad = (y != H.IGNORE_INDEX) & ((y < 0) | (y >= n))
    if bad.any():
        raise InputError(f"{name} holds {int(y[bad][0])}, outside 0..{n - 1} (or −100 for none)")
    return y


__all__ = ["THLForSequenceClassification", "THLForTokenClassification", "THLForMultipleChoice", "TaskModel",
           "JointParams", "Subset", "init_head", "language_model_config", "HEAD_NAMES"]

