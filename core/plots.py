"""The one figure every track draws: a grid of image batches (matplotlib, headless)."""

from __future__ import annotations

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
