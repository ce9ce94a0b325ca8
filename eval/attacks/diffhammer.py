"""DiffHammer (Wang et al., NeurIPS 2024): the selective attack on diffusion purification.

Averaging the gradients of all purification draws (EOT) lets draws that pull in different directions cancel
(the paper's "gradient dilemma"). DiffHammer's EM step instead picks, per example, the draw a* whose attack
direction most raises the other draws' losses (selection: argmax_a sum_b ELU(L_b + eps <unit(g_a), g_b>)),
weights every draw by how near that direction brings it to fooling the classifier (E-step:
w_b = sigmoid(lam (L_b + eps <unit(g_a*), g_b>)), g_b the loss gradient at draw b's purified image: the
first-order loss after a full step; the released code's E-step omits eps, which makes the direction term
dominate), and follows the weighted gradient (M-step). Here the M-step gradient sum_b w_b J_b^T g_b / sum_b w_b is computed
exactly through every draw (the released code grafts it through the selected draw's chain alone to save
backward passes), the step follows a decaying average of past gradients as theirs (v = (t + 1)^-smooth), and
each example keeps the iterate that fooled the most of its draws, the mean loss breaking ties."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.errors import InputError

from .base import AttackContext
from .pgd import EOTPGD, loss_of

LOSSES = ("margin", "dlr")


class DiffHammer(EOTPGD):
    """`eot` draws per step (DiffHammer's N), margin (CW) loss by default, lam 5 and smoothing 0.5 as the
    released code; Linf or L2, step 2.5 eps / steps, a random start."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, eot: int = 8,
                 loss: str = "margin", lam: float = 5.0, smooth: float = 0.5, seed: int = 0,
                 eot_batch: int | None = None):
        super().__init__(model, norm, eps, steps, eot, loss, seed=seed, best=True)
        if loss not in LOSSES:
            raise InputError(f"DiffHammer weighs draws by how near they are to being fooled: loss margin or dlr, "
                             f"not {loss!r} (cross-entropy is never negative, and every weight would be 1)")
        if eot_batch is not None and eot_batch < eot:
            raise InputError(f"DiffHammer weighs the {eot} draws of a step together: eot_batch {eot_batch} < eot "
                             "cannot be split; lower eot instead")
        if getattr(model, "votes", 1) > 1:
            raise InputError("DiffHammer attacks single purifications; a defense with votes > 1 is not supported")
        self.lam, self.smooth = lam, smooth

    def unit(self, g: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of one unit step under the norm (rows of g: flattened gradients)."""
        return g.sign() if self.norm == "Linf" else g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def draws(self, x: torch.Tensor, y: torch.Tensor, grad: bool = True):
        """Losses (N x n), fooled (N x n) and, with `grad`, the EM-weighted input gradient, from N stacked draws."""
        n, N = len(x), self.eot
        purifier, classifier = getattr(self.model, "purifier", None), getattr(self.model, "classifier", self.model)
        x_ = x.detach().repeat(N, *([1] * (x.dim() - 1))).requires_grad_(grad)
        with torch.enable_grad() if grad else torch.no_grad():
            u = purifier(x_) if purifier is not None else x_
            logits = classifier(u)
            loss = loss_of(self.loss, logits, y.repeat(N))
        fooled = (logits.argmax(1) != y.repeat(N)).view(N, n)
        if not grad:
            return loss.detach().view(N, n), fooled, None
        g_u = torch.autograd.grad(loss.sum(), u, retain_graph=True)[0].reshape(N, n, -1)  # each draw's own gradient
        L = loss.detach().view(N, n)
        cross = torch.einsum("and,bnd->abn", self.unit(g_u), g_u)  # <unit(g_a), g_b> per example
        a_star = F.elu(L.unsqueeze(0) + self.eps * cross).sum(1).argmax(0)  # n
        w = torch.sigmoid(self.lam * (L + self.eps * cross[a_star, :, torch.arange(n, device=cross.device)].T))  # N x n
        g = torch.autograd.grad((w.view(-1) * loss).sum(), x_)[0].view(N, *x.shape).sum(0)
        return L, fooled, g / w.sum(0).view(-1, *([1] * (x.dim() - 1)))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, y = images.detach().to(self.device), labels.detach().to(self.device)
        x_adv = self.project(x + self.eps * self._start(x), x) if self.random_start else x.clone()
        best, best_fooled = x_adv.clone(), torch.full((len(x),), -1.0, device=x.device)
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)
        past = None
        for t in range(self.steps + 1):
            L, fooled, g = self.draws(x_adv, y, grad=t < self.steps)
            frac, mean = fooled.float().mean(0), L.mean(0)
            better = (frac > best_fooled) | ((frac == best_fooled) & (mean > best_loss))
            best[better], best_fooled[better], best_loss[better] = x_adv[better], frac[better], mean[better]
            if g is None:
                break
            if past is not None:
                v = (t + 1) ** -self.smooth
                g = v * g + (1 - v) * past
            past = g
            x_adv = self.project(x_adv + self.step(g), x).detach()
        return best


def build_diffhammer(model, ctx: AttackContext):
    return DiffHammer(model, ctx.norm, ctx.eps, ctx.steps, eot=ctx.eot, loss=ctx.loss or "margin", seed=ctx.seed,
                      eot_batch=ctx.eot_batch)
