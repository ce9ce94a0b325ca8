"""`python -m eval latency`: seconds per batch of each purifier, alone and with the classifier behind it.

Warm-up before timing, `torch.inference_mode`, CUDA events and synchronisation on GPU; each optional
speed-up (autocast, channels_last, torch.compile) is measured as its own row beside the plain one."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.checkpoint import load_classifier
from core.errors import InputError
from core.io import atomic_write_json, atomic_write_text
from purify import load_purifier

from ..attacks import EOTPGD
from ..defended import Defended
from ..harness.memory import checkpoint_share

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _timer(device: torch.device):
    """A function that times one call: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return timed


def _timing(times: list[float], peak) -> dict:
    """Median and p90 of sorted call times, with the peak memory."""
    return {"median_s": statistics.median(times), "p90_s": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
            "peak_memory_mb": peak}


def time_module(module, x: torch.Tensor, warmup: int = 2, repeats: int = 10, autocast: str | None = None) -> dict:
    """Median and p90 seconds per call of `module(x)` after `warmup` calls; peak CUDA memory."""
    device = x.device
    timed = _timer(device)
    amp = (torch.autocast(device.type, dtype=AUTOCAST[autocast]) if autocast else contextlib.nullcontext())
    with torch.inference_mode(), amp:
        for _ in range(warmup):
            module(x)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = sorted(timed(lambda: module(x)) for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return _timing(times, peak)


def time_gradient(model, x: torch.Tensor, eot: int, warmup: int = 1, repeats: int = 3,
                  checkpoint: bool | float = False) -> dict:
    """Median and p90 seconds of one PGD-EOT gradient (`eot` purifications, batched, full gradient through the
    purifier; that share of its UNet calls checkpointed), what each attack step costs."""
    y = torch.zeros(len(x), dtype=torch.long, device=x.device)
    attack, timed = EOTPGD(model, steps=1, eot=eot), _timer(x.device)
    p = getattr(model, "purifier", None)
    trainable = [q for q in model.parameters() if q.requires_grad]
    for q in trainable:  # as the harness attacks: no parameter gradients (restored after)
        q.requires_grad_(False)
    if checkpoint:
        p.set_grad_checkpoint(checkpoint)
    try:
        for _ in range(warmup):
            attack.gradient(x, y)
        times = sorted(timed(lambda: attack.gradient(x, y)) for _ in range(repeats))
    finally:
        if checkpoint:
            p.set_grad_checkpoint(False)
        for q in trainable:
            q.requires_grad_(True)
    return _timing(times, None)


def variants(autocast: str | None, channels_last: bool, compile: bool) -> list[dict]:
    """The plain setting, then each requested speed-up alone (so each is measured, not assumed)."""
    out = [{"name": "plain"}]
    if autocast:
        if autocast not in AUTOCAST:
            raise InputError(f"unknown autocast dtype {autocast!r}; known: {', '.join(AUTOCAST)}")
        out.append({"name": f"autocast-{autocast}", "autocast": autocast})
    if channels_last:
        out.append({"name": "channels-last", "channels_last": True})
    if compile:
        out.append({"name": "compile", "compile": True})
    return out


def benchmark(purifiers: dict, classifier=None, batch_sizes=(1, 64), warmup: int = 2, repeats: int = 10,
              device: str | None = None, autocast: str | None = None, channels_last: bool = False,
              compile: bool = False, seed: int = 0, onnx=(), gradient_eot: int = 0) -> list[dict]:
    """One row per (variant, purifier, batch size, alone / with classifier); speed-up against the first purifier.
    `gradient_eot` > 0 (needs a classifier): also one PGD-EOT gradient at that EOT per purifier and batch size
    (variant `gradient-eot<k>`; a purifier of more than 8 steps checkpointed as the harness's "auto" would)."""
    if gradient_eot < 0:
        raise InputError(f"gradient_eot must be >= 0 (0: do not time the attack gradient), got {gradient_eot}")
    if gradient_eot and classifier is None:
        raise InputError("timing the attack gradient needs --classifier (it differentiates the classifier's loss)")
    if not purifiers:
        raise InputError("give at least one purifier to time")
    if any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive, got {list(batch_sizes)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    plan = [(v, label, b, with_clf) for v in variants(autocast, channels_last, compile) for label in purifiers
            for b in batch_sizes for with_clf in ([False, True] if classifier is not None else [False])]
    for v, label, b, with_clf in tqdm(plan, desc="latency"):
        pur = purifiers[label].to(device).manual_seed(seed)
        module = Defended(pur, classifier.to(device)) if with_clf else pur
        x = torch.rand(b, pur.channels, *pur.image_size, generator=torch.Generator().manual_seed(seed)).to(device)
        if v.get("channels_last"):  # on a copy: the rows after it time the models as they were
            module = copy.deepcopy(module).to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if v.get("compile"):
            module = torch.compile(module)
        r = time_module(module, x, warmup, repeats, v.get("autocast"))
        rows.append(_row(v["name"], device, label, with_clf, b, pur.nfe, r, torch.get_num_threads()))
    for label in purifiers if gradient_eot else []:
        pur = purifiers[label].to(device).manual_seed(seed)
        for b in batch_sizes:
            x = torch.rand(b, pur.channels, *pur.image_size, generator=torch.Generator().manual_seed(seed)).to(device)
            share = checkpoint_share(pur, x[:1], b * gradient_eot) if pur.nfe > 8 else 0.0
            defended = Defended(pur, classifier.to(device))
            r = time_gradient(defended, x, gradient_eot, min(warmup, 1), max(1, min(repeats, 3)), checkpoint=share)
            # the same EOT copies forward alone, one pass: what the gradient's own forward costs without autograd
            f = time_module(defended, x.repeat(gradient_eot, 1, 1, 1), min(warmup, 1), max(1, min(repeats, 3)), None)
            rows.append({**_row(f"gradient-eot{gradient_eot}", device, label, True, b, pur.nfe, r,
                                torch.get_num_threads()), "checkpoint_share": share, "forward_eot_s": f["median_s"]})
    rows += _onnx_rows(onnx, batch_sizes, warmup, repeats, seed)
    for row in rows:
        ref = next(r for r in rows if r["variant"] == row["variant"] and r["batch_size"] == row["batch_size"]
                   and r["with_classifier"] == row["with_classifier"])
        row["speedup"] = ref["median_s"] / row["median_s"]
        plain = next((r for r in rows if r["variant"] == "plain" and r["purifier"] == row["purifier"]
                      and r["batch_size"] == row["batch_size"] and r["with_classifier"] == row["with_classifier"]), None)
        row["vs_plain"] = plain["median_s"] / row["median_s"] if plain else None
    return rows


def _row(variant, device, label, with_clf, b, nfe, r, threads) -> dict:
    return {"variant": variant, "device": str(device), "purifier": label, "with_classifier": with_clf,
            "batch_size": b, "nfe": nfe, **r, "images_per_s": b / r["median_s"], "ms_per_image": 1000 * r["median_s"] / b,
            "threads": threads}


def _onnx_rows(files, batch_sizes, warmup: int, repeats: int, seed: int) -> list[dict]:
    """Exported purifiers under ONNX Runtime (CPU, as many threads as torch uses), beside the torch rows."""
    from purify.onnx import load_onnx_purifier

    rows = []
    for f in files:
        runner = load_onnx_purifier(f, seed=seed)
        c, h, w = runner.meta.get("input_shape", (None, None, None))
        fixed = runner.meta.get("batch", "dynamic")
        for b in batch_sizes if fixed == "dynamic" else [fixed]:
            x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))
            r = time_module(runner, x, warmup, repeats)
            rows.append(_row("onnxruntime", "cpu", runner.meta.get("label", Path(f).stem),
                             runner.meta.get("output") == "logits", b, runner.nfe, r, runner.threads))
    return rows


def render(rows: list[dict], device: str) -> str:
    head = ["variant", "purifier", "+classifier", "batch", "NFE", "threads", "median s", "p90 s", "images/s",
            "ms/image", "peak MB", "speed-up", "vs plain"]
    lines = [f"# Defense latency ({device})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = "n/a (CPU)" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        vs = "-" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}x"
        lines.append(f"| {r['variant']} | {r['purifier']} | {'yes' if r['with_classifier'] else 'no'} | "
                     f"{r['batch_size']} | {r['nfe']} | {r['threads']} | {r['median_s']:.4f} | {r['p90_s']:.4f} | "
                     f"{r['images_per_s']:.1f} | {r['ms_per_image']:.2f} | {peak} | {r['speedup']:.1f}x | {vs} |")
    grads = [r for r in rows if r["variant"].startswith("gradient-")]
    if grads:
        lines += ["", "Attack cost: one PGD-EOT gradient (all EOT draws stacked in one pass, full gradient through the "
                  "purifier, the share of a long purifier's UNet calls checkpointed as the harness would) against "
                  "one forward pass of the defense on the same batch, and against one forward pass of the same "
                  "EOT copies (ms per image of the batch):", "",
                  "| purifier | batch | EOT | checkpointed | forward | forward of the EOT copies | gradient | "
                  "gradient / forward | gradient / forward of the copies |", "|---|---|---|---|---|---|---|---|---|"]
        for g in grads:
            f = next((r for r in rows if r["variant"] == "plain" and r["purifier"] == g["purifier"]
                      and r["batch_size"] == g["batch_size"] and r["with_classifier"]), None)
            if f:
                fe = g.get("forward_eot_s")
                lines.append(f"| {g['purifier']} | {g['batch_size']} | {g['variant'].removeprefix('gradient-eot')} | "
                             f"{100 * g.get('checkpoint_share', 0):.0f}% | {f['ms_per_image']:.2f} | "
                             + (f"{1000 * fe / g['batch_size']:.2f}" if fe else "-") +
                             f" | {g['ms_per_image']:.2f} | {g['median_s'] / f['median_s']:.1f}x | "
                             + (f"{g['median_s'] / fe:.1f}x" if fe else "-") + " |")
    lines += ["", "Speed-up: the first purifier's median time over this row's, same variant, batch and "
              "classifier setting; vs plain: the same purifier's plain median over this row's. Peak memory is "
              "torch.cuda.max_memory_allocated (not measured on CPU). onnxruntime rows: the exported file "
              "(`python -m eval export`) on ONNX Runtime's CPU provider with the thread count shown.", ""]
    return "\n".join(lines)


def device_name(device: str) -> str:
    """The GPU's name, or the CPU with its thread count: the machine a timing belongs to."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def run_latency(purifier_dirs: list[str], classifier_dir: str | None, batch_sizes, out: str | Path | None,
                **kw) -> list[dict]:
    """Load, time, write OUT/latency.json and OUT/latency.md."""
    if not purifier_dirs:
        raise InputError("give at least one --purifier folder")
    purifiers = {}
    for d in purifier_dirs:
        p = load_purifier(d)
        label = p.label
        purifiers[label if label not in purifiers else f"{label}-{len(purifiers)}"] = p
    classifier = load_classifier(classifier_dir) if classifier_dir else None
    rows = benchmark(purifiers, classifier, batch_sizes, **kw)
    name = device_name(rows[0]["device"])
    text = render(rows, name)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "latency.json", {"device": name, "purifiers": dict(zip(purifiers, purifier_dirs)),
                                                 "rows": rows})
        atomic_write_text(out / "latency.md", text)
    print(text)
    return rows
