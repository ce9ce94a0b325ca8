"""python -m eval quickstart [--fast] [--out DIR]
python -m eval accuracy --purifier DIR --classifier DIR [--n N]
python -m eval pgd-eot --purifier DIR --classifier DIR [--eps 0.1 --steps 40 --eot 4 --n 128]
python -m eval compare --teacher DIR --student DIR [--student DIR ...] --classifier DIR [--out DIR]"""

import argparse

from core.cli import run_or_exit

from .quickstart import quickstart


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="the main job on the embedded digits: train, purify, report")
    q.add_argument("--fast", action="store_true", help="tiny budgets (about 3 minutes): a smoke run, not results")
    q.add_argument("--out", default=None, help="run folder (default runs/quickstart, or runs/quickstart-fast)")
    a = sub.add_parser("accuracy", help="clean accuracy bare and through a purifier, and seconds per batch")
    a.add_argument("--purifier", required=True)
    a.add_argument("--classifier", required=True)
    a.add_argument("--dataset", default="digits")
    a.add_argument("--data-root", default=None)
    a.add_argument("--n", type=int, default=None, help="test examples (default: all)")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare", help="students against their teacher: PSNR, accuracy, seconds per batch")
    c.add_argument("--teacher", required=True)
    c.add_argument("--student", action="append", default=[], help="a student purifier folder (repeatable)")
    c.add_argument("--classifier", required=True)
    c.add_argument("--dataset", default="digits")
    c.add_argument("--data-root", default=None)
    c.add_argument("--n", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="folder for compare.json and compare.md")
    c.add_argument("--baseline-steps", type=int, nargs="*", default=[1, 2, 4],
                   help="also time the teacher's own UNet as a K-step DDIM sampler (undistilled baselines)")
    e = sub.add_parser("pgd-eot", help="adaptive PGD-EOT with full gradients through the purifier")
    e.add_argument("--purifier", required=True)
    e.add_argument("--classifier", required=True)
    e.add_argument("--dataset", default="digits")
    e.add_argument("--data-root", default=None)
    e.add_argument("--n", type=int, default=128)
    e.add_argument("--eps", type=float, default=0.1)
    e.add_argument("--steps", type=int, default=40)
    e.add_argument("--eot", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "pgd-eot":
        import json

        from .pgd_eot import evaluate_pgd_eot

        print(json.dumps(run_or_exit(evaluate_pgd_eot, args.purifier, args.classifier, args.dataset, args.n,
                                     args.eps, args.steps, args.eot, args.seed, args.data_root), indent=2))
    if args.command == "compare":
        from .compare import compare, render

        result = run_or_exit(compare, args.teacher, args.student, args.classifier, args.dataset, args.n,
                             args.batch_size, args.seed, args.out, args.data_root, tuple(args.baseline_steps))
        print(render(result["rows"], result["examples"], args.batch_size))
    if args.command == "accuracy":
        import json

        from .accuracy import purified_accuracy

        r = run_or_exit(purified_accuracy, args.purifier, args.classifier, args.dataset, args.n,
                        args.batch_size, args.seed, args.data_root)
        print(json.dumps(r, indent=2))
    if args.command == "quickstart":
        out = args.out or ("runs/quickstart-fast" if args.fast else "runs/quickstart")
        run_or_exit(quickstart, out, fast=args.fast)
        print(f"report written to {out}/report.md")


if __name__ == "__main__":
    main()
