"""Evaluation: the engine (`attacks/`, `harness/`, `stats.py`) and the commands built on it (`robustness/`,
`certify/`, `bench/`, `quickstart/`).

`import eval` loads the harness only; `eval.quickstart` (both training tracks, matplotlib) loads on first use."""

import importlib.abc
import sys

from purify.onnx import load_onnx_purifier

from .attacks import ATTACKS, BPDA, EOTPGD, AttackSpec, build_attack, preset_eps, register_attack
from .defended import Defended
from .harness import Budget, evaluate

onnx_purifier = load_onnx_purifier  # an exported student under ONNX Runtime, used like a purifier

__all__ = ["ATTACKS", "BPDA", "AttackSpec", "Budget", "Defended", "EOTPGD", "build_attack", "evaluate", "onnx_purifier",
           "preset_eps", "quickstart", "register_attack"]

# modules of the flat layout, and where their names live now
MOVED = {"eval.accuracy": "eval.bench.accuracy (purify_batches: core.metrics)", "eval.binomial": "eval.stats",
         "eval.budget": "eval.harness.budget", "eval.certify_report": "eval.certify.report",
         "eval.checks": "eval.harness.checks (flips, sign_test: eval.stats)", "eval.compare": "eval.bench.fidelity",
         "eval.convergence": "eval.robustness.ladder (paired_change: eval.stats)",
         "eval.escalate": "eval.robustness.escalate", "eval.latency": "eval.bench.latency",
         "eval.matched": "eval.robustness.matched (pm: eval.stats)", "eval.memory": "eval.harness.memory",
         "eval.scores": "eval.robustness.scores", "eval.smoothed_attack": "eval.certify.attack"}


class _Moved(importlib.abc.MetaPathFinder):
    """An import of a module of the flat layout fails with a sentence naming its new place."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            raise ModuleNotFoundError(f"{name} moved to {MOVED[name]} (eval is now arranged by idea: docs/methods.md"
                                      "#layout)", name=name)
        return None


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.insert(0, _Moved())


def __getattr__(name):
    if name == "quickstart":
        from .quickstart import quickstart

        return quickstart
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
