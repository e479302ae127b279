"""Component variants: the spec's components by default, and the researcher's own, chosen by config.

Each swappable component of the step is a *kind* with a forward and a backward of a fixed signature
(the spec's own functions define it):

    kind             spec   forward / backward (the "spec" variant)
    local_attention  §4.2   local_attention.local_attention_forward / _backward
    router           §4.3   router.router_forward / router_backward
    gru              §4.5   gru.gru_forward / gru_backward
    writer           §4.6   writer.writer_forward / writer_backward
    memory_write     §4.7   writer.memory_write_forward / memory_write_backward

A variant is registered once by name (``register``) and chosen per model by the config field
``components`` (``{"router": "my_router"}``); kinds not named there use "spec". The plain path, the
layered engine and training compose whatever variants the config names (``thl_np.step``); the fast
path's Numba kernels compute the spec variants and the built-in routers ``unit_keys``, ``empty_last`` and
``unit_rows`` (``router_unit_keys.py``, ``router_empty_last.py``, ``router_unit_rows.py``); a model with another
variant (such as the built-in ``memory_write: decay_on_write``, ``memory_write_on_write.py``) runs on the plain
path (``has_fast_path``).
``docs/CHANGING_A_COMPONENT.md`` is a worked example.

A variant's forward returns what the spec's does, with its own cache as the last value; its backward
takes that cache (a memory write has no cache: its backward receives the step ``t`` and the state's
``last_write`` before the write as keywords, which the built-in ``decay_on_write`` uses). Two things
of a cache are read outside the component: a writer cache's ``j_star`` (the row its backward's memory
gradient belongs to) and, for the reference vectors and tests, the router cache's ``cap_mask`` and the
writer cache's ``novel``/``clipped`` (None or absent is fine there).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from . import (
    gru,
    local_attention,
    memory_write_on_write,
    router,
    router_empty_last,
    router_unit_keys,
    router_unit_rows,
    writer,
)

SPEC = "spec"


@dataclass(frozen=True)
class Variant:
    """One implementation of a component kind."""

    kind: str
    name: str
    forward: Callable
    backward: Callable
    fast: bool = False     # the fast path's kernels compute exactly this variant
    doc: str = ""


_REGISTRY: dict[str, dict[str, Variant]] = {
    "local_attention": {SPEC: Variant("local_attention", SPEC, local_attention.local_attention_forward,
                                      local_attention.local_attention_backward, fast=True)},
    "router": {SPEC: Variant("router", SPEC, router.router_forward, router.router_backward, fast=True),
               router_unit_keys.NAME: Variant("router", router_unit_keys.NAME, router_unit_keys.unit_keys_forward,
                                              router_unit_keys.unit_keys_backward, fast=True,
                                              doc="scores by the slot's unit row (router_unit_keys.py)"),
               router_empty_last.NAME: Variant("router", router_empty_last.NAME, router_empty_last.empty_last_forward,
                                               router_empty_last.empty_last_backward, fast=True,
                                               doc="unit_keys with an empty slot ranked below every written one "
                                                   "(router_empty_last.py)"),
               router_unit_rows.NAME: Variant("router", router_unit_rows.NAME, router_unit_rows.unit_rows_forward,
                                              router_unit_rows.unit_rows_router_backward, fast=True,
                                              doc="scores and values from the slot's unit row "
                                                  "(router_unit_rows.py)")},
    "gru": {SPEC: Variant("gru", SPEC, gru.gru_forward, gru.gru_backward, fast=True)},
    "writer": {SPEC: Variant("writer", SPEC, writer.writer_forward, writer.writer_backward, fast=True)},
    "memory_write": {SPEC: Variant("memory_write", SPEC, writer.memory_write_forward,
                                   writer.memory_write_backward, fast=True),
                     memory_write_on_write.NAME: Variant(
                         "memory_write", memory_write_on_write.NAME, memory_write_on_write.decay_on_write_forward,
                         memory_write_on_write.decay_on_write_backward,
                         doc="a slot decays by the steps since its last write, when written "
                             "(memory_write_on_write.py)")},
}
KINDS = tuple(_REGISTRY)


def register(kind: str, name: str, forward: Callable, backward: Callable, *, doc: str = "",
             replace: bool = False) -> Variant:
    """Register ``forward``/``backward`` as variant ``name`` of component ``kind`` and return it.

    Registering a name twice is an error unless ``replace=True`` (a notebook re-running a cell)."""
    if kind not in _REGISTRY:
        raise ConfigError(f"no component kind {kind!r}: the kinds are {list(KINDS)}")
    if not isinstance(name, str) or not name or name == SPEC:
        raise ConfigError(f"variant name {name!r} must be a non-empty string other than {SPEC!r}")
    if not (callable(forward) and callable(backward)):
        raise ConfigError(f"variant {kind}={name}: forward and backward must be callables")
    if name in _REGISTRY[kind] and not replace:
        raise ConfigError(f"variant {kind}={name} is already registered (pass replace=True to redefine it)")
    v = Variant(kind, name, forward, backward, fast=False, doc=doc)
    _REGISTRY[kind][name] = v
    return v


def variants(kind: str) -> list[str]:
    """The registered variant names of ``kind``."""
    return sorted(_REGISTRY[kind])


def check_choice(choice) -> dict:
    """A config's ``components`` value, checked: {kind: registered variant name}, "spec" entries dropped."""
    if choice is None:
        return {}
    if not isinstance(choice, dict):
        raise ConfigError(f"components = {choice!r} must be an object mapping a component kind to a variant "
                          f"name, e.g. {{\"router\": \"my_router\"}}")
    out = {}
    for kind, name in choice.items():
        if kind not in _REGISTRY:
            raise ConfigError(f"components: no component kind {kind!r}; the kinds are {list(KINDS)}")
        if not isinstance(name, str) or name not in _REGISTRY[kind]:
            raise ConfigError(
                f"components: {kind} variant {name!r} is not registered (registered: {variants(kind)}); "
                "import the module that registers it first (thl-np: --plugin FILE)")
        if name != SPEC:
            out[kind] = name
    return out


@dataclass(frozen=True)
class Components:
    """The variant of every kind that one config composes."""

    local_attention: Variant
    router: Variant
    gru: Variant
    writer: Variant
    memory_write: Variant

    @property
    def fast(self) -> bool:
        """True when the fast path's kernels compute every chosen variant."""
        return all(getattr(self, k).fast for k in KINDS)

    def custom(self) -> list[str]:
        """"kind=name" for every variant that is not the spec's."""
        return [f"{k}={getattr(self, k).name}" for k in KINDS if getattr(self, k).name != SPEC]

    def without_kernels(self) -> list[str]:
        """"kind=name" for every chosen variant the fast path's kernels do not compute."""
        return [f"{k}={getattr(self, k).name}" for k in KINDS if not getattr(self, k).fast]


def components_for(config) -> Components:
    """The variants ``config.components`` chooses (the spec's for every kind it does not name)."""
    choice = check_choice(getattr(config, "components", None))
    return Components(**{k: _REGISTRY[k][choice.get(k, SPEC)] for k in KINDS})


def load_plugin(source: str):
    """Import a Python file (``path/to/file.py``) or an importable module name, for the variants it
    registers (``thl-np --plugin``). Returns the module."""
    import importlib
    import importlib.util
    import os
    import sys

    try:
        if source.endswith(".py") or os.sep in source:
            if not os.path.isfile(source):
                raise ConfigError(f"plugin {source!r}: no such file")
            key = os.path.realpath(source)
            if key in _LOADED_FILES:  # the same file named twice (--plugin a.py --plugin ./a.py): once
                return _LOADED_FILES[key]
            name = "thl_np_plugin_" + os.path.splitext(os.path.basename(source))[0]
            spec = importlib.util.spec_from_file_location(name, source)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            _LOADED_FILES[key] = module
            return module
        return importlib.import_module(source)
    except ConfigError:
        raise
    except SystemExit as exc:  # sys.exit() in the plugin: say which plugin ended the program
        raise ConfigError(f"plugin {source!r} ended the program while it was imported (sys.exit({exc.code!r})): "
                          f"a plugin should only register variants") from None
    except Exception as exc:  # the plugin's own error, reported on one line
        raise ConfigError(f"plugin {source!r} failed to import: {type(exc).__name__}: {exc}") from None


_LOADED_FILES: dict = {}  # realpath of a plugin file → its module


def check_forward_shapes(variant: Variant, outputs, expected) -> None:
    """A plugin variant's forward outputs against the shapes the step needs (``expected``: (what, shape)
    pairs, matched with ``outputs`` in order): ConfigError naming the variant and the expected shape, not a
    broadcasting error later. The spec's variants are not checked (their tests are)."""
    if variant.name == SPEC:
        return
    for (what, shape), value in zip(expected, outputs, strict=True):
        got = tuple(getattr(value, "shape", ()))
        if got != tuple(shape):
            raise ConfigError(f"variant {variant.kind}={variant.name}: its forward returned {what} of shape "
                              f"{list(got)}, expected {list(shape)} (the {variant.kind} signature: "
                              f"docs/CHANGING_A_COMPONENT.md)")


# The built-in routers' score rules, for code that recomputes scores outside a step (the passkey trace),
# and the number the fast kernels take for each (``key_rule``, thl_np.fast.router).
_SCORE_RULES = {SPEC: router.DOT, router_unit_keys.NAME: router_unit_keys.UNIT_KEYS,
                router_empty_last.NAME: router_empty_last.EMPTY_LAST,
                router_unit_rows.NAME: router_unit_keys.UNIT_KEYS}     # unit_rows scores as unit_keys does
KEY_RULES = {SPEC: 0, router_unit_keys.NAME: 1, router_empty_last.NAME: 2, router_unit_rows.NAME: 3}


def router_score_rule(config):
    """The ``router.ScoreRule`` of the config's router, or None for a plugin's router (its scores are its own)."""
    return _SCORE_RULES.get(components_for(config).router.name)


def key_rule(config) -> int:
    """The fast kernels' number for the config's router scores (``KEY_RULES``: 0 the spec's, 1 ``unit_keys``,
    2 ``empty_last``, 3 ``unit_rows``, whose values are read from unit rows too). KeyError for a plugin router,
    which has no kernels."""
    return KEY_RULES[components_for(config).router.name]


def has_fast_path(config) -> bool:
    """True when the fast path computes this config's model (every chosen variant has kernels)."""
    return components_for(config).fast
