"""Binomial statistics of randomized smoothing (Cohen et al., 2019): the one-sided Clopper-Pearson lower bound
and the two-sided binomial test, exact in log space for the N the certificates use (no scipy needed)."""

from __future__ import annotations

import functools
import math

import numpy as np


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
