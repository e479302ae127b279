"""Inference: the bounded state, the fast decoding session and the layered engine for small GPUs."""
from ..state import InferenceState
from .decoder import FastDecoder
from .layered import LayeredInferenceEngine

__all__ = ["InferenceState", "FastDecoder", "LayeredInferenceEngine"]
