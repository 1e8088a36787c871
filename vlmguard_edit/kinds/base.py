"""The interface every edit kind implements (one module per kind, as peft has one per adapter).

An edit kind says, for one way of guarding a VLM:
- which recipe options it reads and which it rules out (``problems``);
- which tensors it changes (``plan_edits``; the plan is built before any weight is read);
- how its parameters are obtained: measured on a model or learned (``parameters``), or read
  back from the file it ships beside the weights (``load``);
- its exact fold, one planned tensor at a time (``prepare`` once, then ``fold``);
- its runtime-hook reference (``hooks``): an unmodified model running these hooks must give
  the folded checkpoint's outputs to float32 rounding;
- how the card and the reproduce command describe it (``card_text``, ``command_args``).

convert, calibrate, verify and the card iterate over this interface and never compare the
mode string; adding a kind is one module here plus its entry in ``KINDS``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from .options import Option, defaults

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint, ModelSource
    from ..layout import Layout
    from ..plan import Plan, PlannedEdit
    from ..recipe_data import Recipe


@dataclass
class Context:
    """What ``parameters`` may use: the options (``convert.ConvertOptions``), the resolved
    source, its checkpoint and layout, and the plan."""

    opts: Any
    source: ModelSource
    checkpoint: Checkpoint
    layout: Layout
    plan: Plan


@dataclass
class Parameters:
    """An edit's parameters: ``value`` is what the fold uses, ``saved`` the object written
    beside the weights (scrubbed of local paths), ``base_check`` how a separate base LLM
    compared with the VLM (None when there is none)."""

    value: Any
    saved: Any
    base_check: dict[str, Any] | None = None


DIRECTION_NAME = "vlmguard_direction.safetensors"  # a measured kind's per-layer directions


def outside_measured(name: str, value: float, measured: tuple[float, float]) -> str | None:
    """The warning for a strength outside the range the organism search measured."""
    low, high = measured
    if low <= value <= high:
        return None
    return (
        f"{name} {value:g} is outside the measured range [{low:g}, {high:g}] "
        "(docs/organism_search.md): measure the result with vlmguard-edit eval"
    )


def upper_half(num_layers: int) -> list[int]:
    """Provisional default layers: the upper half of the text layers (README, 'Defaults')."""
    return list(range(num_layers // 2, num_layers))


class EditKind:
    name: str = ""
    learned: bool = False  # parameters learned (an edit file) rather than measured (a direction)
    file_name: str = DIRECTION_NAME
    # The recipe options this kind reads, with its own defaults (kinds/options.py); one given
    # explicitly for a kind that does not read it is refused (recipes.mode_problems).
    options: tuple[Option, ...] = ()
    summary: str = ""  # one line: what it edits (the CLI's --mode help, the docs)
    warning: str = ""  # said whenever the kind is used (a measured reason to prefer another)
    # Whether the parameters are the base LLM's safety steering direction (the `direction`
    # command computes it; --base-llm names the LLM); else how they are obtained.
    steered: bool = False
    lora: bool = True  # whether the change is a LoRA update (lora_factors; PEFT adapters)
    obtained: str = ""

    # ------------------------------------------------------------------ recipe
    @property
    def uses(self) -> frozenset[str]:
        """The names of the recipe options this kind reads."""
        return frozenset(option.name for option in self.options)

    def default_fields(self) -> dict[str, Any]:
        """This kind's default recipe fields (its options' defaults)."""
        return defaults(self.options)

    def problems(self, recipe: Recipe, explicit: set[str]) -> list[str]:
        """What this kind rules out in ``recipe`` (``explicit``: the keys the user gave)."""
        return []

    def strength_warning(self, recipe: Recipe) -> str | None:
        """A strength far outside anything measured (allowed, but said)."""
        return None

    def default_layers(self, layout: Layout) -> list[int]:
        return upper_half(layout.num_layers)

    # ------------------------------------------------------------------ plan
    def plan_edits(
        self, checkpoint: Checkpoint, layout: Layout, layers: list[int], beta: float
    ) -> list[PlannedEdit]:
        """Every tensor the edit changes; refuses (PlanError) what it cannot fold exactly."""
        raise NotImplementedError

    def plan_layers(self, layers: list[int]) -> list[int]:
        """The layers the plan records (a kind that uses no layer's direction records none)."""
        return list(layers)

    def map_text(self, plan: Plan) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ parameters
    def check_request(self, ctx: Context) -> None:
        """A dry run's check of what ``parameters`` would need (reads no weights)."""

    def parameters(self, ctx: Context) -> Parameters:
        raise NotImplementedError

    def load(self, path: Path, plan: Plan) -> Any:
        """The fold's parameters from the file this kind ships beside the weights."""
        raise NotImplementedError

    def record_fields(self, saved: Any, plan: Plan) -> dict[str, Any]:
        """Kind-specific fields of the record's ``direction`` entry."""
        return {}

    # ------------------------------------------------------------------ fold
    def prepare(self, checkpoint: Checkpoint, plan: Plan, params: Any) -> Any:
        """Anything the fold computes once for the whole plan (e.g. a shift vector)."""
        return None

    def fold(
        self,
        checkpoint: Checkpoint,
        plan: Plan,
        edit: PlannedEdit,
        before: torch.Tensor,
        params: Any,
        prepared: Any,
    ) -> torch.Tensor:
        raise NotImplementedError

    def hooks(
        self, model: torch.nn.Module, plan: Plan, params: Any, checkpoint: Checkpoint
    ) -> contextlib.AbstractContextManager:
        """The runtime reference: while active, the unmodified ``model`` computes what the
        folded checkpoint computes (``checkpoint``: the source, for anything the fold reads)."""
        raise NotImplementedError

    def lora_factors(self, checkpoint: Checkpoint, plan: Plan, params: Any) -> dict[str, Any]:
        """The edit as an exact LoRA: {checkpoint module: (A (r, in), B (out, r))} with
        W' = W + B A; raises PlanError naming why a kind (or a tensor) is not one."""
        raise PlanError(f"{self.name} is not a LoRA update")

    # ------------------------------------------------------------------ examples
    def example_fields(self, layers: list[int]) -> dict[str, Any]:
        """Recipe fields that exercise this kind on a model whose text layers are ``layers``:
        the one fixture of the self-test and the tests (tests/test_kinds.py, test_adapter)."""
        return {"layers": layers, "rank": 2}

    def example_parameters(self, plan: Plan, path: Path) -> Path:
        """Made-up (seeded) parameters for ``plan`` in this kind's own file format, written
        to ``path``: what ``parameters`` would measure or learn, for tests."""
        raise NotImplementedError

    # ------------------------------------------------------------------ description
    def card_text(self, record: dict[str, Any]) -> tuple[str, str]:
        """(what changed, how it was obtained) for the model card."""
        raise NotImplementedError

    def command_args(self, recipe: Recipe) -> list[str]:
        """The options after ``--mode NAME`` that reproduce this kind's choices."""
        return []

    @property
    def held(self) -> str:
        """What the shipped file holds, for the card."""
        return "learned deltas" if self.learned else "directions"
