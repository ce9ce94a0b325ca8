#!/usr/bin/env bash
# BEARD's budgets brought to pixels (docs/methods.md): its "8/255" on normalised inputs is about 8/255 x 0.2 = 0.00627
# in pixels, its PGD-L2 "128/255" about 0.1; the same six attacks and scores as eval.yaml, so that RR, CREI and
# I-RR sit nearer BEARD's scale. Run after train.sh, on the same classifiers.
set -euo pipefail
OUT=${OUT:-runs/ddb}
SETS=${SETS:-"sre2l-ce-ipc1 sre2l-guard-ipc1 sre2l-gradnorm-ipc1 dc-ce-ipc1 sre2l-ce-ipc10 sre2l-guard-ipc10 sre2l-gradnorm-ipc10 dc-ce-ipc10 dc-guard-ipc10"}
for set in $SETS; do
  python -m eval robustness --config configs/cifar10/dd-benchmark/eval.yaml --out $OUT/eval/$set-beard \
    classifier=$OUT/train/$set/classifier eps=0.00627 "budget.attack_eps={pgd-l2: 0.1}" \
    "budget.attacks=[fgsm,pgd,pgd-l2,deepfool,cw-l2,autoattack]"
done
