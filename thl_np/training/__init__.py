"""Training: AdamW, the learning-rate schedule, byte-level data lanes, the truncated-BPTT loop and its
atomic checkpoints, and its data-parallel form over MPI (``distributed``). ``thl-np train`` / ``thl-np eval``
(thl_np/cli/train.py) are thin wrappers over ``train`` and ``evaluate``."""
from ..io.folder import latest_checkpoint, resolve_model_dir
from .data import Batch, LaneBatches, load_bytes, split_bytes
from .optim import AdamW, clip_grad_norm, global_grad_norm
from .schedule import CosineSchedule, lr_at
from .trainer import TrainConfig, TrainResult, evaluate, saved_train_config, train

__all__ = [
    "AdamW", "clip_grad_norm", "global_grad_norm", "CosineSchedule", "lr_at", "Batch", "LaneBatches",
    "load_bytes", "split_bytes", "TrainConfig", "TrainResult", "train", "evaluate", "saved_train_config",
    "latest_checkpoint", "resolve_model_dir",
]
