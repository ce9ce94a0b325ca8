"""python -m robust_data squeeze|recover|relabel|train|pipeline --config FILE --out DIR [key=value ...]

  squeeze   train the squeezed classifier (SRe2L stage 1; objective ce, guard, guard-loss, gradnorm, adversarial)
  recover   synthesize ipc images per class from the squeezed classifier (stage 2)
  condense  DC: learn ipc images per class by gradient matching (instead of squeeze + recover)
  relabel   FKD soft labels: stored crops and the squeezed classifier's fp16 logits (stage 3)
  train     a classifier from scratch on the distilled images and soft labels (stage 4)
  pipeline  all four, each reused when unchanged and resumed when interrupted
  cost      seconds per squeeze step and peak memory of each objective, as ratios to ce"""

import argparse

from core.cli import add_run_args, resolve, run_or_exit


def main(argv=None):
    from .pipeline import PipelineConfig, pipeline
    from .recover import RecoverConfig, recover
    from .relabel import RelabelConfig, relabel
    from .squeeze import SqueezeConfig, train_squeeze
    from .train import TrainConfig, train_distilled

    p = argparse.ArgumentParser(prog="python -m robust_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("squeeze", "train the squeezed classifier (SRe2L stage 1)"),
                        ("recover", "synthesize the distilled images (stage 2)"),
                        ("condense", "DC: learn the distilled images by gradient matching"),
                        ("relabel", "FKD soft labels for the distilled images (stage 3)"),
                        ("train", "train a classifier on the distilled data (stage 4)"),
                        ("pipeline", "squeeze, recover, relabel and train in one run folder")]:
        add_run_args(sub.add_parser(name, help=help_))
    c = sub.add_parser("cost", help="seconds per squeeze step of each objective, side by side")
    c.add_argument("--config", default="configs/digits/squeeze.yaml", help="a squeeze config (model, batch)")
    c.add_argument("--objectives", nargs="+", default=["ce", "guard", "gradnorm", "adversarial"])
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--out", default=None, help="folder for cost.json and cost.md")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.command == "squeeze":
        folder = run_or_exit(train_squeeze, resolve(SqueezeConfig, args), args.out, resume=args.resume)
        print(f"classifier written to {folder}")
    elif args.command == "recover":
        print(f"distilled data written to {run_or_exit(recover, resolve(RecoverConfig, args), args.out)}")
    elif args.command == "condense":
        from .condense import CondenseConfig, condense

        print(f"condensed data written to {run_or_exit(condense, resolve(CondenseConfig, args), args.out)}")
    elif args.command == "relabel":
        print(f"soft labels written to {run_or_exit(relabel, resolve(RelabelConfig, args), args.out)}")
    elif args.command == "train":
        folder = run_or_exit(train_distilled, resolve(TrainConfig, args), args.out, resume=args.resume)
        print(f"classifier written to {folder}")
    elif args.command == "cost":
        from .cost import run_cost

        run_or_exit(run_cost, resolve(SqueezeConfig, args), tuple(args.objectives), args.steps, args.out)
    else:
        r = run_or_exit(pipeline, resolve(PipelineConfig, args), args.out)
        print(f"classifier trained on {r.get('method', 'sre2l')} {r['objective']} distilled data: {r['classifier']} "
              f"(test accuracy {r['test_accuracy']:.4f}); summary in {args.out}/pipeline.json")


if __name__ == "__main__":
    main()
