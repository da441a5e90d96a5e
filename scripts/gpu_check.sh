#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 8 minutes, for the device tool (one H100, no network):
#   run: bash scripts/gpu_check.sh   with carry ["data/cifar10-train-jpeg.zip"] (copy it there first)
# Writes to $OUT (the device tool's return folder): bench.jsonl (step throughput, GFLOP/img, TFLOP/s,
# fraction of the measured peak, baseline ratio), a short real pretraining run on CIFAR-10 whose
# metrics.jsonl gives img/s with the data pipeline included, and the log. Record the figures in
# docs/benchmarks.md.
set -uo pipefail
export PYTHONPATH=src
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== step throughput (bench), bf16, with the starting design as baseline"
for b in 512 2048; do
  timeout 120 python -m mae_torch bench --preset cifar10-vit-tiny --device cuda --batch-size $b \
    --steps 20 --warmup 5 --baseline --json | tee -a "$OUT/bench.jsonl"
done
echo "== torch.compile"
timeout 150 python -m mae_torch bench --preset cifar10-vit-tiny --device cuda --batch-size 2048 \
  --steps 20 --warmup 5 --compile --mode pretrain --json | tee -a "$OUT/bench.jsonl"

echo "== end to end: pretraining on the CIFAR-10 training images, data pipeline included"
if [ -f data/cifar10-train-jpeg.zip ]; then
  mkdir -p /tmp/cifar && unzip -q -o data/cifar10-train-jpeg.zip -d /tmp/cifar
  timeout 200 python -m mae_torch pretrain --preset cifar10-vit-tiny --data /tmp/cifar/train --device cuda \
    --epochs 4 --batch-size 4096 --device-batch-size 2048 --warmup-epochs 1 --num-workers 8 \
    --out "$OUT/pretrain" --overwrite
  rm -f "$OUT"/pretrain/*.pt "$OUT"/pretrain/best.*  # keep the returned files small
else
  echo "data/cifar10-train-jpeg.zip not carried: skipped"
fi
