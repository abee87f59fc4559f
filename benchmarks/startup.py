"""How long `peft` takes to answer before any work: `peft --help`, `peft train --help` and `peft validate`
of shipped recipes, each the wall and CPU time of a fresh process (medians of --runs, after one
unmeasured run that warms the file cache), and which heavy libraries the command imports (from
`python -X importtime`).

    python benchmarks/startup.py                         # this checkout
    git worktree add /tmp/before HEAD                    # the code before a change, to compare with
    python benchmarks/startup.py --root /tmp/before .    # both, runs interleaved

Prints a markdown table per checkout (its peftcli and its recipes/). With several checkouts each
command's runs alternate between them, so a load that comes and goes weighs on all alike; the load
average before and after is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["quickstart.yaml", "lora-sst2.yaml", "lora-smollm2-instruct.yaml", "qlora-smollm2-instruct.yaml"]
HEAVY = ["torch", "transformers", "datasets", "accelerate"]


def commands(recipes: list[str]) -> list[tuple[str, list[str]]]:
    """(label, argv after `python`): the interpreter alone and `import torch` as the floor and the cost
    that a command importing torch cannot go below; then the commands."""
    peft = ["-m", "peftcli"]
    rows = [("python -c pass", ["-c", "pass"]), ("python -c 'import torch'", ["-c", "import torch"])]
    rows += [("peft --help", [*peft, "--help"]), ("peft train --help", [*peft, "train", "--help"])]
    rows += [(f"peft validate recipes/{r}", [*peft, "validate", f"recipes/{r}"]) for r in recipes]
    return rows


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="100")
    env.pop("PYTHONWARNINGS", None)
    return env


def timed(argv: list[str], root: Path) -> tuple[float, float, int]:
    """Wall time, CPU time (user + system, the process's own: less moved by other work on the machine
    than the wall time, which waits for a core) and exit code of one run."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, *argv], cwd=root, env=environment(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, child.returncode


def heavy_imports(argv: list[str], root: Path) -> list[str]:
    """The HEAVY top-level packages the command imports, read from `-X importtime` (one line per module)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        check=False,
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root", type=Path, nargs="+", default=[ROOT], help="checkouts whose peftcli and recipes/ are timed"
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (the median is reported)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="recipe files under ROOT/recipes to validate")
    args = parser.parse_args()
    roots = [root.resolve() for root in args.root]

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.runs} runs each, "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    rows: dict[Path, list[str]] = {root: [] for root in roots}
    for label, argv in commands(args.recipes):
        runs: dict[Path, list[tuple[float, float, int]]] = {root: [] for root in roots}
        for root in roots:
            timed(argv, root)  # warm the file cache
        for _ in range(args.runs):
            for root in roots:
                runs[root].append(timed(argv, root))
        for root in roots:
            wall, cpu, codes = zip(*runs[root], strict=True)
            loaded = ", ".join(heavy_imports(argv, root)) or "none of " + ", ".join(HEAVY)
            rows[root].append(
                f"| `{label}` | {statistics.median(wall):.2f} s | {min(wall):.2f}-{max(wall):.2f} s "
                f"| {statistics.median(cpu):.2f} s | {','.join(str(c) for c in sorted(set(codes)))} | {loaded} |"
            )
    print(f"load average after {os.getloadavg()[0]:.2f}")
    for root in roots:
        print(f"\n{root}\n\n| command | wall time, median | min-max | CPU time, median | exit code | imports |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows[root]))


if __name__ == "__main__":
    main()
