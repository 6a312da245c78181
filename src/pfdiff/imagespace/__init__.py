"""Image-space references: diffusion models trained on the pixels themselves (no encoder)."""

from pfdiff.imagespace.dpdm import (DPDMConfig, HighNoiseDiffusionLoss, cas_accuracy, feature_fid, load_image_splits,
                                    run_dpdm, sample_balanced, save_grid, train_denoiser, train_image_classifier)

__all__ = ["DPDMConfig", "HighNoiseDiffusionLoss", "cas_accuracy", "feature_fid", "load_image_splits", "run_dpdm",
           "sample_balanced", "save_grid", "train_denoiser", "train_image_classifier"]
