"""The certification report: certified accuracy against radius, the attack beside it, and the plot."""

from __future__ import annotations

from statistics import NormalDist


def certified_plot(results: dict, path) -> None:
    """Certified accuracy against L2 radius, one curve per defense (from the per-radius summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, r in results.items():
        radii = [float(k) for k in r["certified_accuracy"]]
        line, = ax.plot(radii, [100 * v for v in r["certified_accuracy"].values()], marker="o",
                        label=f"{label} (sigma {r['sigma']:.3g})")
        if r.get("attack"):
            ax.plot([float(k) for k in r["attack"]], [100 * c["attacked_accuracy"] for c in r["attack"].values()],
                    ls="--", marker="x", color=line.get_color(), label=f"{label}: attacked (upper bound)")
    ax.set_xlabel("L2 radius ([0, 1] pixels)"), ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ceiling(n: int, alpha: float) -> float:
    """The largest certifiable radius in units of sigma with n draws: Phi^-1 of the bound when all n agree."""
    return NormalDist().inv_cdf(alpha ** (1 / n))


def render(report: dict) -> str:
    """The certification report a person reads."""
    lines = [f"# Certified L2 robustness on {report['dataset']} (randomized smoothing)", "", *body(report)]
    return "\n".join(lines)


def _of_batch(r: dict) -> str:
    mark = "" if r.get("batch_rate_same_session", True) else " †"
    return f"{100 * r['draws_per_second'] / r['batch_draws_per_second']:.0f}%{mark}"


def body(report: dict, level: str = "##", folder: str = "") -> list[str]:
    """The report's text below its title: the table, the attack beside it, the plot (for embedding elsewhere)."""
    res = report["defenses"]
    radii = list(next(iter(res.values()))["certified_accuracy"]) if res else []
    head = ["defense", "NFE", "sigma", "t_star", "r max"] + [f"r = {r}" for r in radii] + [
        "ACR", "abstain", "s / image", "draws / s", "of batch rate"]
    lines = [f"Cohen et al.'s CERTIFY: n0 {report['n0']}, N {report['n']}, alpha {report['alpha']}, on the same "
             f"{report['examples']} seeded test images for every row. Certified accuracy in % ± its standard error "
             "(correct and certified at least that radius, [0, 1] pixels); ACR: average certified radius. A "
             "certificate is a lower bound on the accuracy any L2 attacker of that radius can leave. Draws / s: "
             "purifications per second while certifying; of batch rate: that against one plain forward pass of "
             f"{report.get('batch', 'a batch of')} draws, timed alone in the session that certified the row (marked "
             "† where some records came from an earlier run: then not comparable). With N draws no "
             "radius can exceed sigma "
             f"Phi^-1(alpha^(1/N)) = {ceiling(report['n'], report['alpha']):.2f} sigma (r max below).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in res.items():
        acc_ = [f"{100 * r['certified_accuracy'][k]:.1f} ± {100 * r['certified_accuracy_se'][k]:.1f}" for k in radii]
        t = "-" if r["t_star"] is None else f"{r['t_star']:.4f}"
        top = r["sigma"] * ceiling(report["n"], report["alpha"])
        lines.append("| " + " | ".join([label, str(r["nfe"]), f"{r['sigma']:.3f}", t, f"{top:.2f}", *acc_,
                                        f"{r['acr']:.3f}",
                                        f"{100 * r['abstain']:.1f}%", f"{r['seconds_per_image']:.2f}",
                                        f"{r['draws_per_second']:.0f}",
                                        _of_batch(r)]) + " |")
    if report.get("attack"):
        a = report["attack"]
        lines += ["", f"{level} The attack beside the certificate", "",
                  f"L2 PGD, {a['steps']} steps, on the mean softmax of {a['votes']} purifications (SmoothAdv's attack) "
                  "at each radius where some example is certified; the attacked point judged by PREDICT with "
                  f"{a['n']} draws (abstaining counts as wrong). Attacked accuracy is an upper bound, certified "
                  "accuracy a lower bound: a certified example that the attack turns into a definite wrong "
                  "prediction contradicts its certificate. Flagged when such examples are more than chance allows "
                  f"(each side errs with probability alpha = {report['alpha']}; limit: Bin(certified, 2 alpha) at "
                  "level 0.01).", "", "| defense | r | certified | attacked | contradictions (limit) | flag |",
                  "|---|---|---|---|---|---|"]
        for label, r in res.items():
            for k, c in r.get("attack", {}).items():
                lines.append(f"| {label} | {k} | {100 * c['certified_accuracy']:.1f}% | "
                             f"{100 * c['attacked_accuracy']:.1f}% | {len(c['contradictions'])} ({c['limit']}) | "
                             f"{'**raised**' if c['flag'] else '-'} |")
        lines += ["", "Flags raised: " + (", ".join(report["raised"]) if report["raised"] else "none") + "."]
    return lines + ["", f"![certified accuracy against radius]({folder}certified_vs_radius.png)", "",
                    f"Per-example records (prediction, p_A lower bound, radius, seconds): `{folder}<defense>/records.jsonl`.",
                    ""]
