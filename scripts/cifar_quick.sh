#!/usr/bin/env bash
# A quick real-data check on a CPU: MAE pretraining, then fine-tuning from the MAE encoder and from scratch
# with the same budget, on the CIFAR-10 training images of ../shared/data (see its README), at reduced scale
# (ViT-T width with 4x4 patches and 6 blocks, a few epochs). Held out for the final number: the last 500
# images of each class (never seen in training or model selection); validation for early stopping and best
# epoch: 10% of the rest. Usage: scripts/cifar_quick.sh [WORK_DIR]   (about 30 minutes on 2 CPU cores)
set -euo pipefail
WORK=${1:-runs/cifar-quick}
ZIP=${CIFAR_ZIP:-../shared/data/cifar10-train-jpeg.zip}
MAE=${MAE:-mae}
mkdir -p "$WORK"
python scripts/split_cifar_zip.py "$ZIP" "$WORK/data"
MODEL=(--preset cifar10-vit-tiny --patch-size 4 --depth 6 --decoder-depth 2 --pos-embed sincos --global-pool avg)
COMMON=(--data "$WORK/data" --num-workers 1 --seed 0)
$MAE pretrain "${MODEL[@]}" "${COMMON[@]}" --epochs ${PRE_EPOCHS:-4} --batch-size 256 --warmup-epochs 1 \
  --out "$WORK/pretrain" --overwrite
for init in mae scratch; do
  extra=(); [ "$init" = mae ] && extra=(--pretrained "$WORK/pretrain")
  $MAE finetune "${MODEL[@]}" "${COMMON[@]}" "${extra[@]}" --epochs ${FT_EPOCHS:-2} --batch-size 128 \
    --warmup-epochs 0.5 --out "$WORK/finetune-$init" --overwrite
  $MAE evaluate --checkpoint "$WORK/finetune-$init" --data "$WORK/data" --json | tee "$WORK/eval-$init.json"
done
