"""What the student-distillation commands share: their config, optimizer and adversarial batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.training import LoopConfig


@dataclass
class AdversarialConfig:
    """Beyond the papers: distil on adversarial inputs crafted by PGD against a classifier."""

    classifier: str | None = None  # classifier folder; None turns the option off
    eps: float = 0.1
    steps: int = 10
    fraction: float = 0.5  # share of each batch replaced by adversarial examples
    target: str = "teacher"  # "teacher": the teacher's purification of that input; "clean": the clean image


@dataclass
class StudentConfig(LoopConfig):
    """What both student-distillation methods share."""

    t_star: float | None = None  # default: the teacher's
    ema_decay: float = 0.999
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


def student_dir(out: Path, k: int) -> Path:
    """Where a K-step student of a distillation run lands."""
    return Path(out) / "students" / f"steps-{k}"


def peak_memory_mb(device) -> float:
    """Peak accelerator memory, or this process's peak resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def student_inputs(x, y, classifier, cfg: AdversarialConfig, g: torch.Generator):
    """[0, 1] batch -> (inputs in [-1, 1], clean targets or None, mask of examples with a clean target or None)."""
    x = x * 2 - 1
    if classifier is None:
        return x, None, None
    x_in, mask = adversarial_batch(x, y, classifier, cfg, g)
    return (x_in, x, mask) if cfg.target == "clean" else (x_in, None, None)


def adversarial_batch(x, y, classifier, cfg: AdversarialConfig, g: torch.Generator):
    """Replace the first `fraction` of a [-1, 1] batch by PGD examples against `classifier`; returns (x_in, mask)."""
    import torchattacks

    n = int(round(cfg.fraction * x.shape[0]))
    mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if n == 0:
        return x, mask
    attack = torchattacks.PGD(classifier, eps=cfg.eps, alpha=2.5 * cfg.eps / cfg.steps, steps=cfg.steps)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # torchattacks uses the global RNG
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))
        x_adv = attack((x[:n] + 1) / 2, y[:n]) * 2 - 1
    mask[:n] = True
    return torch.cat([x_adv.detach(), x[n:]]), mask
