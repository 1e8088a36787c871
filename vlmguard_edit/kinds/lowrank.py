"""lowrank (learned): a rank-r update B A of every selected text layer's attention output
projection, the design's own edit site, learned as image-path is but also holding text-only
answers to the original's: for a VLM whose text-only behaviour must change too, and the
edit the default (lowrank-attention) builds on. A weight change is exact behind a post-norm
too: the fold is the Linear itself."""

from __future__ import annotations

from ..checkpoint import FLOAT_DTYPES
from ..errors import PlanError
from ..plan import PlannedEdit
from ._learned import LearnedKind
from .options import LAYERS, LEARNED, RANK


class LowRank(LearnedKind):
    name = "lowrank"
    factored = True
    options = (LAYERS, RANK, *LEARNED)
    preserve_text = True
    summary = (
        "learn a rank-r (--rank) update of the text layers' attention o_proj with the same "
        "teachers, text-only answers held too"
    )

    def default_layers(self, layout):
        # Every text layer; a cross-attention layer, which only an image reaches, is left to
        # the image-path kind.
        return [i for i in range(layout.num_layers) if i not in layout.cross_layers]

    def plan_edits(self, checkpoint, layout, layers, beta):
        if not layers:
            raise PlanError("lowrank needs at least one layer")
        return [o_proj_edit(checkpoint, layout, layer) for layer in layers]

    def map_text(self, plan):
        return f"W_o <- W_o + B A on attention o_proj (learned, rank {plan.rank}, per layer)"

    def command_args(self, recipe):
        layers = ",".join(map(str, recipe.layers or []))
        return ["--layers", layers, "--rank", str(recipe.rank), *super().command_args(recipe)]


ATTENTION_OUTPUTS = ("o_proj", "out_proj", "attn.dense")


def o_proj_edit(checkpoint, layout, layer: int) -> PlannedEdit:
    writer = layout.writers[layer][0]
    # o_proj, a linear-attention layer's out_proj, Persimmon's self_attn.dense: the token
    # mixer's output projection
    if not writer.module.endswith(ATTENTION_OUTPUTS) or writer.fused:
        raise PlanError(
            f"{layout.family.model_type} layer {layer}: the first writer {writer.module} is "
            "not an attention output projection; lowrank cannot be used"
        )
    info = checkpoint.info(writer.weight)
    if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
        raise PlanError(
            f"{writer.weight} is {info.dtype} {list(info.shape)}; expected a float matrix"
        )
    return delta_edit(checkpoint, writer.weight, layer)


def delta_edit(checkpoint, key: str, layer: int) -> PlannedEdit:
    """A learned change ("delta") of the weight ``key`` of a text layer."""
    info = checkpoint.info(key)
    module = key.removesuffix(".weight")
    return PlannedEdit(
        key, checkpoint.key_to_file[key], layer, module, info.dtype, info.shape, "delta"
    )
