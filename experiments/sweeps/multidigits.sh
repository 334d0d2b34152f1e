#!/usr/bin/env bash
# The MultiDigits sweep of docs/experiments.md, end to end: single-task baselines with the sweep's
# budget, the sweep of a grid (default: 5 methods × 3 seeds) with those baselines in the tasks, the
# tables and the plots.
#   bash experiments/sweeps/multidigits.sh [output root] [parallel runs] [grid]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${1:-runs/sweeps/multidigits}
JOBS=${2:-2}
GRID=${3:-experiments/sweeps/multidigits.yaml}
PY=${PYTHON:-python}
BUDGET=(--trainer.max_epochs 3 --data.init_args.num_train 5000 --seed_everything 0 --trainer.enable_progress_bar false)
mkdir -p "$ROOT"
# 1. Each task alone, same encoder, data and budget: validation metrics -> baselines.yaml (once;
#    the baseline runs keep their configs in $ROOT/baselines/).
[ -f "$ROOT/baselines.yaml" ] || "$PY" -m mtl_lightning.monitoring.baselines \
    --config experiments/multidigits/ew.yaml --out "$ROOT/baselines.yaml" "${BUDGET[@]}" --trainer.default_root_dir "$ROOT/baselines"
# 2. The base config's tasks with those baselines (JSON), for Δm / Δ_MTL in every run.
TASKS=$("$PY" - "$ROOT/baselines.yaml" <<'PY'
import json, sys, yaml
baselines = yaml.safe_load(open(sys.argv[1]))
tasks = yaml.safe_load(open("experiments/multidigits/ew.yaml"))["model"]["tasks"]
for task in tasks:
    task["init_args"]["baselines"] = baselines[task["init_args"]["name"]]
print(json.dumps(tasks))
PY
)
# 3. The sweep (finished runs are skipped: rerunning this script resumes it).
"$PY" -m mtl_lightning sweep --grid "$GRID" --set "model.tasks=$TASKS" \
    --root "$ROOT" --jobs "$JOBS" --no-wandb
# 4. The table (Markdown and LaTeX) and the plots.
"$PY" -m mtl_lightning results "$ROOT" --out "$ROOT/table.md" --plots "$ROOT" --pareto left/accuracy right/accuracy
"$PY" -m mtl_lightning results "$ROOT" --format latex --out "$ROOT/table.tex"
"$PY" -m mtl_lightning results "$ROOT" --metric-split val --out "$ROOT/table_val.md"  # the split of the baselines
