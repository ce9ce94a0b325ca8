"""How much memory a full gradient through a purifier needs, against what the machine has: the harness's
"auto" gradient checkpointing."""

from __future__ import annotations

import copy
import math
import os
import weakref

import torch
import torch.nn as nn

_GRAPH_BYTES: dict = {}


def graph_bytes(purifier: nn.Module, x1: torch.Tensor) -> int:
    """Bytes of activations autograd keeps for one image through `purifier` (measured once per purifier: one
    forward with grad). Each storage counts once (one tensor is often saved by several ops, and views share it),
    and the purifier's own weights not at all: they are saved by every UNet call but do not grow with the batch."""
    key = (id(purifier), tuple(x1.shape), str(x1.device))
    held = _GRAPH_BYTES.get(key)
    if held is None or held[0]() is not purifier:  # an id can be reused once its purifier is freed
        probe = copy.deepcopy(purifier)  # its own generator: the attack's draws stay as they were
        if hasattr(probe, "set_grad_checkpoint"):
            probe.set_grad_checkpoint(False)  # a checkpointed call would hide what it saves from the hook
        seen = {t.untyped_storage().data_ptr() for t in [*probe.parameters(), *probe.buffers()]}
        total = 0

        def pack(t):
            nonlocal total
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:  # saved tensors stay alive, so no address is reused meanwhile
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe(x1.detach().clone().requires_grad_(True))
        _GRAPH_BYTES[key] = (weakref.ref(purifier), total)
    return _GRAPH_BYTES[key][1]


def checkpoint_share(purifier: nn.Module, x1: torch.Tensor, rows: int) -> float:
    """The share of a long purifier's UNet calls to recompute in backward so that the activations kept for
    `rows` images take at most half the memory available (0 when they fit; in steps of 5%, a little margin)."""
    need = graph_bytes(purifier, x1) * rows
    share = min(1.0, max(0.0, 1 - available_bytes(x1) / 2 / need))
    return math.ceil(share * 20) / 20


def available_bytes(x: torch.Tensor) -> int:
    """Free memory where the attack runs: the GPU's, or this process's share of the RAM the kernel says a program
    can still take (MemAvailable: free pages and the page cache it can drop; free pages alone understate it by
    gigabytes), within the container's limit where there is one, shared by the processes on this machine."""
    if x.device.type == "cuda":
        return torch.cuda.mem_get_info(x.device)[0]
    free = [_meminfo_available(), _cgroup_available()]
    free = [f for f in free if f is not None]
    if not free:
        try:
            free = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            free = [4 * 2**30]  # unknown: assume 4 GiB
    return min(free) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError):
        return None


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), None without a limit."""
    try:
        root = "/sys/fs/cgroup"
        with open(f"{root}/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(f"{root}/memory.current") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None
