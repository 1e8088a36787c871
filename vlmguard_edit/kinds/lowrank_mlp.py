"""lowrank-mlp (learned): a rank-r update B A of every selected text layer's MLP output
projection (down_proj, the MLP's residual writer) instead of the attention's, learned as
lowrank is (the VLM's own text-only answers as teacher, text-only answers held).

For a model whose refusal is written by the MLPs rather than by attention, and a second
site to compare with lowrank's o_proj on the zoo. A layer whose MLP output is fused experts
or split per expert has no single down_proj: the planner refuses it by name. The fold is
the Linear's own W + B A, exact behind any norm."""

from __future__ import annotations

from ..checkpoint import FLOAT_DTYPES
from ..errors import PlanError
from ._learned import factored_what, learned_text
from .lowrank import ATTENTION_OUTPUTS, LowRank, delta_edit


class LowRankMLP(LowRank):
    name = "lowrank-mlp"
    summary = (
        "learn a rank-r (--rank) update of the text layers' MLP down_proj with the same "
        "teachers, text-only answers held too"
    )

    def plan_edits(self, checkpoint, layout, layers, beta):
        if not layers:
            raise PlanError("lowrank-mlp needs at least one layer")
        return [mlp_output_edit(checkpoint, layout, layer) for layer in layers]

    def map_text(self, plan):
        return f"W_down <- W_down + B A on the MLP output projection (learned, rank {plan.rank})"

    def card_text(self, record):
        _, how = learned_text(record, lowrank=True)
        layers = len({e["layer"] for e in record["edits"]})
        where = f"the MLP output projections of {layers} text layers"
        what = factored_what(where, record["recipe"])
        return what, how


def mlp_output_edit(checkpoint, layout, layer: int):
    """The one plain 2-D MLP output projection among the layer's residual writers."""
    mlp = [
        w
        for w in layout.writers[layer]
        if not w.module.endswith(ATTENTION_OUTPUTS) and not w.fused and ".experts." not in w.module
    ]
    infos = [(w, checkpoint.info(w.weight)) for w in mlp]
    plain = [w for w, i in infos if i.dtype in FLOAT_DTYPES and len(i.shape) == 2]
    if len(plain) != 1:
        found = ", ".join(w.module for w in layout.writers[layer])
        raise PlanError(
            f"{layout.family.model_type} layer {layer}: no single MLP output projection among "
            f"its writers ({found}); lowrank-mlp cannot be used"
        )
    return delta_edit(checkpoint, plain[0].weight, layer)
