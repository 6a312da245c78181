"""pfdiff: private, federated diffusion in feature space for long-tailed recognition."""

__version__ = "0.1.0"
