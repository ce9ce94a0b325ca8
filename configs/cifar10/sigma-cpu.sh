#!/bin/bash
# The models of configs/cifar10/certify-cpu-sigma.yaml on 2 CPU cores (about 45 minutes; each skipped once trained):
# the CPU-sized classifier trained with Gaussian noise at sigma 0.25 and 0.5, and consistency and progressive students
# of the CPU teacher (t_max 0.3) distilled for the t_star whose noise is that sigma ([0, 1] pixels; alpha_bar(t_star) =
# 1 / (1 + 4 sigma^2) on the teacher's own schedule: eval.certify.t_star_for_sigma). The certificates: the command in
# configs/cifar10/certify-cpu-sigma.yaml.
set -e
[ -d runs/c10/teacher/purifier ] || \
  python -m distill teacher --config configs/cifar10/teacher-cpu.yaml --out runs/c10/teacher
t_star() {  # the t_star whose noise is sigma $1 on the teacher's schedule
  python -c "import sys; from eval.certify import t_star_for_sigma; from purify import load_purifier
print(t_star_for_sigma(load_purifier(sys.argv[1]).schedule, float(sys.argv[2])))" runs/c10/teacher/purifier "$1"
}
for sigma in 0.25 0.5; do
  [ -d "runs/c10/clf-noise-$sigma/classifier" ] || python -m robust_data squeeze \
    --config configs/cifar10/squeeze-cpu.yaml --out "runs/c10/clf-noise-$sigma" noise_sd=$sigma
  [ -f "runs/c10/cd-$sigma/students/steps-1/purifier.json" ] || python -m distill consistency \
    --config configs/cifar10/consistency-cpu.yaml --teacher runs/c10/teacher/purifier --out "runs/c10/cd-$sigma" \
    t_star=$(t_star $sigma)
  [ -f "runs/c10/pd-$sigma/students/steps-1/purifier.json" ] || python -m distill progressive \
    --config configs/cifar10/progressive-cpu.yaml --teacher runs/c10/teacher/purifier --out "runs/c10/pd-$sigma" \
    t_star=$(t_star $sigma)
done
