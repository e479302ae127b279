"""`thl-np train --init MODEL --set FIELD=VALUE`: a new run that starts from a model's weights, or with
config fields changed (the weights of THL do not depend on J, so even ``memory_slots`` may change)."""
from __future__ import annotations

import click

NEW_RUN_DIM = 128
NEW_RUN_SLOTS = 64


def parse_sets(values) -> dict:
    """--set FIELD=VALUE (repeatable) → {field: value} (``thl_np.config.parse_overrides``), a usage error
    for an item that is not FIELD=VALUE."""
    from ..config import parse_overrides
    from ..errors import ConfigError

    try:
        return parse_overrides(values)
    except ConfigError as e:
        raise click.BadParameter(str(e).removeprefix("--set "), param_hint="--set") from e


def start_model(init, config_file, dim, memory_slots, write_rate, dtype, sets):
    """A new run's model: a fresh one from flags (``new_model_config``), or --init's weights (a model folder, a
    training run folder, or ``default``: the packaged model) under its config with --set's fields on top."""
    if init is None:
        config = new_model_config(config_file, dim, memory_slots, write_rate, dtype)
        return config.replace(**sets) if sets else config
    if any(v is not None for v in (config_file, dim, memory_slots)):
        raise click.UsageError("--init takes the model's shape from its weights: drop --config/--dim/--memory-slots "
                               "(change other config fields with --set FIELD=VALUE)")
    from ..io.folder import resolve_model_dir
    from ..model import THLModel

    model = THLModel.from_pretrained(resolve_model_dir(None if init == "default" else init), dtype=dtype)
    changes = dict(sets, **({"write_rate": write_rate} if write_rate is not None else {}))
    if dtype is not None:
        changes["dtype"] = dtype
    return THLModel(model.config.replace(**changes), params=model.params) if changes else model


def new_model_config(config_file, dim, memory_slots, write_rate, dtype):
    """A new run's model: vocab 259 (byte tokenizer), every width ``dim``, ``memory_slots`` slots, the
    rest THLConfig defaults; or ``--config``'s fields with only the flags actually given on top."""
    from .basic import build_init_config

    if config_file is None:
        dim = NEW_RUN_DIM if dim is None else dim
        memory_slots = NEW_RUN_SLOTS if memory_slots is None else memory_slots
    overrides = {"memory_slots": memory_slots, "write_rate": write_rate, "dtype": dtype}
    return build_init_config(config_file, overrides, dim, None)
