"""The robust-distillation benchmarks' scores over a set of attacks: BEARD's RR, AE and CREI (Zhou et al., 2024,
`metrics/white_box/auto_metrics.py`) and ROME's I-RR (Zhou et al., ICML 2025), in percent, as their code computes
them from one model's clean accuracy, its accuracy under each attack, and each attack's time."""

from __future__ import annotations

from core.errors import InputError


def robustness_ratio(clean: float, attacked: list[float]) -> float:
    """RR = 1 - (clean - mean attacked) / (clean - min attacked); 0 when the worst attack costs nothing."""
    worst = min(attacked)
    return 0.0 if clean == worst else 100 * (1 - (clean - sum(attacked) / len(attacked)) / (clean - worst))


def attack_efficiency(clean_time: float, times: list[float]) -> float:
    """AE = (mean attack time - clean time) / (max attack time - clean time); 0 when no attack costs more."""
    slowest = max(times)
    return 0.0 if slowest == clean_time else 100 * (sum(times) / len(times) - clean_time) / (slowest - clean_time)


def improved_robustness_ratio(clean: float, attacked: list[float]) -> float:
    """ROME's I-RR = 1 - (clean - mean attacked) (clean - min attacked) / clean^2."""
    if clean <= 0:
        return 0.0
    return 100 * (1 - (clean - sum(attacked) / len(attacked)) * (clean - min(attacked)) / clean ** 2)


def bench_scores(clean: float, attacked: dict[str, float], clean_time: float, times: dict[str, float],
                 alpha: float = 0.5) -> dict:
    """RR, AE, CREI = alpha RR + (1 - alpha) AE (BEARD's alpha 0.5) and I-RR over the attacks of `attacked`
    (accuracies in [0, 1] or percent, one scale throughout; times in any one unit)."""
    if len(attacked) < 2 or set(attacked) != set(times):
        raise InputError(f"benchmark scores need two or more attacks, each with a time; got {sorted(attacked)} "
                         f"and times for {sorted(times)}")
    acc, t = list(attacked.values()), [times[a] for a in attacked]
    rr, ae = robustness_ratio(clean, acc), attack_efficiency(clean_time, t)
    return {"attacks": list(attacked), "rr": rr, "ae": ae, "crei": alpha * rr + (1 - alpha) * ae,
            "i_rr": improved_robustness_ratio(clean, acc), "alpha": alpha}
