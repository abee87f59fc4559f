"""Completions from a causal LM or an encoder-decoder: the decoding settings, when to stop, the new text
of one prompt, and greedy answers to a whole eval split (seq2seq's ROUGE-L and exact match)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from peftcli.tasks.registry import IGNORE_INDEX


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # None: off
    top_k: int | None = None  # None: off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, object]:
        # Every setting is given, so a model's own generation_config (some ship a temperature or top_p)
        # never changes what the options say.
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p or 1.0,
            "top_k": self.top_k or 0,
        }


def stop_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The model's end tokens and the tokenizer's EOS: training appends and trains the tokenizer's EOS,
    which a model's generation_config need not list."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return [int(i) for i in dict.fromkeys([*ids, tokenizer.eos_token_id]) if i is not None]


@torch.inference_mode()
def complete(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, ids: list[int], decoding: Decoding) -> str:
    """The text generated after the prompt `ids` (special tokens left out)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    torch.manual_seed(decoding.seed)  # per prompt: a prompt's sample does not depend on the ones before it
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=decoding.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids(model, tokenizer),
        **decoding.generate_kwargs(),
    )
    return tokenizer.decode(output[0, new_tokens_start(model, prompt) :], skip_special_tokens=True)


def new_tokens_start(model: torch.nn.Module, prompt: torch.Tensor) -> int:
    """Where the generated tokens start in `generate`'s output: after the prompt for a decoder; an
    encoder-decoder returns the decoder's sequence only (its start token is special, so decoding drops it)."""
    return 0 if getattr(model.config, "is_encoder_decoder", False) else prompt.shape[1]


@torch.inference_mode()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batches: Iterable[dict[str, torch.Tensor]],
    max_new_tokens: int,
) -> tuple[list[str], list[str], list[str]]:
    """(sources, generated, references) for an encoder-decoder's batches of source ids and target labels:
    greedy decoding, as HF Seq2SeqTrainer's predict_with_generate does by default."""
    model.eval()
    device = next(model.parameters()).device
    sources: list[str] = []
    generated: list[str] = []
    references: list[str] = []
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids(model, tokenizer),
            **Decoding().generate_kwargs(),
        )
        sources += tokenizer.batch_decode(ids, skip_special_tokens=True)
        generated += tokenizer.batch_decode(output, skip_special_tokens=True)
        targets = [[t for t in row if t != IGNORE_INDEX] for row in batch["labels"].tolist()]
        references += tokenizer.batch_decode(targets, skip_special_tokens=True)
    return sources, generated, references
