"""Where parallel runs train: one GPU each by its CUDA_VISIBLE_DEVICES name, or an equal share of the
CPU cores; and the refusals when there are not enough of either."""

from __future__ import annotations

from pathlib import Path

from peftcli.training.slots import Slot, plan_slots


def test_one_run_keeps_the_process_defaults() -> None:
    assert plan_slots(1, 16, ["0", "1"]) == ([Slot()], [])


def test_cpu_runs_share_the_cores_once() -> None:
    assert plan_slots(2, 2, []) == ([Slot({}, 1), Slot({}, 1)], [])
    assert plan_slots(3, 8, []) == ([Slot({}, 2)] * 3, [])  # 6 of 8 threads: none oversubscribed


def test_gpu_runs_get_one_visible_gpu_each_by_its_name() -> None:
    slots, problems = plan_slots(2, 16, ["3", "GPU-8f1c"])
    assert problems == []
    assert [s.env for s in slots] == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "GPU-8f1c"}]
    assert [s.threads for s in slots] == [8, 8]
    assert plan_slots(1, 16, ["3", "5"])[0] == [Slot()]  # one run sees every GPU, as peft train does
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan_slots(2, 16, ["0", "1", "2", "3"])[0]] == ["0", "1"]


def test_more_runs_than_devices_is_refused_naming_the_limit() -> None:
    assert plan_slots(3, 16, ["0", "1"]) == (
        [],
        ["--parallel 3: 2 GPUs visible (0, 1), and a run trains on one. Use --parallel 2 or less."],
    )
    assert plan_slots(3, 2, []) == (
        [],
        [
            (
                "--parallel 3: this machine has 2 CPU cores and no GPU, and a run needs a core at least. "
                "Use --parallel 2 or less."
            )
        ],
    )


def test_describe_and_log() -> None:
    slot = Slot({"CUDA_VISIBLE_DEVICES": "1"}, 4).with_log(Path("out/logs/trial-001.log"))
    assert (slot.env, slot.threads, slot.log) == ({"CUDA_VISIBLE_DEVICES": "1"}, 4, Path("out/logs/trial-001.log"))
    assert slot.describe() == "GPU 1, 4 CPU threads"
    assert Slot({}, 1).describe() == "the CPU, 1 CPU thread"


def test_consoles_made_for_a_terminal_are_made_again_for_a_log_file(monkeypatch, tmp_path: Path) -> None:
    """A trial's output goes to its log: peftcli's consoles, made in the fork server for its terminal,
    must not write colour codes there."""
    import sys

    from rich.console import Console

    from peftcli.training import run as train
    from peftcli.training.own_process import remake_consoles

    for name, module in list(sys.modules.items()):  # every console remade here is put back afterwards
        if name.startswith("peftcli.") and isinstance(getattr(module, "console", None), Console):
            monkeypatch.setattr(module, "console", module.console)
    monkeypatch.setattr(train, "console", Console(stderr=True, soft_wrap=True, force_terminal=True))
    train.console.print("[bold]x[/]")  # to the captured stderr, with codes: it thinks it has a terminal
    with (tmp_path / "log").open("w") as log:
        monkeypatch.setattr("sys.stderr", log)
        remake_consoles()
        assert train.console.stderr and train.console.soft_wrap and not train.console.is_terminal
        train.console.print("[bold]done[/] in 1.0s")
    assert (tmp_path / "log").read_text() == "done in 1.0s\n"
