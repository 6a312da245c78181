"""Where private randomness comes from: one source for every draw a privacy guarantee rests on.

A DP guarantee holds only if the adversary cannot predict the mechanism's noise. pfdiff publishes the run
seed (config.yaml, the report), so noise derived from it is no noise at all: anyone can re-draw it and
subtract it (the noisy class counts were inverted exactly that way, and two releases with the same seed
cancel each other's noise). Hence:

- **secure** (the default): every private draw — DP-SGD's Gaussian noise, its Poisson batches, noisy class
  counts, federated clients' noise, DPDM's DP-SGD — comes from a ``torch.Generator`` seeded per draw with 63
  fresh bits of OS entropy (:func:`secrets.randbits`, i.e. ``os.urandom``). The seeds are never stored or
  logged. Every draw is new, so a step that is re-executed (a resumed run repeating the steps after its last
  checkpoint) is a *new* release and is charged again (:class:`pfdiff.privacy.accounting.PrivacyLedger`).
- **reproducible** (``privacy.reproducible_noise: true``; debugging only): draws are derived from the run
  seed, so a run can be replayed bit for bit. The run is then **NOT PRIVATE**; the ledger, the report and
  the CLI say so.

Caveats, stated rather than hidden:

- The generator is torch's PRNG (MT19937 on CPU, Philox on CUDA), not a CSPRNG. Its seed is unguessable
  (2^63 choices per draw, fresh each time) and its outputs are never released on their own (only
  sums with gradients), which is what the guarantee needs in practice; a cryptographic generator
  (Opacus' ``PrivacyEngine(secure_mode=True)`` requires ``torchcsprng`` and draws from
  ``/dev/urandom`` through it; no ``torchcsprng`` distribution installs from PyPI for this torch, and
  pfdiff uses Opacus' ``DPOptimizer`` directly with its own generator) would remove even that assumption.
- Floating-point Gaussian samples are not exactly Gaussian (Mironov, CCS 2012: the low-order bits of
  naive float samples can reveal the unnoised value, breaking DP for the Laplace mechanism; Jin et al.
  2022 and Haney et al. 2022 for the Gaussian). Opacus' ``secure_mode`` mitigates it by drawing 2n = 4
  normals of std σ and returning their sum / 2 (Holohan & Braghin 2021, §5.1), which costs four normal
  draws per coordinate instead of one. ``privacy.secure_mode: true`` turns that on for DP-SGD (measured
  cost in ``benchmarks/results/dp.json``); the small one-off releases here (counts) always use it.
"""

from __future__ import annotations

import secrets

import torch

from pfdiff.training import derive_seed

SECURE = "secure (OS entropy, never logged)"
NOT_PRIVATE = "reproducible: derived from the run seed — NOT PRIVATE (debugging only)"


class NoiseSource:
    """Seeds for private draws: fresh OS entropy (``reproducible=False``) or ``derive_seed(seed, …)``.

    ``seed`` is used only in reproducible mode; a secure source ignores it, so no call site can leak
    the run seed into the noise by accident.
    """

    def __init__(self, reproducible: bool = False, seed: int = 0):
        self.reproducible = bool(reproducible)
        self._seed = int(seed)

    @property
    def private(self) -> bool:
        """Whether draws from this source can carry a DP guarantee."""
        return not self.reproducible

    @property
    def label(self) -> str:
        return NOT_PRIVATE if self.reproducible else SECURE

    def seed(self, *parts: int | str) -> int:
        """A seed for one private draw; ``parts`` name the draw (used only in reproducible mode)."""
        return derive_seed(self._seed, *parts) if self.reproducible else secrets.randbits(63)

    def generator(self, device: torch.device | str, *parts: int | str) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed(*parts))

    def child(self, *parts: int | str) -> "NoiseSource":
        """A source for a sub-task (e.g. one federated client): independent streams in both modes."""
        return NoiseSource(self.reproducible, derive_seed(self._seed, *parts))

    def gaussian(self, shape: tuple[int, ...] | int, std: float, *parts: int | str) -> torch.Tensor:
        """float64 N(0, std²) samples for a one-off release, drawn Opacus' secure way (Σ of 4 N(0, std²)
        / 2: same distribution, robust to the floating-point attack; see the module doc)."""
        g = self.generator("cpu", *parts)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return torch.randn((4, *shape), generator=g, dtype=torch.float64).sum(0) * (std / 2.0)


def noise_source(privacy_cfg, seed: int) -> NoiseSource:
    """The run's source for ``seed`` from a ``PrivacyConfig`` (``reproducible_noise``)."""
    return NoiseSource(privacy_cfg.reproducible_noise, seed)
