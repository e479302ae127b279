"""``thl-np gradcheck --plugin FILE``: the finite-difference check (thl_np.gradcheck) of a plugin's variants."""
from __future__ import annotations

import click

from ..errors import InputError


@click.command()
@click.option("--plugin", "plugins", multiple=True, required=True, metavar="FILE.py|MODULE",
              help="The plugin whose variants are checked (repeatable).")
@click.option("--seq-len", default=6, show_default=True, type=click.IntRange(1, 64),
              help="Tokens in the checked sequence.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed: the tiny model, tokens and directions.")
@click.option("--tolerance", default=1e-5, show_default=True, type=float, help="Relative error allowed.")
def gradcheck(plugins, seq_len, seed, tolerance):
    """Check each variant a plugin registers: its backward against central differences of the plain forward,
    on a tiny float64 model that uses it (the project's harness, thl_np.gradcheck). Run it before training a
    new variant: a wrong backward otherwise trains silently.

    \b
    Example:
      thl-np gradcheck --plugin hard_read.py
    """
    import numpy as np

    from ..components.registry import _REGISTRY, load_plugin
    from ..config import THLConfig
    from ..gradcheck import check_gradients
    from ..model import THLModel

    before = {(kind, name) for kind, variants in _REGISTRY.items() for name in variants}
    modules = [load_plugin(p) for p in plugins]
    new = sorted({(kind, name) for kind, variants in _REGISTRY.items() for name in variants
                  if (kind, name) not in before or _REGISTRY[kind][name].forward.__module__
                  in {m.__name__ for m in modules}})
    if not new:
        raise InputError(f"{', '.join(plugins)} registered no component variant: nothing to check")
    rng = np.random.default_rng(seed)
    failed = []
    for kind, name in new:
        config = THLConfig(vocab_size=64, dim=8, memory_slots=8, local_window=3, num_tiers=2, dtype="float64",
                           components={kind: name})
        model = THLModel(config, seed=seed)
        ids = rng.integers(0, config.vocab_size, size=(2, seq_len + 1))
        report = check_gradients(model, ids[:, :-1], ids[:, 1:], tolerance=tolerance, seed=seed)
        click.echo(f"{kind}={name}:\n{report}")
        if not report.ok:
            failed.append(f"{kind}={name}")
    if failed:
        raise InputError(f"the backward of {', '.join(failed)} does not match its forward's finite differences")
    click.echo(f"{len(new)} variant(s) OK")


COMMANDS = [gradcheck]
