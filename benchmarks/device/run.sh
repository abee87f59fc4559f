#!/usr/bin/env bash
# Run on a GPU machine lent through the device tool, after `bash benchmarks/device/prepare.sh` here:
#   run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=600)
# A task gets 15 minutes of device time in all, a machine's start (1-2 minutes) included, so this is one
# call, each part under its own time limit (together under 10 minutes), most wanted first:
#   1. installs .device/wheels over the image's packages (its CUDA torch stays), and records versions
#   2. tests/gpu (training with bf16 and fp16 autocast, eval, merge, HF peft, dropout, the benchmark's GPU columns;
#      fp16 over fp16 base weights, FSDP2 with evals and bf16, compare, TF32 on/off, host syncs per step;
#      QLoRA: 4- and 8-bit bases through bitsandbytes' CUDA kernels, HF peft both ways, the paged optimizer)
#   3. the ~1B Llama shape, both tools: bf16, NF4, and NF4 with gradient checkpointing (peak GPU memory)
#   4. SmolLM2-135M's shape in bf16, both tools
# Everything lands in $OUT as it is made: versions.txt, gpu-tests.log, bench-<workload>.jsonl and .log, and
# benchmarks.md (docs/benchmarks.md with the GPU tables written in; copy it back over the doc), so a part cut
# off by its limit loses only itself. `run.sh tests` runs 1-2, `run.sh bench` 1, 3-4.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-device-out}
mkdir -p "$out"
timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft, accelerate, datasets, pydantic, typer
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__,
      'datasets', datasets.__version__, 'pydantic', pydantic.__version__, 'typer', typer.__version__)"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
} 2>&1 | tee "$out/versions.txt"
stage=${1:-all}
if [ "$stage" != bench ]; then
    # One worker per test file (pytest-xdist, in the image), side by side on the machine's 16 cores, so one slow
    # file cannot starve the others of the limit; -v writes each result to the log as it comes.
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 3 --dist loadfile")
    # shellcheck disable=SC2086
    OUT=$out timeout 230 python3 -m pytest tests/gpu -v -rA -p no:cacheprovider $parallel 2>&1 | tee "$out/gpu-tests.log"
fi
[ "$stage" = tests ] && exit 0
cp docs/benchmarks.md "$out/benchmarks.md"
bf16="--variant bf16:train.mixed_precision=bf16 --variant bf16-base:train.mixed_precision=bf16,model.dtype=bfloat16"
nf4="--variant bf16-base:train.mixed_precision=bf16,model.dtype=bfloat16
     --variant nf4:train.mixed_precision=bf16,model.quantization.bits=4
     --variant nf4-gc:train.mixed_precision=bf16,model.quantization.bits=4,train.gradient_checkpointing=true"
for spec in "llama-1b-gsm8k:30:5:230:hf-grouped-bf16,hf-grouped-nf4-bf16,hf-grouped-nf4-gc-bf16:nf4" \
    "smollm2-shape-gsm8k:60:6:90:hf-defaults-bf16,hf-grouped-bf16:bf16"; do
    IFS=: read -r workload steps warmup limit tools rows <<<"$spec"
    variants=$bf16
    [ "$rows" = nf4 ] && variants=$nf4
    # shellcheck disable=SC2086
    timeout "$limit" python3 benchmarks/train_vs_hf.py --workload "$workload" --data .device/data --steps "$steps" \
        --warmup "$warmup" --tools "$tools" $variants --markdown "$out/benchmarks.md" \
        >"$out/bench-$workload.jsonl" 2>"$out/bench-$workload.log"
    echo "$workload: exit $?"
    cat "$out/bench-$workload.jsonl"
    tail -5 "$out/bench-$workload.log"
done
