"""image-path (learned): a change dW, db of the family's last image-to-language Linear (the
LLaVA projector's linear_2, Qwen-VL's merger, ... as the layout data says; and, for mllama,
the writers of the cross-attention layers an image alone reaches), so text-only behaviour is
the original's by construction."""

from __future__ import annotations

from ..checkpoint import FLOAT_DTYPES
from ..errors import PlanError
from ..plan import PlannedEdit
from ._learned import LearnedKind


class ImagePath(LearnedKind):
    name = "image-path"
    summary = (
        "learn a change of the image-to-language Linear so that SOURCE answers harmful "
        "requests with an image as it does text only (text-only outputs cannot change)"
    )

    def plan_layers(self, layers):
        return []

    def problems(self, recipe, explicit):
        return []

    def plan_edits(self, checkpoint, layout, layers, beta):
        return image_path_edits(checkpoint, layout)

    def map_text(self, plan):
        modules = list(dict.fromkeys(e.module for e in plan.edits))
        where = modules[0] + (f" and {len(modules) - 1} more" if len(modules) > 1 else "")
        return f"W <- W + dW, b <- b + db on {where} (learned; image path only)"


def image_path_edits(checkpoint, layout) -> list[PlannedEdit]:
    """The family's last image-to-language Linear: weight and (if any) bias."""
    module = layout.image_path
    if module is None:
        known = " or ".join(layout.family.image_path) or (
            layout.family.no_image_path or "none mapped for this family"
        )
        raise PlanError(
            f"{layout.family.model_type}: no image-to-language Linear found ({known}); "
            "image-path cannot be used"
        )
    # Cross-attention layers (mllama) run only when an image is in the prompt (a text-only
    # forward skips them): their writers are on the image path too.
    modules = [(-1, module)] + [
        (w.layer, w.weight.removesuffix(".weight"))
        for layer in layout.cross_layers
        for w in layout.writers[layer]
    ]
    edits = []
    for layer, name in modules:
        for key in (f"{name}.weight", f"{name}.bias"):
            if key not in checkpoint.key_to_file:
                continue
            info = checkpoint.info(key)
            if info.dtype not in FLOAT_DTYPES:
                raise PlanError(f"{key} is {info.dtype}; only float weights can be edited")
            file = checkpoint.key_to_file[key]
            edits.append(PlannedEdit(key, file, layer, name, info.dtype, info.shape, "delta"))
    return edits
