"""What training and evaluation both measure: top-1 accuracy, and a purifier applied in seeded batches."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .seeding import derive_seed


@torch.inference_mode()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512, device="cpu") -> float:
    """Top-1 accuracy of `model` on tensors (x, y)."""
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(1, len(x))


def default_device() -> torch.device:
    """The accelerator when there is one: inference-only commands run there as the training loops do."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_seed(seed: int, batch: int) -> int:
    """The purifier seed of one batch: every purifier reseeded with it draws the same diffusion noise at t_star."""
    return derive_seed(seed, "batch", batch)


@torch.no_grad()
def purify_batches(purifier, x: torch.Tensor, batch_size: int = 64, seed: int | None = None,
                   desc: str | None = None) -> tuple[torch.Tensor, float]:
    """Purify x in batches; returns (outputs, median s per full batch).

    With `seed`, the purifier is reseeded before every batch (`batch_seed`): its first draw, the noise that
    diffuses x to t_star, is then the same for every purifier on every batch, however many draws each makes."""
    outs, times = [], []
    device = next((q.device for q in purifier.parameters()), torch.device("cpu"))
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=desc is None):
        if seed is not None:
            purifier.manual_seed(batch_seed(seed, i // batch_size))
        t0 = time.perf_counter()
        outs.append(purifier(x[i:i + batch_size].to(device)).cpu())  # .cpu() waits for an accelerator
        if len(outs[-1]) == batch_size or not times:
            times.append(time.perf_counter() - t0)
    return torch.cat(outs), sorted(times)[len(times) // 2]
