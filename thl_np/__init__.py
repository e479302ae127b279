"""thl-np: THL (Transformer Hierarchical Layers) in NumPy."""
from . import _threads  # noqa: F401  (first: idle OpenMP workers sleep, set before Numba is imported)
from .config import THLConfig
from .errors import ConfigError, InputError, StateError, THLError, WeightsError
from .generation import generate_text, stream_text
from .inference.state import InferenceState
from .model import THLModel, value_and_grad
from .tasks import THLForMultipleChoice, THLForSequenceClassification, THLForTokenClassification
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["THLConfig", "THLModel", "InferenceState", "Tokenizer", "generate_text", "stream_text",
           "value_and_grad", "THLForSequenceClassification", "THLForTokenClassification", "THLForMultipleChoice",
           "THLError", "ConfigError", "WeightsError", "StateError", "InputError"]
