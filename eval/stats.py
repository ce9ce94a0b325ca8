"""Every statistic the reports print: accuracy with its standard errors over examples, paired changes and
McNemar's exact sign test on the same examples, and the binomial bounds of randomized smoothing (Cohen et al.,
2019: the one-sided Clopper-Pearson bound and the two-sided binomial test, exact in log space, no scipy)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from core.errors import InputError


@functools.lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    """log k! for k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _log_binom_tail(k: int, n: int, p: float) -> float:
    """log P(Bin(n, p) >= k), summed in log space (exact for any n the certificates use)."""
    if k <= 0 or p >= 1:
        return 0.0
    if p <= 0:
        return -math.inf
    lf, j = _log_factorials(n), np.arange(k, n + 1)
    terms = lf[n] - lf[j] - lf[n - j] + j * math.log(p) + (n - j) * math.log1p(-p)
    m = terms.max()
    return float(m + math.log(np.exp(terms - m).sum()))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials: the p at which
    P(Bin(n, p) >= k) = alpha (Cohen's LowerConfBound)."""
    if k <= 0:
        return 0.0
    lo, hi = 0.0, k / n
    log_alpha = math.log(alpha)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _log_binom_tail(k, n, mid) < log_alpha else (lo, mid)
    return lo


def binom_test_p(n_a: int, n_b: int) -> float:
    """Two-sided p-value of n_a successes in n_a + n_b fair coin flips (Cohen's PREDICT test)."""
    n, k = n_a + n_b, max(n_a, n_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * math.exp(_log_binom_tail(k, n, 0.5)))


def binom_tail(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) >= k)."""
    return math.exp(_log_binom_tail(k, n, p))


def tail_limit(n: int, p: float, level: float = 0.01) -> int:
    """The smallest k with P(Bin(n, p) >= k) <= level: more events than this are not chance at that level."""
    log_level = math.log(level)
    return next(k for k in range(n + 2) if k > n or _log_binom_tail(k, n, p) <= log_level)


def flips(first, second) -> tuple[int, int]:
    """(examples correct in `first` and not in `second`, the other way round): the pairs a sign test reads."""
    return (sum(bool(a) and not b for a, b in zip(first, second)),
            sum(bool(b) and not a for a, b in zip(first, second)))


def sign_test(k: int, j: int) -> float:
    """One-sided exact sign test (McNemar's, on paired examples): P(at least k of k + j fair coin flips go one way)."""
    return binom_tail(k, k + j, 0.5) if k + j else 1.0


def paired_change(before: list, after: list) -> dict:
    """`after` against `before` on the same examples: the change of accuracy, its paired standard error (of the
    mean per-example difference), the flips each way and McNemar's one-sided exact p that `after` is lower."""
    n = len(before)
    if n == 0 or n != len(after):
        raise InputError(f"a paired change needs the same examples on both sides, got {n} and {len(after)}")
    return paired_counts(*flips(before, after), n)


def paired_counts(broken: int, recovered: int, n: int) -> dict:
    """`paired_change` from its counts alone: `broken` examples lost, `recovered` gained, of `n` paired ones."""
    if n < 1 or broken < 0 or recovered < 0 or broken + recovered > n:
        raise InputError(f"paired counts need 0 <= broken + recovered <= n, got {broken}, {recovered}, {n}")
    mean = (recovered - broken) / n
    squares = broken * (-1 - mean) ** 2 + recovered * (1 - mean) ** 2 + (n - broken - recovered) * mean ** 2
    return {"change": mean, "se": math.sqrt(squares / max(n - 1, 1) / n), "broken": broken, "recovered": recovered,
            "p": sign_test(broken, recovered)}


def accuracy_stats(m: torch.Tensor) -> dict:
    """Average and worst-case accuracy of an R x n correctness matrix, each with its standard error over the
    n examples (of the per-example mean over R, and of survival in all R)."""
    m = m.bool()
    per_example, worst = m.float().mean(0), m.all(0).float()
    n = max(1, per_example.numel() - 1)
    return {"average": per_example.mean().item(), "worst": worst.mean().item(),
            "average_se": (per_example.var(unbiased=False) / n).sqrt().item() if per_example.numel() > 1 else 0.0,
            "worst_se": (worst.var(unbiased=False) / n).sqrt().item() if worst.numel() > 1 else 0.0}


def proportion_se(p: float, n: int) -> float:
    """The standard error of a proportion p over n examples (n - 1 in the denominator, as `accuracy_stats`)."""
    return math.sqrt(p * (1 - p) / max(1, n - 1))


def pm(s: dict, key: str) -> str:
    """'62.5 ± 6.1' (percent) from an accuracy_stats entry."""
    v, se = s.get(key), s.get(f"{key}_se")
    if v is None:
        return "-"
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")
