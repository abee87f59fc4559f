"""Runs several `peft` commands one after another in one Python process, for tests that need many short
runs (tests/cli/test_hub.py): torch, transformers and datasets are imported once, not once a command
(seconds each). Each command is `peft`'s own entry point with its own argv and HF_TOKEN (or none), and
its exit code, stdout and stderr are captured; the environment is otherwise the process's own.

    python tests/cli/peft_batch.py < commands.json    # [{"args": [...], "token": null}, ...]

prints a JSON list of {"code", "stdout", "stderr"}, one a command, in order. Anything else written to the
real stderr (a library's log line) is left there for the caller to see.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import Any

from peftcli.cli import main


def run(args: list[str], token: str | None) -> dict[str, Any]:
    os.environ.pop("HF_TOKEN", None)
    if token is not None:
        os.environ["HF_TOKEN"] = token
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["peft", *args]
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
    return {
        "code": code if isinstance(code, int) else int(code is not None),
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
    }


if __name__ == "__main__":
    commands = json.load(sys.stdin)
    results = [run(c["args"], c.get("token")) for c in commands]
    sys.__stdout__.write(json.dumps(results))
