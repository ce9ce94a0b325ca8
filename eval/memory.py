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
    """Bytes autograd keeps for one image through `purifier` (measured once per purifier: one forward with grad)."""
    key = (id(purifier), tuple(x1.shape), str(x1.device))
    held = _GRAPH_BYTES.get(key)
    if held is None or held[0]() is not purifier:  # an id can be reused once its purifier is freed
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        probe = copy.deepcopy(purifier)  # its own generator: the attack's draws stay as they were
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
    """Free memory where the attack runs: the GPU's, or the machine's available RAM."""
    if x.device.type == "cuda":
        return torch.cuda.mem_get_info(x.device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30  # unknown: assume 4 GiB
