"""Strict recipe loading: unknown keys and bad values are errors, all reported at once.

A recipe is a small YAML file, one per model family (see ``recipes/``)::

    model: llava-hf/llava-1.5-7b-hf
    base_llm:
      id: lmsys/vicuna-7b-v1.5
      template: "A chat between ... USER: {request} ASSISTANT:"
    anchors: default
    layers: 16-31
    rank: 1
    beta: -1.0

Command-line options override recipe values; recipe values override the defaults below.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, RecipeError
from .kinds import MODES, OPTIONS, foreign_options, get_kind
from .kinds.options import is_int
from .layout import FAMILIES
from .recipe_data import (
    DEFAULT_MODE,
    IMAGE_KINDS,
    SELF,
    SHIFT_DIRECTIONS,
    BaseLLM,
    Recipe,
    parse_layers,
)

# The keys every recipe may have: the common ones, and every kind's options (kinds/options.py).
_TOP_KEYS = {"model", "base_llm", "anchors", "mode", "batch_size", "notes", "family"}
_TOP_KEYS |= set(OPTIONS)
_BASE_KEYS = {"id", "revision", "template"}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from exc
    recipe = recipe_from_dict(data, str(path))
    # Files named in a recipe are relative to the recipe, so recipes work from any folder:
    # anchor files always, models when written as ./ or ../ paths (else they are Hub ids).
    anchors = Path(recipe.anchors)
    if recipe.anchors != "default" and not anchors.is_absolute():
        recipe.anchors = str((path.parent / anchors).resolve())
    if recipe.model and recipe.model.startswith(("./", "../")):
        recipe.model = str((path.parent / recipe.model).resolve())
    if recipe.base_llm.id and recipe.base_llm.id.startswith(("./", "../")):
        recipe.base_llm.id = str((path.parent / recipe.base_llm.id).resolve())
    return recipe


def base_recipe(mode: str | None) -> Recipe:
    """What a command starts from without a recipe file: the default edit, or, for another
    --mode, that kind's own option defaults."""
    kind = get_kind(mode or DEFAULT_MODE)
    return Recipe(mode=kind.name, **kind.default_fields())


def default_recipe() -> Recipe:
    """The learned lowrank-attention edit with its own defaults: rank 4 on every text
    layer's o_proj and q/k/v, the VLM's own text-only answers as teacher, the shipped anchors,
    typographic renders behind the reading gate, preservation weight 4, calibrated over 10
    and 20 epochs."""
    return base_recipe(DEFAULT_MODE)


def recipe_from_dict(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a parsed recipe. Collects every problem, then raises one RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError(source, ["the top level must be a mapping of keys to values"])
    # Values the file leaves out are the default edit's, or its mode's plain values.
    return recipe_with(
        base_recipe(data["mode"] if data.get("mode") in MODES else None), data, source
    )


def recipe_with(base: Recipe, data: dict[str, Any], source: str = "(options)") -> Recipe:
    """``base`` with the values of ``data`` (a recipe file's keys, command-line options or
    the Python API's keyword arguments), each checked as a recipe file's key is, and the
    result checked against its kind; every problem is collected into one RecipeError."""
    problems: list[str] = []
    recipe = replace(base, base_llm=replace(base.base_llm))
    data = {k: asdict(v) if isinstance(v, BaseLLM) else v for k, v in data.items()}
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"{key}: unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")

    def check(key: str, ok: bool, expected: str) -> bool:
        if key in data and not ok:
            problems.append(f"{key}: expected {expected}, got {data[key]!r}")
            return False
        return key in data

    if check("model", isinstance(data.get("model"), str) and data["model"].strip(), "a model id"):
        recipe.model = data["model"]
    if "base_llm" in data:
        recipe.base_llm = _base_llm(data["base_llm"], problems)
    if check("anchors", isinstance(data.get("anchors"), str), "'default' or a file path"):
        recipe.anchors = data["anchors"]
    if check("mode", data.get("mode") in MODES, f"one of {', '.join(MODES)}"):
        recipe.mode = data["mode"]
    if check("batch_size", is_int(data.get("batch_size")) and data["batch_size"] >= 1, "int >= 1"):
        recipe.batch_size = data["batch_size"]
    for key in sorted(set(data) & set(OPTIONS)):  # each checked by the option its kinds own
        try:
            setattr(recipe, key, OPTIONS[key].parse(data[key]))
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    if check("notes", isinstance(data.get("notes"), str), "text"):
        recipe.notes = data["notes"]
    if check("family", data.get("family") in FAMILIES, "a supported family (docs/families.md)"):
        recipe.family = data["family"]
    problems += mode_problems(recipe, explicit=set(data))
    if problems:
        raise RecipeError(source, problems)
    return recipe


def training_length(changes: dict[str, Any]) -> dict[str, Any]:
    """Epochs or a learning rate given without a search is the training length to use: it
    replaces the recipe's search (which would otherwise pick its own candidates)."""
    given = changes.get("epochs") is not None or changes.get("learning_rate") is not None
    if given and changes.get("search") is None:
        return {**changes, "search": []}
    return changes


def strength_problems(recipe: Recipe) -> list[str]:
    """Strengths that cannot be right: not finite (every kind); 0 for the kind that uses it."""
    problems = []
    for name in ("beta", "gamma"):
        value = getattr(recipe, name)
        if not math.isfinite(value):
            problems.append(f"{name}: expected a finite number, got {value!r}")
    return problems


def strength_warnings(recipe: Recipe) -> list[str]:
    """The kind's own warning, and strengths far outside anything measured (allowed, but
    said)."""
    kind = get_kind(recipe.mode)
    warnings = [kind.warning] if kind.warning else []
    if not strength_problems(recipe):
        warning = kind.strength_warning(recipe)
        return warnings + ([warning] if warning else [])
    return warnings


def mode_problems(recipe: Recipe, explicit: set[str]) -> list[str]:
    """What the recipe's kind rules out (shared by recipe files and command-line options).
    ``explicit``: the keys the user gave (a default value is never a problem)."""
    kind = get_kind(recipe.mode)
    problems = strength_problems(recipe) + kind.problems(recipe, explicit)
    return problems + foreign_options(recipe.mode, explicit)


def _base_llm(value: Any, problems: list[str]) -> BaseLLM:
    if isinstance(value, str):
        return BaseLLM(id=value)
    if not isinstance(value, dict):
        problems.append(f"base_llm: expected a model id or a mapping, got {value!r}")
        return BaseLLM()
    base = BaseLLM()
    for key in sorted(set(value) - _BASE_KEYS):
        problems.append(f"base_llm.{key}: unknown key (allowed: {', '.join(sorted(_BASE_KEYS))})")
    if "id" not in value:
        problems.append("base_llm.id: missing (a Hub id, a folder, or 'self')")
    for key in sorted(_BASE_KEYS & set(value)):
        item = value[key]
        if key != "id" and item is None:
            continue
        if not isinstance(item, str) or not item.strip():
            problems.append(f"base_llm.{key}: expected text, got {item!r}")
            continue
        setattr(base, key, item)
    if base.template is not None and "{request}" not in base.template:
        problems.append("base_llm.template: must contain the placeholder {request}")
    return base


# The recipe's data lives in recipe_data (below the edit kinds); these names stay importable
# from here, where users have always found them.
__all__ = ["DEFAULT_MODE", "IMAGE_KINDS", "SELF", "SHIFT_DIRECTIONS", "BaseLLM", "Recipe"]
__all__ += ["base_recipe", "default_recipe"]
__all__ += ["load_recipe", "mode_problems", "parse_layers", "recipe_from_dict", "recipe_with"]
__all__ += ["strength_problems", "strength_warnings", "training_length"]
