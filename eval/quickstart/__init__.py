"""The main job: both tracks on one dataset, every classifier behind every purifier under the harness, latency.

Stages (each reused when its config and inputs are unchanged, resumed when interrupted):
1. the standard classifier (squeeze, cross-entropy) and the DiffPure teacher;
2. progressive and consistency students (1, 2 and 4 steps);
3. SRe2L and GUARD distilled data (recover from the standard / the GUARD-squeezed classifier) and
   classifiers trained on them;
4. every classifier bare and behind the teacher and each student, under standard and adaptive attacks;
5. certified robustness (randomized smoothing) of DDS, the 1-step students and Gaussian noise (bare, and a
   classifier trained with it);
6. latency of every defense; then report.{md,json} and the plots."""

from .config import FAST, CertifyBudget, HarnessBudget, LatencyBudget, QuickstartConfig, eval_config, quickstart_config, stage_configs
from .report import build_report, render
from .run import measure_latency, pretrained_teacher, quickstart

__all__ = ["CertifyBudget", "FAST", "HarnessBudget", "LatencyBudget", "QuickstartConfig", "build_report", "eval_config",
           "measure_latency", "pretrained_teacher", "quickstart", "quickstart_config", "render", "stage_configs"]
