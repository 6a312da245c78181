"""Networks: encoders E, classifiers G and the feature denoiser ε_θ."""

from pfdiff.models.classifiers import CosineClassifier, create_classifier
from pfdiff.models.denoisers import FeatureDenoiser, timestep_embedding
from pfdiff.models.encoders import ENCODERS, IdentityEncoder, ResNet32, SmallCNN, create_encoder

__all__ = ["CosineClassifier", "create_classifier", "FeatureDenoiser", "timestep_embedding",
           "ENCODERS", "IdentityEncoder", "ResNet32", "SmallCNN", "create_encoder"]
