#!/usr/bin/env bash
# The GPU checks in one run, for a session lent the device (one H200; torch, triton,
# transformers, peft and accelerate preinstalled; no vllm/trl/deepspeed):
#   run(command="bash bench/gpu.sh", timeout_s=540)
# Installs moetune without dependencies, then runs the GPU benchmarks, each of which checks
# its results against a reference before timing; logs go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$out/environment.txt" 2>&1
python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1
step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "### $*" > "$out/$name.txt"
  timeout "$limit" "$@" >> "$out/$name.txt" 2>&1
  echo "exit $?" >> "$out/$name.txt"
}
step fp8_gemm 150 python bench/fp8_gemm.py
step moe_layer 90 python bench/moe_layer.py --gpu
step train_step 120 python bench/train_step.py --gpu
step lora 150 python bench/lora.py --gpu --fp8
tail -n 8 "$out"/*.txt
