"""Where parallel runs train: one GPU each by its CUDA_VISIBLE_DEVICES name, or an equal share of the
CPU cores; and the refusals when there are not enough of either."""

from __future__ import annotations

from pathlib import Path

from peftcli.slots import Slot, plan_slots


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
            "--parallel 3: this machine has 2 CPU cores and no GPU, and a run needs a core at least. Use --parallel 2 or less."
        ],
    )


def test_describe_and_log() -> None:
    slot = Slot({"CUDA_VISIBLE_DEVICES": "1"}, 4).with_log(Path("out/logs/trial-001.log"))
    assert (slot.env, slot.threads, slot.log) == ({"CUDA_VISIBLE_DEVICES": "1"}, 4, Path("out/logs/trial-001.log"))
    assert slot.describe() == "GPU 1, 4 CPU threads"
    assert Slot({}, 1).describe() == "the CPU, 1 CPU thread"
