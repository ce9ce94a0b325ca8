"""Evaluation: the attack harness, the latency benchmark and the quickstart report.

`import eval` loads the harness only; `eval.quickstart` (both training tracks, matplotlib) loads on first use."""

from purify.onnx import load_onnx_purifier

from .attacks import ATTACKS, BPDA, EOTPGD, AttackSpec, build_attack, preset_eps, register_attack
from .budget import Budget
from .defended import Defended
from .harness import evaluate

onnx_purifier = load_onnx_purifier  # an exported student under ONNX Runtime, used like a purifier

__all__ = ["ATTACKS", "BPDA", "AttackSpec", "Budget", "Defended", "EOTPGD", "build_attack", "evaluate", "onnx_purifier", "preset_eps",
           "quickstart", "register_attack"]


def __getattr__(name):
    if name == "quickstart":
        from .quickstart import quickstart

        return quickstart
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
