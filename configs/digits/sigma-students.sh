#!/bin/bash
# The 1-step students of configs/digits/certify-sigma.yaml: progressive and consistency distillation of the quickstart's
# teacher at the main job's budgets, for the t_star whose noise is sigma 0.25 and 0.5 in [0, 1] pixels
# (alpha_bar(t_star) = 1 / (1 + 4 sigma^2) on the teacher's own schedule: eval.certify.t_star_for_sigma); skips one
# trained.
set -e
T=${TEACHER:-runs/quickstart/teacher/purifier}
t_star() {  # the t_star whose noise is sigma $1 on the teacher's schedule
  python -c "import sys; from eval.certify import t_star_for_sigma; from purify import load_purifier
print(t_star_for_sigma(load_purifier(sys.argv[1]).schedule, float(sys.argv[2])))" "$T" "$1"
}
for sigma in 0.25 0.5; do
  out=runs/sigma-$sigma
  [ -f "$out/progressive/students/steps-1/purifier.json" ] || python -m distill progressive \
    --config configs/digits/progressive.yaml --teacher "$T" --out "$out/progressive" \
    t_star=$(t_star $sigma) start_steps=8 steps_per_round=120 checkpoint_every=120
  [ -f "$out/consistency/students/steps-1/purifier.json" ] || python -m distill consistency \
    --config configs/digits/consistency.yaml --teacher "$T" --out "$out/consistency" \
    t_star=$(t_star $sigma) train_steps=320 checkpoint_every=160
done
