"""Inference: the bounded state, the fast decoding session and the layered engine for small GPUs."""
from .fast import FastDecoder
from .layered import LayeredInferenceEngine
from .state import InferenceState

__all__ = ["InferenceState", "FastDecoder", "LayeredInferenceEngine"]
