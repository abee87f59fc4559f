"""Would vLLM serve an adapter (issue 22, part 3): each of vLLM's load-time rules (peftcli/reporting/serving.py)
from an adapter_config.json and its tensor names, the same rules over adapters HF peft itself saved,
and `peft inspect` on real tiny runs, line for line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState
from peft import AdaLoraConfig, IA3Config, LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from peftcli.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from peftcli.commands.inspection import run_inspect
from peftcli.reporting.serving import MAX_LORA_RANKS, vllm_verdict
from peftcli.training.run import run_train
from tests.cli.test_cli import peft
from tests.conftest import tiny_recipe

LLAMA = "LlamaForCausalLM"
QV = ["q_proj", "v_proj"]
DORA = "DoRA (use_dora) is not supported by vLLM's LoRA loader"
MERGE = " To serve it with vLLM, merge it into the base (`peft merge`) and serve the merged model."


def lora_config(**changes) -> dict:
    """adapter_config.json of a plain causal-LM LoRA, as peftcli writes it."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": QV,
        "modules_to_save": None,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
    }
    return config | changes


def lora_keys(modules: list[str] = QV, layers: int = 2) -> list[str]:
    return [
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(layers)
        for m in modules
        for ab in "AB"
    ]


# -- each rule, from a config and a key set -----------------------------------------------------------


def test_plain_lora_loads_with_the_smallest_max_lora_rank_that_fits() -> None:
    verdict = vllm_verdict(lora_config(), lora_keys(), LLAMA)
    assert verdict.loads is True and verdict.reasons == []
    assert (
        verdict.line() == "vLLM: loads (LoRA rank 8 on q_proj, v_proj; start vLLM with --enable-lora --max-lora-rank 8)"
    )
    # vLLM's --max-lora-rank takes only these values (vllm/config/lora.py, MaxLoRARanks).
    assert MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    for rank, flag in [(1, 1), (4, 8), (16, 16), (17, 32), (300, 320), (512, 512)]:
        assert vllm_verdict(lora_config(r=rank), lora_keys(), LLAMA).max_lora_rank == flag, rank


def test_rank_above_512_and_rank_pattern() -> None:
    verdict = vllm_verdict(lora_config(r=1024), lora_keys(), LLAMA)
    assert verdict.line() == "vLLM: would refuse: LoRA rank 1024 is above vLLM's largest --max-lora-rank, 512"
    # A per-module rank counts: vLLM checks the largest (validate_legal) against --max-lora-rank.
    verdict = vllm_verdict(lora_config(r=8, rank_pattern={"v_proj": 40}), lora_keys(), LLAMA)
    assert (verdict.loads, verdict.rank, verdict.max_lora_rank) == (True, 40, 64)


def test_dora_is_refused_and_its_magnitudes_need_no_second_reason() -> None:
    keys = lora_keys() + ["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    verdict = vllm_verdict(lora_config(use_dora=True), keys, LLAMA, mergeable=True)
    assert verdict.loads is False and verdict.reasons == [DORA]
    assert verdict.line() == f"vLLM: would refuse: {DORA}.{MERGE}"


@pytest.mark.parametrize(
    ("saved", "hint"),
    [
        (["lm_head"], "; train LoRA on embed_tokens / lm_head (method.target_modules) instead of them in full"),
        (["embed_tokens"], "; train LoRA on embed_tokens / lm_head (method.target_modules) instead of them in full"),
        (["score"], ""),
    ],
)
def test_modules_to_save_is_refused(saved: list[str], hint: str) -> None:
    keys = lora_keys() + [f"base_model.model.{saved[0]}.weight"]  # the layer trained in full, as HF peft saves it
    verdict = vllm_verdict(lora_config(modules_to_save=saved), keys, LLAMA)
    assert verdict.reasons == [
        f"modules_to_save {saved} (layers trained in full): vLLM only supports modules_to_save being None{hint}"
    ]


def test_adapter_bias_is_refused() -> None:
    for change in ({"bias": "all"}, {"bias": "lora_only"}, {"lora_bias": True}):
        verdict = vllm_verdict(lora_config(**change), lora_keys(), LLAMA)
        assert (
            verdict.loads is False
            and len(verdict.reasons) == 1
            and verdict.reasons[0].endswith(": vLLM does not support adapter bias")
        ), change
    assert vllm_verdict(lora_config(bias="all"), lora_keys(), LLAMA).reasons == [
        "bias='all', lora_bias=False: vLLM does not support adapter bias"
    ]


def test_inits_that_change_the_base_are_refused() -> None:
    assert vllm_verdict(lora_config(init_lora_weights="gaussian"), lora_keys(), LLAMA).loads is True
    assert vllm_verdict(lora_config(init_lora_weights=False), lora_keys(), LLAMA).loads is True
    assert vllm_verdict(lora_config(init_lora_weights="pissa"), lora_keys(), LLAMA).reasons == [
        (
            "init_lora_weights='pissa' also changes the base weights when HF peft loads the adapter, which vLLM does "
            "not: save it converted to a plain LoRA (peftcli does)"
        )
    ]


def test_tensors_vllm_cannot_read_are_refused() -> None:
    keys = lora_keys() + ["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"]
    assert vllm_verdict(lora_config(), keys, LLAMA).reasons == [
        (
            "adapter_model.safetensors holds 1 tensor(s) vLLM cannot read, e.g. "
            'base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias ("is unsupported LoRA weight"): '
            "vLLM takes lora_A / lora_B weights only"
        )
    ]


@pytest.mark.parametrize(
    ("peft_type", "what"),
    [
        (
            "ADALORA",
            "AdaLoRA keeps its update as P, Lambda and Q (lora_A, lora_E, lora_B) with a per-module rank_pattern",
        ),
        ("IA3", "IA3 scales activations by learned vectors"),
        ("PREFIX_TUNING", "prefix tuning adds learned key/value prefixes"),
        ("PROMPT_TUNING", "prompt tuning adds learned virtual tokens (vLLM's prompt adapters went with its V0 engine)"),
        ("BOTTLENECK", "peft_type BOTTLENECK is peftcli's own format"),
    ],
)
def test_methods_other_than_lora_are_refused(peft_type: str, what: str) -> None:
    verdict = vllm_verdict({"peft_type": peft_type, "task_type": "CAUSAL_LM"}, ["base_model.model.x.weight"], LLAMA)
    assert verdict.line() == f"vLLM: would refuse: {what}; vLLM's LoRA loader takes only LoRA adapters (peft_type LORA)"


def test_tasks_and_model_classes() -> None:
    seq_cls = vllm_verdict(lora_config(task_type="SEQ_2_SEQ_LM"), lora_keys(), "T5ForConditionalGeneration")
    assert seq_cls.reasons == [
        "task_type SEQ_2_SEQ_LM: vLLM 0.11-0.14 serves LoRA adapters on text-generation models (task_type CAUSAL_LM)"
    ]
    gpt2 = vllm_verdict(
        lora_config(target_modules=["c_attn"]),
        ["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"],
        "GPT2LMHeadModel",
    )
    assert gpt2.reasons == [
        (
            "vLLM's GPT2LMHeadModel does not support LoRA (no SupportsLoRA: "
            "the LoRA column of vLLM's supported-models table is empty)"
        )
    ]
    # Qwen2's vLLM class lists no embedding modules: LoRA on the embeddings has nowhere to go.
    keys = lora_keys() + [
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    ]
    assert vllm_verdict(lora_config(), keys, "Qwen2ForCausalLM").reasons == [
        (
            "LoRA on embed_tokens: vLLM's Qwen2ForCausalLM takes LoRA on q_proj, k_proj, v_proj, o_proj, gate_proj, "
            "up_proj, down_proj only"
        )
    ]
    assert vllm_verdict(lora_config(), keys, LLAMA).loads is True  # Llama's embedding_modules has embed_tokens
    unknown = vllm_verdict(lora_config(), lora_keys(), "OlmoForCausalLM")
    assert unknown.loads is None
    assert unknown.line() == (
        "vLLM: cannot tell: peftcli has no table of vLLM's LoRA modules for OlmoForCausalLM (see the LoRA column of "
        "vLLM's supported-models page). The adapter itself passes vLLM's checks (LoRA rank 8 on q_proj, v_proj; "
        "--enable-lora --max-lora-rank 8)"
    )


# -- the same rules over what HF peft itself saves ----------------------------------------------------


def saved_by_hf_peft(folder: Path, tiny_dirs, config) -> tuple[dict, list[str]]:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-lm"]), config)
    model.save_pretrained(folder)
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        return read_adapter_config(folder), list(f.keys())


def test_hf_peft_adapters(tiny_dirs, tmp_path: Path) -> None:
    plain = saved_by_hf_peft(
        tmp_path / "lora", tiny_dirs, LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=["q_proj", "down_proj"])
    )
    assert vllm_verdict(*plain, LLAMA).line() == (
        "vLLM: loads (LoRA rank 16 on down_proj, q_proj; start vLLM with --enable-lora --max-lora-rank 16)"
    )
    head = saved_by_hf_peft(
        tmp_path / "head", tiny_dirs, LoraConfig(task_type="CAUSAL_LM", target_modules=QV, modules_to_save=["lm_head"])
    )
    assert [r.split(":")[0] for r in vllm_verdict(*head, LLAMA).reasons] == [
        "modules_to_save ['lm_head'] (layers trained in full)"
    ]
    dora = saved_by_hf_peft(
        tmp_path / "dora", tiny_dirs, LoraConfig(task_type="CAUSAL_LM", target_modules=QV, use_dora=True)
    )
    assert vllm_verdict(*dora, LLAMA).reasons == [DORA]
    adalora = saved_by_hf_peft(
        tmp_path / "adalora", tiny_dirs, AdaLoraConfig(task_type="CAUSAL_LM", target_modules=QV, total_step=10)
    )
    assert vllm_verdict(*adalora, LLAMA).line().startswith("vLLM: would refuse: AdaLoRA keeps its update")
    ia3 = saved_by_hf_peft(
        tmp_path / "ia3",
        tiny_dirs,
        IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    assert vllm_verdict(*ia3, LLAMA).loads is False


# -- `peft inspect` on real runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_dirs, tiny_data) -> dict[str, Path]:
    """Two tiny Llama runs: LoRA rank 8 on q_proj, v_proj; the same with DoRA."""
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for name, dora in (("lora", False), ("dora", True)):
        method = {"name": "lora", "rank": 8, "alpha": 16, "target_modules": QV, "use_dora": dora}
        recipe = tiny_recipe(
            tiny_dirs["llama-lm"],
            tiny_data,
            "causal_lm",
            output_dir=str(root / name),
            method=method,
            train={"max_steps": 2, "eval_every": None},
        )
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        AcceleratorState._reset_state()
        out[name] = run_train(path, [])
    return out


def vllm_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("vLLM:")]


def test_inspect_says_vllm_loads_a_lora_run(runs: dict[str, Path]) -> None:
    result = peft("inspect", str(runs["lora"]))
    assert result.returncode == 0, result.stderr
    assert vllm_lines(result.stdout) == [
        "vLLM: loads (LoRA rank 8 on q_proj, v_proj; start vLLM with --enable-lora --max-lora-rank 8)"
    ]
    assert (
        read_adapter_config(runs["lora"] / "adapter")["r"] == 8 and (runs["lora"] / "adapter" / CONFIG_NAME).is_file()
    )


def test_inspect_says_vllm_refuses_dora_on_an_adapter_folder(
    runs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    # In this process (the command line's wiring is the test above's): what it prints and returns.
    capsys.readouterr()
    info = run_inspect(runs["dora"] / "adapter", [])
    assert vllm_lines(capsys.readouterr().out) == [f"vLLM: would refuse: {DORA}.{MERGE}"]
    assert info["vllm"] | {"line": None} == {
        "loads": False,
        "reasons": [DORA],
        "rank": 8,
        "modules": QV,
        "max_lora_rank": 8,
        "merge_instead": True,
        "flags": "--enable-lora --max-lora-rank 8",
        "vllm_versions": "0.11-0.14",
        "line": None,
    }
