#!/bin/bash
# The models of configs/cifar10/certify-cpu.yaml on 2 CPU cores (about 50 minutes; each skipped once trained), then
# the certificates: the CPU-sized classifier, the same trained with Gaussian noise at sigma 0.1694, the CPU teacher
# (t_max 0.3) and its consistency and progressive students.
set -e
[ -d runs/c10/clf/classifier ] || \
  python -m robust_data squeeze --config configs/cifar10/squeeze-cpu.yaml --out runs/c10/clf
[ -d runs/c10/clf-noise/classifier ] || \
  python -m robust_data squeeze --config configs/cifar10/squeeze-cpu.yaml --out runs/c10/clf-noise noise_sd=0.1694
[ -d runs/c10/teacher/purifier ] || \
  python -m distill teacher --config configs/cifar10/teacher-cpu.yaml --out runs/c10/teacher
[ -f runs/c10/cd/students/steps-1/purifier.json ] || \
  python -m distill consistency --config configs/cifar10/consistency-cpu.yaml --teacher runs/c10/teacher/purifier \
    --out runs/c10/cd
[ -f runs/c10/pd/students/steps-1/purifier.json ] || \
  python -m distill progressive --config configs/cifar10/progressive-cpu.yaml --teacher runs/c10/teacher/purifier \
    --out runs/c10/pd
python -m eval certify --config configs/cifar10/certify-cpu.yaml --out runs/c10/certify-cpu
