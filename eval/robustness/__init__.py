"""`python -m eval robustness`, the command built on the harness: its config (`config.py`), the run over every
defense (`run.py`), the convergence ladder (`ladder.py`), the escalation of rows above a reference
(`escalate.py`), the like-for-like comparison (`matched.py`), the benchmarks' scores (`scores.py`) and the
report (`report.py`)."""

from .config import EvalConfig, check, defenses
from .report import render
from .run import run_robustness

__all__ = ["EvalConfig", "check", "defenses", "render", "run_robustness"]
