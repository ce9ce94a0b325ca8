"""The command-line shape every track shares: `--config FILE --out DIR [--resume] [key=value ...]`."""

from __future__ import annotations

import argparse
import atexit
import sys

from .config import ConfigError, load_config
from .errors import InputError


def add_run_args(p: argparse.ArgumentParser, default_config: str | None = None) -> argparse.ArgumentParser:
    p.add_argument("--config", default=default_config, help="YAML config (defaults: the dataclass defaults)")
    p.add_argument("--out", required=True, help="run folder: config, log.jsonl, checkpoints, results")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train_steps=200")
    return p


def resolve(cls, args):
    """Load the config or exit with one clear line (unknown key, bad value, missing file)."""
    try:
        return load_config(cls, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def _close_process_group():
    # Under `accelerate launch`, a process that exits with its gloo group still open can abort in the group's
    # threads ("terminate called without an active exception") after its work is done: close it first.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_close_process_group)


def run_or_exit(fn, *a, **kw):
    """Run a command; errors a user can fix (bad config or input, missing or clashing files) end with one line;
    anything else is a bug and keeps its traceback."""
    try:
        return fn(*a, **kw)
    except (InputError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
