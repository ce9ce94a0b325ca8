"""Certified L2 robustness by randomized smoothing (Cohen et al., 2019) of classifier(purifier(.)): Cohen's
CERTIFY and PREDICT and the sigma <-> t_star correspondence (`smoothing.py`, no I/O), the attack beside the
certificate (`attack.py`), the command (`run.py`) and its report (`report.py`)."""

from .run import CertifyConfig, batch_throughput, open_defense, run_certify
from .smoothing import (
                        ABSTAIN,
                        RADII,
                        GaussianSmoothing,
                        Smoothing,
                        certify,
                        predict,
                        purifier_sigma,
                        sample_counts,
                        summarize,
                        t_star_for_sigma,
)

__all__ = ["ABSTAIN", "CertifyConfig", "GaussianSmoothing", "RADII", "Smoothing", "batch_throughput", "certify",
           "open_defense", "predict", "purifier_sigma", "run_certify", "sample_counts", "summarize", "t_star_for_sigma"]
