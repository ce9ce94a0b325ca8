"""Training of purifiers: the DiffPure teacher's score network (students come with distillation)."""

from .teacher import TeacherConfig, train_teacher

__all__ = ["TeacherConfig", "train_teacher"]
