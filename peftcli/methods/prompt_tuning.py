"""Prompt tuning: learn n "soft prompt" vectors P (n x d) prepended to the input embeddings.

Lester et al. 2021, https://arxiv.org/abs/2104.08691. The frozen model reads [P; E(x)] instead of E(x);
only P (and a classification head) trains. The paper finds that initializing P from real token
embeddings (sampled vocabulary rows, or the embeddings of a task description) trains better than random
vectors, and that the method catches up with full fine-tuning only on large models: on small encoders it
lags far behind LoRA and needs a high learning rate (3e-2 .. 3e-1).

Parameters and file keys follow HF peft (`prompt_encoder.embedding.weight` while training,
`prompt_embeddings` in the file); see _virtual_tokens.py for how the model prepends the prompt.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from peftcli.methods import _virtual_tokens as vt
from peftcli.methods.base import Adapted, ApplyContext, Kind, Method

HF_INIT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="n: soft-prompt vectors prepended to every input")
    init: Literal["random", "sample_vocab", "text"] = Field(
        "sample_vocab",
        description="sample_vocab: rows of the input embedding for random token ids; text: the embeddings of "
        "init_text's tokens, repeated or cut to n; random: N(0, 1) vectors (may sit far from real embeddings)",
    )
    init_text: str | None = Field(
        None,
        validate_default=True,
        description="with init: text, a task description, e.g. 'Classify the sentiment of this review'",
    )
    tokenizer_name_or_path: str | None = Field(
        None, description="with init: text, the tokenizer that splits init_text; default: the model's own"
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @field_validator("init_text", "tokenizer_name_or_path")
    @classmethod
    def _only_with_text_init(cls, value: str | None, info: ValidationInfo) -> str | None:
        init = info.data.get("init")
        if init == "text" and info.field_name == "init_text" and not value:
            raise PydanticCustomError(
                "value_error",
                "init: text needs the text whose token embeddings start the prompt, e.g. init_text: "
                "'Classify the sentiment of this review'",
            )
        if init not in ("text", None) and value is not None:
            raise PydanticCustomError(
                "value_error",
                f"{info.field_name} is used by init: text only (init is {init}). "
                f"Set init: text, or remove {info.field_name}",
            )
        return value


def initial_prompt(model: nn.Module, params: PromptTuningParams) -> tuple[vt.PromptEmbedding, str | None]:
    """The prompt module, initialized as `params.init` says, and the tokenizer name used (init: text)."""
    weight = model.get_input_embeddings().weight
    prompt = vt.PromptEmbedding(params.num_virtual_tokens, weight.shape[1], device=weight.device)
    tokenizer_name = None
    if params.init == "sample_vocab":
        ids = torch.randint(0, weight.shape[0], (params.num_virtual_tokens,), dtype=torch.long)
        rows = vt.embedding_rows(model, ids)
    elif params.init == "text":
        assert params.init_text is not None
        tokenizer, tokenizer_name = vt.load_model_tokenizer(model, params.tokenizer_name_or_path)
        rows = vt.embedding_rows(model, vt.text_token_ids(tokenizer, params.init_text, params.num_virtual_tokens))
    else:
        return prompt, None
    with torch.no_grad():
        prompt.embedding.weight.copy_(rows)
    return prompt, tokenizer_name


def apply(model: nn.Module, params: PromptTuningParams, ctx: ApplyContext) -> Adapted:
    prompt, tokenizer_name = initial_prompt(model, params)
    adapted = vt.attach(model, prompt, params.num_virtual_tokens, params, ctx)
    adapted.config_extras["tokenizer_name_or_path"] = tokenizer_name
    return adapted


def peft_config(params: PromptTuningParams, adapted: Adapted) -> dict[str, Any]:
    extras = adapted.config_extras
    return {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": params.num_virtual_tokens,
        "token_dim": extras["token_dim"],
        "num_transformer_submodules": extras.get("num_transformer_submodules", 1),
        "num_attention_heads": extras["num_attention_heads"],
        "num_layers": extras["num_layers"],
        "prompt_tuning_init": HF_INIT[params.init],
        "prompt_tuning_init_text": params.init_text,
        # HF peft requires it with TEXT, even where (loading) it does not use it.
        "tokenizer_name_or_path": extras.get("tokenizer_name_or_path"),
        "tokenizer_kwargs": None,
        "modules_to_save": adapted.modules_to_save or None,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> PromptTuningParams:
    # Two submodules: an encoder-decoder's prompt, whose encoder half the model reads (see vt.state).
    # The file's prompt_embeddings replace any initialization, so a loaded adapter starts from random
    # vectors (and needs no tokenizer).
    return PromptTuningParams(
        num_virtual_tokens=config["num_virtual_tokens"],
        init="random",
        modules_to_save=list(dict.fromkeys(config.get("modules_to_save") or [])),
    )


METHOD = Method(
    name="prompt_tuning",
    summary="trainable soft-prompt vectors prepended to the input",
    kind=Kind.VIRTUAL_TOKENS,
    params=PromptTuningParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=None,
    peft_type="PROMPT_TUNING",
    paper="https://arxiv.org/abs/2104.08691",
    state=vt.state,
    load_state=vt.load_state,
)
