"""Entity spans from BIO tag sequences, and entity-level precision, recall and F1 as seqeval scores them.

An entity is a maximal run B-X I-X ... I-X. seqeval's default (non-strict) mode is followed exactly,
so the numbers match the ones papers and HF's run_ner report:
  - a stray I-X (after O, or after a tag of another type) starts an entity of type X;
  - a type change ends an entity even without a B- (B-PER I-ORG is two entities);
  - E-/S- prefixes (IOBES) are read as seqeval reads them; a tag without a prefix (PER) is an
    entity of one word each time the type changes.
Sentences are scored as one stream with an O between them, so no entity crosses a sentence boundary.
Scores are micro averages over entities: a predicted entity counts as correct only when its type,
first and last word all match a gold entity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

Entity = tuple[str, int, int]  # (type, first word, last word), both ends included


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_'); 'PER' -> ('P', 'ER') as seqeval splits it."""
    if tag in ("O", "B", "I", "E", "S"):
        return tag, "_"
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def entities(tags: Sequence[str], offset: int = 0) -> list[Entity]:
    """The entity spans of one sentence's tags, positions shifted by `offset`."""
    found: list[Entity] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        kind, type_ = split_tag(tag)
        if _ends(prev_tag, kind, prev_type, type_):
            found.append((prev_type, offset + begin, offset + i - 1))
        if _starts(prev_tag, kind, prev_type, type_):
            begin = i
        prev_tag, prev_type = kind, type_
    return found


def corpus_entities(sentences: Iterable[Sequence[str]]) -> set[Entity]:
    """Every sentence's entities, numbered as one stream with an O after each sentence (seqeval's)."""
    out: set[Entity] = set()
    offset = 0
    for tags in sentences:
        out.update(entities(tags, offset))
        offset += len(tags) + 1
    return out


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Micro precision/recall/F1 over entities, and the same per entity type with its gold support."""
    true_set, pred_set = corpus_entities(gold), corpus_entities(predicted)
    correct = true_set & pred_set
    by_type: dict[str, Any] = {}
    gold_n, pred_n, correct_n = (Counter(e[0] for e in s) for s in (true_set, pred_set, correct))
    for type_ in sorted(set(gold_n) | set(pred_n)):
        by_type[type_] = _prf(correct_n[type_], pred_n[type_], gold_n[type_]) | {"support": gold_n[type_]}
    return _prf(len(correct), len(pred_set), len(true_set)) | {"support": len(true_set), "per_type": by_type}
