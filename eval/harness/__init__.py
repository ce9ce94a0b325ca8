"""The engine every evaluation command runs on: `evaluate` (plan -> record loop -> report), the `Budget` it attacks
with, the gradient-masking flags (`checks.py`), the memory estimate behind "auto" checkpointing (`memory.py`) and
the sharded, resumable record loop (`records.py`) that certification shares."""

from .budget import Budget, with_changes
from .evaluate import check_batch, evaluate, item_seed, purifier_of

__all__ = ["Budget", "check_batch", "evaluate", "item_seed", "purifier_of", "with_changes"]
