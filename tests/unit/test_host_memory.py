"""peftcli.training.host_memory: freed tensors go back to the OS, so a run's peak memory is what it uses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftcli.training import host_memory

# Allocate 40 tensors of 4 MiB (after one freed 8 MiB block has raised glibc's dynamic threshold past
# them), keep the last, free the rest: on the heap the kept one pins the top and nothing returns to the
# OS; each on its own mapping, the freed ones are unmapped. Prints the RSS (MiB) the frees gave back.
PROBE = textwrap.dedent(
    """
    import sys
    import torch
    from peftcli.training import host_memory

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    if sys.argv[1] == "on":
        assert host_memory.return_freed_memory()
    first = torch.ones(2 * 2**20)  # 8 MiB: mmapped, then freed (glibc raises its threshold to 8 MiB here)
    del first
    blocks = [torch.ones(2**20) for _ in range(40)]
    before = rss()
    del blocks[:-1]
    print(round(before - rss()))
    """
)


def given_back(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's malloc only (Linux)")
def test_freed_tensors_return_to_the_os_only_with_the_fixed_threshold() -> None:
    assert given_back("off") < 20  # glibc's heap keeps the 156 MiB freed below the kept tensor
    assert given_back("on") > 140  # 39 x 4 MiB unmapped


def test_a_user_s_own_malloc_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert host_memory.user_tuned()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert host_memory.user_tuned()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert not host_memory.user_tuned()


def test_the_recipe_key_turns_it_on_and_the_adapter_is_the_same(
    tmp_path: Path, tiny_dirs: dict[str, Path], tiny_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftcli.training.run import run_train
    from tests.cli.test_cli import write_recipe
    from tests.conftest import tiny_recipe

    calls: list[bool] = []
    monkeypatch.setattr(host_memory, "return_freed_memory", lambda: calls.append(True) or True)
    path = write_recipe(tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification"))
    run_train(path, [f"output_dir={tmp_path / 'off'}"])
    assert calls == []  # off by default: it costs speed (docs/benchmarks.md)
    run_train(path, [f"output_dir={tmp_path / 'on'}", "train.return_freed_memory=true"])
    assert calls == [True]
    off, on = ((tmp_path / d / "adapter" / "adapter_model.safetensors").read_bytes() for d in ("off", "on"))
    assert off == on
