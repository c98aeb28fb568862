#!/usr/bin/env bash
# The issue-18 ablation on the synthetic regime (benchmarks/ablation/regime.yaml), resumable: rerun this
# script and finished points are skipped. Raw results are copied to benchmarks/results/ablation/.
# Usage (from the repo root):  nohup nice -n 15 benchmarks/ablation/run.sh > runs/ablation.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-runs/ablation}
OUT=benchmarks/results/ablation
export RAY_AUTH_MODE=disabled TQDM_DISABLE=1 PYTHONPATH=$PWD
core=(
  experiment --config benchmarks/ablation/regime.yaml --run-root "$ROOT"
  --strategy none --strategy lsr --strategy lsro --strategy all_in_one --strategy pseudo --strategy slsr
  --seed 0 --seed 1 --seed 2
  --variant 'bot:train.recipe=bot'
  --variant 'nonoise@slsr:train.model.noise_layer=false'
  --k 2 --k 3 --k 4 --lambda 0.5 --lambda 1.0 --generated 0 --generated 0.5 --generated 1 --generated 2
  --curve-seed 0
)
# phase 2 adds the membership-rule variant (it retrains the GANs: new cluster stage) to the same tables
more=(--variant 'rule_any@slsr:cluster.rule=any')
run() {  # a local Ray start can time out on an overloaded machine: retry (finished points are kept)
  for attempt in 1 2 3 4 5; do
    "$PY" -m slsr_ray.cli "$@" && return 0
    echo "[run.sh] attempt $attempt failed; retrying in 30 s"; sleep 30
  done
  return 1
}
run "${core[@]}" "$@"
run "${core[@]}" "${more[@]}" "$@"
# results.json holds every finished point's record (per seed), the row statistics and the GAN quality
mkdir -p "$OUT"
cp "$ROOT"/experiment/results.{json,md} "$ROOT"/experiment/*.png "$OUT"/
