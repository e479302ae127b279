"""THLConfig: every field of spec §1, with its default and its validation.

A config.json written by the PyTorch THL's ``save_pretrained`` loads unchanged. ``dim=N`` is a
shorthand that sets the embedding, hidden, tier, memory and value widths at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .checks import check
from .errors import ConfigError
from .task_fields import TASK_FIELDS, check_task_fields

DTYPES = ("float32", "float64")


@dataclass
class THLConfig:
    """The hyper-parameters of a THL model (spec §1). Field names are the config.json keys."""

    vocab_size: int = 50257
    embedding_dim: int = 768
    hidden_dim: int = 768
    num_tiers: int = 3
    tier_dims: list = field(default=None)
    tier_timescales: list = field(default=None)
    local_window: int = 64
    memory_slots: int = 1024
    memory_dim: int = 768
    query_dim: int = 64
    value_dim: int = 768
    num_heads: int = 4
    head_dim: int = 64
    read_topk: int = 4
    load_penalty: float = 0.1
    read_ema_decay: float = 0.99
    read_slot_capacity: int | None = None
    router_load_balance_lambda: float = 0.0
    write_slots: int = 1
    memory_decay: float = 0.9995
    write_rate: float = 0.05
    write_clip_max: float = 1.0
    write_ema_decay: float = 0.99
    novelty_beta: float = 8.0
    novelty_theta: float = 0.3
    stale_weight: float = 1.0
    underuse_weight: float = 1.0
    pad_token_id: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    # Component variants, {kind: registered name} (thl_np.components.registry); {} composes the spec's
    # components. Written to config.json only when it names a variant.
    components: dict = field(default=None)
    # Int8 weights, {"method": "int8", "block_size": null | b} (thl_np.quant, docs/QUANTIZATION.md); None for
    # float weights. Written to config.json only for a quantized model.
    quantization: dict = field(default=None)
    # A task head (thl_np.finetune): written to config.json only when ``task`` is set, as Hugging Face configs
    # write them; a language model's config.json has none of them.
    task: str | None = None
    num_labels: int | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    classifier_dropout: float | None = None

    def __init__(self, dim: int | None = None, **kwargs):
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(
                f"unknown THLConfig field(s) {unknown}; known fields are {sorted(names)} "
                "(use dim=N to set every width at once)"
            )
        if dim is not None:
            _check_int("dim", dim)
            for name in ("embedding_dim", "hidden_dim", "memory_dim", "value_dim"):
                kwargs.setdefault(name, dim)
        for f in dataclasses.fields(self):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:  # pragma: no cover - every field has a default
                value = None
            setattr(self, f.name, value)
        k = self.num_tiers
        _check_int("num_tiers", k)
        if self.tier_dims is None:
            self.tier_dims = [dim if dim is not None else 768] * k
        if self.tier_timescales is None:
            self.tier_timescales = [8**i for i in range(k)]
        self.tier_dims = _int_list("tier_dims", self.tier_dims)
        self.tier_timescales = _int_list("tier_timescales", self.tier_timescales)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = ("vocab_size", "embedding_dim", "hidden_dim", "num_tiers", "memory_slots",
                    "memory_dim", "query_dim", "value_dim", "num_heads", "head_dim", "read_topk",
                    "write_slots")
        for name in positive:
            _check_int(name, getattr(self, name))
        _check_int("local_window", self.local_window)
        if len(self.tier_dims) != self.num_tiers:
            raise ConfigError(
                f"len(tier_dims) = {len(self.tier_dims)} != num_tiers = {self.num_tiers}: "
                "give one width per tier"
            )
        if len(self.tier_timescales) != self.num_tiers:
            raise ConfigError(
                f"len(tier_timescales) = {len(self.tier_timescales)} != num_tiers = {self.num_tiers}: "
                "give one timescale per tier"
            )
        for i, d in enumerate(self.tier_dims):
            _check_int(f"tier_dims[{i}]", d)
        for i, tau in enumerate(self.tier_timescales):
            _check_int(f"tier_timescales[{i}]", tau)
        if self.tier_timescales[0] != 1:
            raise ConfigError(
                f"tier_timescales[0] = {self.tier_timescales[0]}, but Tier 0 must run every step: set it to 1"
            )
        if self.value_dim % self.num_heads:
            raise ConfigError(
                f"value_dim = {self.value_dim} is not divisible by num_heads = {self.num_heads}: "
                "choose a value_dim that is a multiple of num_heads"
            )
        if self.read_topk > self.memory_slots:
            raise ConfigError(
                f"read_topk = {self.read_topk} > memory_slots = {self.memory_slots}: "
                "a head cannot read more slots than exist"
            )
        if self.write_slots > self.memory_slots:
            raise ConfigError(
                f"write_slots = {self.write_slots} > memory_slots = {self.memory_slots}: "
                "lower write_slots or add slots"
            )
        if self.read_slot_capacity is not None:
            _check_int("read_slot_capacity", self.read_slot_capacity)
        if self.pad_token_id is not None:
            _check_int("pad_token_id", self.pad_token_id)
            if self.pad_token_id >= self.vocab_size:
                raise ConfigError(
                    f"pad_token_id = {self.pad_token_id} is outside the vocabulary (vocab_size = "
                    f"{self.vocab_size}): use an id below vocab_size or null"
                )
        for name in ("read_ema_decay", "write_ema_decay", "memory_decay", "load_penalty",
                     "router_load_balance_lambda", "write_rate", "write_clip_max", "novelty_beta", "novelty_theta",
                     "stale_weight", "underuse_weight"):
            check(name, getattr(self, name), ConfigError)
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"dtype = {self.dtype!r} is not supported: use one of {list(DTYPES)}")
        if not isinstance(self.device, str):
            raise ConfigError(f"device = {self.device!r} must be a string (\"cpu\"; it is accepted and ignored)")
        from .components.registry import check_choice  # imported here: the components import nothing of this

        self.components = check_choice(self.components)
        from .quant.scheme import check_quantization

        self.quantization = check_quantization(self.quantization)
        check_task_fields(self)

    # ------------------------------------------------------------------ derived sizes
    @property
    def total_tier_dim(self) -> int:
        """Σ d_k: the width of the LayerNorm and of the output head's input."""
        return int(sum(self.tier_dims))

    @property
    def router_input_dim(self) -> int:
        """d_e + d_0 + d_{K-1}: the router query's input width."""
        return self.embedding_dim + self.tier_dims[0] + self.tier_dims[-1]

    @property
    def writer_input_dim(self) -> int:
        """d_0 + d_{K-1}: the writer's input width."""
        return self.tier_dims[0] + self.tier_dims[-1]

    @property
    def head_value_dim(self) -> int:
        """d_v / H: the width of one router head's value."""
        return self.value_dim // self.num_heads

    def tier_input_dim(self, k: int) -> int:
        """in_k: d_e for Tier 0, d_{k-1} above it."""
        return self.embedding_dim if k == 0 else self.tier_dims[k - 1]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if not out["components"]:
            del out["components"]  # the spec's components: config.json stays as the PyTorch THL writes it
        if not out["quantization"]:
            del out["quantization"]  # float weights: config.json unchanged
        for name in TASK_FIELDS:
            if out[name] is None:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> THLConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"  # validated: every number finite

    def save(self, path: str) -> None:
        """Write config.json (path may be the file or its folder), atomically."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        # a name of this process's own: two processes saving the same config never share a temporary
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> THLConfig:
        """Read config.json (path may be the file or its folder)."""
        if os.path.isdir(path):
            inner = os.path.join(path, "config.json")
            if not os.path.lexists(inner) and os.path.basename(os.path.normpath(path)) == "config.json":
                raise ConfigError(f"{path} is not a file but a folder: give the config.json file or its model folder")
            path = inner
        if not os.path.exists(path):
            raise ConfigError(f"no config.json at {path}: a model folder needs config.json + model.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is not a file: a model folder needs config.json + model.safetensors")
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read {path} ({exc.strerror or exc}): check the path and its permissions") \
                from None
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, a 5,000-digit number, deep nesting
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise ConfigError(f"{path} is not a valid config.json ({why}); rewrite it or re-export the model") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def replace(self, **changes) -> THLConfig:
        data = self.to_dict()
        data.update(changes)
        return THLConfig(**data)

    def __eq__(self, other):
        return isinstance(other, THLConfig) and self.to_dict() == other.to_dict()


def _check_int(name, value):
    """The field's rule in thl_np.checks.RULES (``name`` may index a list: tier_dims[2])."""
    return check(name.split("[")[0], value, ConfigError, name)


def _int_list(name, values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name} = {values!r} must be a list of integers")
    out = []
    for i, v in enumerate(values):
        _check_int(f"{name}[{i}]", v)
        out.append(int(v))
    return out


def _plain(v):
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if hasattr(v, "item"):
        return v.item()
    return v


def parse_overrides(items) -> dict:
    """Config overrides FIELD=VALUE (thl-np's ``--set``, repeatable) → {field: value}; VALUE is read as JSON
    (1.0, null, [1, 8], {"router": "unit_keys"}) or kept as a string. ConfigError for an item without "=".
    The fields themselves are checked where the config is built (``THLConfig.replace``)."""
    out = {}
    for item in items or ():
        name, sep, text = str(item).partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {item!r} is not FIELD=VALUE (e.g. memory_decay=1.0)")
        try:
            out[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[name.strip()] = text
    return out
