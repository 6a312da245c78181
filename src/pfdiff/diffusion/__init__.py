"""Feature-space diffusion core: schedules, the denoiser wrapper (ε/v/x0), losses, samplers, guidance.

Knows no dataset, privacy or federation: tensors in, tensors out.
"""

from pfdiff.diffusion.denoiser import (PREDICTIONS, Denoiser, check_prediction, eps_from_x0, split_prediction,
                                       training_target, v_target, x0_from_eps)
from pfdiff.diffusion.guidance import ClassifierFreeGuidance
from pfdiff.diffusion.losses import WEIGHTINGS, DiffusionLoss, DiffusionOutput, loss_weight
from pfdiff.diffusion.samplers import (SAMPLERS, SPACINGS, ddim_step, ddpm_step, generate, get_sampler,
                                       make_timesteps, sample_ddim, sample_ddpm, sample_heun)
from pfdiff.diffusion.schedules import SCHEDULES, NoiseSchedule, cosine_schedule, linear_schedule, make_schedule

__all__ = ["PREDICTIONS", "Denoiser", "check_prediction", "eps_from_x0", "split_prediction", "training_target",
           "v_target", "x0_from_eps", "ClassifierFreeGuidance", "WEIGHTINGS", "DiffusionLoss", "DiffusionOutput",
           "loss_weight", "SAMPLERS", "SPACINGS", "ddim_step", "ddpm_step", "generate", "get_sampler",
           "make_timesteps", "sample_ddim", "sample_ddpm", "sample_heun", "SCHEDULES", "NoiseSchedule",
           "cosine_schedule", "linear_schedule", "make_schedule"]
