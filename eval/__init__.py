"""Evaluation: the quickstart report (the attack harness and latency benchmark build on it)."""

from .quickstart import quickstart

__all__ = ["quickstart"]
