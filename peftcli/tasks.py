"""What differs per task: the model class, the head that trains in full, the loss and the metrics.

Losses are returned as (sum, count) so the trainer can normalize over a whole accumulated batch: the
gradient of 4 micro-batches of 8 then equals that of one batch of 32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Task:
    name: str
    auto_model: Any
    peft_task_type: str
    head_modules: tuple[str, ...]
    best_metric: str
    metric_names: tuple[str, ...]
    loss_sum: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    # How many loss terms a batch holds (examples, or target tokens), known before the forward pass.
    units: Callable[[dict[str, torch.Tensor]], int]
    predictions: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor] | None]
    metrics: Callable[[float, float, torch.Tensor | None, torch.Tensor | None, int], dict[str, float]]


def higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "perplexity")


# -- sequence classification -------------------------------------------------------------------


def classification_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, torch.tensor(labels.numel(), device=labels.device)


def classification_predictions(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.argmax(-1), batch["labels"]


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Counts per (true label, predicted label): rows are true labels, columns predictions."""
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.long)
    confusion.index_put_((labels.long(), preds.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return confusion


def classification_metrics(
    loss_sum: float, count: float, preds: torch.Tensor | None, labels: torch.Tensor | None, num_labels: int
) -> dict[str, float]:
    assert preds is not None and labels is not None
    confusion = confusion_matrix(preds, labels, num_labels)
    f1s = []
    for c in range(num_labels):
        tp = int(confusion[c, c])
        fp = int(confusion[:, c].sum()) - tp
        fn = int(confusion[c, :].sum()) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "loss": loss_sum / max(count, 1),
        "accuracy": (preds == labels).float().mean().item() if labels.numel() else 0.0,
        "f1": sum(f1s) / len(f1s),
    }


def classification_details(preds: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> dict[str, Any]:
    """Per-class precision and recall and the confusion matrix (rows: true label, columns: predicted)."""
    confusion = confusion_matrix(preds, labels, len(label_names))
    per_class = {}
    for i, name in enumerate(label_names):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i, :].sum())
        per_class[name] = {
            "precision": tp / predicted if predicted else 0.0,
            "recall": tp / actual if actual else 0.0,
            "support": actual,
        }
    return {"per_class": per_class, "confusion_matrix": confusion.tolist(), "labels": label_names}


# -- causal language modelling -----------------------------------------------------------------


def causal_lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # Position t predicts token t+1; masked labels (prompt, padding) are IGNORE_INDEX.
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def causal_lm_metrics(
    loss_sum: float, count: float, preds: torch.Tensor | None, labels: torch.Tensor | None, num_labels: int
) -> dict[str, float]:
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


TASKS: dict[str, Task] = {
    "sequence_classification": Task(
        name="sequence_classification",
        auto_model=AutoModelForSequenceClassification,
        peft_task_type="SEQ_CLS",
        head_modules=("classifier", "score"),
        best_metric="accuracy",
        metric_names=("loss", "accuracy", "f1"),
        loss_sum=classification_loss,
        units=lambda batch: batch["labels"].numel(),
        predictions=classification_predictions,
        metrics=classification_metrics,
    ),
    "causal_lm": Task(
        name="causal_lm",
        auto_model=AutoModelForCausalLM,
        peft_task_type="CAUSAL_LM",
        head_modules=(),
        best_metric="loss",
        metric_names=("loss", "perplexity"),
        loss_sum=causal_lm_loss,
        units=lambda batch: int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        predictions=lambda logits, batch: None,
        metrics=causal_lm_metrics,
    ),
}

BY_PEFT_TASK_TYPE = {t.peft_task_type: t for t in TASKS.values()}
