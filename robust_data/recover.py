"""SRe2L's recover stage (Yin et al., NeurIPS 2023): synthesize `ipc` images per class from noise by
cross-entropy on the squeezed model plus `r_bn` times BatchNorm statistics matching; CDA's curriculum
(Yin & Shen, 2024) anneals the crop's lower scale bound from 1 to `min_crop` as an option."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.checkpoint import load_classifier
from core.errors import InputError
from core.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from core.runs import open_shared_folder, same_config_or_fail
from core.seeding import step_seed

from .distilled import save_distilled


@dataclass
class RecoverConfig:
    """Defaults follow SRe2L's small-dataset scripts; configs/<dataset>/*.yaml set the anchors' values."""

    classifier: str = ""  # the squeezed classifier folder (needs BatchNorm layers)
    ipc: int = 10
    iterations: int = 1000
    batch_size: int = 100  # images per optimisation batch: classes x (ipc per batch), ipc-major
    lr: float = 0.25
    r_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    crop: bool = True  # random-resized crop + flip on the whole batch each iteration (SRe2L drops it on CIFAR)
    min_crop: float = 0.08  # the crop's lower scale bound
    cda: bool = False  # anneal the lower bound from 1 to min_crop (CDA, cosine)
    cda_milestone: float = 1.0  # fraction of the iterations the annealing takes
    jitter: int = 4  # random roll by up to this many pixels in each direction
    seed: int = 0


def bn_layers(net: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers recover matches, or an error saying the classifier has none."""
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise InputError("recover matches BatchNorm statistics, but the classifier has no BatchNorm2d layer "
                         "(squeeze with arch convnet-bn, resnet18 or wrn-28-10)")
    return layers


class BNStatistics:
    """Hooks on every BatchNorm2d: the distance of the batch's mean / biased variance to the running ones."""

    def __init__(self, net: nn.Module, first_multiplier: float = 10.0):
        self.layers = bn_layers(net)
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self.hook) for m in self.layers]

    def hook(self, module, inputs, output):
        x = inputs[0]
        mean = x.mean((0, 2, 3))
        var = x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
        self.losses.append(torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2))

    def pop(self) -> torch.Tensor:
        """sum_l w_l (||mu_l - running_mean_l|| + ||var_l - running_var_l||) over the last forward."""
        loss = sum(w * term for w, term in zip(self.weights, self.losses))
        self.losses = []
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def crop_scale(cfg: RecoverConfig, it: int) -> float:
    """The crop's lower scale bound at iteration `it` (CDA: cosine from 1 down to min_crop)."""
    if not cfg.cda:
        return cfg.min_crop
    end = cfg.cda_milestone * cfg.iterations
    if it >= end:
        return cfg.min_crop
    return cfg.min_crop + (1 - cfg.min_crop) * (1 + math.cos(math.pi * it / end)) / 2


def random_resized_crop_params(size: tuple[int, int], scale: tuple[float, float], g: torch.Generator,
                               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from `g`: (top, left, height, width)."""
    h, w = size
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=g).item())
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, (1,), generator=g).item()
            left = torch.randint(0, w - cw + 1, (1,), generator=g).item()
            return top, left, ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def augment_batch(x: torch.Tensor, cfg: RecoverConfig, it: int, g: torch.Generator) -> torch.Tensor:
    """One crop + flip for the whole batch (as SRe2L does), then a random roll by up to `jitter` pixels."""
    if cfg.crop:
        top, left, ch, cw = random_resized_crop_params(x.shape[-2:], (crop_scale(cfg, it), 1.0), g)
        x = F.interpolate(x[..., top:top + ch, left:left + cw], size=x.shape[-2:], mode="bilinear",
                          align_corners=False)
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(-1)
    if cfg.jitter > 0:
        dy, dx = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x


def targets(num_classes: int, ipc: int) -> list[tuple[int, int]]:
    """Every (class, index) pair, ipc-major as in SRe2L's loop."""
    return [(c, k) for k in range(ipc) for c in range(num_classes)]


def chunk_plan(num_classes: int, ipc: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The optimisation batches, fixed by (classes, ipc, batch_size) alone. A batch's images share the BatchNorm
    statistics each step matches, so batches are cut before they are dealt to processes (round robin): the
    distilled set does not depend on how many processes made it, or on a resume with another number of them."""
    pairs = targets(num_classes, ipc)
    return [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]


def chunk_file(folder: Path, chunk: list[tuple[int, int]]) -> Path:
    """A batch's file, named by its content: its first pair, its length and a digest of all its pairs."""
    digest = zlib.crc32(",".join(f"{c}:{k}" for c, k in chunk).encode())
    return folder / f"c{chunk[0][0]:04d}-k{chunk[0][1]:04d}-n{len(chunk)}-{digest:08x}.safetensors"


def _holds(path: Path, chunk: list[tuple[int, int]]) -> bool:
    """Whether a batch file exists and holds exactly this batch's (class, index) pairs (a torn or foreign file
    is redone)."""
    if not path.is_file():
        return False
    try:
        t = load_tensors(path)
    except Exception:  # a file that does not parse is redone
        return False
    return (t.get("labels") is not None and t.get("index") is not None
            and list(zip(t["labels"].tolist(), t["index"].tolist())) == chunk
            and len(t.get("images", ())) == len(chunk))


def synthesize(net: nn.Module, mean: torch.Tensor, std: torch.Tensor, pairs: list[tuple[int, int]],
               cfg: RecoverConfig, shape: tuple[int, ...], device, progress: bool = False) -> torch.Tensor:
    """Optimise one batch of images (normalised space, clipped to the valid [0, 1] range); returns [0, 1] pixels."""
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(step_seed(cfg.seed, c, k)))
                     for c, k in pairs]).to(device).requires_grad_(True)
    y = torch.tensor([c for c, _ in pairs], device=device)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    bn = BNStatistics(net, cfg.first_bn_multiplier)
    g = torch.Generator().manual_seed(step_seed(cfg.seed, *pairs[0]))
    try:
        for it in tqdm(range(cfg.iterations), desc=f"recover classes {pairs[0][0]}..", leave=False,
                       disable=not progress):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
            out = net(augment_batch(x, cfg, it, g))
            loss = F.cross_entropy(out, y) + cfg.r_bn * bn.pop()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, hi), lo)
    finally:
        bn.remove()
    return (x.detach() * std + mean).clamp(0, 1)


def recover(cfg: RecoverConfig, out: str | Path) -> Path:
    """Synthesize cfg.ipc images per class; the batches of `chunk_plan` are dealt to accelerate processes;
    finished batches are kept in OUT/batches (named by content) and skipped when the command is rerun, on any
    number of processes. Writes OUT/distilled (see distilled.py)."""
    if cfg.ipc < 1 or int(cfg.ipc) != cfg.ipc:
        raise InputError(f"ipc must be a positive integer, got {cfg.ipc}")
    if cfg.iterations < 1 or cfg.batch_size < 1:
        raise InputError("iterations and batch_size must be positive")
    if not 0 < cfg.min_crop <= 1:
        raise InputError(f"min_crop must be in (0, 1], got {cfg.min_crop}")
    if not cfg.classifier:
        raise InputError("recover needs classifier: the squeezed classifier folder")
    model = load_classifier(cfg.classifier)
    same_config_or_fail(out, cfg)
    net = model.net  # classifiers normalise inside (core.models.Normalized): optimise behind that front
    bn_layers(net)  # no BatchNorm: say so before any work
    meta = read_json(Path(cfg.classifier) / "config.json")
    acc, out = open_shared_folder(out, cfg, "batches")
    net = net.to(acc.device).eval().requires_grad_(False)
    mean, std = model.mean.to(acc.device), model.std.to(acc.device)
    shape = (meta["in_channels"], meta["image_size"], meta["image_size"])
    plan = chunk_plan(meta["num_classes"], cfg.ipc, cfg.batch_size)
    batches = out / "batches"
    for chunk in tqdm(plan[acc.process_index::acc.num_processes], desc="recover", disable=not acc.is_main_process):
        name = chunk_file(batches, chunk)
        if _holds(name, chunk):
            continue
        images = synthesize(net, mean, std, chunk, cfg, shape, acc.device)
        atomic_save_tensors({"images": images.cpu().contiguous(), "labels": torch.tensor([c for c, _ in chunk]),
                             "index": torch.tensor([k for _, k in chunk])}, name)
    acc.wait_for_everyone()
    folder = out / "distilled"
    if acc.is_main_process:
        missing = [chunk_file(batches, c).name for c in plan if not _holds(chunk_file(batches, c), c)]
        if missing:
            raise RuntimeError(f"recover: {len(missing)} of {len(plan)} batches are missing from {batches} "
                               f"({', '.join(missing[:3])}...); rerun the command to make them")
        parts = [load_tensors(chunk_file(batches, c)) for c in plan]  # only this plan's files, never a stray one
        images = torch.cat([p["images"] for p in parts])
        labels, index = torch.cat([p["labels"] for p in parts]), torch.cat([p["index"] for p in parts])
        seen = sorted(zip(labels.tolist(), index.tolist()))
        if seen != sorted(targets(meta["num_classes"], cfg.ipc)):  # every (class, index) exactly once
            raise RuntimeError(f"recover: the batches in {batches} do not hold every (class, index) exactly once")
        order = torch.argsort(labels * cfg.ipc + index)
        save_distilled(folder, images[order], labels[order], {
            "ipc": cfg.ipc, "num_classes": meta["num_classes"], "squeezed_classifier": cfg.classifier,
            "method": "sre2l-recover" + ("+cda" if cfg.cda else ""), "iterations": cfg.iterations,
            "r_bn": cfg.r_bn, "processes": acc.num_processes})
        atomic_write_json(out / "recover.json", {"images": len(labels), "ipc": cfg.ipc})
    acc.wait_for_everyone()
    return folder
