"""The ``thl-np`` command. Each sub-module defines its commands and lists them in ``COMMANDS``."""
from __future__ import annotations

import sys

import click

from ..errors import THLError
from . import basic, bench, golden, tasks, train, weights

_MODULES = (basic, train, tasks, weights, bench, golden)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="thl-np")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE",
              help="Import this Python file or module first: one that registers component variants "
                   "(docs/CHANGING_A_COMPONENT.md). Repeatable.")
def cli(plugins):
    """thl-np: THL (Transformer Hierarchical Layers) in NumPy.

    \b
    Examples:
      thl-np generate "def fibonacci(n):"
      thl-np init --out my-model --dim 128 --memory-slots 64
      thl-np info --model my-model
      thl-np --plugin my_router.py train --data corpus.txt --out runs/mine --config my_config.json
    """
    from ..components.registry import load_plugin

    for source in plugins:
        load_plugin(source)


for _module in _MODULES:
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv=None) -> int:
    """Entry point: THL errors become one clear line and a non-zero exit, never a traceback."""
    try:
        # without standalone mode click returns (not raises) the code a command passed to ctx.exit(n)
        rc = cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except THLError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    return rc if isinstance(rc, int) else 0


def _silence_stdout():
    """After a closed pipe (thl-np ... | head), point stdout at /dev/null so the interpreter's final flush
    does not print another BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
