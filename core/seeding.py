"""Step-seeded randomness: every loop draws from generators seeded by (run seed, step, process, stream), never from
the global RNG, so a resumed run needs no RNG state and reaches the same weights as an uninterrupted one."""

from __future__ import annotations

import zlib

import torch
from torch.utils.data import Sampler

from .errors import InputError


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed for one (run seed, step, process, stream); distinct inputs give distinct seeds."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + stream * 0x2545F4914F6CDD1D)
    return h % (2**63 - 1)


def derive_seed(seed: int, *parts) -> int:
    """A 31-bit seed for whatever an evaluation draws from (run seed, then what it is for: a job and batch, an
    example, a draw, a step): the same parts give the same seed on any process, after any interruption."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank, stream))


class StepBatchSampler(Sampler):
    """Batches for steps [start, total): epoch-wise permutations seeded by (seed, epoch), sharded by rank."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise InputError("cannot draw batches from an empty dataset")
        self.n, self.bs, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.rank, self.world = rank, world

    def __len__(self):
        return max(0, self.total - self.start)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=step_generator(self.seed, epoch, stream=1))

    def __iter__(self):
        cache: dict[int, torch.Tensor] = {}
        for step in range(self.start, self.total):
            first = (step * self.world + self.rank) * self.bs
            idx = []
            for pos in range(first, first + self.bs):
                epoch = pos // self.n
                if epoch not in cache:
                    cache.clear() if len(cache) > 2 else None
                    cache[epoch] = self._perm(epoch)
                idx.append(int(cache[epoch][pos % self.n]))
            yield idx


def step_batches(dataset, batch_size: int, seed: int, start: int, total: int, accelerator, num_workers: int = 0):
    """DataLoader over `dataset` yielding this process's batch for each step in [start, total)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, total,
                               accelerator.process_index, accelerator.num_processes)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=accelerator.device.type == "cuda")
