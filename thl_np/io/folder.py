"""Model folders: where a model is (``resolve_model_dir``), and writing one so that a failure never leaves
half a model (``write_model_folder``). Every loader and writer of the package goes through here.

A model folder holds config.json + model.safetensors. A training run's output folder holds ``LATEST``,
naming its newest complete checkpoint ``step-NNNNNN``, whose ``model/`` is a model folder
(``thl_np.training.checkpoint`` writes them); wherever a model folder is asked for, a run folder stands for
that model. No folder named means the small model shipped inside the package.

Each file is written to a temporary name and renamed into place, config.json last: a full disk or a
kill during the write leaves the folder as it was (a folder this call created is removed again), and
the temporary files a killed process left behind are removed by the next write into the folder.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..checks import as_path, check_output_dir
from ..errors import InputError, WeightsError
from .safetensors import STORAGE_DTYPES, write_safetensors

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
LATEST = "LATEST"
STEP_DIR = re.compile(r"^step-(\d+)$")
_STORAGE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# the temporary names of write_safetensors (.NAME.PID.RANDOM.tmp) and of the config below (.NAME.tmp-PID)
_TEMP = re.compile(r"^\.(?:.+\.(\d+)\.[0-9a-f]{8}\.tmp|config\.json\.tmp-(\d+))$")


def resolve_model_dir(model: str | os.PathLike | None) -> str:
    """The model folder to load: ``model`` itself when it holds config.json, the model of the latest
    checkpoint when it is a training run's output folder, the packaged default model when it is None.
    A one-line WeightsError when there is nothing to load there."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / CONFIG).is_file():
            raise WeightsError(f"no model folder given and the default model is not installed (looked in "
                               f"{DEFAULT_MODEL_DIR}): pass --model DIR, or create a model with "
                               "`thl-np init --out DIR`")
        return str(DEFAULT_MODEL_DIR)
    path = os.fspath(as_path(model, "the model folder"))
    if not os.path.isdir(path):
        what = "is not a folder" if os.path.exists(path) else "does not exist"
        raise WeightsError(f"model folder {path} {what}: pass a folder holding {CONFIG} + {WEIGHTS} "
                           "(`thl-np init --out DIR` makes one)")
    if os.path.isfile(os.path.join(path, CONFIG)):
        if os.path.isfile(os.path.join(path, LATEST)):
            raise InputError(f"{path} holds both a model ({CONFIG}) and a training run ({LATEST}): it is not "
                             f"clear which to use; pass the model folder itself, e.g. {path}/step-NNNNNN/model")
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return os.path.join(ckpt, "model")
    return path  # the loader says what is missing


def latest_checkpoint(out_dir: str) -> str | None:
    """The path of the newest complete checkpoint in the run folder ``out_dir``, or None when there is none."""
    pointer = os.path.join(out_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(out_dir, name)
    if not STEP_DIR.match(name) or not os.path.isdir(path):
        raise InputError(f"{pointer} names {name!r}, which is not a checkpoint folder in {out_dir}")
    return path


def write_model_folder(directory, params, config, metadata: dict, dtype: str | None = None, keep_dtype=()) -> str:
    """Write ``params`` (model.safetensors, stored as ``dtype``, but the tensors named in ``keep_dtype`` as
    they are: int8 values and their scales) and ``config`` (config.json) into
    ``directory``. Checks the location first (a folder that can be made or written, with room for the
    weights); any failure raises WeightsError and leaves the folder's previous files unchanged."""
    directory = as_path(directory, "the model folder")
    if dtype is not None and dtype not in STORAGE_DTYPES:  # before anything is made or written
        raise WeightsError(f"storage dtype {dtype!r} is not supported: use one of {list(STORAGE_DTYPES)}; "
                           f"nothing was written to {directory}")
    need = sum(a.size * (a.dtype.itemsize if n in keep_dtype else _STORAGE_BYTES.get(dtype, a.dtype.itemsize))
               for n, a in params.items()) + (1 << 16)
    check_output_dir(directory, "model folder", need_bytes=need)
    created = not os.path.lexists(directory)
    config_tmp = os.path.join(directory, f".{CONFIG}.tmp-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temps(directory)
        with open(config_tmp, "w") as f:
            f.write(config.to_json())
            f.flush()
            os.fsync(f.fileno())
        write_safetensors(os.path.join(directory, WEIGHTS), params, metadata=metadata, dtype=dtype,
                          keep_dtype=keep_dtype)
        os.replace(config_tmp, os.path.join(directory, CONFIG))
    except BaseException as exc:
        _remove(config_tmp)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        kept = "nothing was left behind" if created else "its previous files are unchanged"
        if isinstance(exc, OSError):
            raise WeightsError(f"cannot write the model folder {directory} ({exc.strerror or exc}): check free "
                               f"space and permissions; {kept}") from None
        if isinstance(exc, WeightsError):  # write_safetensors says which file and why
            raise WeightsError(f"{exc}; {kept}") from None
        raise
    return directory


def remove_stale_temps(directory: str) -> None:
    """Remove the temporary files of writers that died (kill -9) in ``directory``; a live writer's stay."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if m and not pid_alive(int(m.group(1) or m.group(2))):
            _remove(os.path.join(directory, name))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (this process counts as alive: its files are in use)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
