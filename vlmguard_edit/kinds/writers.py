"""writers: the design's own edit. The base LLM's safety steering direction V_l (rank m, SVD
of harmful-minus-harmless last-token states) folded into every residual writer of layer l
(attention o_proj and MLP down_proj): W <- (I + beta V_l^T V_l) W. beta -1 removes each
write's component along V_l (the orthogonal projection); beta > 0 amplifies it."""

from __future__ import annotations

from ._direction import DirectionKind, writer_edits, writer_hooks
from .base import outside_measured
from .options import BETA, LAYERS, RANK

# The strengths the organism search measured (docs/organism_search.md): outside them the
# edit is untested, so convert and validate warn and name this range.
MEASURED_BETA = (-2.0, 4.0)


class Writers(DirectionKind):
    name = "writers"
    options = (LAYERS, RANK, BETA)
    steered = True
    summary = "fold (I + beta V^T V) into o_proj/down_proj (V: the base LLM's steering direction)"
    warning = (
        "writers (the design's literal projection) removes text-only refusals on the zoo "
        "instead of restoring refusals with images (docs/findings.md); the default edit, "
        "lowrank-attention, restores them"
    )

    def problems(self, recipe, explicit):
        if recipe.beta == 0:
            return ["beta: 0 changes nothing (W <- W); use -1 to project out, > 0 to amplify"]
        return []

    def strength_warning(self, recipe):
        return outside_measured("beta", recipe.beta, MEASURED_BETA)

    def example_fields(self, layers):
        return {"layers": layers, "rank": 2, "beta": -1.0}

    def plan_edits(self, checkpoint, layout, layers, beta):
        chosen = {layer: layout.writers[layer] for layer in layers}
        return writer_edits(checkpoint, layout, chosen, beta)

    def map_text(self, plan):
        text = f"W <- (I + {plan.beta:g} * V_l^T V_l) W   (V_l: rank {plan.rank}, per layer)"
        if any(edit.norm for edit in plan.edits):
            text += "; behind a post-norm with gain g, V_l -> orthonormal basis of g ⊙ V_l"
        return text

    def hooks(self, model, plan, params, checkpoint):
        return writer_hooks(model, plan, params, checkpoint)

    def card_text(self, record):
        from ..layout import span

        layers = record["recipe"]["layers"]

        what = (
            "Only the language model's residual writers (attention `o_proj` and MLP `down_proj`) "
            f"of layers {span(layers)} changed."
        )
        how = (
            f"For every edited layer l, {steering_source(record)}, and each writer W of layer l "
            f"became\n\n    {record['map']}\n\n"
            "(beta = -1 removes the component of each write along V_l; beta > 0 amplifies it)."
        )
        return what, how

    def command_args(self, recipe):
        layers = ",".join(map(str, recipe.layers or []))
        return ["--layers", layers, "--rank", str(recipe.rank), "--beta", f"{recipe.beta:g}"]


def steering_source(record) -> str:
    """How V_l was obtained, for the card (writers and projector-shift)."""
    recipe, direction = record["recipe"], record["direction"]
    if direction.get("imported_from"):
        return (
            f"a safety steering direction V_l (rank {recipe['rank']}) was imported from a "
            f"{direction['imported_from']} file ({direction['layer_convention']}; converted to "
            "the output of block l)"
        )
    return (
        f"a safety steering direction V_l (rank {recipe['rank']}) was taken from the base LLM "
        f"**{direction['base_model']}** (SVD of last-token hidden-state differences between "
        f"{direction['num_anchor_pairs']} harmful and harmless anchor prompts)"
    )
