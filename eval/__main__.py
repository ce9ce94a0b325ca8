"""python -m eval quickstart [--fast | --smoke] [--out DIR] [--config FILE] [key=value ...]
python -m eval accuracy --purifier DIR --classifier DIR [--n N]
python -m eval compare --teacher DIR --student DIR [--student DIR ...] --classifier DIR [--out DIR]
python -m eval robustness --config configs/digits/eval.yaml --out DIR [key=value ...]
python -m eval certify --config configs/digits/certify.yaml --out DIR [key=value ...]
python -m eval latency --purifier A [--purifier B ...] [--classifier C] [--onnx FILE ...] --batch-size 1 --out DIR
python -m eval export --purifier DIR [--classifier DIR] --out FILE.onnx [--opset N] [--batch dynamic|N]"""

import argparse
import json

from core.cli import add_run_args, resolve, run_or_exit


def _test_data_args(p: argparse.ArgumentParser, n: int | None, purifier: bool = True) -> argparse.ArgumentParser:
    """The arguments every evaluation on a test split shares."""
    if purifier:
        p.add_argument("--purifier", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=n, help=f"test examples (default: {n or 'all'})")
    p.add_argument("--seed", type=int, default=0)
    return p


def parser() -> argparse.ArgumentParser:
    """Every subcommand and its arguments."""
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="the main job: both tracks, every classifier x purifier, latency, report")
    q.add_argument("--fast", action="store_true", help="tiny budgets (about 3 minutes): a smoke run, not results")
    q.add_argument("--smoke", action="store_true", help="every stage of --config once at full model size, a few "
                   "steps and images: checks a (paper-scale) config end to end before a long run; not results")
    q.add_argument("--out", default=None, help="run folder (default runs/quickstart, or -fast / -smoke)")
    q.add_argument("--config", default=None, help="YAML with any QuickstartConfig keys, over the default budget")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. teacher.train_steps=1200 harness.n=128")
    a = _test_data_args(sub.add_parser("accuracy", help="clean accuracy bare and through a purifier, and s/batch"), None)
    a.add_argument("--batch-size", type=int, default=64)
    c = _test_data_args(sub.add_parser("compare", help="students against their teacher: PSNR, accuracy, s/batch"),
                        None, purifier=False)
    c.add_argument("--teacher", required=True)
    c.add_argument("--student", action="append", default=[], help="a student purifier folder (repeatable)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--out", default=None, help="folder for compare.json and compare.md")
    c.add_argument("--baseline-steps", type=int, nargs="*", default=[1, 2, 4],
                   help="also time the teacher's own UNet as a K-step DDIM sampler (undistilled baselines)")
    add_run_args(sub.add_parser("robustness", help="the attack harness: defenses x attacks, R evaluations, checks"),
                 "configs/digits/eval.yaml")
    add_run_args(sub.add_parser("certify", help="randomized smoothing: certified L2 accuracy of classifier(purifier)"),
                 "configs/digits/certify.yaml")
    lat = sub.add_parser("latency", help="seconds per batch of each purifier, alone and with the classifier")
    lat.add_argument("--purifier", action="append", required=True, help="a purifier folder (repeatable)")
    lat.add_argument("--classifier", default=None, help="also time purifier + this classifier")
    lat.add_argument("--batch-size", type=int, action="append", default=None, help="repeatable (default 1 and 64)")
    lat.add_argument("--out", default=None, help="folder for latency.json and latency.md")
    lat.add_argument("--warmup", type=int, default=2)
    lat.add_argument("--repeats", type=int, default=10)
    lat.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    lat.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="also time under autocast")
    lat.add_argument("--channels-last", action="store_true",
                     help="also time with channels_last tensors and models (on the CPU the UNets always are)")
    lat.add_argument("--compile", action="store_true", help="also time a torch.compile'd module")
    lat.add_argument("--gradient-eot", type=int, default=0, metavar="EOT",
                     help="also time one PGD-EOT gradient at this EOT (needs --classifier): the attack's step cost")
    lat.add_argument("--onnx", action="append", default=[], help="also time an exported file with ONNX Runtime "
                     "(repeatable; exported with the classifier when --classifier is given)")
    ex = sub.add_parser("export", help="a purifier (and its classifier) as ONNX, noise as explicit inputs")
    ex.add_argument("--purifier", required=True, help="a purifier folder (a student of at most 8 steps)")
    ex.add_argument("--classifier", default=None, help="append this classifier: the graph returns logits")
    ex.add_argument("--out", required=True, help="the .onnx file (a .onnx.json description is written beside it)")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    if args.command == "quickstart":
        out = args.out or ("runs/quickstart-smoke" if args.smoke else "runs/quickstart-fast" if args.fast
                           else "runs/quickstart")
        from .quickstart import quickstart, quickstart_config

        cfg = run_or_exit(quickstart_config, args.fast, args.config, args.overrides, smoke=args.smoke)
        run_or_exit(quickstart, out, fast=args.fast or args.smoke, cfg=cfg)
        print(f"report written to {out}/report.md")
    elif args.command == "accuracy":
        from .bench.accuracy import purified_accuracy

        print(json.dumps(run_or_exit(purified_accuracy, args.purifier, args.classifier, args.dataset, args.n,
                                     args.batch_size, args.seed, args.data_root), indent=2))
    elif args.command == "compare":
        from .bench.fidelity import compare, render

        result = run_or_exit(compare, args.teacher, args.student, args.classifier, args.dataset, args.n,
                             args.batch_size, args.seed, args.out, args.data_root, tuple(args.baseline_steps))
        print(render(result["rows"], result["examples"], args.batch_size))
    elif args.command == "robustness":
        from .robustness import EvalConfig, run_robustness

        cfg = resolve(EvalConfig, args)
        run_or_exit(run_robustness, cfg, args.out)
        print(f"report written to {args.out}/report.md")
    elif args.command == "certify":
        from .certify import CertifyConfig, run_certify

        cfg = resolve(CertifyConfig, args)
        run_or_exit(run_certify, cfg, args.out)
        print(f"report written to {args.out}/report.md")
    elif args.command == "latency":
        from .bench.latency import run_latency

        run_or_exit(run_latency, args.purifier, args.classifier, args.batch_size or [1, 64], args.out,
                    warmup=args.warmup, repeats=args.repeats, device=args.device, autocast=args.autocast,
                    channels_last=args.channels_last, compile=args.compile, onnx=args.onnx,
                    gradient_eot=args.gradient_eot)
    elif args.command == "export":
        print(json.dumps(run_or_exit(_export, args), indent=2))


def _export(args) -> dict:
    from core.checkpoint import load_classifier
    from purify import load_purifier
    from purify.onnx import export_onnx

    batch = args.batch if args.batch == "dynamic" else int(args.batch) if args.batch.isdigit() else args.batch
    purifier = load_purifier(args.purifier)
    classifier = load_classifier(args.classifier) if args.classifier else None
    return export_onnx(purifier, args.out, classifier=classifier, opset=args.opset, batch=batch)


if __name__ == "__main__":
    main()
