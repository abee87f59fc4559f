"""Virtual-token plumbing shared by prompt tuning and P-tuning: a prompt module registered on the model,
and the hooks that make the model itself prepend its n vectors to every input.

The training loop calls `model(**batch).logits` and computes the loss from labels of the original length,
so the same model object must do what HF peft's PeftModel wrapper does around it:
  - a forward pre-hook turns input_ids into inputs_embeds = [P; E(input_ids)], P the prompt module's
    output (n x d), and extends attention_mask with n ones; position_ids are dropped (the model numbers
    the longer sequence itself, as HF peft does); token_type_ids get n zeros in front for classifiers and
    are dropped for generative models, as HF peft does per task;
  - where the logits are per position (generative models, token classifiers) a forward hook strips the
    n virtual positions from them, so they line up with the labels (HF peft returns them, and pads a
    language model's labels with -100: the same loss; its token classifier's logits keep the n);
  - in `generate`, once the cache holds the virtual tokens, a decoding step only extends the mask.
A classifier sees the virtual tokens too: BERT's pooler reads position 0, the first virtual token, and a
decoder classifier given inputs_embeds pools the last position (padding included). Both as in HF peft.

The saved file holds what HF peft writes: `prompt_embeddings` (n x d, the prompt module's output, so a
P-tuning encoder is folded away) and a trained head as `base_model.<name>` (HF peft keeps a
prompt-learning model unwrapped, hence no `.model`). A loaded adapter is that folded table.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.errors import CheckpointError, MethodError, first_line
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    assign_tensors,
    freeze,
    train_modules_to_save,
)

PROMPT_MODULE = "prompt_encoder"  # the submodule on the model; HF peft's parameter names start the same
FILE_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."
IGNORE_INDEX = -100


class PromptEmbedding(nn.Module):
    """n trainable vectors of the model's embedding width: prompt tuning's prompt, and the folded form
    every virtual-token adapter is loaded as. Initialized like nn.Embedding (N(0, 1)) unless copied."""

    def __init__(self, num_tokens: int, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, dim, device=device, dtype=torch.float32)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def model_dims(model: nn.Module) -> dict[str, int]:
    """The config values HF peft records in a prompt-learning adapter_config.json."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {
        "token_dim": model.get_input_embeddings().weight.shape[1],
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
    }


def attach(model: nn.Module, prompt: nn.Module, num_tokens: int, params: Any, ctx: ApplyContext) -> Adapted:
    """Freezes `model`, registers `prompt` as its `prompt_encoder` and the hooks that prepend it."""
    if hasattr(model, PROMPT_MODULE):
        raise MethodError(
            f"{type(model).__name__} already has a `{PROMPT_MODULE}`: a virtual-token method was applied to it "
            "before. Load a fresh base model."
        )
    freeze(model)
    model.add_module(PROMPT_MODULE, prompt)
    extras = model_dims(model)
    if getattr(model.config, "is_encoder_decoder", False):
        attach_to_encoder(model, num_tokens)
        extras["num_transformer_submodules"] = 2
    else:
        generative = bool(getattr(model, "can_generate", lambda: False)())
        hooks = VirtualTokenHooks(num_tokens, generative, list(inspect.signature(model.forward).parameters))
        model.register_forward_pre_hook(hooks.before, with_kwargs=True)
        model.register_forward_hook(hooks.after, with_kwargs=True)
    to_save = train_modules_to_save(model, params.modules_to_save, ctx)
    return Adapted(adapted_modules=[PROMPT_MODULE], modules_to_save=to_save, config_extras=extras)


def attach_to_encoder(model: nn.Module, n: int) -> None:
    """An encoder-decoder reads the prompt in its encoder only, as HF peft's PeftModelForSeq2SeqLM does:
    [P; E(x)] is the encoder's input and the n positions join the attention mask, which the decoder's
    cross-attention uses too; the decoder's input and the labels are untouched. The encoder gets the
    prompt from a hook of its own, because `generate` calls the encoder directly; the model's hook
    extends the mask it hands to the encoder (training) or, with the encoder's output given (decoding
    steps of `generate`), to the cross-attention."""
    encoder = model.get_encoder()
    encoder_params = list(inspect.signature(encoder.forward).parameters)
    model_params = list(inspect.signature(model.forward).parameters)

    def before_encoder(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = {**dict(zip(encoder_params, args)), **kwargs}
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        prompt = getattr(model, PROMPT_MODULE)().to(embeds.dtype)
        mask = kwargs.get("attention_mask")
        if (
            mask is not None and mask.dim() == 2 and mask.shape[1] == embeds.shape[1]
        ):  # not extended by the model's hook
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        kwargs["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)
        return (), kwargs

    def before_model(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = {**dict(zip(model_params, args)), **kwargs}
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        return (), kwargs

    encoder.register_forward_pre_hook(before_encoder, with_kwargs=True)
    model.register_forward_pre_hook(before_model, with_kwargs=True)


class VirtualTokenHooks:
    """The pre-hook that prepends the prompt and the hook that strips it from a generative model's logits."""

    def __init__(self, num_tokens: int, generative: bool, forward_params: list[str]) -> None:
        self.n = num_tokens
        self.generative = generative
        self.forward_params = forward_params
        self.prepended = False  # whether the current call got the prompt (cached decoding steps do not)

    def before(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = {**dict(zip(self.forward_params, args)), **kwargs}
        # The positions count the virtual tokens; the model numbers the sequence (and the cache) itself.
        kwargs.pop("position_ids", None)
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        self.prepended = not (cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0)
        if not self.prepended:
            # A decoding step of `generate`: the cache holds the virtual tokens, the mask covers real tokens.
            if mask is not None and mask.dim() == 2:
                kwargs["attention_mask"] = self._prefixed(mask, 1)
            return (), kwargs
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        prompt = getattr(model, PROMPT_MODULE)().to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = self._prefixed(mask, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = None if self.generative else self._prefixed(kwargs["token_type_ids"], 0)
        if kwargs.get("labels") is not None and self.generative:
            kwargs["labels"] = self._prefixed(kwargs["labels"], IGNORE_INDEX)
        return (), kwargs

    def after(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        logits = getattr(output, "logits", None)
        full_length = kwargs["inputs_embeds"].shape[1] if self.prepended else -1
        # Logits per position (a language model's, a token classifier's) are stripped of the virtual
        # positions so they line up with the labels; a sequence classifier's (batch x classes) are not.
        # generate asks for the last position only (logits_to_keep=1): nothing to strip then.
        if logits is not None and logits.dim() == 3 and logits.shape[1] == full_length:
            output.logits = logits[:, self.n :]
        return output

    def _prefixed(self, t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t.new_full((t.shape[0], self.n), value), t], dim=1)


# -- save and load -----------------------------------------------------------------------------


def prompt_table(model: nn.Module, all_rows: bool = False) -> torch.Tensor:
    """The prompt module's output with dropout off: what the model prepends at inference (n rows), or
    with `all_rows` every row the module makes (a seq2seq P-tuning encoder's 2n, see `state`)."""
    prompt = getattr(model, PROMPT_MODULE)
    was_training = prompt.training
    prompt.eval()
    try:
        with torch.no_grad():
            out = prompt.all_rows() if all_rows and hasattr(prompt, "all_rows") else prompt()
            return out.detach().float()
    finally:
        prompt.train(was_training)


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(PROMPT_MODULE + ".")}


def state(model: nn.Module, adapted: Adapted) -> dict[str, torch.Tensor]:
    stacks = adapted.config_extras.get("num_transformer_submodules", 1)
    table = prompt_table(model, all_rows=True)
    # HF peft's seq2seq prompt has n rows per transformer stack and feeds the encoder the first n only.
    # A P-tuning encoder makes all 2n (the LSTM reads them as one sequence); a prompt-tuning table has
    # the n the model reads, and a copy fills the decoder's n, which never reach the model.
    n = prompt_table(model).shape[0]
    if table.shape[0] != stacks * n:
        table = table.repeat(stacks, 1)
    tensors = {FILE_KEY: table}
    tensors.update({HEAD_PREFIX + n: p for n, p in head_parameters(model).items()})
    return tensors


def load_state(model: nn.Module, adapted: Adapted, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Loads `prompt_embeddings` as the prompt (a P-tuning encoder is replaced by its folded table) and
    the head, checking names and shapes."""
    if FILE_KEY not in tensors:
        raise CheckpointError(f"{path}: no `{FILE_KEY}` tensor; it is not a prompt-tuning or P-tuning adapter file.")
    table = tensors[FILE_KEY]
    expected = tuple(prompt_table(model).shape)
    stacks = adapted.config_extras.get("num_transformer_submodules", 1)
    if stacks > 1 and table.shape[0] == stacks * expected[0]:
        table = table[: expected[0]]  # the encoder's rows; see `state`
    if tuple(table.shape) != expected:
        raise CheckpointError(
            f"{path}: {FILE_KEY} has shape {tuple(table.shape)} but the model expects {expected} "
            "(num_virtual_tokens x hidden size). Was the adapter trained on another base model?"
        )
    device = model.get_input_embeddings().weight.device
    folded = PromptEmbedding(*expected, device=device)
    with torch.no_grad():
        folded.embedding.weight.copy_(table)
    setattr(model, PROMPT_MODULE, folded)
    load_head(model, {k: v for k, v in tensors.items() if k != FILE_KEY}, path)


def load_head(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    assign_tensors({HEAD_PREFIX + n: p for n, p in head_parameters(model).items()}, tensors, path)


# -- initialization from the vocabulary --------------------------------------------------------


def embedding_rows(model: nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Rows of the model's input embedding, as float32 copies."""
    embeddings = model.get_input_embeddings()
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=embeddings.weight.device)
    with torch.no_grad():
        return embeddings(ids).detach().float().clone()


def load_model_tokenizer(model: nn.Module, name: str | None) -> tuple[Any, str]:
    """The tokenizer named `name`, else the one beside the model (its folder or hub id; in a folder
    that holds only a GGUF file, the GGUF's tokenizer). Returns it and the name to record."""
    from transformers import AutoTokenizer

    source = name or getattr(model, "name_or_path", "") or ""
    if not source:
        raise MethodError(
            "method.tokenizer_name_or_path: the model does not say where it was loaded from, so its tokenizer "
            "cannot be found for init: text. Name a tokenizer folder or hub id."
        )
    kwargs: dict[str, Any] = {}
    folder = Path(source)
    ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if (
        len(ggufs) == 1
        and not (folder / "tokenizer_config.json").is_file()
        and not (folder / "tokenizer.json").is_file()
    ):
        kwargs["gguf_file"] = ggufs[0].name
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs), source
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise MethodError(
            f"method.tokenizer_name_or_path: cannot load a tokenizer from {source!r} for init: text ({first[:200]}). "
            "Name a folder or hub id holding the model's tokenizer."
        ) from None


def text_token_ids(tokenizer: Any, text: str, num_tokens: int) -> list[int]:
    """The text's token ids (special tokens included, as the tokenizer adds them), repeated or cut to
    num_tokens, as HF peft does."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise MethodError(f"method.init_text: the text has no tokens (got {text!r}). Give a short task description.")
    repeats = -(-num_tokens // len(ids))
    return (ids * repeats)[:num_tokens]
