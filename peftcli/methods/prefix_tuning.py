"""Prefix tuning: learn keys and values for `n` virtual positions in front of every attention layer.

Li and Liang 2021, https://arxiv.org/abs/2101.00190. Each layer l attends over [P_k^l; K] and [P_v^l; V]
where P^l (n x heads x head_dim) is learned and the base weights stay frozen:
    attention_l(x) = softmax(Q [P_k^l; K]^T / sqrt(d)) [P_v^l; V]
The prefixes of all layers are one table of shape (n, layers * 2 * kv_heads * head_dim). With
`prefix_projection`, the table is reparameterized as MLP(E) = W2 tanh(W1 E + b1) + b2 with E (n x d),
which the paper found trains more stably; the MLP is folded away on save, so the file holds only the table
(`prompt_embeddings`), exactly as HF peft writes it.

The model object itself uses the prefix, so the training loop's `model(**batch).logits` needs no change:
a forward pre-hook on the top-level model puts the prefix into a fresh attention cache and prepends ones
to the attention mask. The input's own positions follow the prefix (they start at n), as in HF peft.
On an encoder-decoder (T5, BART) the prefix goes to the decoder's self-attention only, laid out as HF
peft's PeftModelForSeq2SeqLM lays it out (see `PrefixEncoder.fill_decoder`); the encoder's input and
mask are untouched.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from peftcli.errors import CheckpointError, MethodError
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Kind,
    Method,
    assign_tensors,
    freeze,
    train_modules_to_save,
)

if TYPE_CHECKING:  # transformers is imported where a model runs, not when a recipe is validated
    from transformers import Cache, EncoderDecoderCache

ENCODER = "prefix_encoder"  # the submodule registered on the model; its parameters are the adapter
FILE_KEY = "prompt_embeddings"  # HF peft's key for the (folded) prefix table
# HF peft keeps a prompt-learning model unwrapped, so the trained head is saved as `base_model.<name>`,
# not `base_model.model.<name>` as for LoRA.
HEAD_PREFIX = "base_model."


class PrefixTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="n: prefix positions added to every layer's keys and values")
    prefix_projection: bool = Field(
        False,
        description="train the prefix through a two-layer MLP (reparameterization, folded away on save); "
        "use a lower learning rate with it (1e-3..5e-3 instead of 1e-2..3e-2)",
    )
    encoder_hidden_size: int | None = Field(
        None,
        gt=0,
        description="hidden size of the projection MLP (needs prefix_projection); default: the prefix width per layer",
    )
    init_weights: Literal["random", "zero"] = Field(
        "random",
        description="random: normal prefixes (HF peft's default); zero: zero prefixes (the last projection layer with "
        "prefix_projection)",
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @field_validator("encoder_hidden_size")
    @classmethod
    def _needs_projection(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("prefix_projection"):
            raise PydanticCustomError(
                "needs_projection",
                "sizes the projection MLP, which prefix_projection: false leaves out; "
                "set prefix_projection: true or remove this key",
            )
        return value


class KVShape:
    """The per-layer key/value shape the prefix must have: GQA models (Llama, SmolLM2) cache fewer
    key/value heads than they have query heads, and HF peft sizes the prefix for the cached heads."""

    def __init__(self, config: Any) -> None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        values = text.to_dict()
        self.layers = getattr(text, "num_hidden_layers", None) or values.get("n_layer")
        hidden = getattr(text, "hidden_size", None)
        heads = getattr(text, "num_attention_heads", None)
        if not (self.layers and hidden and heads):
            raise MethodError(
                f"prefix_tuning: cannot read the number of layers, hidden size and attention heads from the "
                f"{type(config).__name__} (got {self.layers}, {hidden}, {heads}). This architecture is not supported."
            )
        self.heads, self.head_dim = heads, hidden // heads
        if values.get("num_key_value_heads") is not None:
            self.head_dim = values.get("head_dim") or self.head_dim
            self.heads = values["num_key_value_heads"]
        self.token_dim = self.heads * self.head_dim  # HF peft's `token_dim`: one layer's key (or value) width

    @property
    def width(self) -> int:
        return self.layers * 2 * self.token_dim


class PrefixEncoder(nn.Module):
    """The prefix table (n x layers*2*token_dim), or, with projection, embeddings E (n x token_dim) and
    the MLP that maps them to it. Parameter names are HF peft's PrefixEncoder's."""

    def __init__(self, n: int, shape: KVShape, projection_size: int | None, zero: bool, device: torch.device) -> None:
        super().__init__()
        self.shape = shape
        self.transform: nn.Sequential | None = None
        if projection_size is None:
            self.embedding = nn.Embedding(n, shape.width, device=device)
            if zero:
                nn.init.zeros_(self.embedding.weight)
            return
        self.embedding = nn.Embedding(n, shape.token_dim, device=device)
        self.transform = nn.Sequential(
            nn.Linear(shape.token_dim, projection_size, device=device),
            nn.Tanh(),
            nn.Linear(projection_size, shape.width, device=device),
        )
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def table(self) -> torch.Tensor:
        """(n, layers*2*token_dim): the keys and values of every layer. Computed once per forward and
        shared by the whole batch; the same computation gives the folded table, so folding is exact."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def fold(self) -> None:
        """Replaces the projection by the table it computes (what HF peft loads in inference mode)."""
        if self.transform is None:
            return
        with torch.no_grad():
            table = self.table()
        self.transform = None
        self.embedding = nn.Embedding(table.shape[0], table.shape[1], device=table.device, _weight=table.clone())

    def fill(self, cache: Cache, batch_size: int, dtype: torch.dtype) -> None:
        """Writes the prefix into an empty cache: layer l's keys are rows 2l, its values rows 2l+1."""
        s = self.shape
        n = self.embedding.weight.shape[0]
        kv = self.table().to(dtype).view(n, s.layers * 2, s.heads, s.head_dim).permute(1, 2, 0, 3)
        for layer in range(s.layers):
            keys, values = (t.unsqueeze(0).expand(batch_size, -1, -1, -1) for t in (kv[2 * layer], kv[2 * layer + 1]))
            cache.update(keys, values, layer)

    def fill_decoder(self, cache: EncoderDecoderCache, batch_size: int, dtype: torch.dtype) -> None:
        """An encoder-decoder's prefix, exactly as HF peft's PeftModelForSeq2SeqLM builds it: the rows of
        the table (sized by the encoder's layers) are repeated once more along the layer axis and cut into
        groups of four per layer (self-attention key and value, cross-attention key and value); HF peft
        then empties the cross-attention cache, so only the decoder's self-attention reads a prefix.
        Decoder layer l thus gets rows 4l and 4l+1 modulo 2 x layers (with 2 layers, both get layer 0's)."""
        s = self.shape
        n = self.embedding.weight.shape[0]
        kv = self.table().to(dtype).view(n, s.layers * 2, s.heads, s.head_dim)
        kv = torch.cat([kv, kv], dim=1).permute(1, 2, 0, 3)
        for layer in range(s.layers):
            keys, values = (t.unsqueeze(0).expand(batch_size, -1, -1, -1) for t in (kv[4 * layer], kv[4 * layer + 1]))
            cache.self_attention_cache.update(keys, values, layer)


def decoder_prefix_hook(forward_params: list[str]) -> Any:
    """The pre-hook for an encoder-decoder: the prefix goes to the decoder's self-attention cache (see
    `PrefixEncoder.fill_decoder`); the encoder and its mask are untouched, as in HF peft. A forward
    without a cache (training, eval) gets a fresh one, and a given decoder_attention_mask gets n ones in
    front, as HF peft's forward does; the first step of `generate` (an empty cache) has the prefix put
    into generate's own cache, with the masks as generate made them, as HF peft's generate does."""

    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = {**dict(zip(forward_params, args)), **kwargs}
        encoder: PrefixEncoder = getattr(module, ENCODER)
        n = encoder.embedding.weight.shape[0]
        sized = [
            kwargs.get(k)
            for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels")
        ]
        sized = [t for t in sized if t is not None]
        if not sized:
            return (), kwargs
        batch_size = sized[0].shape[0]
        dtype = compute_dtype(module, encoder.embedding.weight.device)
        from transformers import DynamicCache, EncoderDecoderCache

        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            encoder.fill_decoder(cache, batch_size, dtype)
            kwargs["past_key_values"] = cache
            mask = kwargs.get("decoder_attention_mask")
            if mask is not None:
                kwargs["decoder_attention_mask"] = torch.cat([mask.new_ones(batch_size, n), mask], dim=1)
        elif not isinstance(cache, EncoderDecoderCache):
            raise MethodError(
                "prefix_tuning: past_key_values must be a transformers EncoderDecoderCache (got "
                f"{type(cache).__name__})."
            )
        elif cache.get_seq_length() == 0:
            encoder.fill_decoder(cache, batch_size, dtype)
        return (), kwargs

    return hook


def prefix_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Runs before every forward of the adapted model. Without a cache (training, eval) or with an empty
    one (the first step of `generate`) it fills a cache with the prefix; a cache that already holds
    tokens (later `generate` steps) holds the prefix already. Either way the n prefix positions are
    visible in the attention mask, and explicit position ids move past them."""
    encoder: PrefixEncoder = getattr(module, ENCODER)
    n = encoder.embedding.weight.shape[0]
    inputs = args[0] if args else kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        return args, kwargs
    from transformers import Cache, DynamicCache

    batch_size = inputs.shape[0]
    cache = kwargs.get("past_key_values")
    if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
        if cache is None:
            cache = DynamicCache(config=module.config)
        encoder.fill(cache, batch_size, compute_dtype(module, encoder.embedding.weight.device))
        kwargs["past_key_values"] = cache
    elif not isinstance(cache, Cache):
        raise MethodError(f"prefix_tuning: past_key_values must be a transformers Cache (got {type(cache).__name__}).")
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise MethodError(f"prefix_tuning: expects a 2-D attention mask (batch x tokens) (got {mask.dim()}-D).")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch_size, n), mask], dim=1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return args, kwargs


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the layers' own keys and values come in: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def apply(model: nn.Module, params: PrefixTuningParams, ctx: ApplyContext) -> Adapted:
    if hasattr(model, ENCODER):
        raise MethodError(f"prefix_tuning: {type(model).__name__} already has a prefix; apply the method once.")
    shape = KVShape(model.config)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if encoder_decoder:
        check_decoder_shape(model, shape)
    freeze(model)
    projection_size = (params.encoder_hidden_size or shape.token_dim) if params.prefix_projection else None
    device = model.get_input_embeddings().weight.device
    encoder = PrefixEncoder(params.num_virtual_tokens, shape, projection_size, params.init_weights == "zero", device)
    model.add_module(ENCODER, encoder)
    if encoder_decoder:
        hook = decoder_prefix_hook(list(inspect.signature(model.forward).parameters))
        model.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        model.register_forward_pre_hook(prefix_hook, with_kwargs=True)
    to_save = train_modules_to_save(model, params.modules_to_save, ctx)
    return Adapted(
        adapted_modules=[ENCODER],
        modules_to_save=to_save,
        config_extras={
            "token_dim": shape.token_dim,
            "num_attention_heads": shape.heads,
            "num_layers": shape.layers,
            "encoder_hidden_size": projection_size or shape.token_dim,
            "num_transformer_submodules": 2 if encoder_decoder else 1,
        },
    )


def check_decoder_shape(model: nn.Module, shape: KVShape) -> None:
    """HF peft sizes an encoder-decoder's prefix by the encoder's layers and d_model / heads; the
    decoder's self-attention must have as many layers and that head size for the prefix to fit."""
    config = model.config
    decoder_layers = (
        getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or shape.layers
    )
    head_dim = getattr(config, "d_kv", None) or shape.head_dim
    if decoder_layers != shape.layers or head_dim != shape.head_dim:
        raise MethodError(
            f"prefix_tuning: {type(model).__name__} has {shape.layers} encoder and {decoder_layers} decoder layers "
            f"and attention heads of size {head_dim} (d_model / heads = {shape.head_dim}); HF peft's encoder-decoder "
            "prefix fits only equal layer counts and head size d_model / heads. Use lora instead."
        )


def state(model: nn.Module, adapted: Adapted) -> dict[str, torch.Tensor]:
    """HF peft's file: the folded prefix table, plus every other trainable tensor (the head)."""
    encoder: PrefixEncoder = getattr(model, ENCODER)
    with torch.no_grad():
        out = {FILE_KEY: encoder.table()}
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith(ENCODER + "."):
            out[HEAD_PREFIX + name] = p
    return out


def load_state(model: nn.Module, adapted: Adapted, tensors: dict[str, torch.Tensor], path: str) -> None:
    encoder: PrefixEncoder = getattr(model, ENCODER)
    encoder.fold()  # a file holds the folded table, which the projection cannot be recovered from
    expected = {FILE_KEY: encoder.embedding.weight} | {
        HEAD_PREFIX + n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(ENCODER + ".")
    }
    assign_tensors(expected, tensors, path, f"a prefix-tuned {type(model).__name__}")


def peft_config(params: PrefixTuningParams, adapted: Adapted) -> dict[str, Any]:
    extras = adapted.config_extras
    return {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": params.num_virtual_tokens,
        "token_dim": extras["token_dim"],
        "num_transformer_submodules": extras.get("num_transformer_submodules", 1),
        "num_attention_heads": extras["num_attention_heads"],
        "num_layers": extras["num_layers"],
        "encoder_hidden_size": extras["encoder_hidden_size"],
        "prefix_projection": params.prefix_projection,
        "init_weights": "zero" if params.init_weights == "zero" else None,
        "modules_to_save": adapted.modules_to_save or None,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> PrefixTuningParams:
    if config.get("num_transformer_submodules", 1) not in (None, 1, 2):
        raise CheckpointError(
            f"adapter_config.json: num_transformer_submodules={config['num_transformer_submodules']!r}: expected 1 "
            "(an encoder or a decoder) or 2 (an encoder-decoder)."
        )
    projection = bool(config.get("prefix_projection", False))
    return PrefixTuningParams(
        num_virtual_tokens=config["num_virtual_tokens"],
        prefix_projection=projection,
        encoder_hidden_size=config.get("encoder_hidden_size") if projection else None,
        init_weights="zero" if config.get("init_weights") == "zero" else "random",
        # HF peft lists `classifier` and `score` (twice over) for any classifier; the ones present are kept.
        modules_to_save=list(dict.fromkeys(config.get("modules_to_save") or [])),
    )


METHOD = Method(
    name="prefix_tuning",
    summary="trainable key/value prefixes in every attention layer",
    kind=Kind.VIRTUAL_TOKENS,
    params=PrefixTuningParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=None,
    peft_type="PREFIX_TUNING",
    paper="https://arxiv.org/abs/2101.00190",
    state=state,
    load_state=load_state,
    # The prefix lives in the attention cache, which recomputation would fill a second time.
    supports_gradient_checkpointing=False,
)
