"""The ``thl-np`` command group and its error handling. Each sub-module defines its commands and lists them
in ``COMMANDS``; ``thl_np.cli.main`` imports this module inside its Ctrl-C handler."""
from __future__ import annotations

import sys
import warnings

import click

from ..errors import THLError
from . import basic, bench, export, finetune, golden, gradcheck, quant, serve, train, weights

_MODULES = (basic, train, finetune, weights, quant, export, bench, golden, gradcheck, serve)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="thl-np")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE",
              help="Import this Python file or module first: one that registers component variants "
                   "(docs/CHANGING_A_COMPONENT.md). Repeatable.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run the kernels on N threads (at most NUMBA_NUM_THREADS, the cores by default). Default: "
                   "THL_NP_THREADS, else automatic: one for a small model, and only the cores that other "
                   "processes leave idle.")
def cli(plugins, threads):
    """thl-np: THL (Transformer Hierarchical Layers) in NumPy.

    \b
    Examples:
      thl-np generate "def fibonacci(n):"
      thl-np init --out my-model --dim 128 --memory-slots 64
      thl-np info --model my-model
      thl-np --plugin my_router.py train --data corpus.txt --out runs/mine --config my_config.json
      thl-np --threads 1 generate "def fibonacci(n):"
    """
    from .. import _threads
    from ..components.registry import load_plugin

    if threads is not None:
        _threads.set_threads(threads)
    else:
        _threads.requested()  # a THL_NP_THREADS that is not a number: one line now, not in the middle of a run
    for source in plugins:
        load_plugin(source)


for _module in _MODULES:
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv=None) -> int:
    """Entry point: every error becomes one clear line and a non-zero exit, never a traceback."""
    # NumPy's overflow / invalid-value warnings come before the error that names what went non-finite
    # (a diverged run, NaN weights): on a terminal they are noise around that one line
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"thl_np\.")
    try:
        # without standalone mode click returns (not raises) the code a command passed to ctx.exit(n)
        rc = cli.main(args=argv, prog_name="thl-np", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as exc:  # a bad flag: one line, and where the help is
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
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
    except SystemExit:
        if _stdout_closed():  # click's answer to a closed pipe (thl-np info | head -1): not an error
            _silence_stdout()
            return 0
        raise
    except OSError as exc:  # a disk that filled up, a folder that went away: what and where, on one line
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        return 1
    except MemoryError:
        click.echo("error: out of memory: use a smaller model, batch or sequence length", err=True)
        return 1
    return rc if isinstance(rc, int) else 0


def _stdout_closed() -> bool:
    """Whether click met a closed stdout (it swaps in its PacifyFlushWrapper, then exits with status 1).
    By name: click 8.2 renamed the class and deprecates importing it."""
    return type(sys.stdout).__name__.endswith("PacifyFlushWrapper")  # _PacifyFlushWrapper since click 8.2


def _silence_stdout():
    """After a closed pipe (thl-np ... | head), point stdout at /dev/null so the interpreter's final flush
    does not print another BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
