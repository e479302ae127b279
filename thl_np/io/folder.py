"""Model folders: where a model is (``resolve_model_dir``), and writing one so that a failure never leaves
half a model (``write_model_folder``). Every loader and writer of the package goes through here.

A model folder holds config.json + model.safetensors. A training run's output folder holds ``LATEST``,
naming its newest complete checkpoint ``step-NNNNNN``, whose ``model/`` is a model folder
(``thl_np.training.checkpoint`` writes them); wherever a model folder is asked for, a run folder stands for
that model. No folder named, or the name ``"default"``, means the small model shipped inside the package.

Each file is written to a temporary name and renamed into place, config.json last: a full disk or a
kill during the write leaves the folder as it was (a folder this call created is removed again), and
the temporary files a killed process left behind are removed by the next write into the folder.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

from ..checks import as_path, check_output_dir
from ..errors import InputError, WeightsError
from .safetensors import STORAGE_DTYPES, write_safetensors

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
DEFAULT_NAME = "default"  # the name of the shipped model, wherever a model folder is asked for
LATEST = "LATEST"
STEP_DIR = re.compile(r"^step-(\d+)$")
_STORAGE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# the temporary names of write_safetensors (.NAME.PID.RANDOM.tmp) and of the config below (.NAME.tmp-PID)
_TEMP = re.compile(r"^\.(?:.+\.(\d+)\.[0-9a-f]{8}\.tmp|config\.json\.tmp-(\d+))$")


def resolve_model_dir(model: str | os.PathLike | None) -> str:
    """The model folder to load: ``model`` itself when it holds config.json, the model of the latest
    checkpoint when it is a training run's output folder, the packaged default model when it is None or
    the name ``"default"`` (``THLModel.from_pretrained("default")``, ``thl-np info default``). A real
    folder named ``default`` in the working directory wins over the shipped model: pass ``./default``
    to be explicit either way, or None for the shipped model. A one-line WeightsError when there is
    nothing to load there."""
    if model == DEFAULT_NAME and not os.path.isdir(DEFAULT_NAME):
        model = None
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
    held = _held.get(os.path.realpath(directory))
    created = not os.path.lexists(directory) or (held is not None and held[1])  # made here or by our own lock
    with model_folder_lock(directory):  # one writer at a time: weights and config from the same writer
        _write_model_folder(directory, params, config, metadata, dtype, keep_dtype, created)
    return directory


def _write_model_folder(directory, params, config, metadata, dtype, keep_dtype, created) -> None:
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


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name in the same folder (``.NAME.PID.RANDOM.tmp``,
    which ``remove_stale_temps`` recognises once its writer is dead), flushed to disk, then renamed over
    ``path``: a reader, or a restart after kill -9, sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


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


# ---------------------------------------------------------------------------------------------- run lock
RUN_LOCK = ".run.lock"


@contextlib.contextmanager
def run_lock(out_dir, *, active: bool = True):
    """Hold ``out_dir``'s run lock while a `train` / `finetune` run writes it (one writer per run folder).

    The lock is an ``flock`` on ``out_dir/.run.lock``, which holds the owner's pid: the kernel releases it
    when the owner exits or crashes (kill -9), so a lock left by a dead run is stale and taken over; a live
    owner's (``pid_alive``) makes a second run, or a second ``--resume``, fail at once with one line.
    Nothing is locked (the run's own checks then speak) for a path that is a file, a model folder, or a
    folder that cannot be made; a folder made only for the lock is removed again if the run left it empty.
    """
    out_dir = os.fspath(out_dir)
    if (not active or fcntl is None or (os.path.exists(out_dir) and not os.path.isdir(out_dir))
            or os.path.exists(os.path.join(out_dir, CONFIG))):
        yield
        return
    made = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError:
        yield
        return
    path = os.path.join(out_dir, RUN_LOCK)
    fd = _take_lock(path, out_dir)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
        if made:
            try:
                os.rmdir(out_dir)  # only if the run wrote nothing there (it failed before its first file)
            except OSError:
                pass


def _take_lock(path: str, out_dir: str, what: str = "run") -> int:
    for _ in range(100):
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise InputError(f"cannot lock the run folder {out_dir!r} ({exc.strerror or exc}): choose a writable "
                             "--out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _lock_owner(fd)
            os.close(fd)
            if owner is not None and not pid_alive(owner):
                continue  # its owner is gone: the kernel drops the flock as it exits; try again
            who = f"process {owner}" if owner else "another process"
            raise InputError(f"{out_dir!r} is in use by another {what} ({who} holds {os.path.basename(path)}): "
                             "wait for it to end, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if not same:  # the previous owner removed the file as we opened it: lock the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise InputError(f"cannot lock the run folder {out_dir!r}: it keeps changing under another process; "
                     "choose another --out")


def _lock_owner(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- model-folder lock
WRITE_LOCK = ".write.lock"
LOCK_NAMES = (RUN_LOCK, WRITE_LOCK)
_held: dict[str, tuple[int, bool]] = {}   # folder (real path) -> (lock fd, whether this process made the folder)


def hold_model_folder(directory) -> None:
    """Take ``directory``'s writer lock for the rest of this process (a command that checks a model folder
    is new, then writes it): a second process writing the same folder meanwhile is refused in one line,
    so neither reports success for work the other overwrote. Released at exit (by the kernel on a crash);
    a folder made only for the lock is removed again if nothing was written."""
    directory = os.fspath(directory)
    key = os.path.realpath(directory)
    if fcntl is None or key in _held or (os.path.exists(directory) and not os.path.isdir(directory)):
        return
    made = not os.path.exists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return  # the writer's own checks say why
    _held[key] = (_take_lock(os.path.join(directory, WRITE_LOCK), directory, "writer"), made)
    if len(_held) == 1:
        atexit.register(_release_all)


def _release(key: str) -> None:
    fd, made = _held.pop(key)
    _remove(os.path.join(key, WRITE_LOCK))
    os.close(fd)
    if made:
        try:
            os.rmdir(key)
        except OSError:
            pass


def release_model_folder(directory) -> None:
    """Give back ``hold_model_folder``'s lock before the process ends (a command run in-process is over)."""
    key = os.path.realpath(os.fspath(directory))
    if key in _held:
        _release(key)


def _release_all() -> None:
    for key in list(_held):
        _release(key)


@contextlib.contextmanager
def model_folder_lock(directory):
    """``hold_model_folder`` for the length of a ``with``, unless this process holds it already."""
    key = os.path.realpath(os.fspath(directory))
    if key in _held:
        yield
        return
    hold_model_folder(directory)
    try:
        yield
    finally:
        if key in _held:
            _release(key)
