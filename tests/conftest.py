"""Tiny models built from configs (no downloads), a tiny word-level tokenizer, and tiny data files.

Every model here has dropout 0, so outputs are deterministic and comparisons can be exact.
"""

from __future__ import annotations

import os

# Tests never reach the hub: every model and dataset they use is built here or shipped by a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "happy", "fun"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "sad", "ugly", "weak"]
FILLER = ["the", "film", "was", "very", "a", "meal", "and", "book", "really", "quite", "story", "show"]
QA = ["what", "is", "plus", "one", "two", "three", "four", "five", "six", "question", "answer", ":"]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
VOCAB = SPECIALS + POSITIVE + NEGATIVE + FILLER + QA


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def _bert_cls(num_labels: int = 2) -> torch.nn.Module:
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return BertForSequenceClassification(cfg)


def _gpt2() -> torch.nn.Module:
    cfg = GPT2Config(
        vocab_size=len(VOCAB),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def _llama() -> torch.nn.Module:
    return LlamaForCausalLM(_llama_config())


def _llama_cls(num_labels: int = 2) -> torch.nn.Module:
    cfg = _llama_config()
    cfg.num_labels = num_labels
    return LlamaForSequenceClassification(cfg)


def _t5() -> torch.nn.Module:
    cfg = T5Config(
        vocab_size=len(VOCAB),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def _bart() -> torch.nn.Module:
    cfg = BartConfig(
        vocab_size=len(VOCAB),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=3,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(cfg)


# name -> (builder, task)
TINY = {
    "bert-cls": (_bert_cls, "sequence_classification"),
    "llama-cls": (_llama_cls, "sequence_classification"),
    "gpt2-lm": (_gpt2, "causal_lm"),
    "llama-lm": (_llama, "causal_lm"),
    "t5-s2s": (_t5, "seq2seq_lm"),
    "bart-s2s": (_bart, "seq2seq_lm"),
}
# The archs with one stack of blocks (encoder-decoders' virtual tokens are tested in tests/methods/test_seq2seq.py).
SINGLE_STACK = [name for name, (_, task) in TINY.items() if task != "seq2seq_lm"]


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TINY[name][0]()
    model.eval()
    return model


def sample_batch(name: str, tokenizer: PreTrainedTokenizerFast, n: int = 4) -> dict[str, torch.Tensor]:
    rng = random.Random(0)
    words = POSITIVE + NEGATIVE + FILLER
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    if TINY[name][1] == "seq2seq_lm":
        # The decoder reads short texts (padded at the end, which causal attention keeps from earlier
        # positions). Given directly, not as labels: HF peft's loaded AdaLoRA fails on a forward with labels.
        targets = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(n)]
        batch["decoder_input_ids"] = tokenizer(targets, padding=True, return_tensors="pt")["input_ids"]
    return batch


def sentiment_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        # The sentiment word opens and closes the text: BERT classifies from the first token and
        # Llama from the last, so a tiny random model learns the task in a few steps.
        key = rng.choice(POSITIVE if positive else NEGATIVE)
        words = [key] + [rng.choice(FILLER) for _ in range(rng.randint(1, 9))] + [key]
        rows.append({"text": " ".join(words), "label": "positive" if positive else "negative"})
    return rows


def qa_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    numbers = ["one", "two", "three", "four", "five", "six"]
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 2), rng.randint(0, 2)
        pad = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 6)))
        rows.append({"question": f"{pad} what is {numbers[a]} plus {numbers[b]}".strip(), "answer": numbers[a + b + 1]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- token classification: a WordPiece tokenizer (names split into pieces), a tiny BERT tagger, NER rows

NER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
NER_WORDS = ["john", "mary", "paris", "rome", "acme", "lives", "in", "works", "at", "the", "and", "today", "."]
NER_PIECES = ["zor", "##va", "##th", "qu", "##en", "##by"]  # zorvath -> zor ##va ##th, quenby -> qu ##en ##by
NER_VOCAB = NER_SPECIALS + NER_WORDS + NER_PIECES
# The order tag_names_for gives the tags of ner_rows: I-LOC and I-ORG are added though no row has them.
NER_TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def make_wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(NER_VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", NER_VOCAB.index("[CLS]")), ("[SEP]", NER_VOCAB.index("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def bert_tagger(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(NER_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=len(NER_TAGS),
        id2label=dict(enumerate(NER_TAGS)),
        label2id={t: i for i, t in enumerate(NER_TAGS)},
        pad_token_id=0,
    )
    return BertForTokenClassification(cfg).eval()


def ner_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Sentences such as "Zorvath Quenby lives in Paris": two-word and multi-piece names, entities side by side."""
    rng = random.Random(seed)
    people = [["john"], ["mary"], ["zorvath"], ["john", "quenby"], ["mary", "zorvath"]]
    rows = []
    for _ in range(n):
        person, place = rng.choice(people), rng.choice(["paris", "rome"])
        tokens = [*person, rng.choice(["lives", "works"]), "in", place] + (["today"] if rng.random() < 0.5 else [])
        tags = ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O", "B-LOC"] + ["O"] * (len(tokens) - len(person) - 3)
        if rng.random() < 0.4:
            tokens += ["and", "acme", "."]
            tags += ["O", "B-ORG", "O"]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one state per process, and an Accelerator() made without a precision takes the
    one a previous test left (a run with `mixed_precision: auto` leaves bf16 on CPUs with AMX): each
    test starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield


@pytest.fixture(scope="session")
def tiny_ner(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny BERT tagger saved with its WordPiece tokenizer, and NER train/validation files."""
    root = tmp_path_factory.mktemp("ner")
    bert_tagger().save_pretrained(root / "bert-tok")
    make_wordpiece_tokenizer().save_pretrained(root / "bert-tok")
    return {
        "model": root / "bert-tok",
        "train": write_jsonl(root / "data" / "train.jsonl", ner_rows(64, 5)),
        "validation": write_jsonl(root / "data" / "validation.jsonl", ner_rows(16, 6)),
    }


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved as a transformers folder with its tokenizer, as `peft train` loads it."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in TINY:
        folder = root / name
        tiny_model(name).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "sentiment_train": write_jsonl(root / "sentiment" / "train.jsonl", sentiment_rows(96, 1)),
        "sentiment_validation": write_jsonl(root / "sentiment" / "validation.jsonl", sentiment_rows(32, 2)),
        "qa_train": write_jsonl(root / "qa" / "train.jsonl", qa_rows(96, 3)),
        "qa_validation": write_jsonl(root / "qa" / "validation.jsonl", qa_rows(24, 4)),
    }


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def tiny_data_section(task: str, data: dict[str, Path]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The `data.files` and `data.columns` of a recipe over the tiny data, for the task."""
    if task == "sequence_classification":
        files = {"train": [str(data["sentiment_train"])], "validation": [str(data["sentiment_validation"])]}
        return files, {"text": "text", "label": "label"}
    # causal_lm and seq2seq_lm: the question is the prompt (the seq2seq source), the answer the target.
    files = {"train": [str(data["qa_train"])], "validation": [str(data["qa_validation"])]}
    return files, {"prompt_template": "question : {question} answer :", "response": "answer"}


def tiny_recipe(model_dir: Path, data: dict[str, Path], task: str, **sections: Any) -> dict[str, Any]:
    """A complete recipe dict for a tiny model; `sections` replace or extend top-level sections."""
    files, columns = tiny_data_section(task, data)
    recipe: dict[str, Any] = {
        "name": "tiny",
        "task": task,
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"files": files, "columns": columns, "max_length": 32},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "schedule": {"name": "constant", "warmup_steps": 0},
        # fp32 whatever the CPU: `auto` would pick bf16 on CPUs with AMX, and tests compare numbers.
        "train": {"batch_size": 8, "max_steps": 6, "log_every": 2, "eval_every": 3, "seed": 0, "mixed_precision": "no"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe
