"""PNG figures for reports (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(logs: dict[str, Path], path: str | Path, key: str = "loss") -> Path:
    """Loss against step for each run's log.jsonl."""
    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3), squeeze=False)
    for ax, (name, log) in zip(axes[0], logs.items()):
        recs = [json.loads(line) for line in Path(log).read_text().splitlines()] if Path(log).is_file() else []
        ax.plot([r["step"] for r in recs], [r[key] for r in recs])
        ax.set_title(name, fontsize=9), ax.set_xlabel("step"), ax.set_ylabel(key)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def robust_vs_eps(curves: dict[str, list[tuple[float, float]]], path: str | Path, chance: float | None = 0.1) -> Path:
    """Robust accuracy against epsilon, one line per defense."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in curves.items():
        ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o", label=name)
    if chance:
        ax.axhline(100 * chance, color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("epsilon"), ax.set_ylabel("robust accuracy (%)"), ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

