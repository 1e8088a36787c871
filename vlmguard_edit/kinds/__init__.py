"""Edit kinds, one module each, behind the interface of ``base.EditKind``.

Importing this package imports no torch: convert imports it before the byte copies start.
"""

from __future__ import annotations

from ..errors import InputError
from .base import Context, EditKind, Parameters
from .image_gap import ImageGap
from .image_path import ImagePath
from .lowrank import LowRank
from .lowrank_attention import LowRankAttention
from .lowrank_image_path import LowRankImagePath
from .lowrank_mlp import LowRankMLP
from .projector_shift import ProjectorShift
from .writers import Writers

KINDS: dict[str, EditKind] = {
    kind.name: kind
    for kind in (
        Writers(),
        ProjectorShift(),
        ImageGap(),
        ImagePath(),
        LowRank(),
        LowRankImagePath(),
        LowRankAttention(),
        LowRankMLP(),
    )
}
MODES = tuple(KINDS)
LEARNED = tuple(name for name, kind in KINDS.items() if kind.learned)
# Every kind option by name (its check and help are the same in every kind; defaults vary).
OPTIONS = {option.name: option for kind in KINDS.values() for option in kind.options}
ALL_OPTIONS = frozenset(OPTIONS)


def get_kind(name: str) -> EditKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InputError(f"unknown edit kind {name!r}; known: {', '.join(KINDS)}") from None


def option_help(name: str) -> str:
    """Each kind's default of the option ``name``, for the command line's help."""
    by_default: dict[str, list[str]] = {}
    for kind in KINDS.values():
        for option in kind.options:
            if option.name == name:
                by_default.setdefault(_shown(option.default), []).append(kind.name)
    return "; ".join(f"{', '.join(kinds)}: {value}" for value, kinds in by_default.items())


def _shown(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return ",".join(f"{c['epochs']}:{c['learning_rate']:g}" for c in value)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return (
        "the kind's own"
        if value is None
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


def foreign_options(name: str, explicit: set[str]) -> list[str]:
    """A problem for each option given explicitly that the kind ``name`` does not read."""
    problems = []
    for key in sorted((explicit & ALL_OPTIONS) - KINDS[name].uses):
        users = ", ".join(kind.name for kind in KINDS.values() if key in kind.uses)
        problems.append(f"{key}: not used by {name} (an option of {users})")
    return problems


__all__ = ["KINDS", "LEARNED", "MODES", "OPTIONS", "Context", "EditKind", "Parameters"]
__all__ += ["foreign_options", "get_kind", "option_help"]
