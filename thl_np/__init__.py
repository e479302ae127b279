"""thl-np: THL (Transformer Hierarchical Layers) in NumPy."""
from .config import THLConfig
from .errors import ConfigError, InputError, StateError, THLError, WeightsError

__version__ = "0.1.0"

__all__ = ["THLConfig", "THLError", "ConfigError", "WeightsError", "StateError", "InputError"]
