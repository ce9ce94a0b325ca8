"""`python -m eval compare`: students against their teacher in one run (PSNR to the teacher's purification,
accuracy, seconds per batch), beside the undistilled K-step DDIM baselines of the teacher's own UNet."""

from __future__ import annotations

from pathlib import Path

import torch

from core.checkpoint import load_classifier
from core.datasets import load_dataset, to_tensors
from core.io import atomic_write_json, atomic_write_text
from core.metrics import accuracy, default_device, purify_batches
from purify import load_purifier


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) for [0, 1] images."""
    mse = (a - b).double().flatten(1).square().mean(1).clamp(min=1e-12)
    return (10 * torch.log10(1 / mse)).mean().item()


def compare(teacher: str, students: list[str], classifier: str, dataset: str = "digits", n: int | None = None,
            batch_size: int = 64, seed: int = 0, out: str | Path | None = None, data_root=None,
            baseline_steps: tuple[int, ...] = (1, 2, 4)) -> dict:
    """Rows for the teacher (SDE and ODE), each student, and the undistilled baseline (the teacher's own
    UNet in DDIM mode with K steps: what a student must beat), all fed the same noise at t_star."""
    device = default_device()
    clf = load_classifier(classifier, device)

    def load(folder, **overrides):
        return load_purifier(folder, **overrides).to(device)

    x, y = to_tensors(load_dataset(dataset, "test", root=data_root)[0], n)
    ref_sde, t_sde = purify_batches(load(teacher), x, batch_size, seed)
    ref_ode, _ = purify_batches(load(teacher, mode="ode"), x, batch_size, seed)
    rows = [{"purifier": "none", "nfe": 0, "accuracy": accuracy(clf, x, y, device=device)}]
    baselines = {f"teacher DDIM-{k} (undistilled)": k for k in baseline_steps}
    for name in [teacher + " (ode)", teacher, *baselines, *students]:
        if name == teacher:
            p, out_x, secs = load(teacher), ref_sde, t_sde
        else:
            p = (load(teacher, mode="ode") if name.endswith(" (ode)") else
                 load(teacher, mode="ode", steps=baselines[name]) if name in baselines else load(name))
            out_x, secs = purify_batches(p, x, batch_size, seed)
        rows.append({"purifier": name, "kind": p.kind, "mode": p.mode, "nfe": p.nfe,
                     "accuracy": accuracy(clf, out_x, y, device=device), "psnr_vs_teacher_sde": psnr(out_x, ref_sde),
                     "psnr_vs_teacher_ode": psnr(out_x, ref_ode), "seconds_per_batch": secs,
                     "speedup_vs_teacher": t_sde / secs})
    result = {"examples": len(y), "batch_size": batch_size, "seed": seed, "rows": rows}
    if out is not None:
        atomic_write_json(Path(out) / "compare.json", result)
        atomic_write_text(Path(out) / "compare.md", render(rows, len(y), batch_size))
    return result


def render(rows: list[dict], n: int, batch_size: int) -> str:
    lines = [f"{n} test images; seconds per batch of {batch_size} (median); PSNR in dB against the teacher's "
             "purification of the same images from the same noise at t_star.", "",
             "| purifier | kind | nfe | accuracy | PSNR vs teacher (sde) | PSNR vs teacher (ode) | s / batch | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["purifier"] == "none":
            lines.append(f"| none | - | 0 | {100 * r['accuracy']:.1f}% | - | - | - | - |")
            continue
        lines.append(f"| {r['purifier']} | {r['kind']}/{r['mode']} | {r['nfe']} | {100 * r['accuracy']:.1f}% | "
                     f"{r['psnr_vs_teacher_sde']:.1f} | {r['psnr_vs_teacher_ode']:.1f} | "
                     f"{r['seconds_per_batch']:.3f} | {r['speedup_vs_teacher']:.1f}x |")
    return "\n".join(lines) + "\n"
