"""Evaluation: the attack harness, the latency benchmark and the quickstart report."""

from .attacks import BPDA, EOTPGD, build_attack, preset_eps
from .defended import Defended
from .harness import evaluate
from .quickstart import quickstart

__all__ = ["BPDA", "Defended", "EOTPGD", "build_attack", "evaluate", "preset_eps", "quickstart"]
