"""projector-shift: the multimodal projector's output bias b <- b + gamma * u, so the edit acts
only on image tokens (text-only behaviour is exactly the original's). u comes from one layer's
steering direction V_l: its attention-aware form (the unit image-token state that layer's
attention maps most strongly onto V_l[0]) or V_l[0] itself ("ssd")."""

from __future__ import annotations

import contextlib

from ..checkpoint import FLOAT_DTYPES
from ..errors import PlanError
from ..plan import PlannedEdit
from ._direction import DirectionKind
from .base import outside_measured
from .options import GAMMA, LAYERS, RANK, SHIFT_DIRECTION
from .writers import steering_source

MEASURED_GAMMA = (0.25, 2.0)  # docs/organism_search.md


class ProjectorShift(DirectionKind):
    name = "projector-shift"
    options = (LAYERS, RANK, GAMMA, SHIFT_DIRECTION)
    steered = True
    lora = False  # a bias shift
    summary = "add gamma * u to the projector's output bias (image tokens only)"

    def problems(self, recipe, explicit):
        problems = []
        if recipe.layers is not None and len(recipe.layers) != 1:
            problems.append(
                "layers: projector-shift takes exactly one layer (whose direction is used)"
            )
        if recipe.gamma == 0:
            problems.append("gamma: 0 changes nothing (the bias stays as it is)")
        return problems

    def strength_warning(self, recipe):
        return outside_measured("gamma", recipe.gamma, MEASURED_GAMMA)

    def example_fields(self, layers):
        return {"layers": layers[-1:], "rank": 2, "gamma": 2.0}

    def plan_edits(self, checkpoint, layout, layers, beta):
        return [_shift_edit(checkpoint, layout, layers)]

    def map_text(self, plan):
        u = "u ∝ g ⊙ (W_o W_v)^T V_l[0]" if plan.shift_direction == "attention" else "u = V_l[0]"
        layer = plan.layers[0]
        return f"b <- b + {plan.gamma:g} * u on the projector output ({u}, layer {layer})"

    def prepare(self, checkpoint, plan, params):
        return shift_vector(checkpoint, plan, params)

    def fold(self, checkpoint, plan, edit, before, params, prepared):
        from ..fold import shift

        return shift(before, prepared, plan.gamma)

    def lora_factors(self, checkpoint, plan, params):
        raise PlanError("projector-shift changes a bias (b + gamma u): a LoRA changes weights only")

    @contextlib.contextmanager
    def hooks(self, model, plan, params, checkpoint):
        from ..runtime import ProjectorShiftHook

        with ProjectorShiftHook(model, shift_vector(checkpoint, plan, params), plan.gamma):
            yield

    def card_text(self, record):
        recipe = record["recipe"]
        what = (
            "Only the bias of the multimodal projector's output layer changed, so the edit acts "
            "only when an image is in the prompt: text-only behaviour is exactly the original's."
        )
        how = (
            f"For layer {recipe['layers'][0]}, {steering_source(record)}; the projector's "
            f"output bias became\n\n    b <- b + gamma * u        gamma = {recipe['gamma']:g}\n\n"
            + (
                "with u the unit image-token state that layer's attention maps most strongly "
                "onto V_l[0]: u ∝ g ⊙ (Σ_h W_o^h W_v^h)^T V_l[0] (g: the layer's input-norm gain)."
                if recipe.get("shift_direction", "attention") == "attention"
                else "with u = V_l[0]."
            )
        )
        return what, how

    def command_args(self, recipe):
        return [
            "--gamma",
            f"{recipe.gamma:g}",
            "--shift-direction",
            recipe.shift_direction,
            "--layers",
            ",".join(map(str, recipe.layers or [])),
            "--rank",
            str(recipe.rank),
        ]


def _shift_edit(checkpoint, layout, layers: list[int]) -> PlannedEdit:
    if len(layers) != 1:
        raise PlanError(f"projector-shift uses exactly one layer's direction; got layers {layers}")
    if layout.projector_bias is None:
        known = " or ".join(layout.family.projector_bias) or "none known"
        raise PlanError(
            f"{layout.family.model_type}: no multimodal projector output bias found ({known})"
        )
    layer = layers[0]
    for name in (layout.family.value_proj + ".weight", layout.family.input_norm):
        if layout.layer_key(layer, name) not in checkpoint.key_to_file:
            raise PlanError(f"projector-shift needs {layout.layer_key(layer, name)}: missing")
    key = layout.projector_bias
    info = checkpoint.info(key)
    if info.dtype not in FLOAT_DTYPES or info.shape != (layout.hidden_size,):
        raise PlanError(
            f"{key} is {info.dtype} {list(info.shape)}; expected float ({layout.hidden_size},)"
        )
    file = checkpoint.key_to_file[key]
    module = key.removesuffix(".bias")
    return PlannedEdit(key, file, layer, module, info.dtype, info.shape, "shift")


def shift_vector(checkpoint, plan, vectors):
    """The unit vector the shift adds: V_l[0], or its attention-aware form at layer l."""
    from ..fold import attention_direction

    layer = plan.layers[0]
    v = vectors[layer][0]
    if plan.shift_direction == "ssd":
        return v / v.norm()
    layout = plan.layout
    o_proj = next(w for w in layout.writers[layer] if w.module == "self_attn.o_proj")
    return attention_direction(
        checkpoint.read(o_proj.weight),
        checkpoint.read(layout.layer_key(layer, layout.family.value_proj + ".weight")),
        checkpoint.read(layout.layer_key(layer, layout.family.input_norm)),
        v,
        layout.num_heads,
        layout.num_kv_heads,
    )
