"""ONNX export of one THL step (spec §4 plus the head), verified in ONNX Runtime (docs/DEPLOY.md).

One module per component lowering (``embedding``, ``local_attention``, ``router``, ``gru``, ``writer``,
``output``), each tested alone against its definition in ``thl_np.components``; ``graph`` composes them
as ``thl_np.step`` does; ``export`` writes the file and its metadata; ``runtime`` loads an export (checking
its metadata against its graph) and runs it; ``check`` compares an export with thl-np step by step.
Needs the ``[onnx]`` extra (onnx, onnxruntime).
"""


def require() -> None:
    """InputError (one line) when the ``[onnx]`` extra is not installed."""
    import importlib.util

    from ..errors import InputError

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"the ONNX export needs {' and '.join(missing)}: pip install 'thl-np[onnx]'")
