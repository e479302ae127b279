"""The package's layers: every module imports only modules of its own layer or below, and no import cycle.

Read from the sources (every ``import`` statement, those inside functions included, since a lazy import
upwards is still a dependency upwards), so it holds however the modules happen to be imported. The
layers, bottom up (docs/SPEC_MAP.md describes them):

0. foundation: errors, the tokenizer, the thread counts (BLAS, OpenMP, the kernels);
1. definitions that read no config: the argument checks, the components (spec equations, forward and
   backward, on plain arrays and numbers), the quantization schemes;
2. the config (its task fields, the variants and quantization it names, checked against layer 1), the
   parameters, the state, the safetensors files and the model folder;
3. composition and kernels: the spec §4 step and §5 BPTT (``step``), the memory choices a run makes
   (``memory_steps``), the Numba kernels (``fast``), the int8 form of the parameters (``quant``);
4. engines: the decoders, the fast gradient, the layered engine;
5. the model: ``THLModel``, the one place that chooses the path and the quantized form;
6. applications: generation, training, fine-tuning, evaluation, reference vectors, conversion, gradient checks,
   the ONNX export;
7. the command line, and the package's own ``__init__`` (the public names).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "thl_np"

LAYERS = [
    ("thl_np.errors", "thl_np.tokenizer", "thl_np._blas", "thl_np._threads"),
    ("thl_np.checks", "thl_np.components", "thl_np.quant"),  # thl_np.quant: its schemes and stored matrix
    ("thl_np.config", "thl_np.task_fields", "thl_np.params", "thl_np.state", "thl_np.io", "thl_np.io.safetensors",
     "thl_np.io.folder"),
    ("thl_np.step", "thl_np.memory_steps", "thl_np.fast", "thl_np.quant.params", "thl_np.quant.quantize"),
    ("thl_np.engines",),
    ("thl_np.model",),
    ("thl_np.generation", "thl_np.training", "thl_np.finetune", "thl_np.eval", "thl_np.reference",
     "thl_np.io.convert", "thl_np.gradcheck", "thl_np.serve", "thl_np.onnx"),
    ("thl_np.cli", "thl_np"),
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` named in LAYERS."""
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def package_modules() -> dict:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _ancestors(module: str) -> set:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _type_checking_lines(tree) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(module: str, path: Path, mods: dict) -> set:
    """The package modules that importing ``module`` (or running any of its functions) imports: each named
    module and the packages above it that are not above ``module`` itself (those are already loading)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if node.lineno in skip if hasattr(node, "lineno") else False:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
        for name in names:
            for m in _ancestors(name) | {name}:
                if m in mods and m != module and m not in _ancestors(module) and m != "thl_np":
                    found.add(m)
    return found


def import_graph() -> dict:
    mods = package_modules()
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack = []

    def visit(v):
        colour[v] = GREY
        stack.append(v)
        for w in sorted(graph[v]):
            if colour[w] == GREY:
                return stack[stack.index(w):] + [w]
            if colour[w] == WHITE:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        colour[v] = BLACK
        return None

    for v in sorted(graph):
        if colour[v] == WHITE:
            found = visit(v)
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    for module in package_modules():
        layer_of(module)


def test_every_import_goes_to_the_same_layer_or_below():
    upward = []
    for module, deps in import_graph().items():
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) imports {dep} (layer {layer_of(dep)})")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


BLOCK_NUMBA = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numba", "llvmlite"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("module", ["thl_np.step", "thl_np.components.registry", "thl_np.state", "thl_np.config"])
def test_the_spec_side_imports_without_numba(module):
    """``import thl_np.step`` (the spec composed once) needs NumPy only: a porter reads and runs it without Numba."""
    code = BLOCK_NUMBA + f"import {module}\nimport thl_np\nassert 'numba' not in sys.modules, sorted(sys.modules)\n"
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_plain_step_runs_without_numba():
    code = BLOCK_NUMBA + (
        "import numpy as np\n"
        "from thl_np.config import THLConfig\nfrom thl_np.params import init_params\n"
        "from thl_np.state import InferenceState\nfrom thl_np.step import thl_step, output_forward\n"
        "c = THLConfig(dim=16, memory_slots=8, vocab_size=259)\np = init_params(c, seed=0)\n"
        "s = InferenceState.init(2, c)\nh, s, _ = thl_step(p, c, np.array([1, 2]), s)\n"
        "logits, _, _ = output_forward(p, h)\nassert logits.shape == (2, 259) and np.isfinite(logits).all()\n"
        "assert 'numba' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
