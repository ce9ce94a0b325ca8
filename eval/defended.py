"""A defended model: purifier in front of a classifier, one nn.Module on [0, 1] inputs; and the config entries
that name one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from core.errors import InputError
from core.io import read_json
from purify.purifier import label_of


class Defended(nn.Module):
    """classifier(purifier(x)); with `votes` > 1, the mean softmax over that many independent purifications.

    Always in eval mode: torchattacks calls `model.train()` after an attack on a model it found in training
    mode, which would let BatchNorm layers of a shared classifier update their statistics while scoring."""

    def __init__(self, purifier: nn.Module | None, classifier: nn.Module, votes: int = 1):
        super().__init__()
        if votes < 1:
            raise InputError(f"votes must be at least 1, got {votes}")
        self.purifier, self.classifier, self.votes = purifier, classifier, votes
        self.eval()

    def train(self, mode: bool = True) -> "Defended":
        return super().train(False)

    def extra_repr(self) -> str:
        return f"votes={self.votes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.purifier is None:
            return self.classifier(x)
        if self.votes == 1:
            return self.classifier(self.purifier(x))
        probs = torch.stack([self.classifier(self.purifier(x)).softmax(1) for _ in range(self.votes)]).mean(0)
        return probs.clamp_min(1e-12).log()  # log of the vote: argmax and cross-entropy both behave


def defense_entries(entries: list, keys: tuple[str, ...] | None = None, bare_label: Callable[[dict], str] = lambda d: "undefended",
                    purifier_optional: bool = False) -> list[dict]:
    """A config's `defenses` list, as `python -m eval robustness` and `python -m eval certify` both take it: each
    entry a purifier folder, "none" (the bare classifier) or a dict with `purifier` and its own keys (`keys`: the
    valid ones, None: any). Returns dicts with `purifier` (a folder, None for the bare classifier) and a unique
    `label` (given, else the purifier's own, e.g. consistency-1, else `bare_label(entry)`), before any work."""
    out, labels = [], set()
    for d in entries:
        d = {"purifier": d} if isinstance(d, str) else dict(d)
        if "purifier" not in d and not purifier_optional:
            raise InputError(f"a defenses entry needs a purifier (a folder or 'none'), got {d}")
        unknown = set(d) - {"purifier", "label", *keys} if keys is not None else set()
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(sorted(unknown))} in a defenses entry; valid: "
                             f"{', '.join(['purifier', 'label', *keys])}")
        bare = d.get("purifier") in (None, "none")
        if not bare and not Path(d["purifier"]).is_dir():
            raise FileNotFoundError(f"purifier folder {d['purifier']} does not exist")
        label = d.get("label") or (bare_label(d) if bare else purifier_label(d["purifier"]))
        base, i = label, 2
        while label in labels:
            label, i = f"{base}-{i}", i + 1
        labels.add(label)
        out.append({**d, "purifier": None if bare else str(d["purifier"]), "label": label})
    return out


def purifier_label(folder) -> str:
    """A purifier's own label from its purifier.json (kind and NFE, e.g. consistency-1), else its folder's name."""
    meta = Path(folder) / "purifier.json"
    return label_of(read_json(meta)) if meta.is_file() else Path(folder).name
