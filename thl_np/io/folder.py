"""Writing a model folder (config.json + model.safetensors) so that a failure never leaves half a model.

Each file is written to a temporary name and renamed into place, config.json last: a full disk or a
kill during the write leaves the folder as it was (a folder this call created is removed again), and
the temporary files a killed process left behind are removed by the next write into the folder.
"""
from __future__ import annotations

import os
import re
import shutil

from ..checks import as_path, check_output_dir
from ..errors import WeightsError
from .safetensors import write_safetensors

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_STORAGE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# the temporary names of write_safetensors (.NAME.PID.RANDOM.tmp) and of the config below (.NAME.tmp-PID)
_TEMP = re.compile(r"^\.(?:.+\.(\d+)\.[0-9a-f]{8}\.tmp|config\.json\.tmp-(\d+))$")


def write_model_folder(directory, params, config, metadata: dict, dtype: str | None = None, keep_dtype=()) -> str:
    """Write ``params`` (model.safetensors, stored as ``dtype``, but the tensors named in ``keep_dtype`` as
    they are: int8 values and their scales) and ``config`` (config.json) into
    ``directory``. Checks the location first (a folder that can be made or written, with room for the
    weights); any failure raises WeightsError and leaves the folder's previous files unchanged."""
    directory = as_path(directory, "the model folder")
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
