"""Method names understood by the pipeline, and how each one is built for one seed.

Grammar: ``BASE[+la]`` where ``+la`` applies post-hoc logit adjustment with the *effective* prior
(the class mass the classifier was trained on: real counts plus weighted pseudo-features).

BASE is one of ``ce``, ``resample``, ``ldmlr``, ``ldmlr-aid``, ``ldmlr-ft``, ``dp-ldmlr`` or an end-to-end
variant ``e2e-{A,B,C}[-{proto,cov,rad}][-aid]``. ``logit_adjust`` is ``ce+la``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pfdiff.longtail.end_to_end import parse_e2e

BASES = {
    "ce": "Cross-entropy (stage 1 E+G)",
    "resample": "Class-balanced classifier re-training, cRT (Kang et al. 2020)",
    "ldmlr": "LDMLR: frozen E, pseudo-features from feature diffusion fill every class to n_max (Han et al. 2024)",
    "ldmlr-aid": "LDMLR with AID/OOD-filtered pseudo-features (Mahalanobis, tied covariance)",
    "ldmlr-ft": "LDMLR, then E fine-tuned with G on real images + the fixed pseudo-features",
    "dp-ldmlr": "DP-LDMLR: ε_θ trained on the private part under DP (privacy.mechanism), noisy class counts, "
                "G fine-tuned on public features + pseudo-features",
}
ALIASES = {"logit_adjust": "ce+la"}
E2E_HELP = "end-to-end E, G, ε_θ, strategy {A: synchronous, B: alternating, C: progressive}, shape term, ±AID"


@dataclass(frozen=True)
class Method:
    name: str  # as written in the config
    base: str
    adjust: bool  # post-hoc logit adjustment with the effective prior

    @property
    def description(self) -> str:
        text = BASES.get(self.base) or f"{E2E_HELP} ({self.base})"
        return text + (" + post-hoc logit adjustment (Menon et al. 2021)" if self.adjust else "")


def parse_method(name: str) -> Method:
    """``ldmlr+la`` → Method(base='ldmlr', adjust=True); ValueError naming the grammar otherwise."""
    spelled = ALIASES.get(name, name)
    base, _, suffix = spelled.partition("+")
    if suffix not in ("", "la") or (base not in BASES and parse_e2e(base) is None):
        raise ValueError(f"unknown method {name!r}; choose from {sorted(BASES)} or e2e-{{A,B,C}}[-{{proto,cov,rad}}]"
                         f"[-aid], each optionally with '+la'; alias: logit_adjust = ce+la")
    return Method(name, base, suffix == "la")
