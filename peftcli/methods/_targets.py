"""The modules a method adapts when a recipe says `auto`: one table, by `config.model_type`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

Patterns = list[str] | str  # dotted suffixes, or a regular expression over full names (base.name_matches)


@dataclass(frozen=True)
class ModelTargets:
    """Where one model type keeps the modules that methods choosing their own targets look for."""

    # (target_modules, feedforward_modules) as HF peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    # and ..._FEEDFORWARD_MODULES_MAPPING give them: the keys and values of attention, and the MLP's
    # output projection (scaled on its input). None: HF peft has no (IA)^3 defaults for the type.
    ia3: tuple[list[str], list[str]] | None = None
    # (attention output projections, feed-forward output projections): where bottleneck adapters go.
    block_outputs: tuple[Patterns, Patterns] | None = None


_BERT_OUTPUTS = (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense")  # BertSelfOutput / BertOutput
_LLAMA_OUTPUTS = (["self_attn.o_proj"], ["mlp.down_proj"])
_BERT_IA3 = (["key", "value", "output.dense"], ["output.dense"])
_KV_IA3 = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_QV_IA3 = (["q_proj", "v_proj", "down_proj"], ["down_proj"])

DEFAULT_TARGETS: dict[str, ModelTargets] = {
    "bert": ModelTargets(_BERT_IA3, _BERT_OUTPUTS),
    "roberta": ModelTargets(_BERT_IA3, _BERT_OUTPUTS),
    "deberta-v2": ModelTargets((["key_proj", "value_proj", "output.dense"], ["output.dense"]), _BERT_OUTPUTS),
    "xlm-roberta": ModelTargets(block_outputs=_BERT_OUTPUTS),
    "camembert": ModelTargets(block_outputs=_BERT_OUTPUTS),
    "electra": ModelTargets(block_outputs=_BERT_OUTPUTS),
    "deberta": ModelTargets(block_outputs=_BERT_OUTPUTS),
    "distilbert": ModelTargets(block_outputs=(["attention.out_lin"], ["ffn.lin2"])),
    "llama": ModelTargets(_KV_IA3, _LLAMA_OUTPUTS),
    "mistral": ModelTargets(_KV_IA3, _LLAMA_OUTPUTS),
    "qwen2": ModelTargets(_QV_IA3, _LLAMA_OUTPUTS),
    "qwen3": ModelTargets(_QV_IA3, _LLAMA_OUTPUTS),
    "gemma": ModelTargets(_QV_IA3, _LLAMA_OUTPUTS),
    "gemma2": ModelTargets(_QV_IA3, _LLAMA_OUTPUTS),
    "phi3": ModelTargets(block_outputs=_LLAMA_OUTPUTS),
    "olmo": ModelTargets(block_outputs=_LLAMA_OUTPUTS),
    "olmo2": ModelTargets(block_outputs=_LLAMA_OUTPUTS),
    "gpt2": ModelTargets((["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), (["attn.c_proj"], ["mlp.c_proj"])),
    "gptj": ModelTargets(block_outputs=(["attn.out_proj"], ["mlp.fc_out"])),
    "gpt_neox": ModelTargets(
        (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]), (["attention.dense"], ["mlp.dense_4h_to_h"])
    ),
    "falcon": ModelTargets(block_outputs=(["self_attention.dense"], ["mlp.dense_4h_to_h"])),
    "bloom": ModelTargets(block_outputs=(["self_attention.dense"], ["mlp.dense_4h_to_h"])),
    "opt": ModelTargets((["q_proj", "k_proj", "fc2"], ["fc2"]), (["self_attn.out_proj"], ["fc2"])),
    "phi": ModelTargets((["q_proj", "v_proj", "fc2"], ["fc2"]), (["self_attn.dense"], ["mlp.fc2"])),
    "t5": ModelTargets((["k", "v", "wo"], ["wo"]), (["SelfAttention.o", "EncDecAttention.o"], ["DenseReluDense.wo"])),
    "bart": ModelTargets(
        (["q_proj", "v_proj", "fc2"], ["fc2"]), (["self_attn.out_proj", "encoder_attn.out_proj"], ["fc2"])
    ),
}


def model_type(model: nn.Module) -> str | None:
    """transformers' `config.model_type` of the model; None for a model without a config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def known_types(kind: str) -> list[str]:
    """The model types whose row has `kind` (a field of ModelTargets), sorted: for error messages."""
    return sorted(t for t, row in DEFAULT_TARGETS.items() if getattr(row, kind) is not None)


def lookup(model: nn.Module, kind: str) -> tuple[Patterns, Patterns] | None:
    """The model type's `kind` entry; None where the table does not know the type, or the type lacks it."""
    row = DEFAULT_TARGETS.get(str(model_type(model)))
    return getattr(row, kind) if row is not None else None
