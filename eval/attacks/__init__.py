"""The attacks: one file per family (`pgd.py`: PGD-EOT, APGD-EOT, BPDA, transfer; `autoattack.py`; `diffhammer.py`;
`minimal.py`: DeepFool, CW-L2), what they share (`base.py`), and the table that names them (`registry.py`)."""

from .autoattack import Composed, Strongest
from .base import NORMS, AttackContext, check_norm, margin_loss
from .diffhammer import DiffHammer
from .pgd import BPDA, EOTPGD
from .registry import (
                       ATTACKS,
                       EPS_PRESETS,
                       AttackSpec,
                       attack_norm,
                       build_attack,
                       check_attack,
                       check_loss,
                       large_eps,
                       preset_eps,
                       register_attack,
                       within_threat,
)

__all__ = ["ATTACKS", "BPDA", "EOTPGD", "EPS_PRESETS", "NORMS", "AttackContext", "AttackSpec", "Composed",
           "DiffHammer", "Strongest", "attack_norm", "build_attack", "check_attack", "check_loss", "check_norm",
           "large_eps", "margin_loss", "preset_eps", "register_attack", "within_threat"]
