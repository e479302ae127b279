"""The ``thl-np`` command (``thl_np.cli:main``, ``python -m thl_np.cli``).

Importing this module is cheap (no NumPy, no click): the command group and its imports live in
``thl_np.cli.app``, imported by ``main`` inside its Ctrl-C handler, so a Ctrl-C in the first second of any
command (while the imports run) prints "interrupted" and exits 130, as it does later."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    """Entry point: every error becomes one clear line and a non-zero exit, never a traceback."""
    try:
        from .app import main as run
    except KeyboardInterrupt:
        return interrupted()
    try:
        return run(argv)
    except KeyboardInterrupt:  # one arriving between the import and app.main's own handler
        return interrupted()


def interrupted() -> int:
    """Ctrl-C: one line on stderr, exit status 130 (128 + SIGINT)."""
    try:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return 130


def __getattr__(name):  # the group (``cli``) and the other names of thl_np.cli.app, on first use
    if name.startswith("__") or name == "app":
        raise AttributeError(name)
    import importlib

    app = importlib.import_module(".app", __name__)  # not "from . import app": that asks __getattr__ again
    try:
        return getattr(app, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
