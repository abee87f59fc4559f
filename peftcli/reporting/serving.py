"""Would vLLM's LoRA loader take this adapter? vLLM's own load-time checks, applied to an adapter's
adapter_config.json and the tensor names in its adapter_model.safetensors, as a verdict with reasons.

vLLM is not imported (it needs a CUDA build of torch): the rules are copied from its source, vLLM 0.11
to 0.14, and each is cited where it is applied. docs/serving.md lists them with their sources.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from peftcli.adapter_io import PREFIX

VLLM_VERSIONS = "0.11-0.14"

# vllm/config/lora.py (v0.14.0): `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]` and
# `max_lora_rank: MaxLoRARanks = 16`. An adapter loads when its rank is at most the server's
# --max-lora-rank (vllm/lora/peft_helper.py, PEFTHelper.validate_legal: "LoRA rank {r} is greater
# than max_lora_rank {max}").
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The tensor names vLLM reads (vllm/lora/utils.py, parse_fine_tuned_lora_name): `<module>.lora_A.weight`,
# `<module>.lora_B.weight`, and an embedding's `<module>.lora_embedding_A` / `_B`. Anything else raises
# "<name> is unsupported LoRA weight" (the `.bias` form went with LoRA bias support, vLLM PR #25807).
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")

# What a model class takes LoRA on: the suffixes of its linear layers, the packed ones (qkv_proj,
# gate_up_proj) opened into their parts through its `packed_modules_mapping`, plus its
# `embedding_modules` (vllm/model_executor/models/llama.py; the loader compares the last part of each
# module name with this set: vllm/lora/models.py, from_local_checkpoint, "expected target modules in
# ... but received ..."). Llama's table is read from its source; Qwen2/3 and Gemma/Gemma 2 (LoRA: yes in
# vLLM's supported-models table) have the same projections, their embeddings left out as unverified.
# Other classes get "cannot tell".
_DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_MODULES: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": (*_DECODER_LINEAR, "embed_tokens", "lm_head"),
    "MistralForCausalLM": (*_DECODER_LINEAR, "embed_tokens", "lm_head"),  # a LlamaForCausalLM in vLLM
    "Qwen2ForCausalLM": _DECODER_LINEAR,
    "Qwen3ForCausalLM": _DECODER_LINEAR,
    "GemmaForCausalLM": _DECODER_LINEAR,
    "Gemma2ForCausalLM": _DECODER_LINEAR,
}
# No SupportsLoRA: an empty LoRA column in docs/models/supported_models.md.
NO_LORA = (
    "GPT2LMHeadModel",
    "GPTJForCausalLM",
    "GPTNeoXForCausalLM",
    "BloomForCausalLM",
    "FalconForCausalLM",
    "MPTForCausalLM",
)

# init_lora_weights names that only set the starting weights (as True and False do), so the saved
# adapter is a plain LoRA.
# PiSSA, OLoRA, CorDA and LoftQ saved unconverted also change the base weights when HF peft loads them,
# which vLLM does not do (peft_helper.py on vLLM's main branch refuses them; 0.14 serves them wrong).
PLAIN_INITS = ("gaussian", "eva", "orthogonal")


@dataclass(frozen=True)
class Verdict:
    """`loads`: True, False (vLLM refuses it, `reasons` say why) or None (cannot tell: the model class
    is not in LORA_MODULES). `max_lora_rank`: the smallest --max-lora-rank vLLM accepts that fits."""

    loads: bool | None
    reasons: list[str] = field(default_factory=list)
    rank: int | None = None
    modules: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None
    merge_instead: bool = False  # a refused adapter peftcli can fold into the base, which vLLM then serves

    def flags(self) -> str:
        return f"--enable-lora --max-lora-rank {self.max_lora_rank}"

    def line(self) -> str:
        """e.g. `vLLM: loads (LoRA rank 8 on q_proj, v_proj; start vLLM with --enable-lora --max-lora-rank 8)`."""
        if self.loads is False:
            merge = ". To serve it with vLLM, merge it into the base (`peft merge`) and serve the merged model."
            return "vLLM: would refuse: " + "; ".join(self.reasons) + (merge if self.merge_instead else "")
        what = f"LoRA rank {self.rank} on {', '.join(self.modules)}"
        if self.loads is None:
            return (
                f"vLLM: cannot tell: {'; '.join(self.reasons)}. The adapter itself passes vLLM's checks ({what}; "
                f"{self.flags()})"
            )
        return f"vLLM: loads ({what}; start vLLM with {self.flags()})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "loads": self.loads,
            "reasons": self.reasons,
            "rank": self.rank,
            "modules": self.modules,
            "max_lora_rank": self.max_lora_rank,
            "merge_instead": self.merge_instead,
            "flags": self.flags() if self.max_lora_rank is not None else None,
            "vllm_versions": VLLM_VERSIONS,
            "line": self.line(),
        }


def vllm_verdict(
    config: dict[str, Any], keys: Iterable[str], architecture: str | None, mergeable: bool = False
) -> Verdict:
    """Whether vLLM would serve the adapter of `config` (adapter_config.json) whose weights file holds
    the tensors `keys`, over a base of class `architecture` (transformers' class name, as in config.json's
    `architectures`). `mergeable`: peftcli can fold the adapter into the base, which a refusal suggests.

    Returns:
        Verdict: the answer, its reasons, and for a LoRA the rank, the module suffixes and the flags.
    """
    peft_type = str(config.get("peft_type") or "")
    if peft_type != "LORA":
        return Verdict(False, [method_reason(peft_type)], merge_instead=mergeable)
    keys = sorted(keys)
    modules = sorted({module_of(k).rsplit(".", 1)[-1] for k in keys if k.endswith(LORA_SUFFIXES)})
    rank = max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])
    fits = [r for r in MAX_LORA_RANKS if r >= rank]
    flag = fits[0] if fits else None
    reasons = [*config_reasons(config, rank), *key_reasons(config, keys), *task_reasons(config, architecture, modules)]
    if reasons:
        return Verdict(False, reasons, rank, modules, flag, merge_instead=mergeable)
    if architecture not in LORA_MODULES:
        unknown = (
            f"peftcli has no table of vLLM's LoRA modules for {architecture} (see the LoRA column of vLLM's "
            "supported-models page)"
        )
        return Verdict(None, [unknown], rank, modules, flag)
    return Verdict(True, [], rank, modules, flag)


def method_reason(peft_type: str) -> str:
    """vLLM's loader knows LoRA only: PEFTHelper needs `r`, `lora_alpha` and `target_modules`
    ("Missing required configuration fields") and the weights must be lora_A/lora_B pairs."""
    what = {
        "ADALORA": (
            "AdaLoRA keeps its update as P, Lambda and Q (lora_A, lora_E, lora_B) with a per-module rank_pattern"
        ),
        "IA3": "IA3 scales activations by learned vectors",
        "PREFIX_TUNING": "prefix tuning adds learned key/value prefixes",
        "PROMPT_TUNING": "prompt tuning adds learned virtual tokens (vLLM's prompt adapters went with its V0 engine)",
        "P_TUNING": "p-tuning adds learned virtual tokens (vLLM's prompt adapters went with its V0 engine)",
    }.get(peft_type, f"peft_type {peft_type or '(none)'} is peftcli's own format")
    return f"{what}; vLLM's LoRA loader takes only LoRA adapters (peft_type LORA)"


def config_reasons(config: dict[str, Any], rank: int) -> list[str]:
    """PEFTHelper._validate_features and validate_legal (vllm/lora/peft_helper.py)."""
    reasons = []
    if config.get("use_dora"):
        reasons.append("DoRA (use_dora) is not supported by vLLM's LoRA loader")
    saved = config.get("modules_to_save") or []
    if saved:
        reasons.append(
            f"modules_to_save {list(saved)} (layers trained in full): vLLM only supports modules_to_save being None"
            + (
                "; train LoRA on embed_tokens / lm_head (method.target_modules) instead of them in full"
                if {"embed_tokens", "lm_head"} & {str(s).rsplit(".", 1)[-1] for s in saved}
                else ""
            )
        )
    if str(config.get("bias") or "none") != "none" or config.get("lora_bias"):
        reasons.append(
            f"bias={config.get('bias')!r}, lora_bias={bool(config.get('lora_bias'))}: "
            "vLLM does not support adapter bias"
        )
    if rank > MAX_LORA_RANKS[-1]:
        reasons.append(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank, {MAX_LORA_RANKS[-1]}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        reasons.append(
            f"init_lora_weights={init!r} also changes the base weights when HF peft loads the adapter, which vLLM "
            "does not: save it converted to a plain LoRA (peftcli does)"
        )
    if config.get("layers_to_transform") or config.get("layer_replication"):
        reasons.append("layers_to_transform / layer_replication: vLLM applies LoRA by module name only")
    return reasons


def key_reasons(config: dict[str, Any], keys: list[str]) -> list[str]:
    """Tensors that are not LoRA A/B pairs. Those of modules_to_save, and DoRA's magnitudes, are
    explained by their own reasons."""
    saved = [str(s) for s in config.get("modules_to_save") or []]

    def explained(key: str) -> bool:
        dora = bool(config.get("use_dora")) and ".lora_magnitude_vector" in key
        return dora or any(f".{s}." in f".{module_of(key)}." for s in saved)

    odd = [k for k in keys if not k.endswith(LORA_SUFFIXES) and not explained(k)]
    if not odd:
        return []
    return [
        (
            f"adapter_model.safetensors holds {len(odd)} tensor(s) vLLM cannot read, e.g. "
            f'{odd[0]} ("is unsupported LoRA weight"): vLLM takes lora_A / lora_B weights only'
        )
    ]


def task_reasons(config: dict[str, Any], architecture: str | None, modules: list[str]) -> list[str]:
    """The task (vLLM serves LoRA on text-generation models) and the model class's LoRA modules."""
    task_type = config.get("task_type")
    if task_type != "CAUSAL_LM":
        return [
            (
                f"task_type {task_type}: vLLM {VLLM_VERSIONS} serves LoRA adapters on text-generation models "
                "(task_type CAUSAL_LM)"
            )
        ]
    if architecture in NO_LORA:
        return [
            (
                f"vLLM's {architecture} does not support LoRA (no SupportsLoRA: "
                "the LoRA column of vLLM's supported-models table is empty)"
            )
        ]
    allowed = LORA_MODULES.get(str(architecture))
    outside = [m for m in modules if allowed is not None and m not in allowed]
    if outside:
        return [f"LoRA on {', '.join(outside)}: vLLM's {architecture} takes LoRA on {', '.join(allowed or ())} only"]
    return []


def module_of(key: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> `model.layers.0.self_attn.q_proj`."""
    name = key.removeprefix(PREFIX)
    for suffix in (*LORA_SUFFIXES, ".weight", ".bias"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name
