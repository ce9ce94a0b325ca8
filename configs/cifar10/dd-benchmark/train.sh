#!/usr/bin/env bash
# The benchmark table (docs/results.md): each distilled set of data.sh trained on the benchmarks' evaluation model
# and schedule (train.yaml), then attacked (eval.yaml at 8/255 with BEARD's scores; DD-RobustBench's FGSM / PGD /
# CW-loss PGD at 2/255 and 4/255). SETS picks the sets (default: every ipc 1 and 10 set); EPOCHS overrides 1000.
set -euo pipefail
OUT=${OUT:-runs/ddb}
SETS=${SETS:-"sre2l-ce-ipc1 sre2l-guard-ipc1 sre2l-gradnorm-ipc1 dc-ce-ipc1 sre2l-ce-ipc10 sre2l-guard-ipc10 sre2l-gradnorm-ipc10 dc-ce-ipc10 dc-guard-ipc10"}
for set in $SETS; do
  case $set in dc-*) data=$OUT/$set/condense/distilled ;; *) data=$OUT/$set/recover/distilled ;; esac
  python -m robust_data train --config configs/cifar10/dd-benchmark/train.yaml --out $OUT/train/$set \
    distilled=$data ${EPOCHS:+epochs=$EPOCHS}
  python -m eval robustness --config configs/cifar10/dd-benchmark/eval.yaml --out $OUT/eval/$set-8 \
    classifier=$OUT/train/$set/classifier
  for eps in 0.00784 0.01569; do
    python -m eval robustness --config configs/cifar10/dd-benchmark/eval.yaml --out $OUT/eval/$set-$eps \
      classifier=$OUT/train/$set/classifier eps=$eps "budget.attacks=[fgsm,pgd,cw]" "scores=[]"
  done
done
