"""Training of purifiers: the DiffPure teacher, and progressive / consistency distillation into students."""

from .consistency import ConsistencyConfig, train_consistency
from .progressive import ProgressiveConfig, progressive_target, train_progressive
from .teacher import TeacherConfig, train_teacher

__all__ = ["ConsistencyConfig", "ProgressiveConfig", "TeacherConfig", "progressive_target", "train_consistency",
           "train_progressive", "train_teacher"]
