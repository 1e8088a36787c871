"""image-gap: the image's push on each selected layer's attention output, measured on the VLM
itself (gap.py: the mean change a blank image causes at the last prompt token, with its
text-only component removed), projected out of that layer's o_proj: W_o <- (I - d d^T) W_o."""

from __future__ import annotations

from ..checkpoint import import_torch
from ..errors import PlanError
from ._direction import DirectionKind, writer_edits, writer_hooks
from .options import BETA, LAYERS, RANK


class ImageGap(DirectionKind):
    name = "image-gap"
    accepts_gap = True
    options = (LAYERS, RANK, BETA)  # rank and beta checked for their only values: 1 and -1
    obtained = "measured on the VLM itself by convert (vlmguard-edit convert VLM --recipe RECIPE)"
    summary = "project the image-gap direction (measured on the VLM itself) out of o_proj"

    def example_fields(self, layers):
        return {"layers": layers, "rank": 1}

    def problems(self, recipe, explicit):
        from ..recipe_data import SELF

        problems = []
        if recipe.base_llm.id not in (None, SELF):
            problems.append(
                "base_llm: image-gap measures its direction on the VLM itself (with and without "
                "an image); leave base_llm out"
            )
        if recipe.rank != 1:
            problems.append("rank: image-gap has rank 1")
        if recipe.beta != -1.0:
            problems.append("beta: image-gap folds the projection (beta -1) only")
        return problems

    def plan_edits(self, checkpoint, layout, layers, beta):
        chosen = {layer: layout.writers[layer][:1] for layer in layers}  # o_proj only
        normed = [w for writers in chosen.values() for w in writers if w.post_norm]
        if normed:
            raise PlanError(
                f"{layout.family.model_type} has a norm between {normed[0].module} and the "
                "residual add; image-gap is measured at the writer's output and is not "
                "supported there"
            )
        edits = writer_edits(checkpoint, layout, chosen, beta)
        if any(
            not e.module.endswith(("attn.o_proj", "attn.out_proj", "attn.dense")) for e in edits
        ):
            raise PlanError(
                f"{layout.family.model_type}: the first writer is not an attention o_proj"
            )
        return edits

    def map_text(self, plan):
        return "W_o <- (I - d_l d_l^T) W_o on attention o_proj   (d_l: image-gap direction)"

    def measure(self, ctx):
        from ..anchors import load_anchors
        from ..direction import Direction
        from ..gap import compute_gap_direction

        opts, layers = ctx.opts, ctx.plan.layers
        if opts.dry_run:  # reads no weights: a placeholder for the plan
            placeholder = import_torch().eye(ctx.layout.hidden_size)[:1]
            return Direction(dict.fromkeys(layers, placeholder)), None
        direction = compute_gap_direction(
            ctx.source,
            load_anchors(opts.recipe.anchors),
            layers,
            batch_size=opts.recipe.batch_size,
            device=opts.device,
            dtype=opts.dtype,
            trust_remote_code=opts.trust_remote_code,
            progress=opts.progress,
        )
        return direction, None

    def hooks(self, model, plan, params, checkpoint):
        return writer_hooks(model, plan, params, checkpoint, attention_only=True)

    def card_text(self, record):
        from ..layout import span

        layers, pairs = record["recipe"]["layers"], record["direction"]["num_anchor_pairs"]
        what = (
            f"Only the attention output projections (`o_proj`) of layers {span(layers)} of the "
            "language model changed."
        )
        how = (
            "For every edited layer l, an image-gap direction d_l was measured on the source "
            "model itself: the mean change that a blank image causes in layer l's attention "
            f"output at the last prompt token, over {pairs} harmful "
            "and harmless anchor prompt pairs, with its component along the text-only mean "
            "removed. Each o_proj became\n\n"
            "    W_o <- (I - d_l d_l^T) W_o\n\n"
            "so the attention no longer writes along d_l: the image's push there is removed, "
            "while text-only prompts, which carry nothing along d_l on average, barely change."
        )
        return what, how

    def command_args(self, recipe):
        return ["--layers", ",".join(map(str, recipe.layers or []))]
