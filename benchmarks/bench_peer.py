"""The PyTorch THL run beside thl-np, in the same run as ``thl-np bench``: its figures beside thl-np's.

    python benchmarks/bench_peer.py --peer PATH [thl-np bench's options]   # e.g. --json, --no-train

This harness is not part of the installed package: it sets itself as ``thl_np.cli.bench.PEER_HARNESS`` and
runs ``thl-np bench`` with the same arguments.

PATH is a folder holding the PyTorch THL's ``thl`` package (``../shared/peer/`` in this project's
workspace); torch must be installed (``pip install "thl-np[torch]"``). The peer is read through its public
API only: ``thl.THLConfig``, ``thl.THLModel`` (``forward_step``, ``forward``, ``load_state_dict``) and
``thl.inference.state.InferenceState.init``.

What is measured, each beside thl-np's own figure (``thl_np.eval.bench.run`` pairs them):

- **decode, batch 1 and 8**: one ``forward_step`` per token under ``torch.inference_mode`` from the state
  ``InferenceState.init`` gives, logits every step (as thl-np's decoder), fed the same token ids; its steps
  are timed in the same rounds as thl-np's decoders, so both see the same memory bandwidth.
- **prompt**: ``model(ids)`` on one sequence of the prompt length, logits at every position, under
  ``torch.inference_mode`` (the best of a few runs, as thl-np's figure).
- **training**: forward, mean cross-entropy and backward by torch autograd, in training mode (the peer
  draws its own Gumbel noise, thl-np is given uniforms), on the bench's training config, batch 8 × 128
  tokens; no optimiser step on either side (thl-np's figure is ``value_and_grad``'s).

Both run the same config in float32 and, when the peer accepts them, the same weights: thl-np's spec §2
tensors loaded into the peer's ``state_dict`` (the names and ``[out, in]`` shapes are the same). If it
refuses them, the peer keeps its own random initialisation of the same config, and ``weights`` says so.
The two compute different numbers even on the same weights (the spec's §6 lists the PyTorch THL's
defects), but the same work per token. torch uses its own thread pool (``threads``); thl-np uses Numba's.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time

import numpy as np

from thl_np.config import THLConfig
from thl_np.errors import ConfigError, InputError

#: Seconds to wait after the peer's steps before anything else is timed: torch's worker threads spin for a
#: moment after each parallel region and would take cores from what follows.
SETTLE_S = 0.2


@dataclasses.dataclass
class Peer:
    """The imported peer: its ``thl`` package, torch, and where they came from."""

    thl: object
    torch: object
    state_type: object   # thl.inference.state.InferenceState
    path: str

    def model(self, config: THLConfig, params) -> PeerModel:
        """The PyTorch THL of ``config``, with thl-np's ``params`` where it takes them (``PeerModel``)."""
        return PeerModel(self, config, params)

    def train_tokens_per_s(self, config: THLConfig):
        return train_tokens_per_s(self, config)

    @property
    def description(self) -> str:
        return (f"the PyTorch THL from {self.path} (torch {self.torch.__version__}, "
                f"{self.torch.get_num_threads()} threads)")


def load_peer(path) -> Peer:
    """Import the ``thl`` package under ``path`` and torch, or raise InputError / ConfigError saying what is
    missing, before any measurement starts."""
    path = os.path.abspath(os.fspath(path))
    init = os.path.join(path, "thl", "__init__.py")
    if not os.path.isfile(init):
        raise InputError(f"--peer {path} holds no thl/ package (expected {init}): pass the folder that holds the "
                         "PyTorch THL's thl/ package, such as ../shared/peer")
    try:
        torch = importlib.import_module("torch")
    except ImportError as exc:
        raise ConfigError(f"--peer needs torch, which cannot be imported ({exc}): pip install 'thl-np[torch]' "
                          "(the CPU wheel is enough)") from None
    loaded = sys.modules.get("thl")
    if loaded is not None:
        where = os.path.dirname(os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or "")))
        if where != path:
            raise InputError(f"a different thl package is already imported (from {where}): run the bench in a "
                             f"fresh process to use the one in {path}")
        return _peer_of(torch, path)
    sys.path.insert(0, path)
    try:
        return _peer_of(torch, path)
    except BaseException:  # a package that is not the peer leaves nothing behind under the name thl
        for name in [m for m in sys.modules if m == "thl" or m.startswith("thl.")]:
            del sys.modules[name]
        raise
    finally:
        sys.path.remove(path)


def _peer_of(torch, path: str) -> Peer:
    try:
        thl = importlib.import_module("thl")
        state = importlib.import_module("thl.inference.state")
    except Exception as exc:
        raise InputError(f"--peer {path}: its thl package does not import ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for owner, attr in ((thl, "THLConfig"), (thl, "THLModel"), (state, "InferenceState")):
        if not hasattr(owner, attr):
            raise InputError(f"--peer {path}: its thl package has no {attr}: is it the PyTorch THL?")
    return Peer(thl, torch, state.InferenceState, path)


def check_config(config: THLConfig) -> None:
    """The peer implements the spec's components only, and language models only: refuse anything else."""
    if config.components:
        raise ConfigError(f"--peer: the config chooses component variants {config.components}, which the PyTorch "
                          "THL does not have: compare a model with the spec's components")
    if config.task is not None:
        raise ConfigError(f"--peer: a {config.task} model has no PyTorch THL counterpart to bench")


class PeerModel:
    """The PyTorch THL built for a thl-np model: same config, float32, and the same weights if it takes
    them. Exposes what ``thl_np.eval.bench`` measures: ``decoder(batch_size)``, ``prompt_tokens_per_s``."""

    settle_s = SETTLE_S

    def __init__(self, peer: Peer, config: THLConfig, params=None):
        check_config(config)
        self.peer, self.config = peer, config
        thl = peer.thl
        fields = {f.name for f in dataclasses.fields(thl.THLConfig)}
        kw = {k: v for k, v in config.to_dict().items() if k in fields}
        kw.update(dtype="float32", device="cpu")
        self.peer_config = thl.THLConfig(**kw)
        self.model = thl.THLModel(self.peer_config)
        self.weights = "its own random init (same config)"
        if params is not None:
            refused = self._load(params)
            self.weights = ("the same weights as thl-np" if refused is None else
                            f"its own random init (same config): it refused thl-np's weights ({refused})")
        self.model.eval()

    def _load(self, params) -> str | None:
        """Copy thl-np's weights into the peer's state_dict tensors one at a time (no second copy of the whole
        model); returns why not, or None when every tensor was taken."""
        torch = self.peer.torch
        target = self.model.state_dict()
        if set(target) != set(params):
            odd = sorted(set(target) ^ set(params))
            return f"its tensors differ in name: {', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}"
        bad = [n for n in target if tuple(target[n].shape) != tuple(np.shape(params[n]))]
        if bad:
            return f"tensor {bad[0]} is {list(target[bad[0]].shape)} there, {list(np.shape(params[bad[0]]))} here"
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(torch.from_numpy(np.array(params[name], dtype=np.float32)))
        return None

    # ----------------------------------------------------------------- decode
    def decoder(self, batch_size: int) -> _PeerDecoder:
        return _PeerDecoder(self, batch_size)

    def _initial_state(self, batch_size: int):
        return self.peer.state_type.init(batch_size, self.peer_config, self.model.tiers, self.model.memory_bank)

    # ----------------------------------------------------------------- prompt
    def prompt_tokens_per_s(self, length: int, repeats: int = 3) -> float:
        """Tokens/s of ``model(ids)`` on one sequence of ``length`` tokens, logits at every position."""
        torch = self.peer.torch
        ids = torch.from_numpy((np.arange(length) % self.config.vocab_size)[None, :].astype(np.int64))
        with torch.inference_mode():
            self.model(ids[:, :4])
            best = min(_timed(lambda: self.model(ids)) for _ in range(repeats))
        time.sleep(self.settle_s)
        return length / best


class _PeerDecoder:
    """The peer's recurrent state for ``batch_size`` sequences; ``step(ids)`` runs one token of each."""

    def __init__(self, owner: PeerModel, batch_size: int):
        self.owner = owner
        with owner.peer.torch.inference_mode():
            self.state = owner._initial_state(batch_size)

    def step(self, ids):
        torch = self.owner.peer.torch
        with torch.inference_mode():
            logits, self.state = self.owner.model.forward_step(torch.from_numpy(np.asarray(ids, np.int64)),
                                                               self.state)
        return logits


def train_tokens_per_s(peer: Peer, config: THLConfig, seq_len: int = 128, batch_size: int = 8, repeats: int = 3,
                       seed: int = 0) -> tuple[float, str]:
    """Tokens/s of the peer's forward + cross-entropy + backward (torch autograd, training mode) on the
    config and weights ``thl_np.eval.bench.bench_train`` uses; returns (tokens/s, which weights)."""
    from .model import THLModel

    torch = peer.torch
    pm = PeerModel(peer, config, THLModel(config, seed=seed).params)
    pm.model.train()
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, min(256, config.vocab_size), size=(batch_size, seq_len + 1)))
    V = config.vocab_size

    def step(x, y):
        pm.model.zero_grad(set_to_none=True)
        logits, _ = pm.model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()

    step(ids[:, :2], ids[:, 1:3])
    best = min(_timed(lambda: step(ids[:, :-1], ids[:, 1:])) for _ in range(repeats))
    time.sleep(SETTLE_S)
    return batch_size * seq_len / best, pm.weights


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    import thl_np.cli
    import thl_np.cli.bench

    thl_np.cli.bench.PEER_HARNESS = sys.modules[__name__]
    sys.exit(thl_np.cli.main(["bench", *sys.argv[1:]]))
