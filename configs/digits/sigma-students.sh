#!/bin/bash
# The 1-step students of configs/digits/certify-sigma.yaml: progressive and consistency distillation of the quickstart's
# teacher at the main job's budgets, for the t_star whose noise is sigma 0.25 and 0.5 in [0, 1] pixels
# (alpha_bar(t_star) = 1 / (1 + 4 sigma^2) on the linear schedule: eval.certify.t_star_for_sigma); skips one trained.
set -e
T=${TEACHER:-runs/quickstart/teacher/purifier}
for pair in 0.25:0.14515304559393655 0.5:0.25909277851956947; do
  sigma=${pair%%:*}; t_star=${pair#*:}
  out=runs/sigma-$sigma
  [ -f "$out/progressive/students/steps-1/purifier.json" ] || python -m distill progressive \
    --config configs/digits/progressive.yaml --teacher "$T" --out "$out/progressive" \
    t_star=$t_star start_steps=8 steps_per_round=120 checkpoint_every=120
  [ -f "$out/consistency/students/steps-1/purifier.json" ] || python -m distill consistency \
    --config configs/digits/consistency.yaml --teacher "$T" --out "$out/consistency" \
    t_star=$t_star train_steps=320 checkpoint_every=160
done
