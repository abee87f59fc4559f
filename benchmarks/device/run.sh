#!/usr/bin/env bash
# Run on a GPU machine lent through the device tool, after `bash benchmarks/device/prepare.sh` here:
#   run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=590)
# One call, in this order, each part under its own time limit so the call ends inside its 10 minutes:
#   1. installs .device/wheels over the image's packages (its CUDA torch stays), and records versions
#   2. tests/gpu (training with bf16 and fp16 autocast, eval, merge, HF peft, dropout, the benchmark's GPU columns;
#      fp16 over fp16 base weights, FSDP2 with evals and bf16, compare, TF32 on/off, host syncs per step)
#   3. the benchmark on the GPU in bf16: SmolLM2-135M's shape, then a ~1B Llama shape, both tools
# Everything lands in $OUT: versions.txt, gpu-tests.log, gpu-readiness.json, bench-<workload>.jsonl and .log, and
# benchmarks.md (docs/benchmarks.md with the GPU tables written in; copy it back over the doc).
# `bash benchmarks/device/run.sh bench` skips the tests, `tests` skips the benchmark: run `tests` first, in a
# call of its own, so that a slow benchmark cannot lose the test results.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-device-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft, accelerate, datasets, pydantic, typer
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__,
      'datasets', datasets.__version__, 'pydantic', pydantic.__version__, 'typer', typer.__version__)"
} 2>&1 | tee "$out/versions.txt"
stage=${1:-all}
if [ "$stage" != bench ]; then
    OUT=$out timeout 360 python3 -m pytest tests/gpu -q -rA -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
fi
[ "$stage" = tests ] && exit 0
cp docs/benchmarks.md "$out/benchmarks.md"
bf16="--variant bf16:train.mixed_precision=bf16 --variant bf16-base:train.mixed_precision=bf16,model.dtype=bfloat16"
for spec in smollm2-shape-gsm8k:100:10:150 llama-1b-gsm8k:60:6:220; do
    IFS=: read -r workload steps warmup limit <<<"$spec"
    # shellcheck disable=SC2086
    timeout "$limit" python3 benchmarks/train_vs_hf.py --workload "$workload" --data .device/data --steps "$steps" \
        --warmup "$warmup" --tools hf-defaults-bf16,hf-grouped-bf16 $bf16 --markdown "$out/benchmarks.md" \
        >"$out/bench-$workload.jsonl" 2>"$out/bench-$workload.log"
    echo "$workload: exit $?"
    cat "$out/bench-$workload.jsonl"
    tail -5 "$out/bench-$workload.log"
done
