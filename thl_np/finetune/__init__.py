"""Task heads on the THL body: the three task models (``models``), their config fields (``config``), JSONL data
and batching (``data``), and finite-difference gradient checks (``gradcheck``). The head equations are in
``thl_np.components.heads``; fine-tuning is ``thl_np.finetune.trainer``; the commands ``thl-np finetune`` and
``thl-np predict`` are in ``thl_np.cli.finetune``. docs/TASKS.md describes all of it."""
from ..task_fields import CHOICE, SEQUENCE, TASKS, TOKEN
from .models import (
    TaskModel,
    THLForMultipleChoice,
    THLForSequenceClassification,
    THLForTokenClassification,
)

MODEL_CLASSES = {SEQUENCE: THLForSequenceClassification, TOKEN: THLForTokenClassification,
                 CHOICE: THLForMultipleChoice}

__all__ = ["THLForSequenceClassification", "THLForTokenClassification", "THLForMultipleChoice", "TaskModel",
           "MODEL_CLASSES", "TASKS", "SEQUENCE", "TOKEN", "CHOICE"]
