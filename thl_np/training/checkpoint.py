"""Training checkpoints that an interruption can never leave half written.

Layout of a training output folder::

    OUT/
      LATEST              one line: the name of the newest complete checkpoint
      step-000600/        one checkpoint (the newest ``keep`` are kept)
        model/            save_pretrained: config.json + model.safetensors
        optimizer.npz     AdamW.state_dict()
        train_state.npz   the recurrent state carried into the next chunk (absent when there is none)
        trainer.json      step, data position, RNG state, train config, data fingerprint, elapsed time
        log.csv           step, loss, lr, grad_norm, tokens_per_s: one row per step so far
        eval.csv          step, bits_per_byte: one row per held-out evaluation so far
      loss.png            the loss curve (when matplotlib is installed)

Why it is atomic: a checkpoint is written into a temporary folder, renamed to ``step-NNNNNN`` (a rename
is atomic), and only then is ``LATEST`` replaced (write a temp file, ``os.replace``: atomic too). A
crash at any point leaves ``LATEST`` naming a complete checkpoint; the previous one is deleted only after
``LATEST`` moved on. Readers follow ``LATEST``, never the folder listing.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable

from ..errors import InputError
from ..io.folder import LATEST, atomic_write_bytes, latest_checkpoint, pid_alive, remove_stale_temps
from ..io.folder import STEP_DIR as _STEP_DIR

_TMP_PREFIX = ".tmp-"
# the temporary names below, by the id of the process writing them: .tmp-step-NNNNNN-PID, .loss.tmp-PID.png
# (LATEST is replaced through thl_np.io.folder.atomic_write_bytes, whose temporaries remove_stale_temps knows)
_STALE = re.compile(r"^(?:\.tmp-step-\d+-|\.loss\.tmp-)(\d+)(?:\.png)?$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def atomic_write_text(path: str, text: str) -> None:
    """Write a small text file so readers see either the old or the new content, never a mix."""
    atomic_write_bytes(path, text.encode())


def write_checkpoint(out_dir: str, step: int, write: Callable[[str], None], keep: int = 1) -> str:
    """Create checkpoint ``step`` by calling ``write(folder)`` on a temporary folder, then publish it.

    If ``write`` raises (or the process is interrupted), the temporary folder is removed and the
    previous checkpoint stays the latest. Returns the new checkpoint's path.
    """
    name = step_dir_name(step)
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f"{_TMP_PREFIX}{name}-{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        _remove_stale_temps(out_dir)
        try:
            os.makedirs(tmp)
            write(tmp)
            if os.path.exists(final):  # a leftover not named by LATEST (or being rewritten): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(os.path.join(out_dir, LATEST), name + "\n")
    except OSError as exc:
        previous = latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
        kept = f"the previous checkpoint {previous} is kept" if previous else "no checkpoint was written"
        raise InputError(f"cannot write checkpoint {name} in {out_dir} ({exc.strerror or exc}): free some space or "
                         f"fix the folder's permissions, then resume; {kept}") from None
    _prune(out_dir, keep=max(1, keep), current=name)
    return final


def _remove_stale_temps(out_dir: str) -> None:
    """What a process killed mid-save left (a temporary checkpoint folder, a LATEST being replaced, a loss
    plot being drawn) is garbage: drop it, unless the process that writes it is still running."""
    remove_stale_temps(out_dir)   # LATEST's temporary (atomic_write_bytes)
    for entry in os.listdir(out_dir):
        m = _STALE.match(entry)
        if m is None or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(out_dir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def _prune(out_dir: str, keep: int, current: str) -> None:
    steps = sorted(
        (int(m.group(1)), entry) for entry in os.listdir(out_dir) if (m := _STEP_DIR.match(entry))
    )
    for _, entry in steps[:-keep]:
        if entry != current:
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)


def is_model_folder(path: str) -> bool:
    """Whether ``path`` holds a model's files (config.json or model.safetensors) at its top."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors"))


# ---------------------------------------------------------------------- small file formats
def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"cannot read checkpoint file {path}: {str(exc)[:200] or type(exc).__name__}") from None


def write_csv(path: str, fields: list[str], rows: Iterable[dict]) -> None:
    """Floats are written with ``repr`` so a log read back is the same numbers."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            # a row without a column (a run resumed from before the column existed) leaves it empty
            writer.writerow([repr(row[k]) if isinstance(row.get(k), float) else row.get(k, "") for k in fields])


def read_csv(path: str, fields: list[str] | None = None, older=()) -> list[dict]:
    """Rows as dicts; ``step`` becomes int, every other column float; an empty cell is left out. With
    ``fields``, the header must be exactly those columns or one of the ``older`` column lists (a log written
    before a column was added; ValueError otherwise, as for a cell that is not a number)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
        if fields is not None and rows and header != list(fields) and header not in [list(o) for o in older]:
            raise ValueError(f"its columns are {reader.fieldnames}, expected {fields}")
    return [{k: int(v) if k == "step" else float(v) for k, v in row.items() if v != ""} for row in rows]
