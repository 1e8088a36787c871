"""lowrank-image-path (learned): the lowrank kind's B A of every selected text layer's o_proj
and a rank-r B A of the image-to-language Linear's weight, learned together, text-only answers
held: the image path can re-map what the image tokens carry (text read in the image, for one)
before the text layers see it."""

from __future__ import annotations

from ._learned import learned_text
from .image_path import image_path_edits
from .lowrank import LowRank, o_proj_edit


class LowRankImagePath(LowRank):
    name = "lowrank-image-path"
    summary = (
        "lowrank plus a rank-r update of the image-to-language Linear's weight, learned "
        "together (image tokens re-mapped before the text layers)"
    )

    def example_fields(self, layers):
        return {"layers": layers[:1], "rank": 2}

    def plan_edits(self, checkpoint, layout, layers, beta):
        text = [o_proj_edit(checkpoint, layout, layer) for layer in layers]
        image = [e for e in image_path_edits(checkpoint, layout) if e.key.endswith(".weight")]
        return text + image  # low-rank factors change weights only: the bias stays

    def map_text(self, plan):
        image = next(e.module for e in plan.edits if e.layer == -1)
        return f"W <- W + B A on attention o_proj and on {image} (learned, rank {plan.rank})"

    def card_text(self, record):
        _, how = learned_text(record, lowrank=True)
        image = [e["module"] for e in record["edits"] if e["layer"] == -1]
        text = len(record["edits"]) - len(image)
        what = (
            f"Only the attention output projections of {text} text layers and the "
            f"image-to-language Linear `{image[0]}` changed, each by a rank-"
            f"{record['recipe']['rank']} product B A; text-only answers were held to the "
            "original's own while it was learned."
        )
        return what, how
