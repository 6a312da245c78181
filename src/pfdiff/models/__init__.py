"""Networks: encoders E (images, 1-D signals, features), classifiers G and the feature denoiser ε_θ."""

from pfdiff.models.classifiers import CosineClassifier, create_classifier
from pfdiff.models.denoisers import DiagonalAffine, FeatureDenoiser, skip_for, timestep_embedding
from pfdiff.models.encoders import CNN1D, ENCODERS, IdentityEncoder, ResNet32, SmallCNN, create_encoder

__all__ = ["CosineClassifier", "create_classifier", "DiagonalAffine", "FeatureDenoiser", "skip_for", "timestep_embedding",
           "CNN1D", "ENCODERS", "IdentityEncoder", "ResNet32", "SmallCNN", "create_encoder"]
