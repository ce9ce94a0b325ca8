"""`python -m robust_data cost`: seconds per squeeze step and peak memory of each objective, side by side,
as ratios to plain cross-entropy (GUARD's claim: about one extra forward and backward pass per step)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from core.config import replace
from core.datasets import load_dataset, to_tensors
from core.io import atomic_write_json, atomic_write_text
from core.models import build_classifier, classifier_config_for

from .objectives import get_objective
from .squeeze import SqueezeConfig


def step_cost(cfg: SqueezeConfig, objectives=("ce", "guard", "gradnorm", "adversarial"), steps: int = 10,
              warmup: int = 2, device: str | None = None) -> list[dict]:
    """Time `steps` optimizer steps per objective on the same batch, interleaving the objectives round by
    round so that drifts in machine speed fall on all of them alike."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, info = load_dataset(cfg.dataset, "train", root=cfg.data_root, image_size=cfg.image_size)
    x, y = to_tensors(train, cfg.batch_size, seed=cfg.seed)
    x, y = x.to(device), y.to(device)
    mcfg = classifier_config_for(info, cfg.arch, width=cfg.width, depth=cfg.depth)
    runs = {}
    for name in objectives:
        fn = get_objective(name, replace(cfg, {"objective": name}))
        torch.manual_seed(cfg.seed)
        model = build_classifier(mcfg).to(device).train()
        runs[name] = (fn, model, torch.optim.AdamW(model.parameters(), lr=cfg.lr))

    def one_step(name):
        fn, model, opt = runs[name]
        loss, _ = fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {name: [] for name in objectives}
    peaks = {name: None for name in objectives}
    for name in objectives:
        for _ in range(warmup):
            one_step(name)
    for _ in range(steps):
        for name in objectives:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            one_step(name)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peaks[name] = max(peaks[name] or 0, torch.cuda.max_memory_allocated(device) / 2**20)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[objectives[0]])
    base_peak = peaks[objectives[0]]
    return [{"objective": name, "median_s": statistics.median(times[name]),
             "ratio": statistics.median(times[name]) / base, "peak_memory_mb": peaks[name],
             "memory_ratio": peaks[name] / base_peak if base_peak else None, "batch_size": cfg.batch_size,
             "arch": cfg.arch, "dataset": cfg.dataset, "device": str(device)} for name in objectives]


def run_cost(cfg: SqueezeConfig, objectives, steps: int = 10, out: str | Path | None = None) -> list[dict]:
    """Measure, print the table, and write OUT/cost.json and OUT/cost.md when `out` is given."""
    rows = step_cost(cfg, objectives, steps)
    text = render(rows)
    print(text)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out) / "cost.json", rows, sort_keys=False)
        atomic_write_text(Path(out) / "cost.md", text + "\n")
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"squeeze step cost on {rows[0]['dataset']} ({rows[0]['arch']}, batch {rows[0]['batch_size']}, "
             f"{rows[0]['device']}); ratios to {rows[0]['objective']}", "",
             "| objective | s / step | ratio | peak MB | memory ratio |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a (CPU)" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
        lines.append(f"| {r['objective']} | {r['median_s']:.4f} | {r['ratio']:.2f}x | {peak} | {mem} |")
    return "\n".join(lines)
