"""What a valid value is, defined once: every validator (THLConfig, TrainConfig, the CLI flags, generation
arguments, InferenceState) asks ``RULES`` and the functions below, so "a finite number in [0, 1]" means
the same thing everywhere, and NaN, ±inf, bools, strings and integers too large for a float are refused
everywhere with the same message.

Also here: the checks made before a command starts its work, so that nothing is lost to an output location
that could have been checked first (``check_output_dir``, ``check_output_file``), and an estimate of a
large allocation (``check_allocation``) so that an impossible model is an error, not a MemoryError.
"""
from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
from dataclasses import dataclass

from .errors import InputError, StateError

# NumPy is imported inside the functions that take arrays: the CLI imports this module, and `thl-np --help`
# stays instant without NumPy.

#: Widths, slot counts, vocabulary sizes...: int32 range, so every product of two stays exact in int64.
MAX_SIZE = 2**31 - 1
#: Tiers: the default clocks 8**k leave int32 at k = 11; a thousand tiers is beyond any use.
MAX_TIERS = 1024
#: Coefficients of the step (η, Δ_max, λ_load, β, θ, λ_s, λ_u, the load-balance weight): a bound far above
#: any useful value that keeps every product the step forms (η·Δ_max, β·θ, λ_s·staleness) and their squares
#: (slot norms) inside float32's range, so the plain, fast and layered paths compute the same numbers.
MAX_COEFFICIENT = 1e6
#: A state's step counter: far beyond any run, and t + T, t - last_write stay exact in int64.
MAX_TIMESTEP = 2**62
#: Seeds of np.random.default_rng (non-negative integers); 2**63 - 1 keeps them int64 in files.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Rule:
    """A finite number (or an integer) in [lo, hi]; ``lo_open`` / ``hi_open`` exclude an end; None: no bound."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        fmt = (lambda v: f"{v:g}") if not self.integer else (lambda v: str(int(v)))
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{kind} in {left}{fmt(self.lo)}, {fmt(self.hi)}{right}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {fmt(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {fmt(self.hi)}"
        return kind

    def check(self, name: str, value, error=InputError, fix: str = ""):
        """``value`` as a float (an int for integer rules), or ``error`` naming ``name``, the value and the rule."""
        tail = f": {fix}" if fix else ""

        def fail(why=""):
            raise error(f"{name} = {_show(value)} must be {self.describe()}{why}{tail}")

        if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):  # NumPy's bool too
            fail()
        if self.integer:
            if getattr(value, "ndim", None) == 0 and getattr(value, "dtype", None) is not None \
                    and value.dtype.kind in "iu":  # a 0-d integer array, as a .npz file holds a scalar
                value = value[()]
            if not isinstance(value, numbers.Integral):
                fail()
            v = int(value)
        else:
            if not isinstance(value, numbers.Real):
                fail()
            try:
                v = float(value)
            except OverflowError:  # an int too large for a float
                fail()
            if not math.isfinite(v):
                fail()
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            fail()
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            fail()
        return v


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:20] + f"...({len(text)} characters)"


_SIZE = Rule(1, MAX_SIZE, integer=True)
_COEF = Rule(-MAX_COEFFICIENT, MAX_COEFFICIENT)
_UNIT = Rule(0.0, 1.0)

#: Every numeric field of the library, by the name it has in THLConfig / TrainConfig / the generation
#: functions / the state. The CLI flags that set a field use its rule (thl_np.cli.params).
RULES: dict[str, Rule] = {
    # THLConfig (spec §1)
    **{name: _SIZE for name in ("vocab_size", "embedding_dim", "hidden_dim", "memory_slots",
                                "memory_dim", "query_dim", "value_dim", "num_heads", "head_dim", "read_topk",
                                "write_slots", "tier_dims", "tier_timescales", "read_slot_capacity", "dim")},
    "num_tiers": Rule(1, MAX_TIERS, integer=True),
    "local_window": Rule(0, MAX_SIZE, integer=True),
    "pad_token_id": Rule(0, MAX_SIZE, integer=True),
    "read_ema_decay": _UNIT, "write_ema_decay": _UNIT, "memory_decay": _UNIT,
    **{name: _COEF for name in ("load_penalty", "router_load_balance_lambda", "write_rate", "novelty_beta",
                                "novelty_theta", "stale_weight", "underuse_weight")},
    "write_clip_max": Rule(0.0, MAX_COEFFICIENT, lo_open=True),
    "num_labels": _SIZE, "classifier_dropout": Rule(0.0, 1.0, hi_open=True),     # task heads (thl_np.finetune)
    # TrainConfig
    **{name: Rule(1, MAX_SIZE, integer=True) for name in ("steps", "seq_len", "batch_size", "eval_lanes",
                                                          "keep_checkpoints", "lr_decay_steps", "seq_len_final",
                                                          "seq_len_ramp", "memory_bptt")},
    "task_mix": _UNIT,                                          # share of rows that are long-range tasks
    "answer_weight": Rule(0.0, MAX_COEFFICIENT, lo_open=True),  # loss weight of a task's answer bytes
    "read_weight": Rule(0.0, MAX_COEFFICIENT),                  # the read-target term's μ (0: off)
    **{name: Rule(0, MAX_SIZE, integer=True) for name in ("warmup", "eval_every", "checkpoint_every",
                                                          "skip_overflow")},
    "eval_tokens": Rule(2, MAX_SIZE, integer=True),
    "eval_examples": Rule(1, MAX_SIZE, integer=True),         # thl-np finetune
    "max_bytes": Rule(2, integer=True),
    "lr": Rule(0.0, lo_open=True),
    "min_lr_ratio": _UNIT,
    "beta1": Rule(0.0, 1.0, hi_open=True), "beta2": Rule(0.0, 1.0, hi_open=True),
    "eps": Rule(0.0, lo_open=True),
    "weight_decay": Rule(0.0), "grad_clip": Rule(0.0),
    "held_out_fraction": Rule(0.0, 1.0, hi_open=True),
    "seed": Rule(0, MAX_SEED, integer=True),
    # generation and evaluation
    "temperature": Rule(0.0),
    "top_k": Rule(1, integer=True),
    "top_p": Rule(0.0, 1.0, lo_open=True),
    "max_length": Rule(0, integer=True),
    "repetition_penalty": Rule(0.0, MAX_COEFFICIENT, lo_open=True),   # 1 is no penalty
    "presence_penalty": _COEF,                                      # 0 is no penalty
    "depth": _UNIT,
    "held_out": Rule(0.0, 1.0, lo_open=True, hi_open=True),   # thl-np eval --held-out: a fraction to evaluate
    "atol": Rule(0.0), "rtol": Rule(0.0),                      # thl-np check-port tolerances
    # InferenceState (spec §3); local_valid's upper end is the config's local_window
    "timestep": Rule(0, MAX_TIMESTEP, integer=True),
}


def check(field: str, value, error=InputError, name: str | None = None, fix: str = ""):
    """``RULES[field]`` applied to ``value`` (reported as ``name``, default the field's own name)."""
    return RULES[field].check(name or field, value, error, fix)


def check_seed(value, name: str = "seed", error=InputError):
    """None (fresh entropy) or a seed for np.random.default_rng: an integer in [0, 2**63 - 1]."""
    if value is None:
        return None
    return check("seed", value, error, name, "use a non-negative integer, or None for a fresh seed")


# ---------------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------------
def first_non_finite(a):
    """The index (a tuple) of the first NaN / ±inf of a float array, or None when every value is finite."""
    import numpy as np

    from .components.primitives import array_module

    xp = array_module(a)
    if a.size == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        if bool(xp.isfinite(a.sum(dtype=xp.float64))):  # a sum is finite only if every value is
            return None
    bad = xp.argmax(~xp.isfinite(a.reshape(-1)))
    flat = int(bad)
    if bool(xp.isfinite(a.reshape(-1)[flat])):
        return None  # the sum overflowed, the values are finite
    return tuple(int(i) for i in np.unravel_index(flat, a.shape))


def check_float_array(name: str, a, error=StateError, what: str = "state") -> None:
    """``a`` is an array of floats (float16/32/64) holding no NaN or ±inf."""
    import numpy as np

    dtype = getattr(a, "dtype", None)
    if dtype is None or not hasattr(a, "shape"):
        raise error(f"{what} {name} is {type(a).__name__}, not an array: rebuild the state "
                    "(InferenceState.init or a state a model returned)")
    if np.dtype(dtype).kind != "f":
        raise error(f"{what} {name} has dtype {dtype}; it must hold floats (float32 or float64)")
    where = first_non_finite(a)
    if where is not None:
        raise error(f"{what} {name} holds a non-finite value ({a[where]} at index {list(where)}): "
                    "the state is corrupt; start from InferenceState.init or an earlier state")


def check_int_array(name: str, a, lo: int, hi: int, error=StateError, what: str = "state") -> None:
    """``a`` is an array of integers, every one in [lo, hi]."""
    import numpy as np

    dtype = getattr(a, "dtype", None)
    if dtype is None or not hasattr(a, "shape"):
        raise error(f"{what} {name} is {type(a).__name__}, not an array: rebuild the state "
                    "(InferenceState.init or a state a model returned)")
    if np.dtype(dtype).kind not in "iu":
        raise error(f"{what} {name} has dtype {dtype}; it must hold integers (int64)")
    if a.size:
        from .components.primitives import array_module

        xp = array_module(a)
        low, high = int(xp.min(a)), int(xp.max(a))
        if low < lo or high > hi:
            raise error(f"{what} {name} holds {low if low < lo else high}, outside [{lo}, {hi}] (step numbers "
                        "of a state lie between 0 and its timestep): the state is corrupt")


# ---------------------------------------------------------------------------------------------------
# Output locations, checked before the work
# ---------------------------------------------------------------------------------------------------
def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _probe_writable(folder: str, flag: str, path: str) -> None:
    """Create and remove a file in ``folder``: the only test root, read-only mounts and /proc all answer."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".thl-np-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc}): "
                         "choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def check_free_space(folder: str, nbytes: int, flag: str, path: str) -> None:
    """At least ``nbytes`` free on the filesystem of ``folder`` (an estimate of what is about to be written)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if nbytes > free:
        raise InputError(f"{flag} {path}: about {format_size(nbytes)} will be written but only "
                         f"{format_size(free)} is free there: free some space or choose another location")


def check_output_dir(path, flag: str = "--out", need_bytes: int = 0) -> str:
    """A folder that a command will create or write into: not a file, under a folder (not a file), writable,
    with ``need_bytes`` free. Creates nothing. Returns the path as a str."""
    path = as_path(path, flag)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a folder: choose another path")
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        raise InputError(f"{flag} {path}: {base} is a file, so no folder can be made under it: choose another path")
    _probe_writable(base, flag, path)
    if need_bytes:
        check_free_space(base, need_bytes, flag, path)
    return path


def check_output_file(path, flag: str, need_bytes: int = 0) -> str:
    """A file that a command will write (atomically, beside itself): not a folder, in an existing writable folder."""
    path = as_path(path, flag)
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is a file" if os.path.lexists(folder) else "does not exist"
        raise InputError(f"{flag} {path}: the folder {folder} {what}: create it first or choose another path")
    _probe_writable(folder, flag, path)
    if need_bytes:
        check_free_space(folder, need_bytes, flag, path)
    return path


# the file formats matplotlib's Agg / PDF / SVG / PS backends write (``savefig`` picks one by the suffix)
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".eps", ".ps",
                 ".pgf", ".raw", ".rgba")


def check_plot_file(path, flag: str) -> str:
    """A plot's output file: an image suffix matplotlib can write (not .txt / .jsonl), then as check_output_file."""
    path = as_path(path, flag)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PLOT_SUFFIXES:
        got = f"'{suffix}'" if suffix else "no suffix"
        raise InputError(f"{flag} {path}: a plot is written as an image, and {got} is not one: end the name "
                         f"with {', '.join(PLOT_SUFFIXES[:4])} (or {', '.join(PLOT_SUFFIXES[4:])})")
    return check_output_file(path, flag)


def as_path(value, what: str) -> str:
    """A str path from a str / bytes / os.PathLike, or InputError naming ``what``."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if not path:
        raise InputError(f"{what} is an empty path: give a folder or file name")
    return path


def as_dtype(value, what: str = "dtype"):
    """A NumPy dtype from a name or a type, or InputError naming ``what`` (callers then ask for float32/64)."""
    import numpy as np

    try:
        return np.dtype(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} {value!r} is not a dtype: use float32 or float64") from None


# ---------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory a new allocation can get (MemAvailable on Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(nbytes: int, what: str, fix: str, error=InputError) -> None:
    """Refuse, before allocating, ``nbytes`` that exceed the memory available now."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise error(f"{what} needs about {format_size(nbytes)} of memory, but only {format_size(free)} is "
                    f"available: {fix}")


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


#: Why a model's metric comes out NaN or infinite, said once for every evaluation.
NON_FINITE_OUTPUT = ("the model's logits are not finite: its weights hold NaN or infinity (files of 64 MB or more "
                     "are not scanned on load: THLModel.from_pretrained(..., verify=True) scans them) or they have "
                     "diverged; use an earlier checkpoint")


def check_metric(name: str, value: float, cause: str, error) -> float:
    """A metric (loss, bits per byte) must be finite: NaN or ±inf is an error naming its likely cause."""
    if not math.isfinite(value):
        raise error(f"{name} is {value}, not a finite number: {cause}")
    return value


def require_matplotlib(what: str = "the plot"):
    """matplotlib's (Figure, FigureCanvasAgg), or InputError naming the extra that installs it (checked before
    any work by the commands that draw)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(f"{what} needs matplotlib: pip install 'thl-np[plot]' (or pip install matplotlib)") from None
    return Figure, FigureCanvasAgg


def as_int_array(x, name):
    """Any array-like of integer token ids (lists, NumPy, a CPU torch tensor) → an int64 array."""
    import numpy as np

    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:
        raise InputError(f"{name} could not be read as an array ({exc})") from None
    if arr.dtype == object:
        raise InputError(f"{name} must be a rectangular array of integer token ids")
    if arr.size == 0 and arr.dtype.kind not in "iu":  # np.asarray([]) is float64: say what is wrong
        raise InputError(f"{name} is empty (shape {list(arr.shape)}): give at least one token per sequence")
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integer token ids, got dtype {arr.dtype}: "
                         "convert with np.asarray(ids, dtype=np.int64)")
    return arr.astype(np.int64, copy=False)
