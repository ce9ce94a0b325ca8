"""Inference only: VP schedule, denoisers, samplers, purifiers and `load_purifier`."""

from .denoisers import UNetDenoiser
from .loading import load_purifier
from .purifier import KINDS, DiffPure, Purifier, check_images, label_of, register_purifier
from .samplers import SAMPLERS, ddim_step, ddpm_step, sample_ode, sample_sde
from .schedule import VPSchedule
from .students import ConsistencyDenoiser, ConsistencyStudent, ProgressiveStudent, sample_consistency

__all__ = ["KINDS", "ConsistencyDenoiser", "ConsistencyStudent", "DiffPure", "ProgressiveStudent", "Purifier",
           "SAMPLERS", "UNetDenoiser", "VPSchedule", "check_images", "ddim_step", "ddpm_step", "label_of",
           "load_purifier", "register_purifier", "sample_consistency", "sample_ode", "sample_sde"]
