"""The recipe options an edit kind reads: each with its default, its check and its help.

Each kind lists the options it reads (``EditKind.options``), with its own defaults where they
differ (``replace(RANK, default=4)``), as peft's per-tuner config and mergekit's
``MergeMethod.parameters()`` do; the recipe loader checks a given value with the option's
``parse``, the default recipe of a kind is its options' defaults, and the command line's
help names every kind's default. The options every kind shares (model, base LLM, anchors,
batch size, notes, family) stay in ``recipe_data.Recipe``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..recipe_data import IMAGE_KINDS, SHIFT_DIRECTIONS, parse_layers


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    # The checked value of a recipe's (or an option's) raw value; ValueError(what is wrong).
    parse: Callable[[Any], Any]
    help: str


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's true is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked(ok: Callable[[Any], bool], expected: str, cast: Callable[[Any], Any] = lambda v: v):
    """A parse function: ``cast(value)`` when ``ok(value)``, else 'expected ..., got ...'."""

    def parse(value: Any) -> Any:
        if not ok(value):
            raise ValueError(f"expected {expected}, got {value!r}")
        return cast(value)

    return parse


def _images(empty: bool):
    def ok(value: Any) -> bool:
        return isinstance(value, list) and (empty or bool(value)) and set(value) <= set(IMAGE_KINDS)

    return _checked(ok, f"a list of {', '.join(IMAGE_KINDS)}", list)


def _search(value: Any) -> list[dict[str, Any]]:
    """A list of {epochs: int >= 1, learning_rate: number in (0, 1)} candidates (empty: no
    search, one training length)."""
    expected = "a list of {epochs: N, learning_rate: R} mappings"
    if not isinstance(value, list):
        raise ValueError(f"expected {expected}, got {value!r}")
    for item in value:
        good = isinstance(item, dict) and set(item) == {"epochs", "learning_rate"}
        good = good and is_int(item["epochs"]) and item["epochs"] >= 1
        good = good and is_number(item["learning_rate"]) and 0 < item["learning_rate"] < 1
        if not good:
            raise ValueError(f"expected {expected}, got the item {item!r}")
    return [{"epochs": c["epochs"], "learning_rate": float(c["learning_rate"])} for c in value]


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


LAYERS = Option("layers", None, parse_layers, "layers to edit, e.g. 16-31 or '8-11,20'")
RANK = Option("rank", 1, _checked(lambda v: is_int(v) and v >= 1, "an integer >= 1"), "rank")
BETA = Option("beta", -1.0, _checked(_finite, "a finite number", float), "W <- (I + beta V^T V) W")
GAMMA = Option("gamma", 1.0, _checked(_finite, "a finite number", float), "b <- b + gamma u")
SHIFT_DIRECTION = Option(
    "shift_direction",
    "attention",
    _checked(lambda v: v in SHIFT_DIRECTIONS, f"one of {', '.join(SHIFT_DIRECTIONS)}"),
    "u: attention-aware, or ssd (u = V[0])",
)
EPOCHS = Option("epochs", 40, _checked(lambda v: is_int(v) and v >= 1, "an integer >= 1"), "passes")
LEARNING_RATE = Option(
    "learning_rate",
    1e-3,
    _checked(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)", float),
    "Adam learning rate",
)
IMAGES = Option("images", ["blank", "noise", "scene"], _images(empty=False), "training images")
PRESERVE_IMAGES = Option("preserve_images", [], _images(empty=True), "preservation-only images")
SEARCH = Option("search", [], _search, "calibration candidates {epochs, learning_rate}")
PRESERVATION_WEIGHT = Option(
    "preservation_weight",
    2.0,
    _checked(lambda v: _finite(v) and v > 0, "a number > 0", float),
    "the preservation rows' loss weight",
)
RECOMBINE = Option(
    "recombine",
    0,
    _checked(lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "recombined anchor pairs taught on renders",
)


def _adversarial(value: Any) -> dict[str, int] | None:
    """None (off; YAML's ``off`` reads as false), or {eps: 1-255 (in 1/255), steps: PGD steps
    per epoch >= 1}."""
    expected = "off or {eps: 1-255, steps: N >= 1}"
    if value is None or value is False or value == "off":
        return None
    good = isinstance(value, dict) and set(value) == {"eps", "steps"}
    good = good and all(is_int(value[k]) for k in ("eps", "steps"))
    if not good or not 1 <= value["eps"] <= 255 or value["steps"] < 1:
        raise ValueError(f"expected {expected}, got {value!r}")
    return {"eps": value["eps"], "steps": value["steps"]}


ADVERSARIAL = Option(
    "adversarial",
    None,
    _adversarial,
    "images crafted against the edit as it learns {eps, steps per epoch}",
)
LEARNED = (
    EPOCHS,
    LEARNING_RATE,
    IMAGES,
    PRESERVE_IMAGES,
    SEARCH,
    PRESERVATION_WEIGHT,
    RECOMBINE,
    ADVERSARIAL,
)


def defaults(options: tuple[Option, ...]) -> dict[str, Any]:
    """The recipe fields of a kind's default recipe (copies: lists are never shared)."""
    return {o.name: list(o.default) if isinstance(o.default, list) else o.default for o in options}
