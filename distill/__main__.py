"""python -m distill teacher     --config configs/digits/teacher.yaml     --out DIR [--resume] [key=value ...]
python -m distill progressive --config configs/digits/progressive.yaml --teacher TEACHER_DIR --out DIR [...]
python -m distill consistency --config configs/digits/consistency.yaml --teacher TEACHER_DIR --out DIR [...]"""

import argparse

from core.cli import add_run_args, resolve, run_or_exit

from .consistency import ConsistencyConfig, train_consistency
from .progressive import ProgressiveConfig, train_progressive
from .teacher import TeacherConfig, train_teacher


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("teacher", help="train a DiffPure teacher (DDPM objective) and save it as a purifier"))
    for name, what in (("progressive", "progressive distillation into 2^k-step DDIM students"),
                       ("consistency", "consistency distillation into 1-, 2-, 4-step students")):
        sp = add_run_args(sub.add_parser(name, help=what))
        sp.add_argument("--teacher", required=True, help="the teacher purifier folder (e.g. RUN/purifier)")
    args = p.parse_args(argv)
    if args.command == "teacher":
        folder = run_or_exit(train_teacher, resolve(TeacherConfig, args), args.out, resume=args.resume)
        print(f"teacher purifier written to {folder}")
    else:
        cls, fn = {"progressive": (ProgressiveConfig, train_progressive),
                   "consistency": (ConsistencyConfig, train_consistency)}[args.command]
        folders = run_or_exit(fn, resolve(cls, args), args.teacher, args.out, resume=args.resume)
        print("students written to " + ", ".join(str(f) for f in folders))


if __name__ == "__main__":
    main()
