#!/usr/bin/env bash
# The improved CIFAR-10 recipe (preset cifar10-vit-tiny-improved) on one GPU, shortened: MAE pretraining, then
# fine-tuning from the MAE encoder and, at the same time as the pretraining, from scratch with the same budget;
# both evaluated on the last 500 training images of each class (held out; the CIFAR-10 test split is not here).
#   PRE_EPOCHS=33 FT_EPOCHS=17 bash scripts/gpu_recipe.sh     (reads data/cifar10-train-jpeg.zip, or ZIP=...;
#   scripts/gpu_check.sh runs it with epochs sized to its call; docs/gpu/ holds such a run)
# Short schedules use batch 1024 for pretraining (lr 6e-4: more steps than the preset's 4096) and warm up for a
# tenth of each schedule. The full schedule is the preset as it is (README, "The full-scale GPU recipe").
# T_PRE and T_FT bound each stage's seconds; a stage stopped there keeps its last finished epoch's weights.
set -uo pipefail
export PYTHONPATH=src
OUT=${OUT:-gpu-out}; PRE=${PRE_EPOCHS:-40}; FT=${FT_EPOCHS:-10}; DEVICE=${DEVICE:-cuda}
T_PRE=${T_PRE:-600}; T_FT=${T_FT:-600}; read -ra X <<< "${EXTRA:-}"
P=cifar10-vit-tiny-improved; R=/tmp/runs; D=/tmp/cifar
common=(--preset $P --data $D --device "$DEVICE" --num-workers 8 --overwrite)
warm() { python -c "print(max(0.5, round($1 / 10, 1)))"; }
mkdir -p "$OUT" $R
python scripts/split_cifar_zip.py "${ZIP:-data/cifar10-train-jpeg.zip}" $D > /dev/null || exit 1  # once

finetune() {  # finetune NAME [flags...]: fine-tune FT epochs, then evaluate on the held-out images
  local name=$1; shift
  timeout "$T_FT" python -m mae_torch finetune "${common[@]}" --epochs "$FT" --warmup-epochs "$(warm "$FT")" \
    --batch-size 512 --device-batch-size 512 "$@" "${X[@]}" --out $R/ft-$name > $R/ft-$name.log 2>&1
  echo "ft-$name exit $?"; tail -n 3 $R/ft-$name.log
  python -m mae_torch evaluate --checkpoint $R/ft-$name/model.safetensors --data $D --device "$DEVICE" --json \
    > $R/eval-$name.json && cat $R/eval-$name.json
}

start=$SECONDS
T_FT=$((T_PRE + T_FT)) finetune scratch --layer-decay 1 &  # same epochs as from MAE; shares the GPU meanwhile
scratch=$!
timeout "$T_PRE" python -m mae_torch pretrain "${common[@]}" --epochs "$PRE" --warmup-epochs "$(warm "$PRE")" \
  --batch-size 1024 --device-batch-size 1024 "${X[@]}" --out $R/pre > $R/pre.log 2>&1
echo "pretrain exit $? after $((SECONDS - start)) s"; tail -n 3 $R/pre.log
finetune mae --pretrained $R/pre
echo "ft-mae done after $((SECONDS - start)) s"
wait $scratch
echo "ft-scratch done after $((SECONDS - start)) s"

python -m mae_torch reconstruct --checkpoint $R/pre --images $D/test/*/4500.jpg --device "$DEVICE" \
  --out $R/reconstructions.png
python -m mae_torch compare $R/ft-scratch $R/ft-mae --out $R/compare.png
python - "$OUT/results.json" "$PRE" "$FT" <<'EOF'
import json, pathlib, sys
runs = pathlib.Path("/tmp/runs")
def lines(name):
    p = runs / name / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
def read(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
out = {"pretrain_epochs_asked": int(sys.argv[2]), "finetune_epochs_asked": int(sys.argv[3])}
for name in ["pre", "ft-mae", "ft-scratch"]:
    m = lines(name)
    out[name] = {"epochs_done": len(m), "last": m[-1] if m else None,
                 "img_per_s_median": sorted(r["img_per_s"] for r in m)[len(m) // 2] if m else None,
                 "train_seconds": sum(r["epoch_time_s"] for r in m)}
for name in ["mae", "scratch"]:
    out[f"heldout_{name}"] = read(runs / f"eval-{name}.json")
pathlib.Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
EOF
tar -czf "$OUT/runs.tar.gz" -C $R --exclude='*.pt' --exclude='*.safetensors' --exclude='events.out.*' .
