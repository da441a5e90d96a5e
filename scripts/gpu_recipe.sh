#!/usr/bin/env bash
# The improved CIFAR-10 recipe (preset cifar10-vit-tiny-improved) on one GPU, shortened to fit one device call of
# under 10 minutes: MAE pretraining, then fine-tuning from the MAE encoder and from scratch with the same budget,
# both evaluated on the last 500 training images of each class (held out; the CIFAR-10 test split is not here).
#   device tool: bash scripts/gpu_recipe.sh   with carry ["data/cifar10-train-jpeg.zip"]
# The full schedule (2000 pretraining + 100 fine-tuning epochs) is the same commands without the --epochs flags.
# A CPU dry run of the plumbing on a small zip: PRE_EPOCHS=1 FT_EPOCHS=1 EXTRA="--batch-size 32 --device-batch-size 32" bash scripts/gpu_recipe.sh
set -uo pipefail
export PYTHONPATH=src
OUT=${OUT:-gpu-out}; PRE=${PRE_EPOCHS:-40}; FT=${FT_EPOCHS:-20}; read -ra X <<< "${EXTRA:-}"
mkdir -p "$OUT" /tmp/cifar
exec > >(tee "$OUT/recipe-log.txt") 2>&1
python scripts/split_cifar_zip.py data/cifar10-train-jpeg.zip /tmp/cifar
P=cifar10-vit-tiny-improved
timeout 240 python -m mae_torch pretrain --preset $P --data /tmp/cifar --epochs $PRE --warmup-epochs 4 \
  "${X[@]}" --out /tmp/runs/pre --overwrite
for init in mae scratch; do
  extra=(); [ $init = mae ] && extra=(--pretrained /tmp/runs/pre) || extra=(--layer-decay 1)
  timeout 150 python -m mae_torch finetune --preset $P --data /tmp/cifar --epochs $FT "${extra[@]}" "${X[@]}" \
    --out /tmp/runs/ft-$init --overwrite
  python -m mae_torch evaluate --checkpoint /tmp/runs/ft-$init --data /tmp/cifar --json | tee "$OUT/eval-$init.json"
done
cp /tmp/runs/pre/metrics.jsonl "$OUT/pretrain-metrics.jsonl"; cp /tmp/runs/pre/reconstructions.png "$OUT/"
for init in mae scratch; do cp /tmp/runs/ft-$init/metrics.jsonl "$OUT/ft-$init-metrics.jsonl"; done
