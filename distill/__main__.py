"""python -m distill teacher --config configs/digits/teacher.yaml --out DIR [--resume] [key=value ...]"""

import argparse

from core.cli import add_run_args, resolve, run_or_exit

from .teacher import TeacherConfig, train_teacher


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("teacher", help="train a DiffPure teacher (DDPM objective) and save it as a purifier"))
    args = p.parse_args(argv)
    if args.command == "teacher":
        folder = run_or_exit(train_teacher, resolve(TeacherConfig, args), args.out, resume=args.resume)
        print(f"teacher purifier written to {folder}")


if __name__ == "__main__":
    main()
