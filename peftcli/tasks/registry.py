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

from peftcli.tasks.entities import entity_scores

IGNORE_INDEX = -100
SENTENCE_END = -1  # token classification: closes each sentence in the flat predictions (see token_predictions)


@dataclass(frozen=True)
class Task:
    name: str
    # The transformers Auto class that loads the base with this task's head, by name: resolved when a
    # model is loaded, so that `peft validate` and `--help` do not import transformers' model classes.
    auto_model_name: str
    peft_task_type: str
    head_modules: tuple[str, ...]
    best_metric: str
    metric_names: tuple[str, ...]
    loss_sum: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    # How many loss terms a batch holds (examples, or target tokens), known before the forward pass.
    units: Callable[[dict[str, torch.Tensor]], int]
    predictions: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor] | None]
    # (loss sum, loss terms, predicted ids, true ids, label names id -> name) -> metrics
    metrics: Callable[[float, float, torch.Tensor | None, torch.Tensor | None, list[str]], dict[str, float]]
    # The model's output head may run at the positions that have a target only (`head_at_targets`).
    head_at_targets_only: bool = False
    # The loss reads one position of the last layer (a pooled token): that layer may run there only
    # (first_position.first_position_only finds out whether the model allows it).
    reads_one_position: bool = False
    # The data.columns key whose values name the classes (the head has one output per class, saved in
    # labels.json); None for tasks without a label set.
    label_column: str | None = None
    # Per-class (or per-entity-type) breakdown for `peft eval`: (preds, labels, label names) -> JSON.
    details: Callable[[torch.Tensor, torch.Tensor, list[str]], dict[str, Any]] | None = None
    # The model writes text (`peft generate`, `peft eval --generate`).
    generates: bool = False
    # Encoder-decoder: the labels go into the forward pass, where the model derives the decoder's
    # input from them (shifted right after the decoder start token), as HF Seq2SeqTrainer does.
    encoder_decoder: bool = False
    # Metrics of greedy generation over the eval split (peft eval), beside the loss metrics.
    generation_metrics: tuple[str, ...] = ()

    @property
    def auto_model(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_model_name)


def higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "perplexity")


# -- sequence classification -------------------------------------------------------------------


def classification_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, labels.new_full((), labels.numel())  # made on the device: no copy from the host


def classification_predictions(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.argmax(-1), batch["labels"]


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Counts per (true label, predicted label): rows are true labels, columns predictions."""
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.long)
    confusion.index_put_((labels.long(), preds.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return confusion


def classification_metrics(
    loss_sum: float, count: float, preds: torch.Tensor | None, labels: torch.Tensor | None, label_names: list[str]
) -> dict[str, float]:
    assert preds is not None and labels is not None
    num_labels = len(label_names)
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


def next_token_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position t predicts token t+1; the last position, and masked labels (prompt, padding), have
    no target (IGNORE_INDEX)."""
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


# The next-token targets one per row of the logits, where a speedup ran the head at the target
# positions only (training.speedups.head_at_targets): given with the batch, the loss reads the same.
NEXT_TOKEN_TARGETS = "next_token_targets"


def causal_lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    targets = batch[NEXT_TOKEN_TARGETS] if NEXT_TOKEN_TARGETS in batch else next_token_targets(batch)
    # The targets are shifted, not the logits: slicing the logits would copy the B x L x vocab tensor.
    logits = logits.reshape(-1, logits.size(-1))
    loss = F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def causal_lm_metrics(
    loss_sum: float, count: float, preds: torch.Tensor | None, labels: torch.Tensor | None, label_names: list[str]
) -> dict[str, float]:
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# -- token classification ----------------------------------------------------------------------


def aligned_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy where logits and labels line up position by position, without a shift: a tagger's
    labelled positions (each word's first sub-token, data.tokenize_tokens), or a decoder's, whose
    position t reads the labels up to t-1 and predicts label t. IGNORE_INDEX has no target."""
    labels = batch["labels"]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()


def labelled_positions(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def token_predictions(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true tag ids of the labelled positions (one per word), as one flat row per batch
    with SENTENCE_END after each sentence: rows of any length then join across batches and processes
    like classification's, and the entity metrics still see where each sentence ends."""
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    keep_ends = torch.cat([keep, keep.new_ones((keep.shape[0], 1))], dim=1)  # an extra column per row: its SENTENCE_END
    end_col = labels.new_full((labels.shape[0], 1), SENTENCE_END)
    preds = torch.cat([logits.argmax(-1), end_col], dim=1)[keep_ends]
    return preds, torch.cat([labels, end_col], dim=1)[keep_ends]


def sentences(ids: torch.Tensor, label_names: list[str]) -> list[list[str]]:
    """A flat row of tag ids with SENTENCE_END after each sentence -> the sentences' tag names."""
    out: list[list[str]] = [[]]
    for i in ids.tolist():
        if i == SENTENCE_END:
            out.append([])
        else:
            out[-1].append(label_names[i])
    return out[:-1]


def token_metrics(
    loss_sum: float, count: float, preds: torch.Tensor | None, labels: torch.Tensor | None, label_names: list[str]
) -> dict[str, float]:
    assert preds is not None and labels is not None
    words = labels != SENTENCE_END
    scores = entity_scores(sentences(labels, label_names), sentences(preds, label_names))
    return {
        "loss": loss_sum / max(count, 1),
        "accuracy": (preds[words] == labels[words]).float().mean().item() if words.any() else 0.0,
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
    }


def token_details(preds: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> dict[str, Any]:
    """Per entity type precision, recall, F1 and gold support, and the number of entities."""
    scores = entity_scores(sentences(labels, label_names), sentences(preds, label_names))
    return {"per_class": scores["per_type"], "entities": scores["support"], "labels": label_names}


TASKS: dict[str, Task] = {
    "sequence_classification": Task(
        name="sequence_classification",
        auto_model_name="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS",
        head_modules=("classifier", "score"),
        best_metric="accuracy",
        metric_names=("loss", "accuracy", "f1"),
        loss_sum=classification_loss,
        units=lambda batch: batch["labels"].numel(),
        predictions=classification_predictions,
        metrics=classification_metrics,
        label_column="label",
        details=classification_details,
        reads_one_position=True,
    ),
    "causal_lm": Task(
        name="causal_lm",
        auto_model_name="AutoModelForCausalLM",
        peft_task_type="CAUSAL_LM",
        head_modules=(),
        best_metric="loss",
        metric_names=("loss", "perplexity"),
        loss_sum=causal_lm_loss,
        units=lambda batch: int((next_token_targets(batch) != IGNORE_INDEX).sum()),
        predictions=lambda logits, batch: None,
        metrics=causal_lm_metrics,
        head_at_targets_only=True,
        generates=True,
    ),
    "seq2seq_lm": Task(
        name="seq2seq_lm",
        auto_model_name="AutoModelForSeq2SeqLM",
        peft_task_type="SEQ_2_SEQ_LM",
        # New in an encoder-decoder built from two pretrained encoders (model.decoder): a BERT-family
        # decoder's cross-attention and its LM head's transform, trained in full like a classifier
        # head. T5 and BART name theirs otherwise (EncDecAttention, encoder_attn): they come pretrained.
        head_modules=("crossattention", "cls.predictions.transform"),
        best_metric="loss",
        metric_names=("loss", "perplexity"),
        loss_sum=aligned_loss,
        units=labelled_positions,
        predictions=lambda logits, batch: None,
        metrics=causal_lm_metrics,
        generates=True,
        encoder_decoder=True,
        generation_metrics=("rouge_l", "exact_match"),
    ),
    "token_classification": Task(
        name="token_classification",
        auto_model_name="AutoModelForTokenClassification",
        peft_task_type="TOKEN_CLS",
        head_modules=("classifier", "score"),
        best_metric="f1",
        metric_names=("loss", "accuracy", "precision", "recall", "f1"),
        loss_sum=aligned_loss,
        units=labelled_positions,
        predictions=token_predictions,
        metrics=token_metrics,
        label_column="tags",
        details=token_details,
    ),
}

BY_PEFT_TASK_TYPE = {t.peft_task_type: t for t in TASKS.values()}
