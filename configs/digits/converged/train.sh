#!/bin/bash
# The students of configs/digits/converged/: plain and adaptive-input consistency distillation of the quickstart's
# teacher (configs/digits/ablation/{plain,adaptive}.yaml), seeds 0, 1 and 2; skips a student already trained.
set -e
T=${TEACHER:-runs/quickstart/teacher/purifier}
for seed in 0 1 2; do
  for v in adaptive plain; do
    out=runs/converged/$v-s$seed
    [ -f "$out/students/steps-1/purifier.json" ] && continue
    python -m distill consistency --config configs/digits/ablation/$v.yaml --teacher "$T" --out "$out" seed=$seed
  done
done
