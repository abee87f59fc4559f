"""Completions from a causal LM: the decoding settings, when to stop, and the new text of one prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


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
    return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)
