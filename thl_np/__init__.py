"""thl-np: THL (Transformer Hierarchical Layers) in NumPy."""
import importlib

from . import _threads  # noqa: F401  (first: idle OpenMP workers sleep, set before Numba is imported)

# The public names, imported on first use (PEP 562): ``import thl_np.cli`` stays cheap, so the command
# line can catch a Ctrl-C during its imports (thl_np.cli.main).
_PUBLIC = {
    "THLConfig": "config", "ConfigError": "errors", "InputError": "errors", "StateError": "errors",
    "THLError": "errors", "WeightsError": "errors", "THLForMultipleChoice": "finetune",
    "THLForSequenceClassification": "finetune", "THLForTokenClassification": "finetune",
    "generate_text": "generation", "stream_text": "generation", "THLModel": "model",
    "dequantize_model": "model", "quantize_model": "model", "value_and_grad": "model",
    "InferenceState": "state", "Tokenizer": "tokenizer",
}


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif not name.startswith("__"):
        try:  # a sub-module: thl_np.model after a bare ``import thl_np``
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


__version__ = "0.1.0"

__all__ = ["THLConfig", "THLModel", "InferenceState", "Tokenizer", "generate_text", "stream_text",
           "value_and_grad", "quantize_model", "dequantize_model", "THLForSequenceClassification",
           "THLForTokenClassification", "THLForMultipleChoice",
           "THLError", "ConfigError", "WeightsError", "StateError", "InputError"]
