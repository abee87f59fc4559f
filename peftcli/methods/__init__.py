"""The method registry: every method peftcli offers, one file each, listed in one dict.

A test fails when a file in this folder is missing here, and the shared method tests run over every
entry, so a new method gets the whole contract suite for free.
"""

from __future__ import annotations

from torch import nn

from peftcli.errors import MethodError
from peftcli.methods import (
    adalora,
    bitfit,
    bottleneck,
    full,
    ia3,
    lora,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    selective,
)
from peftcli.methods.base import ApplyContext, Kind, Method, name_matches

METHODS: dict[str, Method] = {
    "lora": lora.METHOD,
    "adalora": adalora.METHOD,
    "ia3": ia3.METHOD,
    "prefix_tuning": prefix_tuning.METHOD,
    "prompt_tuning": prompt_tuning.METHOD,
    "p_tuning": p_tuning.METHOD,
    "bottleneck": bottleneck.METHOD,
    "selective": selective.METHOD,
    "bitfit": bitfit.METHOD,
    "full": full.METHOD,
}

BY_PEFT_TYPE: dict[str, Method] = {m.peft_type: m for m in METHODS.values()}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"method.name: unknown method {name!r}. Available: {', '.join(sorted(METHODS))}.") from None


__all__ = ["BY_PEFT_TYPE", "METHODS", "ApplyContext", "Kind", "Method", "context_for", "get_method"]


def context_for(model: nn.Module, head_modules: tuple[str, ...], strict: bool = True) -> ApplyContext:
    """What a method may and may not touch in `model`: `all-linear` skips the head and the output layer."""
    # Full names: a head named by a suffix (a decoder's `crossattention` in every layer) is excluded everywhere.
    excluded = [n for n, _ in model.named_modules() if head_modules and name_matches(n, list(head_modules))]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded += [n for n, m in model.named_modules() if output is not None and m is output]
    return ApplyContext(head_modules=head_modules, excluded_modules=tuple(excluded), strict=strict)
