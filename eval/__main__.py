"""python -m eval quickstart [--fast] [--out DIR]"""

import argparse

from core.cli import run_or_exit

from .quickstart import quickstart


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="the main job on the embedded digits: train, purify, report")
    q.add_argument("--fast", action="store_true", help="tiny budgets (about 3 minutes): a smoke run, not results")
    q.add_argument("--out", default=None, help="run folder (default runs/quickstart, or runs/quickstart-fast)")
    args = p.parse_args(argv)
    if args.command == "quickstart":
        out = args.out or ("runs/quickstart-fast" if args.fast else "runs/quickstart")
        run_or_exit(quickstart, out, fast=args.fast)
        print(f"report written to {out}/report.md")


if __name__ == "__main__":
    main()
