"""One exception hierarchy for the whole library.

Every message says what was wrong, with which value, and what to do about it. Bad input must
surface as one of these, never as an IndexError or a broadcasting error from deep inside.
"""


class THLError(Exception):
    """Base class of every error thl-np raises on purpose."""


class ConfigError(THLError, ValueError):
    """A THLConfig field (or config.json) is missing, unknown or out of range."""


class WeightsError(THLError, ValueError):
    """A weights file is missing, malformed, or does not match the config."""


class StateError(THLError, ValueError):
    """An InferenceState does not fit the model, the batch, or the state file format."""


class InputError(THLError, ValueError):
    """Token ids, targets or other call arguments have the wrong type, shape or range."""
