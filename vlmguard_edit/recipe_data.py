"""What a recipe holds (the data, below the edit kinds); recipes.py loads and validates it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SELF = "self"  # base_llm id meaning "the VLM's own language model, text only"


@dataclass
class BaseLLM:
    # A Hub id or folder, or "self" (the VLM's own LM). None: not given (an error at convert).
    id: str | None = None
    revision: str | None = None
    # A format string with one "{request}" placeholder, for base LLMs that ship no chat template.
    template: str | None = None


@dataclass
class Recipe:
    model: str | None = None
    base_llm: BaseLLM = field(default_factory=BaseLLM)
    anchors: str = "default"
    layers: list[int] | None = None  # None: the upper half of the text layers (provisional)
    rank: int = 1
    beta: float = -1.0
    # The edit kind, one module each in kinds/ (writers, projector-shift, image-gap: measured
    # directions; image-path, lowrank: learned); each says which options below it reads.
    mode: str = "writers"
    gamma: float = 1.0
    shift_direction: str = "attention"  # "attention": attention-aware u; "ssd": u = V[0]
    batch_size: int = 8
    # The learned kinds: how long, how fast, on which images (learned/).
    epochs: int = 40
    learning_rate: float = 1e-3
    images: list[str] = field(default_factory=lambda: ["blank", "noise", "scene"])
    # Images for the preservation rows only (harmless anchors keep the original's answers
    # with them; harmful anchors are not taught on them): for a setting the model may not
    # read, whose harmful and harmless rows it could not tell apart.
    preserve_images: list[str] = field(default_factory=list)
    # Calibration: candidates {epochs, learning_rate} tried one by one, each
    # scored on held-out anchors, one picked by a fixed rule (learned.pick). Empty: no search.
    search: list[dict[str, Any]] = field(default_factory=list)
    # The harmless (preservation) rows' loss weight against the refusal rows' (learned/).
    preservation_weight: float = 2.0
    # Recombined anchor pairs taught on typographic renders (learned.recombine); 0: none.
    recombine: int = 0
    notes: str | None = None
    # The layout family (model type) the recipe was written for: convert warns when the model
    # is of another one, and the generated family table lists the recipe. None: any family
    # (the organism recipes serve every organism builder's family).
    family: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Training images of the learned kinds; typographic renders the anchor itself (learned/).
IMAGE_KINDS = ("blank", "noise", "scene", "typographic")
SHIFT_DIRECTIONS = ("attention", "ssd")


# The one default: what `convert` and `calibrate` (and the Python API) use without a recipe
# file or --mode, and what the real-model recipes hold. It is the edit the zoo measures as
# best (docs/results.md; why each value, docs/method.md "The default").
DEFAULT_MODE = "lowrank-attention"


def default_recipe() -> Recipe:
    """The learned lowrank-attention edit: rank 4 on every text layer's o_proj and q/k/v,
    the VLM's own text-only answers as teacher, the shipped anchors, typographic renders
    behind the reading gate, preservation weight 4, calibrated over 10 and 20 epochs."""
    return Recipe(
        mode=DEFAULT_MODE,
        rank=4,
        images=["blank", "noise", "scene", "typographic"],
        preservation_weight=4.0,
        search=[{"epochs": 10, "learning_rate": 1e-3}, {"epochs": 20, "learning_rate": 1e-3}],
    )


def base_recipe(mode: str | None) -> Recipe:
    """What a command starts from without a recipe file: the default edit, or, for another
    --mode, that kind with the plain field values."""
    return default_recipe() if mode in (None, DEFAULT_MODE) else Recipe(mode=mode)
