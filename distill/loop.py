"""What the student-distillation commands share: their config, optimizer and adversarial batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import InputError
from core.training import LoopConfig
from purify.samplers import randn_like

ATTACKS = ("classifier", "adaptive")
TARGETS = ("teacher", "teacher-clean", "clean")
CLASSIFIER_TERMS = ("none", "ce", "kl")


@dataclass
class AdversarialConfig:
    """Beyond the papers: distil on adversarial inputs.

    attack "classifier": Linf PGD against the bare classifier. "adaptive": PGD-EOT against the student being
    trained and the classifier end to end (full gradient through the student's K steps, EOT over its noise),
    the attack the defense meets at test time."""

    classifier: str | None = None  # classifier folder; None turns the option off
    attack: str = "classifier"
    eps: float = 0.1
    steps: int = 10
    eot: int = 1  # adaptive: purifications averaged per gradient
    fraction: float = 0.5  # share of each batch replaced by adversarial examples
    # the adversarial rows' target. "teacher": the teacher's target from the adversarial input; "teacher-clean":
    # the teacher's target from the clean input under the same noise; "clean": the clean image itself
    target: str = "teacher"
    # a term on the classifier's output of the student's purification of the adversarial rows: "ce" to the
    # label, "kl" to the classifier's clean prediction; weighted by classifier_weight
    classifier_term: str = "none"
    classifier_weight: float = 0.01  # the distillation losses are of order 1e-3 to 1e-2

    @property
    def enabled(self) -> bool:
        return self.classifier is not None

    def describe(self) -> dict | None:
        """What a student's purifier.json records about its adversarial inputs (None: plain distillation)."""
        if not self.enabled:
            return None
        return {"attack": self.attack, "eps": self.eps, "steps": self.steps, "eot": self.eot,
                "fraction": self.fraction, "target": self.target, "classifier_term": self.classifier_term,
                "classifier_weight": self.classifier_weight, "classifier": self.classifier}


def check_adversarial(cfg: AdversarialConfig) -> None:
    """Every bad value of the adversarial block, named, before any training."""
    for key, value, known in (("attack", cfg.attack, ATTACKS), ("target", cfg.target, TARGETS),
                              ("classifier_term", cfg.classifier_term, CLASSIFIER_TERMS)):
        if value not in known:
            raise InputError(f"adversarial.{key} must be one of {', '.join(known)}, got {value!r}")
    if not 0 <= cfg.fraction <= 1:
        raise InputError(f"adversarial.fraction must be in [0, 1], got {cfg.fraction}")
    if cfg.eps < 0 or cfg.steps < 1 or cfg.eot < 1:
        raise InputError("adversarial.eps must be >= 0 and adversarial.steps, adversarial.eot >= 1")
    if not cfg.enabled and (cfg.attack != "classifier" or cfg.classifier_term != "none"):
        raise InputError("adversarial.attack / classifier_term need adversarial.classifier (a classifier folder)")


@dataclass
class StudentConfig(LoopConfig):
    """What both student-distillation methods share."""

    t_star: float | None = None  # default: the teacher's
    ema_decay: float = 0.999
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass
class StudentBatch:
    """One training batch in [-1, 1]: the student's inputs `x`, the inputs of the teacher's target `x_ref`,
    the clean images, the labels, and which rows are adversarial."""

    x: torch.Tensor
    x_ref: torch.Tensor
    clean: torch.Tensor
    y: torch.Tensor
    adv: torch.Tensor | None = None  # bool mask of adversarial rows
    clean_target: bool = False  # target "clean": adversarial rows are pulled to the clean image


def student_dir(out: Path, k: int) -> Path:
    """Where a K-step student of a distillation run lands."""
    return Path(out) / "students" / f"steps-{k}"


def peak_memory_mb(device) -> float:
    """Peak accelerator memory, or this process's peak resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def student_inputs(x, y, classifier, cfg: AdversarialConfig, g: torch.Generator, purify=None) -> StudentBatch:
    """[0, 1] batch -> StudentBatch. `purify(x, g) -> x` ([-1, 1], differentiable in x) is the student's
    K-step purification, which the adaptive attack goes through."""
    clean = x * 2 - 1
    if classifier is None:
        return StudentBatch(clean, clean, clean, y)
    x_in, mask = adversarial_batch(clean, y, classifier, cfg, g, purify)
    x_ref = torch.where(mask.view(-1, 1, 1, 1), clean, x_in) if cfg.target == "teacher-clean" else x_in
    return StudentBatch(x_in, x_ref, clean, y, mask, cfg.target == "clean")


class _Adaptive(nn.Module):
    """classifier(purify(x)) on [0, 1] pixels, holding neither network as a submodule, so that the attack's
    eval() / train() switching leaves the student's and classifier's modes alone."""

    def __init__(self, classifier, purify, g, device):
        super().__init__()
        self._parts = (classifier, purify, g)
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)  # tells torchattacks the device

    def forward(self, x):
        classifier, purify, g = self._parts
        return classifier(((purify(x * 2 - 1, g) + 1) / 2).clamp(0, 1))


def adversarial_batch(x, y, classifier, cfg: AdversarialConfig, g: torch.Generator, purify=None):
    """Replace the first `fraction` of a [-1, 1] batch by Linf PGD examples (against the classifier, or PGD-EOT
    against purify + classifier for attack "adaptive"); returns (x_in, mask of replaced rows)."""
    import torchattacks

    n = int(round(cfg.fraction * x.shape[0]))
    mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if n == 0:
        return x, mask
    alpha = 2.5 * cfg.eps / cfg.steps
    # torchattacks' PGD, as the harness's `pgd`; not eval's EOTPGD: training may not import eval, and the last
    # iterate (not the best) is what a training batch wants
    if cfg.attack == "adaptive":
        if purify is None:
            raise InputError("adversarial.attack adaptive needs the student's purification")
        attack = torchattacks.EOTPGD(_Adaptive(classifier, purify, g, x.device), eps=cfg.eps, alpha=alpha,
                                     steps=cfg.steps, eot_iter=cfg.eot)
    else:
        attack = torchattacks.PGD(classifier, eps=cfg.eps, alpha=alpha, steps=cfg.steps)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # torchattacks uses the global RNG
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))
        x_adv = attack((x[:n] + 1) / 2, y[:n]) * 2 - 1
    mask[:n] = True
    return torch.cat([x_adv.detach(), x[n:]]), mask


def k_step_purify(denoiser, sampler, schedule, t_star: float, k: int):
    """The student's K-step purification as a function of ([-1, 1] x, generator): diffuse to t_star, then
    `sampler(denoiser, x_t, times, generator)` over K equal steps to 0, as the saved student does."""
    times = torch.linspace(t_star, 0.0, k + 1, dtype=torch.float64)
    ab = schedule.alpha_bar(torch.tensor(t_star, dtype=torch.float64)).item()

    def purify(x, g):
        z = ab**0.5 * x + (1 - ab) ** 0.5 * randn_like(x, g)
        return sampler(denoiser, z, times.to(x.device), g)

    return purify


def classifier_term(classifier, purify, batch: StudentBatch, cfg: AdversarialConfig, g) -> torch.Tensor | None:
    """The classifier's loss on the student's purification of the adversarial rows (gradient to the student):
    cross-entropy to the label ("ce") or KL from the classifier's clean prediction ("kl")."""
    if cfg.classifier_term == "none" or batch.adv is None:
        return None
    rows = batch.adv
    if not rows.any():
        return batch.x.new_zeros(())
    logits = classifier(((purify(batch.x[rows], g) + 1) / 2).clamp(0, 1))
    if cfg.classifier_term == "ce":
        return F.cross_entropy(logits, batch.y[rows])
    with torch.no_grad():
        p_clean = F.log_softmax(classifier((batch.clean[rows] + 1) / 2), dim=1)
    return F.kl_div(F.log_softmax(logits, dim=1), p_clean, log_target=True, reduction="batchmean")


def with_classifier_term(loss, stats: dict, term, cfg: AdversarialConfig):
    """loss + classifier_weight * term, the term logged as `clf`."""
    if term is None:
        return loss, stats
    return loss + cfg.classifier_weight * term, {**stats, "clf": term.detach()}


def student_loss(x, y, g, classifier, cfg: AdversarialConfig, loss_of, attacked=None, trained=None):
    """One distillation step's loss on a [0, 1] batch: adversarial rows when configured (crafted through
    `attacked` for the adaptive attack), the method's `loss_of(StudentBatch) -> (loss, stats)`, then the
    classifier term on the student's purification `trained` of the adversarial rows."""
    batch = student_inputs(x, y, classifier, cfg, g, attacked)
    loss, stats = loss_of(batch)
    return with_classifier_term(loss, stats, classifier_term(classifier, trained, batch, cfg, g), cfg)
