"""What a recipe holds (the data, below the edit kinds); recipes.py loads and validates it."""

from __future__ import annotations

import re
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
    """A recipe's values: the common fields and every kind's options (flat, as recipe files
    and vlmguard.json hold them). The field defaults are the kind options' plain defaults
    (kinds/options.py, kept equal by a test); a command without a recipe file starts from
    its kind's own defaults instead (recipes.base_recipe, default_recipe)."""

    model: str | None = None
    base_llm: BaseLLM = field(default_factory=BaseLLM)
    anchors: str = "default"
    layers: list[int] | None = None  # None: the kind's own default layers
    rank: int = 1
    beta: float = -1.0
    # The edit kind, one module each in kinds/ (writers, projector-shift, image-gap: measured
    # directions; the lowrank kinds and image-path: learned); each lists the options it reads.
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
    # Adversarial calibration (learned.adversarial): {eps: in 1/255, steps: PGD steps per
    # epoch} for images crafted against the edit as it learns; None: off.
    adversarial: dict[str, int] | None = None
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
# file or --mode, and what the real-model recipes hold: the edit the zoo measures as best
# (docs/results.md; why each value, docs/method.md "The default"). Its values are the kind's
# own option defaults (kinds/lowrank_attention.py; recipes.default_recipe).
DEFAULT_MODE = "lowrank-attention"


def parse_layers(spec: Any) -> list[int]:
    """Parse "10,11,12", "8-15", "8-11,20" or a list of ints into a sorted, unique list."""
    if isinstance(spec, bool):
        raise ValueError("expected layer indices, got a boolean")
    if isinstance(spec, int):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [part.strip() for part in spec.split(",") if part.strip()]
    elif isinstance(spec, list):
        items = spec
    else:
        raise ValueError(f"expected a list of layer indices or a string like '8-15', got {spec!r}")
    layers: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"bad layer {item!r}")
        if isinstance(item, int):
            layers.add(item)
            continue
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(item))
        if not match:
            raise ValueError(f"bad layer {item!r}: use integers and ranges like 8-15")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        if hi < lo:
            raise ValueError(f"bad layer range {item!r}: the end is before the start")
        layers.update(range(lo, hi + 1))
    if not layers:
        raise ValueError("no layers given")
    if min(layers) < 0:
        raise ValueError("layer indices must be >= 0")
    return sorted(layers)
