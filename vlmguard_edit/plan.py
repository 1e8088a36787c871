"""Recipe + checkpoint headers -> the edit plan. No tensor data is read here.

The plan lists every tensor that changes (key, shard, layer, map) and every file that is
copied or dropped. It fails on anything it cannot decide before any byte is written, and
``--dry-run`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint, classify_files
from .errors import PlanError
from .layout import Layout

if TYPE_CHECKING:
    from .kinds.base import EditKind
    from .recipe_data import Recipe


@dataclass(frozen=True)
class PlannedEdit:
    key: str
    file: str
    layer: int  # whose direction is used
    module: str
    dtype: str
    shape: tuple[int, ...]
    kind: str = "map"  # "map": (I + beta V^T V) x;  "shift": b + gamma u;  "delta": x + dx
    norm: str | None = None  # the post-norm weight key: the map uses u ∝ (w + offset) ⊙ v
    # Fused experts (kind "experts"): the axis of each expert's matrix that is the hidden size
    # (1: (E, H, I), used as F.linear; 2: (E, I, H), used as x @ W).
    axis: int = 0


@dataclass
class Plan:
    layout: Layout
    kind: EditKind  # whose plan this is (given by the caller: the plan sits below kinds/)
    layers: list[int]
    rank: int
    beta: float
    edits: list[PlannedEdit]
    copied: list[str]  # other files, copied byte for byte
    dropped: list[str]  # other-format weight files left out (they would be unguarded)
    gamma: float = 1.0
    shift_direction: str = "attention"

    @property
    def mode(self) -> str:
        return self.kind.name

    @property
    def map_text(self) -> str:
        return self.kind.map_text(self)

    def describe(self) -> list[str]:
        lines = [
            f"family {self.layout.family.model_type}, layers under {self.layout.layer_prefix} "
            f"({self.layout.num_layers} text layers, hidden {self.layout.hidden_size})",
            f"map: {self.map_text}",
            f"{len(self.edits)} tensors change in {len(self.layers)} layers:",
        ]
        lines += [
            f"  layer {e.layer:>3}  {e.key}  {e.dtype} {list(e.shape)}  [{e.file}]"
            for e in self.edits
        ]
        lines.append(f"{len(self.copied)} other files copied unchanged")
        if self.dropped:
            lines.append(
                f"{len(self.dropped)} other-format weight files left out: {', '.join(self.dropped)}"
            )
        return lines


def resolve_layers(kind: EditKind, recipe: Recipe, layout: Layout) -> list[int]:
    """The recipe's layers, else the kind's default for this layout."""
    return kind.default_layers(layout) if recipe.layers is None else list(recipe.layers)


def build_plan(checkpoint: Checkpoint, layout: Layout, kind: EditKind, recipe: Recipe) -> Plan:
    """The plan of the edit ``kind`` (kinds/) with the ``recipe``'s layers (None: the kind's
    default) and strengths: which tensors change, which files are copied. Refuses
    (PlanError) anything that cannot be folded exactly."""
    layers = resolve_layers(kind, recipe, layout)
    rank, beta = recipe.rank, recipe.beta
    bad = [layer for layer in layers if not 0 <= layer < layout.num_layers]
    if bad:
        raise PlanError(
            f"layer(s) {bad} out of range: the model has text layers 0..{layout.num_layers - 1}"
        )
    edits = kind.plan_edits(checkpoint, layout, list(layers), beta)
    copied, dropped = classify_files(checkpoint.path, set(checkpoint.shards))
    planned = kind.plan_layers(layers)
    strengths = (recipe.gamma, recipe.shift_direction)
    return Plan(layout, kind, planned, rank, beta, edits, copied, dropped, *strengths)
