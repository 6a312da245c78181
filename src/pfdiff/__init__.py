"""pfdiff: private, federated diffusion in feature space for long-tailed recognition.

Python API: ``pfdiff.run(config, out=None, overrides=())`` (see ``pfdiff.api``); command line: ``pfdiff`` or
``python -m pfdiff``.
"""

__version__ = "0.1.0"


def run(*args, **kwargs):
    """``pfdiff.api.run`` (imported on first use, so ``import pfdiff`` stays light)."""
    from pfdiff.api import run as _run

    return _run(*args, **kwargs)
