"""A quantized frozen base (`model.quantization`): its linear layers in 4 bits (NF4/FP4, QLoRA) or 8
bits (LLM.int8) through bitsandbytes, on CUDA or the CPU, and back to float for `peft merge`.

A model with safetensors weights is quantized while it loads (transformers' BitsAndBytesConfig: the
float weights are never all in memory); a GGUF model, which transformers loads dequantized to float, is
quantized once loaded, layer by layer. Either way the output layer and the task's head stay in float
(they train, or make the logits), as do norms and embeddings: bitsandbytes quantizes linear layers only.
bitsandbytes is an optional extra (`pip install 'peftcli[quant]'`); recipe validation checks for it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from peftcli.config.hardware import bf16_runs_here
from peftcli.methods._layers import dense_weight

INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (transformers' default): larger activations stay 16-bit


def skipped(head_modules: tuple[str, ...]) -> list[str]:
    return ["lm_head", *head_modules]


def compute_dtype(q: Any) -> torch.dtype:
    """The dtype 4-bit weights are dequantized to for each product: bf16 where it runs, else fp32."""
    name = q.compute_dtype or ("bfloat16" if bf16_runs_here() else "float32")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def load_kwargs(q: Any, head_modules: tuple[str, ...]) -> dict[str, Any]:
    """from_pretrained's arguments to quantize while loading, onto the device the run trains on
    (quantized tensors are placed at load, not moved after)."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        config = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skipped(head_modules)
        )
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type or "nf4",
            bnb_4bit_use_double_quant=True if q.double_quant is None else q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(q),
            llm_int8_skip_modules=skipped(head_modules),
        )
    return {"quantization_config": config, "device_map": {"": device()}}


def device() -> str:
    """This process's device: its GPU under a launcher (LOCAL_RANK), else the first GPU, else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def quantize_loaded(model: nn.Module, q: Any, head_modules: tuple[str, ...]) -> None:
    """A float model's linear layers replaced by bitsandbytes ones holding the same weights quantized
    (GGUF models, which load as float). GPT-2's Conv1D stores its weight transposed."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    skip = skipped(head_modules)
    target = device()
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, (nn.Linear, Conv1D)) or any(name == s or name.endswith("." + s) for s in skip):
            continue
        weight = layer.weight.data.T if isinstance(layer, Conv1D) else layer.weight.data
        out_features, in_features = weight.shape
        bias = layer.bias is not None
        if q.bits == 8:
            new = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=bias, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
            )
            new.weight = bnb.nn.Int8Params(weight.contiguous().clone(), requires_grad=False, has_fp16_weights=False)
        else:
            quant_type, double = q.quant_type or "nf4", True if q.double_quant is None else q.double_quant
            new = bnb.nn.Linear4bit(
                in_features, out_features, bias=bias, compute_dtype=compute_dtype(q), quant_type=quant_type,
                compress_statistics=double, device="meta",
            )  # fmt: skip
            new.weight = bnb.nn.Params4bit(
                weight.contiguous().clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double
            )
        if bias:
            new.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to(target))
    model.to(target)  # embeddings, norms and the head too: what loading with a device_map does
    keep_one_weight_layout(model)


def keep_one_weight_layout(model: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit layer's weight for its CPU inference kernel at the first forward in
    eval mode (on CPUs with AVX512-BF16), and from then on the layer takes that kernel in training too,
    where a layer with a bias fails ("a view of a leaf Variable ... in-place"). Training evaluates
    between steps, so the layers keep the one layout that trains."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantize(model: nn.Module) -> None:
    """Every bitsandbytes layer, wherever it is (inside an adapter's wrapper too), replaced by an
    nn.Linear holding exactly the values the quantized layer computes with, in float32; and the model
    no longer marked quantized, so that save_pretrained writes a plain model."""
    for name, layer in list(model.named_modules()):
        weight = dense_weight(layer)
        if weight is None:
            continue
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.data.float().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None  # transformers refuses to cast a model it takes for a bitsandbytes one
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def weight_memory(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes the model's weights take as loaded, and what they would take with every quantized weight
    in `dtype` (the recipe's model.dtype) instead: what the bits saved. A 4-bit weight holds two values
    a byte; its per-block scales count towards the quantized size."""
    loaded = unquantized = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        loaded += p.numel() * p.element_size()
        if state is not None:  # 4 bits: packed bytes, plus the block scales (nested ones with double quant)
            loaded += sum(t.numel() * t.element_size() for t in quant_state_tensors(state))
            unquantized += int(torch.Size(state.shape).numel()) * dtype.itemsize
        elif p.dtype == torch.int8:  # LLM.int8: one byte a value, plus a float scale a row
            scb = getattr(p, "SCB", None)
            loaded += scb.numel() * scb.element_size() if scb is not None else 0
            unquantized += p.numel() * dtype.itemsize
        else:
            unquantized += p.numel() * p.element_size()
    return {"weights": loaded, "weights_unquantized": unquantized}


def quant_state_tensors(state: Any) -> list[torch.Tensor]:
    tensors = [state.absmax]
    if getattr(state, "nested", False) and state.state2 is not None:
        tensors += [state.state2.absmax, state.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]
