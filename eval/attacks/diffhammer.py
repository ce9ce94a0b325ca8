"""DiffHammer (Wang et al., NeurIPS 2024): the selective attack on diffusion purification.

Averaging the gradients of all purification draws (EOT) lets draws that pull in different directions cancel
(the paper's "gradient dilemma"). DiffHammer's EM step instead picks, per example, the draw a* whose attack
direction most raises the other draws' losses (selection: argmax_a sum_b ELU(L_b + eps <unit(g_a), g_b>)),
weights every draw by how near that direction brings it to fooling the classifier (E-step:
w_b = sigmoid(lam (L_b + eps <unit(g_a*), g_b>)): the first-order loss after a full step; the released code's
E-step omits eps, which makes the direction term dominate), and follows the weighted gradient (M-step,
sum_b w_b J_b^T g_b / sum_b w_b, exact through every draw), with a decaying average of past gradients as theirs
(v = (t + 1)^-smooth); each example keeps the iterate that fooled the most of its draws, the mean loss breaking
ties.

Where agreement is measured. The released code takes g_b at draw b's purified image (and grafts the M-step
through the selected draw's chain). A dilemma that lives in the purifier's Jacobian (draws that agree on what
the classifier wants of the purified image but map it back to the input differently) is then invisible: every
draw looks alike. By default (`agreement="input"`) g_b is draw b's own input gradient J_b^T g_b, which the
stacked draws give at no extra cost (one backward pass serves selection, E-step and M-step);
`agreement="purified"` measures it where the released code does (its M-step stays exact here). A draw is one
evaluation of the defense: one purification, or for a voting defense one soft vote of its K purifications (the
input variant attacks votes; the purified one, which needs the image a single purification makes, refuses
them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.errors import InputError

from .base import AttackContext
from .pgd import EOTPGD, loss_of

LOSSES = ("margin", "dlr")
AGREEMENTS = ("input", "purified")


class DiffHammer(EOTPGD):
    """`eot` draws per step (DiffHammer's N), margin (CW) loss by default, lam 5 and smoothing 0.5 as the
    released code; Linf or L2, step 2.5 eps / steps, a random start."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, eot: int = 8,
                 loss: str = "margin", lam: float = 5.0, smooth: float = 0.5, seed: int = 0,
                 eot_batch: int | None = None, agreement: str = "input"):
        super().__init__(model, norm, eps, steps, eot, loss, seed=seed, best=True)
        if loss not in LOSSES:
            raise InputError(f"DiffHammer weighs draws by how near they are to being fooled: loss margin or dlr, "
                             f"not {loss!r} (cross-entropy is never negative, and every weight would be 1)")
        if eot_batch is not None and eot_batch < eot:
            raise InputError(f"DiffHammer weighs the {eot} draws of a step together: eot_batch {eot_batch} < eot "
                             "cannot be split; lower eot instead")
        if agreement not in AGREEMENTS:
            raise InputError(f"unknown agreement {agreement!r}; known: {', '.join(AGREEMENTS)}")
        if agreement == "purified" and getattr(model, "votes", 1) > 1:
            raise InputError("agreement 'purified' reads the image one purification makes; a voting defense needs "
                             "agreement 'input' (a draw: one soft vote of its K purifications)")
        self.lam, self.smooth, self.agreement = lam, smooth, agreement

    def unit(self, g: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of one unit step under the norm (rows of g: flattened gradients)."""
        return g.sign() if self.norm == "Linf" else g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def draws(self, x: torch.Tensor, y: torch.Tensor, grad: bool = True):
        """Losses (N x n), fooled (N x n) and, with `grad`, the EM-weighted input gradient, from N stacked draws."""
        n, N, shape = len(x), self.eot, (-1,) + (1,) * (x.dim() - 1)
        x_ = x.detach().repeat(N, *([1] * (x.dim() - 1))).requires_grad_(grad)
        purified = self.agreement == "purified"
        with torch.enable_grad() if grad else torch.no_grad():
            if purified:
                purifier, classifier = getattr(self.model, "purifier", None), getattr(self.model, "classifier", self.model)
                u = purifier(x_) if purifier is not None else x_
                logits = classifier(u)
            else:
                logits = self.get_logits(x_)  # one evaluation of the defense per row: a purification, or a vote
            loss = loss_of(self.loss, logits, y.repeat(N))
        fooled = (logits.detach().argmax(1) != y.repeat(N)).view(N, n)
        L = loss.detach().view(N, n)
        if not grad:
            return L, fooled, None
        if purified:
            g_u = torch.autograd.grad(loss.sum(), u, retain_graph=True)[0].reshape(N, n, -1)
            w = self.weights(L, g_u)
            g = torch.autograd.grad((w.view(-1) * loss).sum(), x_)[0].view(N, *x.shape).sum(0)
        else:
            g_x = torch.autograd.grad(loss.sum(), x_)[0].view(N, *x.shape)  # each draw's own input gradient
            w = self.weights(L, g_x.flatten(2))
            g = (w.view(N, *shape) * g_x).sum(0)
        return L, fooled, g

    def weights(self, L: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The E-step's weights w_b / sum_b w_b (N x n) from each draw's loss and gradient (N x n x d): the selected
        draw a* is the one whose unit step raises the others' first-order losses most. Normalized in log space:
        far from fooling every sigmoid underflows to 0, and 0 / 0 would stop the attack."""
        n = L.shape[1]
        cross = torch.einsum("and,bnd->abn", self.unit(g), g)  # <unit(g_a), g_b> per example
        a_star = F.elu(L.unsqueeze(0) + self.eps * cross).sum(1).argmax(0)  # n
        z = self.lam * (L + self.eps * cross[a_star, :, torch.arange(n, device=cross.device)].T)
        return F.logsigmoid(z).softmax(0)

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


def build_diffhammer(model, ctx: AttackContext, agreement: str = "input"):
    return DiffHammer(model, ctx.norm, ctx.eps, ctx.steps, eot=ctx.eot, loss=ctx.loss or "margin", seed=ctx.seed,
                      eot_batch=ctx.eot_batch, agreement=agreement)
