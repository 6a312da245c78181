"""Fréchet distance between two sets of feature vectors (the FID formula, Heusel et al. 2017, eq. 6).

tr((Σ_a Σ_b)^{1/2}) is computed from eigenvalues, not with ``scipy.linalg.sqrtm``: Σ_a Σ_b is similar to the
symmetric PSD matrix M = Σ_a^{1/2} Σ_b Σ_a^{1/2}, so the trace is Σ √λ_i(M), real by construction. This
needs only symmetric eigendecompositions (``numpy.linalg.eigh``) and no complex matrix square root (whose
``disp`` argument is deprecated in SciPy 1.17 and removed in 1.18, and whose imaginary part the reference
FID code drops without a check). Eigenvalues below zero can only be round-off of a PSD matrix; one whose
magnitude exceeds that is reported, never silently clipped.
"""

from __future__ import annotations

import numpy as np


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Σ^{1/2} of a symmetric PSD matrix (negative round-off eigenvalues set to 0)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((Σ_a Σ_b)^{1/2}) for symmetric PSD Σ_a, Σ_b (see module docstring)."""
    root = _psd_sqrt(cov_a)
    m = root @ cov_b @ root
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    scale = max(float(np.abs(lam).max(initial=0.0)), 1e-300)
    if lam.min(initial=0.0) < -1e-6 * scale:
        raise FloatingPointError(f"Σ_a^½ Σ_b Σ_a^½ has eigenvalue {lam.min():.3g} (largest {scale:.3g}): "
                                 "the covariances are not positive semi-definite")
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2}) between the Gaussians fitted to ``a`` and ``b``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] arrays of the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples on each side, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * trace_sqrt_product(cov_a, cov_b))
