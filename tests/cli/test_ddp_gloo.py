"""DDP over gloo on CPUs, standing in for GPUs: trainable parameters that get no gradient (bert2bert's
encoder pooler), selective FT choosing its entries once for all processes, and two "machines" (two
`accelerate launch` invocations with --num_machines 2) training as one process accumulating."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftcli.training.run import run_train
from tests.cli.selective_worker import selected, selective_model
from tests.cli.test_cli import ROOT, peft, write_recipe
from tests.cli.test_distributed import TRAIN
from tests.conftest import tiny_recipe, write_jsonl


def assert_same_adapter(ours: Path, theirs: Path) -> dict[str, torch.Tensor]:
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ours, theirs))
    assert a.keys() == b.keys() and len(a) > 0
    for key in b:
        assert a[key].shape == b[key].shape and a[key].numel() > 0
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    return b


def test_bert2bert_trains_under_ddp_though_its_encoder_pooler_gets_no_gradient(
    tiny_dirs: dict[str, Path], tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    # EncoderDecoderModel never calls the encoder's pooler, and `all-linear` adapts it: DDP waited for
    # its gradient and stopped at step 2 ("Expected to have finished reduction in the prior iteration").
    bert = str(tiny_dirs["bert-cls"])
    recipe = tiny_recipe(
        tiny_dirs["bert-cls"],
        tiny_data,
        "seq2seq_lm",
        model={"name": bert, "decoder": bert},
        train={"batch_size": 4, "max_steps": 4, "eval_every": 4, "log_every": 1, "seed": 0},
        # Not Adam: it turns rounding noise into full steps where the exact gradient is zero (the new
        # cross-attention's key biases: softmax ignores a shift shared by all keys), and two ways of
        # summing the same batch then differ there by about the learning rate.
        optimizer={"name": "sgd", "lr": 0.1},
    )
    path = write_recipe(tmp_path, recipe)
    one, two = tmp_path / "one", tmp_path / "two"
    result = peft("train", str(path), f"output_dir={two}", "train.grad_accum=1", "--num-processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    # Two processes with a micro-batch each = one process accumulating two.
    run_train(path, [f"output_dir={one}", "train.grad_accum=2"])
    adapter = assert_same_adapter(two, one)
    pooler = [k for k in adapter if ".encoder.pooler." in k]
    assert pooler, "all-linear adapts the pooler"
    # Unused, so never updated: its LoRA B stays at its zero start, as in the one-process run.
    assert all(not adapter[k].any() for k in pooler if "lora_B" in k)


def test_selective_ft_trains_the_main_process_selection_on_every_process(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: other test runs may be on this machine
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "cli" / "selective_worker.py"),
        str(tmp_path),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]
    alone = [selected(selective_model(data_seed=r)) for r in (0, 1)]

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Each process's batches alone pick other entries; together both train process 0's.
    assert not same(alone[0], alone[1])
    assert same(ranks[0], alone[0]) and same(ranks[1], alone[0])


@pytest.fixture(scope="module")
def classifier_recipe(tmp_path_factory, tiny_dirs, tiny_data) -> Path:
    """The recipe of test_distributed.py: 12 steps, evals and checkpoints at 6 and 12, 33 eval examples."""
    tmp = tmp_path_factory.mktemp("multi-node")
    rows = [json.loads(x) for x in tiny_data["sentiment_validation"].read_text().splitlines()]
    data = dict(tiny_data) | {
        "sentiment_validation": write_jsonl(tmp / "val.jsonl", rows + [{"text": "good film good", "label": "positive"}])
    }
    r = tiny_recipe(tiny_dirs["bert-cls"], data, "sequence_classification", train=TRAIN)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_of_one_process_each_train_as_one_process_accumulating_two(
    classifier_recipe: Path, tmp_path: Path
) -> None:
    port = free_port()
    # The same command on both "machines", each from its own folder. Machine 1's folder cannot hold
    # a run directory (`runs` there is a file): it finishes only if it writes nothing.
    folders = [tmp_path / "machine-0", tmp_path / "machine-1"]
    for folder in folders:
        folder.mkdir()
    (folders[1] / "runs").write_text("not a folder\n")
    launches = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / "configs" / "multi-node.yaml"),
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "-m",
                "peftcli",
                "train",
                str(classifier_recipe),
                "output_dir=runs/multi",
            ],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        for rank, folder in enumerate(folders)
    ]
    try:
        outputs = [p.communicate(timeout=240) for p in launches]
    finally:
        for p in launches:
            p.kill()
    for p, (_, err) in zip(launches, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    one, multi = tmp_path / "one", folders[0] / "runs" / "multi"
    run_train(classifier_recipe, [f"output_dir={one}", "train.grad_accum=2"])
    assert_same_adapter(multi, one)
    report = json.loads((multi / "report.json").read_text())
    assert report["summary"]["num_processes"] == 2
    # Machine 0's main process wrote the checkpoint with both processes' generators; machine 1 printed nothing.
    assert {p.name for p in (multi / "checkpoints" / "step-6").glob("rng-*")} == {
        "rng-0.json",
        "rng-0.safetensors",
        "rng-1.json",
        "rng-1.safetensors",
    }
    assert "done in" in outputs[0][1] and "done in" not in outputs[1][1]
    assert not (folders[0] / "runs" / ".multi.lock").exists()  # released at the end
