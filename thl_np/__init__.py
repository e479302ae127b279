"""thl-np: THL (Transformer Hierarchical Layers) in NumPy."""
from . import _threads  # noqa: F401  (first: idle OpenMP workers sleep, set before Numba is imported)
from .config import THLConfig
from .errors import ConfigError, InputError, StateError, THLError, WeightsError
from .finetune import THLForMultipleChoice, THLForSequenceClassification, THLForTokenClassification
from .generation import generate_text, stream_text
from .model import THLModel, dequantize_model, quantize_model, value_and_grad
from .state import InferenceState
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["THLConfig", "THLModel", "InferenceState", "Tokenizer", "generate_text", "stream_text",
           "value_and_grad", "quantize_model", "dequantize_model", "THLForSequenceClassification",
           "THLForTokenClassification", "THLForMultipleChoice",
           "THLError", "ConfigError", "WeightsError", "StateError", "InputError"]
