"""python -m robust_data squeeze --config configs/digits/squeeze.yaml --out DIR [--resume] [key=value ...]"""

import argparse

from core.cli import add_run_args, resolve, run_or_exit

from .squeeze import SqueezeConfig, train_squeeze


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m robust_data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("squeeze", help="train the squeezed classifier (SRe2L stage 1)"))
    args = p.parse_args(argv)
    if args.command == "squeeze":
        folder = run_or_exit(train_squeeze, resolve(SqueezeConfig, args), args.out, resume=args.resume)
        print(f"classifier written to {folder}")


if __name__ == "__main__":
    main()
