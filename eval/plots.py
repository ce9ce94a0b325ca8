"""PNG figures for reports (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def image_grid(rows: dict[str, torch.Tensor], path: str | Path, labels: list[str] | None = None) -> Path:
    """One row per named batch of [0, 1] NCHW images (e.g. clean / adversarial / purified)."""
    n = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.2 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if labels and r == 0:
                ax.set_title(labels[c], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


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

