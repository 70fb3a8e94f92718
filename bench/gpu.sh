#!/usr/bin/env bash
# The GPU checks in one run, for a session lent the device (one H200; torch, triton,
# transformers, peft and accelerate preinstalled; no vllm/trl/deepspeed):
#   run(command="bash bench/gpu.sh", timeout_s=300)    # about 2.5 minutes, or name steps:
#   run(command="bash bench/gpu.sh train_step lora")
# Puts moetune on the path (a package folder of links: no install), then runs the GPU
# benchmarks, each of which checks its results against a reference before timing and then
# prints its top kernels (bench/profiling.py); logs go to $OUT (or ./gpu_out), a file a step.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # a step cut at its limit keeps what it printed
out="${OUT:-gpu_out}"
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  (cd /tmp && python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)")
} > "$out/environment.txt" 2>&1
# The import namespace `moetune` maps onto the top-level folders (pyproject's package-dir).
site=$(mktemp -d)
mkdir "$site/moetune"
for sub in kernels model finetune rl rewards recipes config data training; do ln -s "$PWD/$sub" "$site/moetune/$sub"; done
export PYTHONPATH="$site"
wanted=" ${*:-fp8_gemm moe_layer train_step lora vllm_lora speculative} "  # bash bench/gpu.sh [STEP ...]
step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  [[ $wanted == *" $name "* ]] || return 0
  echo "### $*" > "$out/$name.txt"
  timeout "$limit" "$@" >> "$out/$name.txt" 2>&1
  echo "exit $?" >> "$out/$name.txt"
}
step fp8_gemm 120 python3 bench/fp8_gemm.py
step moe_layer 90 python3 bench/moe_layer.py --gpu --profile
step train_step 120 python3 bench/train_step.py --gpu --profile
step lora 150 python3 bench/lora.py --gpu --fp8 --profile
step vllm_lora 300 python3 bench/vllm_lora_gpu.py  # needs vLLM: prints why it skips without
# The native engine's MTP speculation (k = 0, 1, 2) on the demo's SFT model, which the GPU image
# cannot train (no trl): make it here first and carry it in (run's carry=["gpu_assets"]):
#   python bench/speculative.py --sft-steps 500 --keep gpu_assets/spec --repeats 1 --batch 1
#   rm -r gpu_assets/spec/checkpoint-*   # (carry takes 64 MiB; the model is 13 MB)
step speculative 240 bash -c '[[ -d gpu_assets/spec ]] || { echo "skipped: no gpu_assets/spec"; exit 0; }
  python3 bench/speculative.py --model gpu_assets/spec --device cuda --repeats 5'
cat "$out"/*.txt
