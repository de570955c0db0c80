"""What the method registries share (``implicit/preference_losses.py``, ``fusion_criteria.py``,
``merge_methods.py``): every method is one declaration, found by its name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Declared(Protocol):
    @property
    def name(self) -> str: ...


Method = TypeVar("Method", bound=Declared)


def by_name(kind: str, methods: Sequence[Method], *unique: Sequence[str]) -> dict[str, Method]:
    """The methods by name. A name declared twice is refused (the later declaration would silently
    replace the earlier), and so is a value declared twice in any of ``unique``."""
    for declared in ([method.name for method in methods], *unique):
        twice = sorted({value for value in declared if declared.count(value) > 1})
        if twice:
            raise ValueError(f"{kind} declare {', '.join(twice)} twice")
    return {method.name: method for method in methods}
