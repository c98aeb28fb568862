#!/usr/bin/env bash
# The issue-18 ablation on the synthetic regime (benchmarks/ablation/regime.yaml), resumable: rerun this
# script and finished points are skipped. Raw results (results.json: every finished point's record per
# seed, the row statistics, the GAN quality) are copied to benchmarks/results/ablation/ after each phase.
# Usage (from the repo root):  nohup nice -n 15 benchmarks/ablation/run.sh > runs/ablation.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-runs/ablation}
OUT=benchmarks/results/ablation
export RAY_AUTH_MODE=disabled TQDM_DISABLE=1 PYTHONPATH=$PWD
base=(experiment --config benchmarks/ablation/regime.yaml --run-root "$ROOT" --seed 0 --seed 1 --seed 2)
# phase 1, the headline: the paper recipe and the Bag-of-Tricks recipe, each with and without SLSR
head=(--strategy none --strategy slsr --variant 'bot:train.recipe=bot')
# phase 2: every strategy, the noise layer off, and the K / lambda / generated-count curves (seed 0)
full=(
  --strategy none --strategy lsr --strategy lsro --strategy all_in_one --strategy pseudo --strategy slsr
  --variant 'bot:train.recipe=bot'
  --variant 'nonoise@slsr:train.model.noise_layer=false'
  --k 2 --k 3 --k 4 --lambda 0.5 --lambda 1.0 --generated 0 --generated 0.5 --generated 1 --generated 2
  --curve-seed 0
)
# phase 3 adds the membership-rule variant (it retrains the GANs: new cluster stage) to the same tables
more=(--variant 'rule_any@slsr:cluster.rule=any')
run() {  # a local Ray start can time out on an overloaded machine: retry (finished points are kept)
  for attempt in 1 2 3 4 5; do
    "$PY" -m slsr_ray.cli "$@" && return 0
    echo "[run.sh] attempt $attempt failed; retrying in 30 s"; sleep 30
  done
  return 1
}
copy() { mkdir -p "$OUT" && cp "$ROOT"/experiment/results.{json,md} "$ROOT"/experiment/*.png "$OUT"/; }
run "${base[@]}" "${head[@]}" "$@" && copy
run "${base[@]}" "${full[@]}" "$@" && copy
run "${base[@]}" "${full[@]}" "${more[@]}" "$@" && copy
