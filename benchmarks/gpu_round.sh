#!/usr/bin/env bash
# Every measurement this project's CPU machines cannot make, in one run on a lent GPU (an H100 or H200), each step
# under its own time limit, 450 s in all, inside the device tool's 600 s per call (not yet run on a GPU):
#   1. the full-size SDXL UNet training step (2.6 B parameters, 1024 px, batch 1, bf16 autocast), r 16 and 64:
#      PEFT LoRA with and without its input cast, PEFT's GraLoRA, the package's GraLoRA, and --gralora_recompute;
#   2. one adapted linear layer at SDXL shapes (operators, host time, time, memory; benchmarks/layers.py);
#   3. one adapted ResNet convolution at SDXL's widths (GraLoRA vs LoCon, default and recomputing; conv_layers.py).
# JSON and logs go to $OUT (default benchmarks/results/gpu). The README's GPU tables are read from them.
#
# The GPU machine's image has torch, transformers and accelerate but not diffusers, and maybe an older PEFT without
# GraLoRA: carry them as wheels. Here, in the repository root, once per checkout:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2 importlib_metadata
# then call the device tool with carry [".whl"] and the command `bash benchmarks/gpu_round.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:=benchmarks/results/gpu}"
OUT=$(cd "$OUT" && pwd)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, peft; print(torch.__version__, diffusers.__version__, peft.__version__)" \
  | tee -a "$OUT/gpu.txt" || exit 1

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.log, show its end
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $?"
  tail -n 30 "$OUT/$name.log"
}

cd benchmarks
step train_step-sdxl 240 python3 train_step.py --models sdxl --batch 1 --ranks 16 64 --repeats 5 \
  --out "$OUT/train_step-sdxl.json"
step layers 120 python3 layers.py --out "$OUT/layers-cuda.json"
step conv_layers 90 python3 conv_layers.py --device cuda --dtype bfloat16 --out "$OUT/conv_layers-cuda.json"
