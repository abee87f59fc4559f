"""P-tuning: virtual tokens produced by a small trainable prompt encoder, prepended to the input embeddings.

Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385. Instead of training the n
prompt vectors directly (prompt tuning), P-tuning trains free vectors E (n x d) and feeds them through
an encoder, P = MLP(E) or P = MLP(BiLSTM(E)), which couples the virtual tokens and trains more stably.
The frozen model reads [P; E(x)]. The encoder is needed for training only: the saved file holds its
output P (`prompt_embeddings`), exactly as HF peft writes it, and a loaded adapter is that table.

The encoder follows HF peft's PromptEncoder (`prompt_encoder.embedding`, `.mlp_head`, `.lstm_head`):
MLP = Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d); LSTM = bidirectional LSTM(d -> h, layers,
dropout) then Linear(2h, 2h) ReLU Linear(2h, d). See _virtual_tokens.py for how the model prepends P.
On an encoder-decoder, as in HF peft, E has 2n rows (n per stack), the encoder runs over all 2n, the
encoder stack reads the first n of P, and the file holds all 2n.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from peftcli.methods import _virtual_tokens as vt
from peftcli.methods.base import Adapted, ApplyContext, Kind, Method


class PTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="n: virtual tokens prepended to every input")
    encoder: Literal["mlp", "lstm"] = Field(
        "mlp",
        description=(
            "the prompt encoder: mlp (three linear layers, recommended) or lstm (bidirectional LSTM, then an MLP)"
        ),
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="h: the encoder's hidden size; default: the model's hidden size"
    )
    encoder_num_layers: int = Field(
        2, gt=0, description="LSTM layers (lstm only; the mlp always has three linear layers)"
    )
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="dropout between LSTM layers (lstm only)")
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @field_validator("encoder_num_layers", "encoder_dropout")
    @classmethod
    def _lstm_options_need_lstm(cls, value: float, info: ValidationInfo) -> float:
        default = cls.model_fields[str(info.field_name)].default
        if info.data.get("encoder") == "mlp" and value != default:
            raise PydanticCustomError(
                "value_error",
                f"{info.field_name} sets the LSTM encoder only; the mlp has three fixed layers and no dropout. "
                "Set encoder: lstm, or remove it",
            )
        return value


class PromptEncoder(nn.Module):
    """E (n x d) through an MLP or a bidirectional LSTM and an MLP: HF peft's PromptEncoder."""

    def __init__(self, num_tokens: int, dim: int, params: PTuningParams, device: torch.device, stacks: int = 1) -> None:
        super().__init__()
        hidden = params.encoder_hidden_size or dim
        self.num_tokens = num_tokens
        # An encoder-decoder's prompt has n rows per stack (2n), as HF peft's; the encoder reads the first n.
        self.embedding = nn.Embedding(num_tokens * stacks, dim, device=device)
        self.lstm_head: nn.LSTM | None = None
        if params.encoder == "lstm":
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=params.encoder_num_layers,
                dropout=params.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                device=device,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(), nn.Linear(2 * hidden, dim, device=device)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden, device=device),
                nn.ReLU(),
                nn.Linear(hidden, hidden, device=device),
                nn.ReLU(),
                nn.Linear(hidden, dim, device=device),
            )

    def all_rows(self) -> torch.Tensor:
        """The encoder run over all its tokens (2n on an encoder-decoder, which the LSTM reads as one
        sequence, as HF peft does): what the file holds."""
        x = self.embedding.weight.unsqueeze(0)  # one sequence of tokens; the hook repeats it per example
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def forward(self) -> torch.Tensor:
        return self.all_rows()[: self.num_tokens]


def apply(model: nn.Module, params: PTuningParams, ctx: ApplyContext) -> Adapted:
    weight = model.get_input_embeddings().weight
    stacks = 2 if getattr(model.config, "is_encoder_decoder", False) else 1
    encoder = PromptEncoder(params.num_virtual_tokens, weight.shape[1], params, weight.device, stacks)
    adapted = vt.attach(model, encoder, params.num_virtual_tokens, params, ctx)
    adapted.config_extras["encoder_hidden_size"] = params.encoder_hidden_size or weight.shape[1]
    return adapted


def peft_config(params: PTuningParams, adapted: Adapted) -> dict[str, Any]:
    extras = adapted.config_extras
    return {
        "peft_type": "P_TUNING",
        "num_virtual_tokens": params.num_virtual_tokens,
        "token_dim": extras["token_dim"],
        "num_transformer_submodules": extras.get("num_transformer_submodules", 1),
        "num_attention_heads": extras["num_attention_heads"],
        "num_layers": extras["num_layers"],
        "encoder_reparameterization_type": params.encoder.upper(),
        "encoder_hidden_size": extras["encoder_hidden_size"],
        "encoder_num_layers": params.encoder_num_layers,
        "encoder_dropout": params.encoder_dropout,
        "modules_to_save": adapted.modules_to_save or None,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> PTuningParams:
    # Two submodules: an encoder-decoder's 2n rows, whose first n the encoder reads (see vt.state).
    # The file holds the encoder's output only (load_state folds the encoder away), so a loaded
    # adapter needs just the sizes; HF peft ignores the LSTM options for its MLP.
    encoder = str(config.get("encoder_reparameterization_type", "MLP")).lower()
    lstm = encoder == "lstm"
    return PTuningParams(
        num_virtual_tokens=config["num_virtual_tokens"],
        encoder="lstm" if lstm else "mlp",
        encoder_hidden_size=config.get("encoder_hidden_size"),
        encoder_num_layers=config.get("encoder_num_layers", 2) if lstm else 2,
        encoder_dropout=config.get("encoder_dropout", 0.0) if lstm else 0.0,
        modules_to_save=list(dict.fromkeys(config.get("modules_to_save") or [])),
    )


METHOD = Method(
    name="p_tuning",
    summary="virtual tokens from a trainable prompt encoder (MLP or LSTM), folded away on save",
    kind=Kind.VIRTUAL_TOKENS,
    params=PTuningParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=None,
    peft_type="P_TUNING",
    paper="https://arxiv.org/abs/2103.10385",
    state=vt.state,
    load_state=vt.load_state,
)
