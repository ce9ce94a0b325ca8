"""PNG figures for reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.io import read_jsonl  # noqa: E402


def training_curves(logs: dict[str, Path], path: str | Path, key: str = "loss") -> Path:
    """Loss against step for each run's log.jsonl."""
    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3), squeeze=False)
    for ax, (name, log) in zip(axes[0], logs.items()):
        recs = [r for r in read_jsonl(log) if "step" in r and key in r]
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


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats on both: cheaper-or-equal and at least as accurate."""
    front, best = [], -1.0
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def robust_vs_latency(points: list[dict], path: str | Path, chance: float | None = 0.1) -> Path:
    """Robust accuracy against milliseconds per image: a colour per classifier, a marker per defense, and each
    classifier's Pareto front.

    `points`: dicts with classifier, defense, ms (per image), accuracy (0-1) and optionally weaker (attacked more
    weakly than the others: drawn hollow and left off the front)."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4.2))
    classifiers = list(dict.fromkeys(p["classifier"] for p in points))
    defenses = list(dict.fromkeys(p["defense"] for p in points))
    markers = dict(zip(defenses, "osv^DPX*<>ph"))
    for i, clf in enumerate(classifiers):
        pts = [p for p in points if p["classifier"] == clf]
        for p in pts:
            hollow = p.get("weaker", False)  # attacked more weakly than the others: an upper bound
            ax.scatter(p["ms"], 100 * p["accuracy"], marker=markers.get(p["defense"], "o"), zorder=3,
                       facecolors="none" if hollow else f"C{i}", edgecolors=f"C{i}")
        front = pareto_front([(p["ms"], p["accuracy"]) for p in pts if not p.get("weaker", False)])
        ax.step([c for c, _ in front], [100 * a for _, a in front], where="post", color=f"C{i}", lw=1, alpha=0.6)
    if chance:
        ax.axhline(100 * chance, color="grey", ls=":", lw=1)
    ax.set_xscale("log"), ax.set_xlabel("ms per image (defense + classifier)")
    ax.set_ylabel("robust accuracy (%), all attacks"), ax.set_ylim(-2, 100)
    first = ax.legend(handles=[Line2D([], [], color=f"C{i}", lw=2, label=c) for i, c in enumerate(classifiers)],
                      fontsize=7, title="classifier (line: Pareto front)", title_fontsize=7, loc="upper left")
    ax.add_artist(first)
    handles = [Line2D([], [], color="k", marker=m, ls="", label=d) for d, m in markers.items()]
    if any(p.get("weaker", False) for p in points):
        handles.append(Line2D([], [], color="k", marker="o", ls="", markerfacecolor="none",
                              label="hollow: weaker attack"))
    ax.legend(handles=handles,
              fontsize=7, title="defense", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
