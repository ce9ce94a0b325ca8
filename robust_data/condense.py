"""DC, dataset condensation by gradient matching (Zhao, Mopuri & Bilen, ICLR 2021): `ipc` synthetic images per
class learned so that, layer by layer, the gradients of randomly initialised networks on a synthetic batch of a
class match those on a real batch of it; the networks train on the synthetic set between matching steps.
Differentiable siamese augmentation (DSA, Zhao & Bilen, ICML 2021) is an option. The matched networks train
with any squeeze objective (robust_data/objectives.py): `objective=guard` is GUARD added to DC."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.config import save_config
from core.datasets import load_dataset, to_tensors
from core.errors import InputError
from core.io import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json, read_jsonl
from core.models import build_classifier, classifier_config_for
from core.runs import process_state, same_config_or_fail

from .distilled import save_distilled
from .objectives import get_objective

# DC's (outer, inner) loops by images per class (its get_loops)
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


@dataclass
class CondenseConfig:
    """DC's CIFAR-10 defaults (ConvNet width 128, depth 3, instance norm; SGD on images 0.1, on the net 0.01)."""

    dataset: str = "digits"
    data_root: str | None = None
    ipc: int = 10
    iterations: int = 1000  # matching iterations, each with a freshly initialised network
    outer_loop: int | None = None  # None: DC's loops for this ipc (LOOPS; else 10 / 50)
    inner_loop: int | None = None
    arch: str = "convnet"  # the matched network: convnet (instance norm), convnet-bn, resnet18, ...
    width: int = 128
    depth: int = 3
    lr_img: float = 0.1
    lr_net: float = 0.01
    batch_real: int = 256  # real images per class per matching step
    batch_train: int = 256  # synthetic images per network training step
    init: str = "real"  # "real" images of the class, or Gaussian "noise" (in normalised pixels)
    dsa: bool = False  # the same random augmentation on the real and synthetic batch of each matching step
    objective: str = "ce"  # how the matched networks train on the synthetic set between matching steps
    reg_lambda: float = 100.0  # objective settings, as in the squeeze stage
    reg_h: float = 3.0
    adv_eps: float = 1 / 255
    adv_steps: int = 10
    checkpoint_every: int = 100
    seed: int = 0


def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """DC's distance for one parameter's gradient: sum over output units of 1 - cosine similarity, with each
    unit's gradient flattened (conv: out x in*k*k, linear: out x in); biases and norm parameters count 0."""
    if g_real.dim() == 1:
        return g_real.new_zeros(())
    a, b = g_real.flatten(1), g_syn.flatten(1)
    return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()


def match_distance(grads_real, grads_syn) -> torch.Tensor:
    """Sum of `layer_distance` over the network's parameters."""
    return sum(layer_distance(r, s) for r, s in zip(grads_real, grads_syn))


DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")  # DSA's color_crop_cutout_flip_scale_rotate


def dsa_params(n: int, g: torch.Generator, shared: bool) -> dict:
    """One DSA draw (Zhao & Bilen, ICML 2021, its 'S' mode): one augmentation family chosen at random per call,
    with per-example parameters; `shared` (the siamese draw of a matching step, DSA's seeded batch mode) gives
    every example of the batch the first one's. Ranges are DSA's ParamDiffAug defaults."""
    family = DSA_FAMILIES[int(torch.randint(len(DSA_FAMILIES), (1,), generator=g))]
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand((1 if shared else n, *shape), generator=g)  # noqa: E731
    p = {"color": lambda: {"brightness": u(-0.5, 0.5), "saturation": u(0, 2), "contrast": u(0.5, 1.5)},
         "crop": lambda: {"shift": u(-0.125, 0.125, 2)},
         "cutout": lambda: {"cutout": u(0, 1, 2)},
         "flip": lambda: {"flip": u(0, 1) < 0.5},
         "scale": lambda: {"scale": u(1 / 1.2, 1.2, 2)},
         "rotate": lambda: {"rotate": u(-15, 15) * math.pi / 180}}[family]()
    return {"family": family, **p}


def dsa_augment(x: torch.Tensor, p: dict) -> torch.Tensor:
    """Apply one `dsa_params` draw to a batch (normalised pixels), differentiably in x; a shared draw (one row)
    applies to a batch of any size."""
    n, _, h, w = x.shape
    f = p["family"]
    p = {k: v if k == "family" else v.expand(n, *v.shape[1:]) for k, v in p.items()}
    col = lambda v: v.to(x).view(n, 1, 1, 1)  # noqa: E731
    if f == "color":
        x = x + col(p["brightness"])
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * col(p["saturation"]) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * col(p["contrast"]) + mean
    if f == "flip":
        return torch.where(col(p["flip"]).bool(), x.flip(-1), x)
    if f == "cutout":
        ys, xs = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
        c = p["cutout"].to(x.device)
        cy, cx = (c[:, 0] * h).long().view(n, 1, 1), (c[:, 1] * w).long().view(n, 1, 1)
        hole = ((ys - cy).abs() < (h + 1) // 4) & ((xs - cx).abs() < (w + 1) // 4)
        return x * (~hole).to(x).unsqueeze(1)
    theta = torch.zeros(n, 2, 3)
    if f == "crop":
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = 2 * p["shift"]
    elif f == "scale":
        theta[:, 0, 0], theta[:, 1, 1] = p["scale"][:, 0], p["scale"][:, 1]
    else:
        a = p["rotate"].view(n)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def loops(cfg: CondenseConfig) -> tuple[int, int]:
    """(outer, inner) loop counts: the config's, else DC's for this ipc."""
    outer, inner = LOOPS.get(cfg.ipc, (10, 50))
    return cfg.outer_loop or outer, cfg.inner_loop or inner


def check(cfg: CondenseConfig) -> None:
    if cfg.ipc < 1 or int(cfg.ipc) != cfg.ipc:
        raise InputError(f"ipc must be a positive integer, got {cfg.ipc}")
    if cfg.iterations < 1 or cfg.batch_real < 1 or cfg.batch_train < 1 or cfg.checkpoint_every < 1:
        raise InputError("iterations, batch_real, batch_train and checkpoint_every must be positive")
    if cfg.init not in ("real", "noise"):
        raise InputError(f"init must be real or noise, got {cfg.init!r}")
    get_objective(cfg.objective)
    if cfg.objective != "ce" and loops(cfg)[0] == 1:  # DC's ipc-1 loops match on fresh networks only
        raise InputError(f"objective {cfg.objective} has no effect with outer_loop 1 (DC's loops at ipc "
                         f"{cfg.ipc}): the matched networks are never trained; set condense.outer_loop above 1 "
                         "or use objective ce")


def condense(cfg: CondenseConfig, out: str | Path) -> Path:
    """Learn the synthetic set into OUT/distilled (the recover stage's format); a rerun resumes from the last
    checkpoint in OUT/state.safetensors."""
    check(cfg)
    out = Path(out)
    same_config_or_fail(out, cfg)
    state = process_state()
    if state.is_main_process:  # one process learns the set (DC's loop does not shard); the others wait for it
        _condense(cfg, out)
    state.wait_for_everyone()
    return out / "distilled"


def _condense(cfg: CondenseConfig, out: Path) -> Path:
    train, info = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    x_all, y_all = to_tensors(train)
    mcfg = classifier_config_for(info, cfg.arch, width=cfg.width, depth=cfg.depth)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(device) for v in (info.mean, info.std))
    real = [((x_all[y_all == c].to(device)) - mean) / std for c in range(info.num_classes)]
    if min(len(r) for r in real) < 1:
        raise InputError(f"{cfg.dataset} has a class without training images")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.arange(info.num_classes).repeat_interleave(cfg.ipc)
    if cfg.init == "real":
        syn = torch.cat([r[torch.randperm(len(r), generator=g)[:cfg.ipc].to(device)] for r in real])
        if len(syn) < len(labels):
            raise InputError(f"init real needs {cfg.ipc} training images of every class")
    else:
        syn = torch.randn(len(labels), *real[0].shape[1:], generator=g).to(device)
    syn = syn.clone().requires_grad_(True)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=0.5)
    state, start = out / "state.safetensors", 0
    if state.is_file():
        saved = load_tensors(state)
        syn.data.copy_(saved["images"].to(device))
        opt_img.state[syn] = {"momentum_buffer": saved["momentum"].to(device)}
        start = read_json(out / "state.json")["iteration"]
        if (out / "log.jsonl").is_file():  # records past the checkpoint are redone
            kept = [r for r in read_jsonl(out / "log.jsonl") if r.get("iteration", 0) <= start]  # torn line dropped
            atomic_write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    outer, inner = loops(cfg)
    objective = get_objective(cfg.objective, cfg)
    log = out / "log.jsonl"
    for it in tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"DC ({cfg.objective})"):
        ig = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)  # every iteration from (seed, it) alone
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ig)))  # the fresh network's weights
        model = build_classifier(mcfg).to(device)
        net, params = model.net, list(model.net.parameters())
        opt_net = torch.optim.SGD(model.parameters(), lr=cfg.lr_net, momentum=0.5)
        total = 0.0
        for ol in range(outer):
            _freeze_batchnorm(net, real, ig)
            loss = syn.new_zeros(())
            for c, r in enumerate(real):
                xr = r[torch.randperm(len(r), generator=ig)[:cfg.batch_real].to(device)]
                xs = syn[c * cfg.ipc:(c + 1) * cfg.ipc]
                if cfg.dsa:  # one siamese draw for the real and the synthetic batch
                    p = dsa_params(1, ig, shared=True)
                    xr, xs = dsa_augment(xr, p), dsa_augment(xs, p)
                y = torch.full((len(xr),), c, device=device)
                g_real = [v.detach() for v in torch.autograd.grad(F.cross_entropy(net(xr), y), params)]
                g_syn = torch.autograd.grad(F.cross_entropy(net(xs), y[:len(xs)]), params, create_graph=True)
                loss = loss + match_distance(g_real, g_syn)
            opt_img.zero_grad()
            loss.backward()
            opt_img.step()
            total += loss.item()
            if ol == outer - 1:
                break
            _train_net(model, opt_net, objective, syn.detach(), labels.to(device), inner, cfg.batch_train, ig,
                       (mean, std), cfg.dsa)
        with log.open("a") as f:
            f.write(f'{{"iteration": {it + 1}, "match": {total / (outer * info.num_classes):.6f}}}\n')
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            atomic_save_tensors({"images": syn.detach().cpu().contiguous(),
                                 "momentum": opt_img.state[syn]["momentum_buffer"].cpu().contiguous()}, state)
            atomic_write_json(out / "state.json", {"iteration": it + 1})
    images = (syn.detach() * std + mean).clamp(0, 1).cpu()
    folder = save_distilled(out / "distilled", images, labels, {
        "ipc": cfg.ipc, "num_classes": info.num_classes, "method": "dc" + ("+dsa" if cfg.dsa else ""),
        "objective": cfg.objective, "iterations": cfg.iterations, "outer_loop": outer, "inner_loop": inner,
        "squeezed_classifier": None})
    atomic_write_json(out / "condense.json", {"images": len(labels), "ipc": cfg.ipc})
    return folder


def _freeze_batchnorm(net: nn.Module, real: list[torch.Tensor], g: torch.Generator) -> None:
    """DC's BatchNorm handling: running statistics from a real batch of 16 per class, then frozen (a synthetic
    batch of one class is too small for batch statistics)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    net.train()
    with torch.no_grad():
        net(torch.cat([r[torch.randint(len(r), (16,), generator=g).to(r.device)] for r in real]))
    for m in bns:
        m.eval()


def _train_net(model, opt, objective, syn, y, epochs: int, batch: int, g: torch.Generator, norm, dsa: bool) -> None:
    """`epochs` passes of the objective over the synthetic set (DC's inner loop), with DSA's per-example
    augmentation when `dsa` (as DSA trains its inner networks). `syn` is in normalised pixels; the objectives
    take [0, 1] pixels, clamped there (see docs/methods.md: the objectives' threat model is the [0, 1] cube)."""
    mean, std = norm
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g).to(y.device)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            xb = syn[idx]
            if dsa:
                xb = dsa_augment(xb, dsa_params(len(idx), g, shared=False))
            loss, _ = objective(model, (xb * std + mean).clamp(0, 1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
