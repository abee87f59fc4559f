"""`peft merge TARGET --out DIR`: fold a mergeable adapter into the base weights and write a standalone
transformers model folder. It checks its own work: the merged model must give the adapted model's
logits on a few probe batches, or nothing is written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from peftcli.adapter_io import atomic_dir, plain_modes, read_adapter_config
from peftcli.errors import PeftcliError
from peftcli.models.gguf_export import check_exportable, is_gguf_file, round_as_stored, write_gguf
from peftcli.models.loading import DTYPES, model_location
from peftcli.models.quantization import compute_dtype, dequantize
from peftcli.models.target import build, resolve_target
from peftcli.reporting.model_card import merged_card, target_base, write_card
from peftcli.training.run_dir import within

console = Console(stderr=True, soft_wrap=True, emoji=False)

PROBE_TEXTS = [
    "The film was a delight from start to finish.",
    "Question: What is 12 plus 30?\nAnswer:",
    "I would not recommend this hotel to anyone.",
    "Write a short poem about the sea.",
    "The quarterly report shows revenue grew by 4 percent, driven by strong sales in Europe.",
    "ok",
    "Translate to French: good morning",
    "Plain, unremarkable, and a little too long.",
]


def run_merge(
    target_path: Path,
    out: Path,
    dtype: str = "float32",
    overrides: list[str] | None = None,
    tolerance: float = 1e-3,
    overwrite: bool = False,
    fmt: str = "safetensors",
    gguf_type: str = "f16",
) -> dict[str, Any]:
    """Merges the adapter of `target_path` (a run directory or an adapter folder) into its base and writes
    the model to `out`: a transformers folder in `dtype`, or with fmt gguf one .gguf file. Returns the
    largest logit differences found (and where it wrote).

        peft merge runs/lora-sst2 --out merged/lora-sst2

    Raises:
        PeftcliError: nothing to merge, a method that cannot merge, an `out` that is taken, or a merged
            model whose logits differ from the adapted model's by more than `tolerance` (nothing written).
    """
    target = resolve_target(target_path, overrides or [])
    check_request(target_path, target, out, fmt, overwrite)
    built = build(target)
    method = built.method
    assert method is not None
    if fmt == "gguf":
        check_exportable(built.model, built.tokenizer, str(target.path), base_gguf(target.model))
    check_mergeable(method, target)
    model = built.model.eval()
    batches = probe_batches(built.tokenizer)
    quantization = target.model.quantization
    adapted_quantized, before, difference = merge_checked(model, method, quantization is not None, batches, tolerance)
    if fmt == "gguf":
        said = merged_text(method.name, target, difference)
        return {"difference": difference} | export_gguf(
            model, built.tokenizer, target, out, gguf_type, batches, before, said
        )
    model.to(DTYPES[dtype])
    cast_difference = max(float((logits(model, b).float() - ref).abs().max()) for b, ref in zip(batches, before))
    result = {"difference": difference, "cast_difference": cast_difference, "out": str(out)}
    said = merged_text(method.name, target, difference)
    if quantization is not None and adapted_quantized is not None:  # measured before anything is written
        result |= quantization_errors(target, batches, adapted_quantized, before)
        said = quantized_merge_text(method.name, target, difference, result)
    write_folder(model, built.tokenizer, method.name, target, out, dtype)
    console.print(
        said
        + (f", {cast_difference:.2e} after casting to {dtype}" if dtype != "float32" else "")
        + f". Wrote {escape(str(out))}; load it with {type(model).__name__}.from_pretrained('{escape(str(out))}')."
    )
    return result


def check_request(target_path: Path, target: Any, out: Path, fmt: str, overwrite: bool) -> None:
    """Before anything loads: there is an adapter to merge, and `out` may be written."""
    if target.adapter_dir is None:
        raise PeftcliError(
            f"{target_path}: a recipe has no trained adapter to merge. "
            f"Train it first (`peft train {target_path}`) and merge the run directory."
        )
    if target.path.resolve().is_relative_to(out.resolve()):
        raise PeftcliError(
            f"{out}: holds the adapter being merged ({target_path}), which --out would replace. Choose another --out."
        )
    if fmt == "gguf":
        check_gguf_out(out, target, overwrite)
    else:
        check_folder_out(out, target, overwrite)


def check_mergeable(method: Any, target: Any) -> None:
    if method.merge is None:
        raise PeftcliError(
            f"{target.adapter_dir}: {method.name} {method.kind.value} and cannot be merged into the weights. "
            "Use the adapter as it is: `peft eval`"
            + (", or HF peft's PeftModel.from_pretrained." if method.in_hf_peft else ".")
        )


def merge_checked(
    model: torch.nn.Module, method: Any, quantized: bool, batches: list[Any], tolerance: float
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor], float]:
    """Folds the adapter into the weights, checked: the merged model must give the adapted model's logits
    on `batches`. Returns the quantized adapted model's logits (None for a float base), the adapted
    model's before the merge, and the largest difference."""
    adapted_quantized = [logits(model, b) for b in batches] if quantized else None
    if quantized:
        # The quantized weights become float ones holding exactly the values the adapted run computed
        # with (found through the adapter's wrappers too); the adapter folds into those.
        dequantize(model)
    before = [logits(model, b) for b in batches]
    method.merge(model)
    leftover = sorted(set(parameter_names(model)) ^ set(plain_parameter_names(model)))
    difference = max(float((logits(model, b) - ref).abs().max()) for b, ref in zip(batches, before))
    if leftover or difference > tolerance:
        raise PeftcliError(
            f"merge check failed: the merged model's logits differ from the adapted model's by {difference:.3g} "
            f"(tolerance {tolerance:g})"
            f"{f'; parameters differ from a plain model: {leftover[:3]}' if leftover else ''}. Nothing was written."
        )
    return adapted_quantized, before, difference


def merged_text(method: str, target: Any, difference: float) -> str:
    return f"merged {method} into {escape(target.model.name)}: largest logit difference {difference:.2e} (float32)"


def write_folder(model: torch.nn.Module, tokenizer: Any, method: str, target: Any, out: Path, dtype: str) -> None:
    """The merged model, its tokenizer and its model card, in `out` whole or not at all."""
    base = target_base(read_adapter_config(target.adapter_dir), target.model, target.recipe is not None)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_card(
            tmp,
            merged_card(
                method=method,
                task=target.task,
                base=base,
                adapter=str(target.adapter_dir),
                model_class=type(model).__name__,
                out=str(out),
                dtype=dtype,
                label_names=target.label_names,
            ),
        )
        plain_modes(tmp)  # safetensors writes model.safetensors owner-only


def quantization_errors(
    target: Any, batches: list[Any], adapted_quantized: list[torch.Tensor], dequantized: list[torch.Tensor]
) -> dict[str, float]:
    """What a quantized run's merge shows beside the merge error: how far the dequantized model is from
    the quantized one as it computes (LLM.int8 also rounds the activations), and how far both are from
    the full-precision base with the same adapter (the cost of the bits)."""
    full = build(replace(target, model=target.model.model_copy(update={"quantization": None}))).model.eval()
    reference = [logits(full, b).to(d.device) for b, d in zip(batches, dequantized)]  # the float base loads on the CPU
    same = [(d.argmax(-1) == r.argmax(-1))[real(b, d)] for d, r, b in zip(dequantized, reference, batches)]
    return {
        "compute_difference": max(float((d - q).abs().max()) for d, q in zip(dequantized, adapted_quantized)),
        "quantization_error": max(float((d - r).abs().max()) for d, r in zip(dequantized, reference)),
        "top_token_agreement": float(torch.cat(same).float().mean()),
    }


def real(batch: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Which of `out`'s rows are real inputs: a token model's non-padding positions, or every example."""
    mask = batch["attention_mask"].bool().to(out.device)
    return mask if out.dim() == 3 and out.shape[:2] == mask.shape else torch.ones_like(out[:, 0], dtype=torch.bool)


def quantized_merge_text(method_name: str, target: Any, difference: float, result: dict[str, Any]) -> str:
    """The three numbers a quantized merge reports, each the largest logit difference over the probes."""
    q = target.model.quantization
    dtype = str(compute_dtype(q)).removeprefix("torch.")
    computes = " (LLM.int8 also rounds activations)" if q.bits == 8 else f" in {dtype}"
    return (
        f"merged {method_name} into {escape(target.model.name)}, dequantized from {q.bits} bits: "
        f"merge error {difference:.2e} (largest logit difference from the dequantized model with the adapter); "
        f"{result['compute_difference']:.2e} from the adapted {q.bits}-bit model as it computes{computes}; "
        f"quantization error {result['quantization_error']:.2e} from the full-precision base with the adapter, "
        f"which picks the same next token at {result['top_token_agreement']:.1%} of the probe positions "
        "(what the bits cost)"
    )


def check_folder_out(out: Path, target: Any, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PeftcliError(
            f"{out}: a file, not a folder. Give --out a folder for the merged model (a new one, or an existing one "
            "with --overwrite)."
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeftcliError(f"{out}: already exists. Pass --overwrite to replace it, or choose another --out.")
    if out.exists() and any(out.iterdir()):
        check_replaceable_model(out, target)


def check_gguf_out(out: Path, target: Any, overwrite: bool) -> None:
    """With --format gguf, --out is the .gguf file; --overwrite replaces only a GGUF file, and never the
    one the base model was read from."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise PeftcliError(
            "--format gguf: needs the gguf package, which is not installed. Install it: pip install 'peftcli[gguf]'."
        )
    if out.suffix != ".gguf" or out.is_dir():
        raise PeftcliError(
            f"{out}: with --format gguf, --out is the .gguf file to write (got a "
            f"{'folder' if out.is_dir() else 'name without .gguf'}). Give a file name ending in .gguf."
        )
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise PeftcliError(f"{out}: already exists. Pass --overwrite to replace it, or choose another --out.")
    base = base_gguf(target.model)
    if out.is_symlink() or not is_gguf_file(out) or (base is not None and base.resolve() == out.resolve()):
        what = (
            "the base model's GGUF file"
            if base is not None and base.resolve() == out.resolve()
            else "not a GGUF file peft merge wrote"
        )
        raise PeftcliError(f"{out}: {what}, so --overwrite will not replace it. Choose another --out.")


def base_gguf(spec: Any) -> Path | None:
    """The GGUF file the base model is read from (a local or package folder, or the hub cache), if any."""
    if not spec.gguf_file:
        return None
    from transformers.utils import cached_file

    try:
        found = cached_file(model_location(spec), spec.gguf_file, revision=spec.revision)
    except OSError:
        return None
    return Path(found) if found else None


def export_gguf(
    model: Any,
    tokenizer: Any,
    target: Any,
    out: Path,
    gguf_type: str,
    batches: list[Any],
    merged: list[torch.Tensor],
    said: str,
) -> dict[str, Any]:
    """Writes the merged model as a GGUF file and reports what its f16 or q8_0 matrices cost: the logits
    of the merged model with its matrices rounded as the file stores them, against the float32 ones."""
    name = target.recipe.name if target.recipe is not None else out.stem
    write_gguf(model, tokenizer, out, gguf_type, name, base_gguf(target.model))
    round_as_stored(model, gguf_type)
    difference = max(float((logits(model, b) - ref).abs().max()) for b, ref in zip(batches, merged))
    console.print(
        f"{said}, {difference:.2e} with its matrices in {gguf_type}. "
        f"Wrote {escape(str(out))} ({out.stat().st_size / 2**20:.1f} MiB); run it with llama.cpp: "
        f"llama-cli -m {escape(str(out))}"
    )
    return {"gguf_difference": difference, "out": str(out)}


def check_replaceable_model(out: Path, target: Any) -> None:
    """--overwrite replaces only a model folder (config.json and files, no subfolders, as `peft merge`
    writes one), and never one that holds the base model, the adapter or the current folder."""
    keep = [(Path.cwd(), "the folder you run from"), (target.path, "the adapter being merged")]
    if Path(model_location(target.model)).exists():
        keep.append((Path(model_location(target.model)), "the base model"))
    if out.is_symlink():
        raise PeftcliError(
            f"{out}: a symbolic link; --overwrite replaces only a merged model folder itself. "
            "Give --out the real folder, or another one."
        )
    for path, what in keep:
        if within(path, out):
            raise PeftcliError(
                f"{out}: --overwrite would delete {what} ({path}), which is inside it. Choose another --out."
            )
    if not (out / "config.json").is_file() or any(p.is_dir() for p in out.iterdir()):
        raise PeftcliError(
            f"{out}: not a model folder peft merge wrote (config.json and files only), so --overwrite will not "
            "delete it. Choose another --out, or empty the folder yourself."
        )


def parameter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def plain_parameter_names(model: torch.nn.Module) -> list[str]:
    """The parameter names of an unadapted model of the same class and config (built on the meta
    device: no memory), which is what the merged folder must hold to load without peftcli."""
    with torch.device("meta"):
        return parameter_names(type(model)(model.config))


def probe_batches(tokenizer: Any, size: int = 4) -> list[dict[str, torch.Tensor]]:
    return [
        dict(tokenizer(PROBE_TEXTS[i : i + size], padding=True, return_tensors="pt"))
        for i in range(0, len(PROBE_TEXTS), size)
    ]


@torch.inference_mode()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if getattr(model.config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = batch["input_ids"]  # the decoder reads the probes too: both stacks are checked
    return model(**batch).logits.float()
