"""Method names understood by the pipeline, and how each one is built for one seed.

Grammar: ``BASE[@LOSS][+la]``

- ``BASE`` is one of ``ce``, ``resample``, ``ldmlr``, ``ldmlr-aid``, ``ldmlr-ft``, ``ldmlr-paper``, ``dp-ldmlr`` or an end-to-end
  variant ``e2e-{A,B,C}`` with options (longtail/end_to_end.py): ``-{proto,cov,rad}``, ``-{aid,bnd}``, ``-bal``,
  ``-wide``, ``-detached``, ``-{ws1,ws2}``.
- ``@LOSS`` selects the stage-1 loss the base is built on: ``ce`` (default), ``la-loss``, ``bsce``,
  ``ldam-drw`` (longtail/losses.py), so every method stacks on every stage-1 encoder, as in LDMLR's table:
  ``ldmlr@bsce``, ``resample@ldam-drw``. End-to-end variants train their own E and take no ``@LOSS``.
- ``+la`` applies post-hoc logit adjustment f(x) − τ·log π with π the *effective* prior of the base (the class
  mass its classifier was fitted on: the stage-1 training counts, or real counts plus weighted
  pseudo-features after LDMLR's stage 3, uniform after cRT); τ is chosen on the validation split from
  ``la_tau_grid`` (``logit_adjust_tau`` without one). On a base whose loss already corrects for the prior
  (``la-loss``, ``bsce``) the training prior would double-correct, so τ is left to validation: 0 where the
  loss's correction holds; on digits-LT, where stage 1 drives the training loss to ≈ 0 and the correction
  fades, it picks 0.5–1 (docs/longtail_protocol.md).

Aliases: ``logit_adjust`` = ``ce+la``; a stage-1 loss alone names its stage-1 classifier: ``bsce`` = ``ce@bsce``,
``la-loss`` = ``ce@la-loss``, ``ldam-drw`` = ``ce@ldam-drw`` (also with ``+la``: ``bsce+la``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pfdiff.longtail.end_to_end import parse_e2e
from pfdiff.longtail.losses import STAGE1_LOSSES

BASES = {
    "ce": "The stage-1 classifier (E+G trained together)",
    "resample": "Class-balanced classifier re-training, cRT (Kang et al. 2020)",
    "ldmlr": "LDMLR: frozen E, pseudo-features from feature diffusion fill every class to n_max (Han et al. 2024)",
    "ldmlr-aid": "LDMLR with AID/OOD-filtered pseudo-features (Mahalanobis, tied covariance)",
    "ldmlr-ft": "LDMLR, then E fine-tuned with G on real images + the fixed pseudo-features",
    "ldmlr-paper": "LDMLR as its authors' code runs stage 3: proportional pseudo counts max(round(0.2·n_c), 5), "
                   "fc-only fine-tune (Adam 1e-3, batch 1024), LSC = +la with the real prior",
    "dp-ldmlr": "DP-LDMLR: ε_θ trained on the private part under DP (privacy.mechanism), noisy class counts, "
                "G fine-tuned on public features + pseudo-features",
}
ALIASES = {"logit_adjust": "ce+la"}
E2E_HELP = ("end-to-end E, G, ε_θ (coupled gradients unless -detached), strategy {A: synchronous, B: alternating, "
            "C: progressive}, shape term, filter, G's loss, sampler width, warm start")
GRAMMAR = ("BASE[@LOSS][+la] with BASE in {bases} or e2e-{{A,B,C}} with options "
           "[-{{proto,cov,rad}}][-{{aid,bnd}}][-bal][-wide][-detached][-{{ws1,ws2}}] (no @LOSS), "
           "LOSS in {losses} (default ce); aliases: logit_adjust = ce+la, a loss alone = ce@LOSS (e.g. bsce+la)")


def grammar() -> str:
    return GRAMMAR.format(bases=sorted(BASES), losses=sorted(STAGE1_LOSSES))


@dataclass(frozen=True)
class Method:
    name: str  # as written in the config
    base: str
    adjust: bool  # post-hoc logit adjustment with the effective prior, τ chosen on validation
    stage1: str = "ce"  # the stage-1 loss the base is built on

    @property
    def spec(self) -> str:
        """The base and its stage-1 loss, e.g. ``ldmlr@bsce`` (``ldmlr`` for ce): one trained model per spec."""
        return self.base if self.stage1 == "ce" else f"{self.base}@{self.stage1}"

    @property
    def is_baseline(self) -> bool:
        """Built on stage 1 without a generator: the stage-1 classifier (any loss, ±la) and cRT."""
        return self.base in ("ce", "resample")

    @property
    def description(self) -> str:
        text = BASES.get(self.base) or f"{E2E_HELP} ({self.base})"
        if parse_e2e(self.base) is None:
            text += f"; stage 1 with {STAGE1_LOSSES[self.stage1]}"
        return text + (" + post-hoc logit adjustment (Menon et al. 2021), τ chosen on validation" if self.adjust else "")


def parse_method(name: str) -> Method:
    """``ldmlr@bsce+la`` → Method(base='ldmlr', adjust=True, stage1='bsce'); ValueError naming the grammar."""
    spelled = ALIASES.get(name, name)
    head, plus, suffix = spelled.partition("+")
    base, at, loss = head.partition("@")
    if not at and base in STAGE1_LOSSES and base != "ce":  # `bsce` = `ce@bsce`
        base, loss = "ce", base
    loss = loss or "ce"
    problem = None
    if plus and suffix != "la":
        problem = f"the only suffix is '+la', got '+{suffix}'"
    elif at and not head.partition("@")[2]:
        problem = "'@' needs a stage-1 loss after it"
    elif loss not in STAGE1_LOSSES:
        problem = f"unknown stage-1 loss {loss!r}"
    elif base not in BASES and parse_e2e(base) is None:
        problem = f"unknown base {base!r}"
    elif parse_e2e(base) is not None and at:
        problem = f"{base} trains its own encoder end to end: '@{loss}' does not apply"
    if problem:
        raise ValueError(f"unknown method {name!r}: {problem}; grammar: {grammar()}")
    return Method(name, base, plus == "+", loss)
