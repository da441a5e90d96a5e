#!/usr/bin/env bash
# One GPU, at most 9 minutes start to end: `mae bench` rows of the speedrun model (bare and with its augmentation),
# `mae speedrun --minutes 7` on the CIFAR-10 training images (the last 500 of each class held out as its test
# split), then `mae bench` rows of imagenet-vit-base with and without --compile in the time that is left.
#   bash scripts/gpu_speedrun.sh          (reads data/cifar10-train-jpeg.zip, or ZIP=...; run from the checkout)
# Everything it leaves is under OUT (default gpu-speedrun), at most 8 files, each under 16 MiB: log.txt,
# bench.jsonl, results.json, results.md, model.safetensors (the classifier, float16), mae.safetensors (the
# pretrained MAE, float16), reconstructions.png and run.tar.gz (every stage's config, metrics and pictures).
# Settings for a tiny run on a CPU (tests/test_gpu_script.py): DEVICE=cpu MINUTES=0.3 PRESET=smoke HELD_OUT=4
# BENCH_PRESET=smoke BENCH_BATCH=8 SR_BENCH_BATCH=8 BENCH_STEPS=2 COMPILE=0 WORKERS=0; PYTHON: the interpreter (python).
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-src}
OUT=${OUT:-gpu-speedrun}; DEVICE=${DEVICE:-cuda}; MINUTES=${MINUTES:-7}; WINDOW=${WINDOW:-540}
PRESET=${PRESET:-cifar10-speedrun}; BENCH_PRESET=${BENCH_PRESET:-imagenet-vit-base}
BENCH_BATCH=${BENCH_BATCH:-256}; SR_BENCH_BATCH=${SR_BENCH_BATCH:-1024}; BENCH_STEPS=${BENCH_STEPS:-20}
WORKERS=${WORKERS:-8}; COMPILE=${COMPILE:-1}; HELD_OUT=${HELD_OUT:-500}; PYTHON=${PYTHON:-python}
W=$(mktemp -d); D=$W/cifar; R=$W/run
mkdir -p "$OUT"; : > "$OUT/bench.jsonl"
exec > >(tee "$OUT/log.txt") 2>&1
start=$SECONDS
left() { echo $((WINDOW - (SECONDS - start))); }
bench() {  # bench SECONDS ARGS...: one `mae bench --json` call, cut at SECONDS, its rows to bench.jsonl
  local limit=$1; shift
  if ((limit < 20)); then echo "skipped (no time left): mae bench $*"; return; fi
  echo "$ mae bench $* (at $((SECONDS - start)) s, limit $limit s)"
  timeout "$limit" "$PYTHON" -m mae_torch bench --device "$DEVICE" --json "$@" | tee -a "$OUT/bench.jsonl"
  echo "exit ${PIPESTATUS[0]}"
}
"$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
"$PYTHON" scripts/split_cifar_zip.py "${ZIP:-data/cifar10-train-jpeg.zip}" "$D" "$HELD_OUT" > /dev/null || exit 1

bench 90 --preset "$PRESET" --mode both --augment --batch-size "$SR_BENCH_BATCH" --steps "$BENCH_STEPS" --warmup 5
echo "$ mae speedrun --minutes $MINUTES (at $((SECONDS - start)) s)"
"$PYTHON" -m mae_torch speedrun --preset "$PRESET" --data "$D" --minutes "$MINUTES" --device "$DEVICE" \
  --num-workers "$WORKERS" --out "$R"
echo "speedrun exit $? at $((SECONDS - start)) s"
bench "$(($(left) / 2))" --preset "$BENCH_PRESET" --batch-size "$BENCH_BATCH" --steps "$BENCH_STEPS" --warmup 3
if ((COMPILE)); then
  bench "$(($(left) - 5))" --preset "$BENCH_PRESET" --batch-size "$BENCH_BATCH" --steps "$BENCH_STEPS" --warmup 3 --compile
fi

for f in results.json results.md model.safetensors mae.safetensors reconstructions.png; do
  [ -f "$R/$f" ] && cp "$R/$f" "$OUT/"
done
tar -czf "$OUT/run.tar.gz" -C "$R" --exclude='*.pt' --exclude='*.safetensors' --exclude='events.out.*' .
echo "done at $((SECONDS - start)) s"
rm -rf "$W"
