"""A merged llama-family causal LM as one GGUF file, the way llama.cpp's convert_hf_to_gguf.py writes it
for LlamaForCausalLM: llama.* hyperparameters, tokenizer.ggml.* vocabulary, tensors named token_embd /
blk.N.attn_q ... output_norm / output, q and k rows permuted into llama.cpp's rotary layout, norms and
other 1-D tensors in float32 and the matrices in f16 or q8_0 (gguf-py's own quantizer).

The tokenizer comes from the base model's own GGUF file when the run started from one (copied field by
field: what llama.cpp wrote for it stays exactly as it was), else it is built from the transformers
tokenizer as convert_hf_to_gguf.py builds it (byte-level BPE: GPT-2, Llama 3, SmolLM2 tokenizers).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftcli.adapter_io import plain_mode
from peftcli.errors import PeftcliError

# --gguf-type -> (llama.cpp's file type, the type of every matrix); names as llama.cpp's --outtype.
GGUF_TYPES = {"f16": ("MOSTLY_F16", "F16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
# The model types whose transformers modules are llama's (the names llama.cpp's LlamaModel converts).
LLAMA_FAMILY = ("llama",)
MAGIC = b"GGUF"

# tokenizer.json's pre_tokenizer -> llama.cpp's name for the same split (tokenizer.ggml.pre). llama.cpp
# splits text by that name alone, so only these exact shapes are written: llama-vocab.cpp's regexes for
# "gpt-2", "smollm" and "llama-bpe" are these pre-tokenizers' patterns.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False},
        ],
    },
}


def check_exportable(model: torch.nn.Module, tokenizer: Any, where: str, base_gguf: Path | None) -> None:
    """Refuses, in one line, a model (or a tokenizer, when there is no base GGUF file to copy it from)
    this writer has no GGUF layout for: before the merge, so a refusal costs nothing."""
    config = model.config
    if config.model_type not in LLAMA_FAMILY or not type(model).__name__.endswith("ForCausalLM"):
        raise PeftcliError(
            f"{where}: --format gguf writes llama-family causal LMs (model_type llama: Llama 2/3, SmolLM2, TinyLlama; "
            f"got {config.model_type} {type(model).__name__}). Merge with --format safetensors and convert that folder "
            "with llama.cpp's convert_hf_to_gguf.py."
        )
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise PeftcliError(
            f"{where}: --format gguf writes default, linear and llama3 rotary scaling (got rope_type "
            f"{rope['rope_type']!r}). Merge with --format safetensors and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    if base_gguf is None:
        bpe_pre_tokenizer(tokenizer)


def write_gguf(
    model: torch.nn.Module, tokenizer: Any, path: Path, gguf_type: str, name: str, base_gguf: Path | None
) -> None:
    """Writes the file atomically: a temporary file beside `path`, renamed over it once complete.

    Args:
        model: the merged LlamaForCausalLM, float weights.
        tokenizer: its transformers tokenizer (used when `base_gguf` is None).
        path: the .gguf file to write.
        gguf_type: a key of GGUF_TYPES.
        name: general.name.
        base_gguf: the GGUF file the base model was read from, whose tokenizer fields are copied.

    Raises:
        PeftcliError: a tokenizer with no GGUF form (see PRE_TOKENIZERS).
    """
    import gguf

    file_type, matrix_type = GGUF_TYPES[gguf_type]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hyperparameters(writer, model.config, getattr(gguf.LlamaFileType, file_type))
    if base_gguf is not None:
        copy_tokenizer(writer, base_gguf, model.config.vocab_size)
    else:
        add_bpe_tokenizer(writer, tokenizer, model.config.vocab_size)
    for tensor_name, data, qtype in gguf_tensors(model, getattr(gguf.GGMLQuantizationType, matrix_type)):
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope_theta and any scaling in config.rope_parameters; 4.x in rope_theta
    and rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer: Any, config: Any, file_type: int) -> None:
    """TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters of convert_hf_to_gguf.py."""
    import gguf

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = rope_parameters(config)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))


def gguf_tensors(model: torch.nn.Module, matrix_type: Any) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, type) for every weight, as convert_hf_to_gguf.py's prepare_tensors writes them."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    yield from rope_factors(config)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings; readers reuse token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PeftcliError(
                f"{hf_name}: a weight with no llama.cpp tensor name; --format gguf cannot write this model."
            )
        data = tensor.detach().to(torch.float32).cpu()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, config.num_attention_heads, config.num_attention_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, config.num_attention_heads, config.num_key_value_heads)
        yield (gguf_name, *quantized(data.numpy(), gguf_name, matrix_type))


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """transformers rotates the two halves of each head; llama.cpp rotates interleaved pairs, so the rows
    of q and k are reordered from (head, half, pair) to (head, pair, half). transformers' GGUF reader
    undoes this (LlamaTensorProcessor._reverse_permute_weights)."""
    n_head = n_head_kv if n_head_kv != n_head else n_head
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def quantized(data: np.ndarray, gguf_name: str, matrix_type: Any) -> tuple[np.ndarray, Any]:
    """1-D tensors and norms stay float32 (llama.cpp's kernels expect it); a matrix whose rows do not
    split into q8_0's 32-value blocks falls back to f16, as in convert_hf_to_gguf.py."""
    import gguf

    qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or gguf_name.endswith("_norm.weight") else matrix_type
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def round_as_stored(model: torch.nn.Module, gguf_type: str) -> None:
    """Rounds the model's weights in place to the values the file holds (f16 or q8_0 matrices, float32
    norms). q8_0's blocks run along rows, so rounding before or after the q/k row permutation is the same."""
    import gguf

    matrix_type = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            data = p.detach().to(torch.float32).cpu().numpy()
            stored, qtype = quantized(data, name, matrix_type)  # norms are 1-D: float32 by their shape
            p.copy_(torch.from_numpy(gguf.quants.dequantize(stored, qtype).reshape(data.shape)))


def rope_factors(config: Any) -> Iterator[tuple[str, np.ndarray, Any]]:
    """Llama 3.1's rotary scaling: llama.cpp reads it as a rope_freqs tensor of per-frequency factors,
    computed as LlamaModel.generate_extra_tensors does."""
    import gguf

    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", np.array(factors, dtype=np.float32), gguf.GGMLQuantizationType.F32


def copy_tokenizer(writer: Any, base_gguf: Path, vocab_size: int) -> None:
    """Every tokenizer.* field of the base model's GGUF file, as it is there."""
    import gguf

    reader = gguf.GGUFReader(base_gguf)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise PeftcliError(
            f"{base_gguf}: its vocabulary ({0 if tokens is None else len(tokens.data)} tokens) does not match the "
            f"model's {vocab_size} embeddings, so its tokenizer cannot be copied. Merge with --format safetensors."
        )
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            # Each value with its own GGUF type (token types stay INT32, ids UINT32, strings bytes as stored).
            element = field.types[-1]
            values = [
                bytes(field.parts[i]) if element == gguf.GGUFValueType.STRING else field.parts[i].tolist()[0]
                for i in field.data
            ]
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, values, gguf.GGUFValueType.ARRAY, element)
            else:
                writer.add_key_value(key, values[0], element)


def bpe_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE tokenizer's pre-tokenizer; refuses any
    other tokenizer: llama.cpp would split its text differently from transformers."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model_type = backend.get("model", {}).get("type")
    pre = next((name for name, shape in PRE_TOKENIZERS.items() if backend.get("pre_tokenizer") == shape), None)
    if model_type != "BPE" or pre is None or backend.get("normalizer") is not None:
        shape = json.dumps(backend.get("pre_tokenizer"), separators=(",", ":"))[:120]
        raise PeftcliError(
            f"tokenizer: --format gguf writes byte-level BPE tokenizers with a pre-tokenizer llama.cpp names "
            f"({', '.join(PRE_TOKENIZERS)}) and no normalizer (got model {model_type}, pre_tokenizer {shape}). "
            "Merge with --format safetensors and convert that folder with llama.cpp's convert_hf_to_gguf.py."
        )
    return pre


def add_bpe_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """convert_hf_to_gguf.py's _set_vocab_gpt2: every id's token and type, llama.cpp's name for the
    pre-tokenizer, and the merges, special ids, add_bos/eos and chat template gguf's SpecialVocab reads
    from the saved tokenizer files."""
    import gguf

    pre = bpe_pre_tokenizer(tokenizer)
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """get_vocab_base of convert_hf_to_gguf.py: ids the tokenizer lacks become [PAD<i>] (UNUSED); added
    tokens are CONTROL when special, else USER_DEFINED."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise PeftcliError(
            f"tokenizer: has token ids up to {max(vocab.values())}, past the model's {vocab_size} embeddings."
        )
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
