"""The repos tests/cli/test_hub.py serves from its stand-in Hub (tests/hub_server.py), shaped as the real
ones: stanfordnlp/sst2 (parquet under data/, train / validation / test; columns idx, sentence, label as a
ClassLabel), openai/gsm8k (configs main and socratic, parquet under main/ and socratic/), and a tiny
BERT classifier as save_pretrained writes it, with the tests' word-level tokenizer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets

from tests.conftest import _bert_cls, make_tokenizer, qa_rows, sentiment_rows

SST2_FEATURES = datasets.Features(
    {
        "idx": datasets.Value("int32"),
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
    }
)
# The front matter of stanfordnlp/sst2's dataset card, less its split sizes (datasets would check them).
SST2_CARD = """---
language:
- en
task_categories:
- text-classification
pretty_name: Stanford Sentiment Treebank v2
dataset_info:
  features:
  - name: idx
    dtype: int32
  - name: sentence
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': negative
          '1': positive
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
  - split: test
    path: data/test-*
---
# Dataset Card for sst2
"""
GSM8K_CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---
"""


def parquet(rows: list[dict[str, Any]], features: datasets.Features | None = None) -> bytes:
    buffer = io.BytesIO()
    datasets.Dataset.from_list(rows, features=features).to_parquet(buffer)
    return buffer.getvalue()


def sst2_files(train: int, validation: int, seed: int) -> dict[str, bytes]:
    """SST-2's layout; the test split's labels are -1, as on the Hub."""

    def rows(n: int, seed: int, labelled: bool = True) -> list[dict[str, Any]]:
        return [
            {"idx": i, "sentence": r["text"], "label": int(r["label"] == "positive") if labelled else -1}
            for i, r in enumerate(sentiment_rows(n, seed))
        ]

    return {
        "README.md": SST2_CARD.encode(),
        "data/train-00000-of-00001.parquet": parquet(rows(train, seed), SST2_FEATURES),
        "data/validation-00000-of-00001.parquet": parquet(rows(validation, seed + 1), SST2_FEATURES),
        "data/test-00000-of-00001.parquet": parquet(rows(8, seed + 2, labelled=False), SST2_FEATURES),
    }


def gsm8k_files() -> dict[str, bytes]:
    main, socratic = qa_rows(24, 3), qa_rows(40, 4)
    return {
        "README.md": GSM8K_CARD.encode(),
        "main/train-00000-of-00001.parquet": parquet(main[:16]),
        "main/test-00000-of-00001.parquet": parquet(main[16:]),
        "socratic/train-00000-of-00001.parquet": parquet(socratic[:32]),
        "socratic/test-00000-of-00001.parquet": parquet(socratic[32:]),
    }


def bert_files(folder: Path, seed: int) -> dict[str, bytes]:
    """A tiny BERT classifier as save_pretrained writes it, with a tokenizer written here."""
    import torch

    torch.manual_seed(seed)
    _bert_cls().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return files_in(folder)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
