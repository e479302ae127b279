"""Flag types that obey the library's own rules (``thl_np.checks.RULES``), so ``--grad-clip nan`` or
``--lr inf`` is refused at parse time with the same words the API uses, and the checks every command that
writes a model folder makes before it starts."""
from __future__ import annotations

import os

import click

from ..checks import RULES, Rule, check_output_dir
from ..errors import InputError


class Number(click.ParamType):
    """A flag holding the field ``field`` of ``RULES`` (or an explicit ``rule``): parsed as an int or a float,
    then checked by the rule; NaN, infinities and values out of range are a usage error."""

    def __init__(self, field: str | None = None, rule: Rule | None = None):
        self.rule = rule if rule is not None else RULES[field]
        self.name = "integer" if self.rule.integer else "number"

    def convert(self, value, param, ctx):
        flag = param.opts[0] if param is not None and param.opts else "value"
        if isinstance(value, str):
            try:
                value = int(value) if self.rule.integer else float(value)
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.rule.integer else 'a number'}", param, ctx)
        try:
            return self.rule.check(flag, value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)

    def __repr__(self):
        return f"Number({self.rule.describe()})"


def check_new_model_folder(out: str, force: bool, flag: str = "--out") -> None:
    """A command about to write a model folder: ``out`` must be a folder it can make or write into, and not
    a non-empty folder unless ``force`` (the rule of every command that writes a model folder)."""
    from ..io.folder import LOCK_NAMES, hold_model_folder, release_model_folder

    check_output_dir(out, flag)
    if os.path.isdir(out) and any(e.name not in LOCK_NAMES for e in os.scandir(out)) and not force:
        raise InputError(f"{flag} {out} exists and is not empty: pass --force to overwrite, or choose another path")
    hold_model_folder(out)  # until this command ends: a second writer of the same folder is refused meanwhile
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: release_model_folder(out))
