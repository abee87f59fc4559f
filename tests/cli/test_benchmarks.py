"""The benchmark script runs end to end (on a tiny model, so the numbers mean nothing) and keeps the
prose of the doc it writes its table into."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli import ROOT


# Both tools' full loops and a second benchmark process (about 40 s on 2 quiet cores): `heavy`, so .ci/run
# runs it after the default run.
@pytest.mark.heavy
def test_benchmark_script_runs_both_tools_and_a_variant(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nprose before\n\n<!-- bench: tiny start -->\nold table\n<!-- bench: tiny end -->\n\n"
        "prose after\n"
    )
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "train_vs_hf.py"), "--workload", "tiny", "--steps", "6",
        "--warmup", "2", "--tools", "peftcli,hf-grouped-bf16", "--variant", "bf16:train.mixed_precision=bf16",
        "--markdown", str(doc),
    ]  # fmt: skip
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    header, rows = lines[0], lines[1:]
    assert set(header) == {"machine", "matmul_gflops", "flops_per_token"} and header["matmul_gflops"]["fp32"] > 0
    assert [r["tool"] for r in rows] == ["peftcli", "hf-grouped-bf16", "peftcli bf16"]
    for r in rows:
        assert (
            r["steps_timed"] == 4
            and r["real_tokens_per_s"] > 0
            and r["median_s_per_step"] > 0
            and r["peak_rss_mb"] > 100
        )
        assert r["trainable_parameters"] == rows[0]["trainable_parameters"]  # the same LoRA in both tools
        assert 0 <= r["eval"]["accuracy"] <= 1
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n\n<!-- bench: tiny start -->\n") and text.endswith(
        "<!-- bench: tiny end -->\n\nprose after\n"
    )
    assert "old table" not in text and "| peftcli bf16 |" in text and "| vs hf-grouped-bf16 |" in text


def test_repeated_rows_are_reported_as_medians_with_every_runs_tokens_per_s() -> None:
    bench = load_benchmark_module()
    runs = [
        {key: float(value) for key in bench.MEDIAN_KEYS} | {"tool": "peftcli", "eval": {"accuracy": 0.5}, "round": i}
        for i, value in ((1, 300), (2, 100), (3, 200))
    ]
    row = bench.median_row(runs)
    assert row["real_tokens_per_s"] == 200 and row["peak_rss_mb"] == 200 and row["runs"] == 3
    assert row["real_tokens_per_s_each"] == [300, 100, 200]
    assert bench.median_row(runs[:1]) == runs[0]  # one run: the row as it was


def load_benchmark_module(name: str = "train_vs_hf") -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


# Builds the 1B Llama shape (20 s on 2 cores): `heavy`, so .ci/run runs it after the default run.
@pytest.mark.heavy
def test_the_gpu_workloads_build_their_models_from_a_config_with_smollm2s_tokenizer(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    bench = load_benchmark_module()
    every = bench.workloads(tmp_path)
    shape, real = every["smollm2-shape-gsm8k"], every["smollm2-gsm8k"]
    assert bench.matmul_parameters(shape) == bench.matmul_parameters(real)  # SmolLM2's shape, counted on "meta"
    with torch.device("meta"):
        billion = AutoModelForCausalLM.from_config(LlamaConfig(**every["llama-1b-gsm8k"].config))
    assert 1.0e9 < sum(p.numel() for p in billion.parameters()) < 1.1e9

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    tiny = bench.replace(shape, config=shape.config | small)
    built = bench.built_model(tiny, tmp_path / "model", tmp_path / "tokenizer")
    again = bench.built_model(tiny, tmp_path / "again", tmp_path / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(built.model)
    assert model.config.hidden_size == 64 and model.config.vocab_size == 49152
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) == bench.matmul_parameters(
        tiny
    )
    for name, value in AutoModelForCausalLM.from_pretrained(again.model).state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name  # seeded: both tools' runs see one model
    gguf = AutoTokenizer.from_pretrained(bench.model_folder(real.model), gguf_file=real.gguf_file)
    text = "Question: Natalia sold 48 clips.\nAnswer: "
    assert AutoTokenizer.from_pretrained(built.model)(text)["input_ids"] == gguf(text)["input_ids"]


def test_the_ceilings_flop_count_is_what_torch_counts_on_a_forward_of_each_tools_batch(tmp_path: Path) -> None:
    """benchmarks/ceilings.py's arithmetic, against torch's own FLOP counter on a tiny BERT and a tiny
    Llama: Trainer's side (every position), and peftcli's (the last layer narrowed to the first
    position; the LM head at the target positions only)."""
    from contextlib import nullcontext
    from dataclasses import replace

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from peftcli.training.speedups.first_position import first_position_only
    from peftcli.training.speedups.head_at_targets import head_at_targets
    from tests.conftest import _llama_config, tiny_model

    ceilings = load_benchmark_module("ceilings")

    def counted(model: torch.nn.Module, batch: dict[str, torch.Tensor], context: Any = None) -> int:
        model.set_attn_implementation("eager")  # torch's counter skips SDPA's CPU kernel, not matmuls
        counter = FlopCounterMode(display=False)
        # The counter is entered last: first_position_only runs its probe forwards on entry.
        with torch.no_grad(), context or nullcontext(), counter:
            model(**batch)
        return counter.get_total_flops()

    lengths = [6, 9, 3]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    ids = torch.randint(4, 20, mask.shape, generator=torch.Generator().manual_seed(0)) * mask

    bert = tiny_model("bert-cls")
    bert.config.save_pretrained(tmp_path / "bert")
    w = ceilings.Workload(
        name="tiny", model=str(tmp_path / "bert"), task="sequence_classification", train_file="", eval_file="",
        columns={}, max_length=32, batch_size=3, lr=1e-3, target_modules=("query",),
    )  # fmt: skip
    shape = ceilings.model_shape(w)
    batch = {"input_ids": ids, "attention_mask": mask}
    assert counted(bert, batch) == ceilings.forward_flops(shape, [lengths], None, peftcli=False)
    narrowing = first_position_only(bert, bert, enabled=True)
    assert counted(bert, batch, narrowing) == ceilings.forward_flops(shape, [lengths], None, peftcli=True)
    assert shape.first_only > 0

    llama = tiny_model("llama-lm")
    w = replace(w, task="causal_lm", config=_llama_config().to_dict())
    shape = ceilings.model_shape(w)
    labels = ids.clone()
    labels[:, :2] = -100  # a two-token prompt
    labels[mask == 0] = -100
    targets = [int((row[1:] != -100).sum()) for row in labels]
    assert counted(llama, batch) == ceilings.forward_flops(shape, [lengths], targets, peftcli=False)
    at_targets = head_at_targets(llama.lm_head, batch | {"labels": labels})
    assert counted(llama, batch, at_targets) == ceilings.forward_flops(shape, [lengths], targets, peftcli=True)
