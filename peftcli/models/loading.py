"""load_base_model: a hub id, a local folder, a GGUF file or a model shipped in a Python package ->
a frozen transformers model for the task, and its tokenizer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from peftcli.config.paths import PACKAGE_PREFIX, is_hub_id, package_folder
from peftcli.config.schema import ModelSpec
from peftcli.data import hub
from peftcli.errors import ModelError
from peftcli.models import quantization
from peftcli.tasks.registry import Task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_location(spec: ModelSpec) -> str:
    """Where transformers should load from: package:<pkg>/<folder> becomes that folder's path."""
    return location_of(spec.name, "model.name")


def base_name(spec: ModelSpec) -> str:
    """What an adapter names as its base (adapter_config.json's base_model_name_or_path, the model
    card): the Hub id when the recipe gives one (model.hub_id), which any machine can load, else where
    the weights were loaded from here."""
    return spec.hub_id or model_location(spec)


def location_of(name: str, key: str) -> str:
    if name.startswith(PACKAGE_PREFIX):
        folder = package_folder(name)
        if folder is None or not folder.exists():
            raise ModelError(f"{key}: {name!r} not found. Install the package that ships it.")
        return str(folder)
    return name


def pinned_revision(name: str, revision: str | None, key: str) -> str | None:
    """What to load `name` at: for a Hub id, the commit `revision` (or the default branch) points to,
    resolved once a process (hub.py), so the tokenizer and the weights come from one commit; else
    `revision` as given."""
    if name.startswith(PACKAGE_PREFIX) or not is_hub_id(name):
        return revision
    from huggingface_hub import constants

    return hub.resolve_commit(name, "model", revision, key, constants.HF_HUB_OFFLINE, ModelError) or revision


def model_commit(spec: ModelSpec) -> str | None:
    """The commit of model.name this process loaded, for report.json; None for a folder or a package."""
    return hub.known_commit(spec.name, "model", spec.revision)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    location = model_location(spec)
    revision = pinned_revision(spec.name, spec.revision, "model.name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=spec.gguf_file, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_failure("tokenizer", spec, exc)) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"model.name: the tokenizer of {spec.name!r} has neither a pad token nor an end-of-sequence token, "
                "and batches are padded (got pad_token null, eos_token null). "
                "Set pad_token (or eos_token) in its tokenizer_config.json."
            )
        # Decoders often ship without a pad token; padding is masked out, so EOS is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def head_kwargs(task: Task, label_names: list[str] | None, tokenizer: Any) -> dict[str, Any]:
    if label_names is None:
        return {}
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
        # Decoder classifiers pick the last non-pad token, so they must know the pad id.
        "pad_token_id": tokenizer.pad_token_id,
    }


def load_base_model(spec: ModelSpec, task: Task, **task_kwargs: Any) -> PreTrainedModel:
    """The base model with the task's head, frozen, in the recipe's dtype."""
    location = model_location(spec)
    kwargs: dict[str, Any] = {
        "revision": pinned_revision(spec.name, spec.revision, "model.name"),
        "dtype": DTYPES[spec.dtype],
    }
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    if spec.quantization is not None and not spec.gguf_file:
        kwargs |= quantization.load_kwargs(spec.quantization, task.head_modules)
    try:
        if spec.decoder is not None:
            model = build_encoder_decoder(spec, location, kwargs)
        else:
            model = task.auto_model.from_pretrained(location, **kwargs, **task_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_failure("model", spec, exc)) from None
    if spec.gguf_file:
        as_plain_float_model(model)
        if spec.quantization is not None:  # transformers loads GGUF as float: quantized here, once loaded
            quantization.quantize_loaded(model, spec.quantization, task.head_modules)
    elif spec.quantization is not None:
        quantization.keep_one_weight_layout(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.dropout is not None:
        set_dropout(model, spec.dropout)
    return model


def build_encoder_decoder(spec: ModelSpec, location: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    """An EncoderDecoderModel from two pretrained models (Rothe et al. 2020, "bert2bert"): the decoder is
    the second one with causal self-attention and new, randomly initialized cross-attention layers (and,
    where the checkpoint has none, a new LM head transform); the task's head_modules train them. The
    decoder starts from the tokenizer's [CLS] (or BOS) and ends at EOS (or [SEP]), the labels' end token."""
    from transformers import AutoModel, AutoModelForCausalLM, EncoderDecoderModel

    assert spec.decoder is not None
    tokenizer = load_tokenizer(spec)
    encoder = AutoModel.from_pretrained(location, **kwargs)
    decoder_kwargs = kwargs | {"revision": pinned_revision(spec.decoder, spec.revision, "model.decoder")}
    decoder = AutoModelForCausalLM.from_pretrained(
        location_of(spec.decoder, "model.decoder"), is_decoder=True, add_cross_attention=True, **decoder_kwargs
    )
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    # It warns on every forward with labels that its loss changed in transformers 4.12; peftcli computes its own.
    warnings.filterwarnings("ignore", message="Version v4.12.0 introduces a better way", category=FutureWarning)
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if start is None or tokenizer.pad_token_id is None:
        raise ModelError(
            f"model.decoder: the tokenizer of {spec.name!r} has no [CLS] or BOS token to start the decoder, or no "
            "pad token. Use a BERT-style tokenizer."
        )
    model.config.decoder_start_token_id = start
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = end
    model.generation_config.decoder_start_token_id = start
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end
    return model


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of the model: nn.Dropout modules, and the probabilities attention layers keep as
    plain floats for their fused kernels (BERT's dropout_prob, Llama's attention_dropout). The config
    is left alone, so a merged model keeps the original values."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, p)


def as_plain_float_model(model: PreTrainedModel) -> None:
    """transformers dequantizes GGUF weights to float tensors on load but keeps the model marked as
    quantized, which stops save_pretrained (so `peft merge` could not export it). When every weight
    is an ordinary float tensor, the mark is dropped."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and all(p.is_floating_point() for p in model.parameters()):
        model.hf_quantizer = None
        model.is_quantized = False  # as transformers' own dequantize() leaves it
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _load_failure(what: str, spec: ModelSpec, exc: Exception) -> str:
    if refused := hub.refusal_line(exc, spec.name, "model", spec.revision, "model.name"):
        return refused
    first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    where = spec.name + (f" (gguf_file {spec.gguf_file})" if spec.gguf_file else "")
    local = Path(model_location(spec)).exists() if not spec.name.startswith(PACKAGE_PREFIX) else True
    fix = (
        "Check the folder holds a transformers model."
        if local
        else "Check the hub id, or that you are online (or set HF_HUB_OFFLINE=1 with a cached copy)."
    )
    return f"model.name: cannot load the {what} from {where!r}: {first[:300]}. {fix}"
