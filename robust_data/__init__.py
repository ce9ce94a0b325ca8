"""Dataset distillation (SRe2L squeeze / recover / relabel); for now the squeeze stage."""

from .objectives import OBJECTIVES, get_objective
from .squeeze import SqueezeConfig, accuracy, train_squeeze

__all__ = ["OBJECTIVES", "SqueezeConfig", "accuracy", "get_objective", "train_squeeze"]
