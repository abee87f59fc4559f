"""LoRA's variants against HF peft (the reference, test-only): DoRA (`use_dora`), PiSSA and OLoRA
initialisation (`init`), LoRA+ (`optimizer.loraplus_lr_ratio`), on tiny Llama, BERT and GPT-2 (whose
Conv1D stores its weight transposed), and DoRA over a 4- and 8-bit base.

Tolerance: logits agree within 1e-5 (absolute and relative); they differ by float32 rounding only,
because DoRA's row norm is computed here from cached ||W||^2 and two small products rather than from
the (out x in) matrix W + s*B@A (measured differences are about 1e-7). Initialisations that HF peft
computes with the same LAPACK call (PiSSA's exact SVD, OLoRA's QR) are compared bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from pydantic import ValidationError

from peftcli.config.schema import OptimizerSpec
from peftcli.errors import MethodError, PeftcliError
from peftcli.methods import METHODS
from peftcli.methods.lora import LoraLinear, LoraParams
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from peftcli.training.optim import make_optimizer
from tests.conftest import TINY, make_tokenizer, sample_batch, tiny_model
from tests.helpers import adapt, logits, randomize_trainable

LORA = METHODS["lora"]
ARCHS = ["llama-lm", "bert-cls", "gpt2-lm"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def hf_config(arch: str, **kw) -> LoraConfig:
    return LoraConfig(
        **{"task_type": TASKS[TINY[arch][1]].peft_task_type, "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
        | kw
    )


def save_ours(model: torch.nn.Module, params, adapted, arch: str, folder: Path) -> dict:
    task = TASKS[TINY[arch][1]]
    save_adapter(folder, method_state(LORA, model, adapted), adapter_config(LORA, params, adapted, task, "tiny", None))
    return json.loads((folder / "adapter_config.json").read_text())


def layers(model: torch.nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def hf_tensor(hf: torch.nn.Module, name: str, part: str) -> torch.Tensor:
    """HF peft's tensor `part` (lora_A, lora_B, lora_magnitude_vector, base_layer) of our layer `name`."""
    module = hf.base_model.model.get_submodule(name)
    if part == "base_layer":
        return module.base_layer.weight
    if part == "lora_magnitude_vector":
        return module.lora_magnitude_vector["default"].weight
    return getattr(module, part)["default"].weight


# -- DoRA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_starts_as_hf_peft_does_and_as_the_base_model(arch: str, tokenizer) -> None:
    batch = sample_batch(arch, tokenizer)
    base = logits(tiny_model(arch), batch)
    ours = tiny_model(arch)
    adapt(ours, LORA, TINY[arch][1], rank=4, alpha=8, use_dora=True)
    torch.manual_seed(0)
    hf = get_peft_model(tiny_model(arch), hf_config(arch, use_dora=True))
    for name, layer in layers(ours).items():
        torch.testing.assert_close(
            layer.lora_magnitude_vector, hf_tensor(hf, name, "lora_magnitude_vector"), rtol=1e-6, atol=0
        )
        # m = ||W|| while B is zero: the fresh model is the base model.
        assert torch.equal(layer.lora_magnitude_vector.detach(), layer.weight_norm())
    torch.testing.assert_close(logits(ours, batch), base, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_dora_loads_in_hf_peft_and_in_ours_with_equal_outputs(arch: str, tokenizer, tmp_path: Path) -> None:
    model = tiny_model(arch)
    params, adapted = adapt(model, LORA, TINY[arch][1], rank=4, alpha=8, use_dora=True)
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    ours = logits(model, batch)
    config = save_ours(model, params, adapted, arch, tmp_path)
    assert config["use_dora"] is True and config["r"] == 4

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), ours, **TOL)
    again = tiny_model(arch)
    load_adapter(tmp_path, again, TASKS[TINY[arch][1]])
    torch.testing.assert_close(logits(again, batch), ours, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_peft_dora_loads_in_ours_with_equal_outputs_and_trainable_count(
    arch: str, tokenizer, tmp_path: Path
) -> None:
    hf = get_peft_model(tiny_model(arch), hf_config(arch, use_dora=True))
    randomize_trainable(hf, seed=3)
    batch = sample_batch(arch, tokenizer)
    expected = logits(hf, batch)
    hf.save_pretrained(tmp_path)
    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, TASKS[TINY[arch][1]])
    torch.testing.assert_close(logits(ours, batch), expected, **TOL)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == hf.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("arch", ["llama-lm", "gpt2-lm"])
def test_dora_training_forward_and_gradients_equal_hf_peft(arch: str, dropout: float, tokenizer) -> None:
    """Training outputs and gradients (A, B and the magnitudes) equal HF peft's. With dropout HF peft
    takes the base product again on the dropped-out input; the same masks (the same seed, one draw per
    layer in both) give the same outputs."""
    ours = tiny_model(arch)
    adapt(ours, LORA, TINY[arch][1], rank=4, alpha=8, use_dora=True, dropout=dropout)
    randomize_trainable(ours)
    hf = get_peft_model(tiny_model(arch), hf_config(arch, use_dora=True, lora_dropout=dropout))
    for name, layer in layers(ours).items():
        with torch.no_grad():
            for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
                hf_tensor(hf, name, part).copy_(
                    getattr(layer, part).weight if part != "lora_magnitude_vector" else layer.lora_magnitude_vector
                )
    batch = sample_batch(arch, tokenizer)
    grads = []
    for model in (ours, hf):
        model.train()
        torch.manual_seed(7)
        out = model(**batch).logits
        out.float().pow(2).mean().backward()
        grads.append((out.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL)
    for name, layer in layers(ours).items():
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            mine = (
                layer.lora_magnitude_vector.grad
                if part == "lora_magnitude_vector"
                else getattr(layer, part).weight.grad
            )
            torch.testing.assert_close(mine, hf_tensor(hf, name, part).grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_merge_keeps_outputs_and_equals_hf_peft_merge(arch: str, tokenizer, tmp_path: Path) -> None:
    model = tiny_model(arch)
    params, adapted = adapt(model, LORA, TINY[arch][1], rank=4, alpha=8, use_dora=True)
    randomize_trainable(model, scale=0.1)
    batch = sample_batch(arch, tokenizer)
    adapted_logits = logits(model, batch)
    save_ours(model, params, adapted, arch, tmp_path)
    LORA.merge(model)
    assert not layers(model)
    torch.testing.assert_close(logits(model, batch), adapted_logits, **TOL)
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path).merge_and_unload()
    mine, hf = dict(model.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == hf.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, hf[key], rtol=1e-6, atol=1e-6)


# -- PiSSA and OLoRA -----------------------------------------------------------------------------


# GPT-2's Conv1D with PiSSA only: HF peft's OLoRA takes the QR of the stored (in, out) weight without
# transposing it, which gives lora_A the output width (peftcli transposes; its GPT-2 case is below).
INIT_CASES = [(i, a) for i in ("pissa", "olora") for a in ("llama-lm", "bert-cls")] + [("pissa", "gpt2-lm")]


@pytest.mark.parametrize(("init", "arch"), INIT_CASES)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_pissa_olora_initialise_exactly_as_hf_peft(init: str, arch: str, dora: bool, tokenizer) -> None:
    batch = sample_batch(arch, tokenizer)
    base = logits(tiny_model(arch), batch)
    ours = tiny_model(arch)
    adapt(ours, LORA, TINY[arch][1], rank=4, alpha=8, init=init, use_dora=dora)
    hf = get_peft_model(tiny_model(arch), hf_config(arch, init_lora_weights=init, use_dora=dora))
    for name, layer in layers(ours).items():
        assert torch.equal(layer.lora_A.weight, hf_tensor(hf, name, "lora_A"))
        assert torch.equal(layer.lora_B.weight, hf_tensor(hf, name, "lora_B"))
        assert torch.equal(layer.base_layer.weight, hf_tensor(hf, name, "base_layer"))  # the residual W - s*B0@A0
        if dora:  # m = ||W_res + s*B0@A0|| = ||W||
            torch.testing.assert_close(
                layer.lora_magnitude_vector, hf_tensor(hf, name, "lora_magnitude_vector"), rtol=1e-5, atol=0
            )
    # The residual plus the principal part is the base weight: the fresh model is the base model.
    torch.testing.assert_close(logits(ours, batch), base, **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_pissa_olora_adapter_is_plain_lora_for_the_original_base(
    init: str, arch: str, tokenizer, tmp_path: Path
) -> None:
    """The rank-2r conversion: the adapter loads on the untouched base, in HF peft and in ours, with the
    outputs of the trained model (which holds the residual base)."""
    model = tiny_model(arch)
    params, adapted = adapt(model, LORA, TINY[arch][1], rank=4, alpha=8, init=init, use_dora=arch == "llama-lm")
    randomize_trainable(model, scale=0.05)
    batch = sample_batch(arch, tokenizer)
    trained = logits(model, batch)
    config = save_ours(model, params, adapted, arch, tmp_path)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), trained, **TOL)
    again = tiny_model(arch)
    load_adapter(tmp_path, again, TASKS[TINY[arch][1]])
    torch.testing.assert_close(logits(again, batch), trained, **TOL)

    # `peft merge` gives the same model either way: the trained model merged in memory (residual base)
    # and the saved adapter merged into the original base.
    LORA.merge(model)
    LORA.merge(again)
    merged, reloaded = dict(model.named_parameters()), dict(again.named_parameters())
    assert merged.keys() == reloaded.keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, reloaded[key], rtol=1e-5, atol=1e-6)


def test_rslora_conversion_keeps_the_scale(tokenizer, tmp_path: Path) -> None:
    model = tiny_model("llama-lm")
    params, adapted = adapt(model, LORA, "causal_lm", rank=4, alpha=8, init="pissa", use_rslora=True)
    randomize_trainable(model, scale=0.05)
    batch = sample_batch("llama-lm", tokenizer)
    config = save_ours(model, params, adapted, "llama-lm", tmp_path)
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * 2**0.5)
    theirs = PeftModel.from_pretrained(tiny_model("llama-lm"), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), logits(model, batch), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_hf_peft_pissa_olora_adapters_load_in_ours_converted_or_not(init: str, tokenizer, tmp_path: Path) -> None:
    """HF peft's converted adapter (save_pretrained with path_initial_model_for_weight_conversion) is a
    plain LoRA; its unconverted one names the init, which loading repeats on the base, as HF peft does.
    Without DoRA: HF peft's conversion (subtract_mutated_init) keeps only lora_A and lora_B, dropping
    DoRA's magnitudes (ours keeps them, above)."""
    arch = "llama-lm"
    batch = sample_batch(arch, tokenizer)
    hf = get_peft_model(tiny_model(arch), hf_config(arch, init_lora_weights=init))
    hf.peft_config["default"].init_lora_weights = True  # the initial adapter is saved as plain LoRA (HF peft's recipe)
    hf.save_pretrained(tmp_path / "initial")
    hf.peft_config["default"].init_lora_weights = init
    randomize_trainable(hf, seed=3, scale=0.05)
    expected = logits(hf, batch)
    hf.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    hf.save_pretrained(tmp_path / "unconverted")
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8
    for folder in ("converted", "unconverted"):
        ours = tiny_model(arch)
        load_adapter(tmp_path / folder, ours, TASKS["causal_lm"])
        torch.testing.assert_close(logits(ours, batch), expected, **TOL)


def test_fast_pissa_keeps_the_base_weight(tokenizer) -> None:
    arch = "llama-lm"
    batch = sample_batch(arch, tokenizer)
    base_model = tiny_model(arch)
    model = tiny_model(arch)
    torch.manual_seed(0)
    adapt(model, LORA, "causal_lm", rank=4, alpha=8, init="pissa", pissa_niter=4)
    for name, layer in layers(model).items():
        rebuilt = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        torch.testing.assert_close(rebuilt, base_model.get_submodule(name).weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model, batch), logits(base_model, batch), **TOL)


def test_pissa_niter_needs_init_pissa_and_init_names_its_choices() -> None:
    with pytest.raises(ValidationError) as exc:
        LoraParams(init="olora", pissa_niter=4)
    assert exc.value.errors()[0]["msg"] == "applies to init: pissa only, not olora; remove it or set init: pissa"
    with pytest.raises(ValidationError) as exc:
        LoraParams(init="pisa")
    assert exc.value.errors()[0]["type"] == "literal_error"


def test_unsupported_init_in_an_adapter_config_is_refused_in_one_line(tmp_path: Path) -> None:
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "init_lora_weights": "loftq"}
    with pytest.raises(PeftcliError) as exc:
        LORA.from_peft_config(config)
    assert exc.value.lines == [
        (
            "adapter_config.json: init_lora_weights='loftq' is not supported by peftcli's LoRA (it loads True, "
            "gaussian, pissa, pissa_niter_N and olora). Load this adapter with HF peft, or save it converted to "
            "plain LoRA "
            "(save_pretrained's path_initial_model_for_weight_conversion)."
        )
    ]


def test_gaussian_init_is_hf_peft_gaussian() -> None:
    """The same seed draws the same A (both build A and B as nn.Linear, then draw A normal, std 1/r)."""
    ours = tiny_model("llama-lm")
    torch.manual_seed(5)
    adapt(ours, LORA, "causal_lm", rank=4, alpha=8, init="gaussian", target_modules=["q_proj", "v_proj"])
    base = tiny_model("llama-lm")
    torch.manual_seed(5)
    hf = get_peft_model(base, hf_config("llama-lm", init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"]))
    for name, layer in layers(ours).items():
        assert torch.equal(layer.lora_A.weight, hf_tensor(hf, name, "lora_A"))
        assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))


# -- a quantized base ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory) -> Path:
    """test_quantized's 64-wide tiny Llama (bitsandbytes quantizes 4-bit weights in blocks of 64 inputs)."""
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaForCausalLM

    from tests.methods.test_quantized import config

    folder = tmp_path_factory.mktemp("quantizable") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(config("llama-lm")).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def quantized(folder: Path, bits: int) -> torch.nn.Module:
    from tests.methods import test_quantized  # imported here: it skips its module without bitsandbytes

    return test_quantized.quantized(folder, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_on_a_quantized_base_both_ways_with_hf_peft(bits: int, quantizable: Path, tmp_path: Path) -> None:
    batch = {"input_ids": torch.tensor([[2, 5, 9, 14, 20, 7], [2, 6, 6, 30, 11, 4]])}
    ours = quantized(quantizable, bits)
    params, adapted = adapt(ours, LORA, "causal_lm", rank=4, alpha=8, use_dora=True)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    randomize_trainable(ours, scale=0.05)
    trained = logits(ours, batch)
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if not p.requires_grad)
    assert all(layer.base_row_norm_sq is not None for layer in layers(ours).values())
    assert not any("base_row_norm_sq" in k for k in ours.state_dict())  # cached, never saved
    save_ours(ours, params, adapted, "llama-lm", tmp_path / "ours")
    theirs = PeftModel.from_pretrained(quantized(quantizable, bits), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, batch), trained, **TOL)

    hf = get_peft_model(quantized(quantizable, bits), hf_config("llama-lm", use_dora=True))
    randomize_trainable(hf, seed=3, scale=0.05)
    hf.save_pretrained(tmp_path / "theirs")
    mine = quantized(quantizable, bits)
    load_adapter(tmp_path / "theirs", mine, TASKS["causal_lm"])
    torch.testing.assert_close(logits(mine, batch), logits(hf, batch), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_refuse_a_quantized_base_in_one_line(init: str, quantizable: Path) -> None:
    model = quantized(quantizable, 4)
    with pytest.raises(MethodError) as exc:
        adapt(model, LORA, "causal_lm", init=init, target_modules=["q_proj"])
    assert exc.value.lines == [
        (
            f"method.init: {init} rewrites the base weights as W - s*B0@A0, which model.quantization holds quantized "
            f"(got {init} with a quantized model.layers.0.self_attn.q_proj). Use init: default or gaussian, or remove "
            "model.quantization."
        )
    ]


# -- LoRA+ -----------------------------------------------------------------------------------------


def lr_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("arch", ["bert-cls", "llama-lm"])
def test_loraplus_groups_are_hf_peft_create_loraplus_optimizer_groups(arch: str) -> None:
    """The same parameters at lr x ratio (B, and the 1-D tensors: DoRA's magnitudes, a head's bias)."""
    ours = tiny_model(arch)
    adapt(ours, LORA, TINY[arch][1], rank=4, alpha=8, use_dora=True)
    mine = lr_by_name(make_optimizer(ours, OptimizerSpec(lr=1e-3, loraplus_lr_ratio=16)), ours)
    hf = get_peft_model(tiny_model(arch), hf_config(arch, use_dora=True))
    theirs = lr_by_name(create_loraplus_optimizer(hf, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16), hf)

    def ours_name(hf_name: str) -> str:
        name = hf_name.removeprefix("base_model.model.").replace(".default", "").replace(".modules_to_save", "")
        return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name

    theirs = {ours_name(n): lr for n, lr in theirs.items() if ".original_module." not in n}
    assert mine == theirs
    assert sorted(set(mine.values())) == [1e-3, 16e-3]


def test_loraplus_without_lora_matrices_is_refused_in_one_line() -> None:
    model = tiny_model("llama-lm")
    adapt(model, METHODS["ia3"], "causal_lm")
    with pytest.raises(PeftcliError) as exc:
        make_optimizer(model, OptimizerSpec(loraplus_lr_ratio=16))
    assert exc.value.lines == [
        (
            "optimizer.loraplus_lr_ratio: scales the learning rate of LoRA's B matrices, and this method trains none "
            "(got 16). Use method lora or adalora, or remove optimizer.loraplus_lr_ratio."
        )
    ]


def test_without_loraplus_the_groups_are_unchanged() -> None:
    model = tiny_model("bert-cls")
    adapt(model, LORA, "sequence_classification", rank=4)
    groups = make_optimizer(model, OptimizerSpec(lr=1e-3, weight_decay=0.1)).param_groups
    assert [(g["lr"], g["weight_decay"], all(p.ndim > 1 for p in g["params"])) for g in groups] == [
        (1e-3, 0.1, True),
        (1e-3, 0.0, False),
    ]
