"""lowrank-attention (learned): the lowrank kind's B A of every selected text layer's
attention output projection, and a rank-r B A of the same layer's query, key and value
projections wherever they are separate Linears, learned together, text-only answers held.

Why the inputs too: an o_proj change re-mixes what each position's attention already read,
but the last prompt token of a typographic prompt does not read the request in the image
(on the organism that reads, a linear probe there tells harmful renders from harmless ones
at 65-70% on unseen nouns): a q/k change can make it attend to the words that do carry it.
Each change is a plain Linear's weight, so the fold is exact (W + B A) behind any norm."""

from __future__ import annotations

from dataclasses import replace

from ..checkpoint import FLOAT_DTYPES
from ..plan import PlannedEdit
from ._learned import factored_what, learned_text
from .lowrank import LowRank, delta_edit
from .options import IMAGES, LAYERS, LEARNED, PRESERVATION_WEIGHT, RANK, SEARCH

INPUTS = ("q_proj", "k_proj", "v_proj")  # an attention module's separate input projections


class LowRankAttention(LowRank):
    name = "lowrank-attention"
    summary = (
        "lowrank plus a rank-r update of each layer's attention q/k/v projections (where "
        "separate), learned together: what the last prompt token attends to can change (the "
        "default edit)"
    )
    # The default edit's values (docs/method.md, "The default"): rank 4, typographic renders
    # behind the reading gate, preservation weight 4, calibrated over 10 and 20 epochs.
    options = (
        LAYERS,
        replace(RANK, default=4),
        *(o for o in LEARNED if o.name not in ("images", "preservation_weight", "search")),
        replace(IMAGES, default=["blank", "noise", "scene", "typographic"]),
        replace(PRESERVATION_WEIGHT, default=4.0),
        replace(SEARCH, default=[{"epochs": n, "learning_rate": 1e-3} for n in (10, 20)]),
    )

    def plan_edits(self, checkpoint, layout, layers, beta):
        edits = super().plan_edits(checkpoint, layout, layers, beta)
        return edits + [e for edit in edits for e in input_edits(checkpoint, edit)]

    def map_text(self, plan):
        inputs = sum(edit.key.rsplit(".", 2)[-2] in INPUTS for edit in plan.edits)
        return (
            f"W <- W + B A on attention o_proj and on {inputs} q/k/v projections "
            f"(learned, rank {plan.rank}, per layer)"
        )

    def card_text(self, record):
        _, how = learned_text(record, lowrank=True)
        layers = len({e["layer"] for e in record["edits"]})
        inputs = sum(e["module"].rsplit(".", 1)[-1] in INPUTS for e in record["edits"])
        where = (
            f"the attention projections of {layers} text layers (the outputs, and {inputs} "
            "query/key/value projections)"
        )
        what = factored_what(where, record["recipe"])
        return what, how


def input_edits(checkpoint, output: PlannedEdit) -> list[PlannedEdit]:
    """The q/k/v projections beside an attention output projection, as separate float
    matrices in the checkpoint (none for fused qkv, latent attention or a linear-attention
    layer: those layers keep the o_proj change only)."""
    parent = output.module.rsplit(".", 1)[0]
    keys = [f"{parent}.{name}.weight" for name in INPUTS]
    infos = {k: checkpoint.info(k) for k in keys if k in checkpoint.key_to_file}
    return [
        delta_edit(checkpoint, key, output.layer)
        for key, info in infos.items()
        if info.dtype in FLOAT_DTYPES and len(info.shape) == 2
    ]
