"""Small helpers for the sentences of the reports (no plotting imports)."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``"1 class"``, ``"2 classes"``, ``"0 runs"``: ``n`` and the noun in the number it takes."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {many or (noun + 'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else noun + 's')}"
