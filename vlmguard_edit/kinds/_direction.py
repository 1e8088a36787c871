"""What the measured kinds share: a per-layer direction file, the residual writers they plan,
and the map (I + beta V^T V) they fold into a writer's weight (writers, image-gap)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..checkpoint import FLOAT_DTYPES, Checkpoint, import_torch, resolve_model
from ..errors import DirectionError, InputError, PlanError
from ..layout import Layout
from ..plan import Plan, PlannedEdit
from ..public import scrub
from .base import Context, EditKind, Parameters

log = logging.getLogger(__name__)

DRIFT_WARNING = 0.5  # median ||W_vlm - W_base|| / ||W_base|| above which convert warns


class DirectionKind(EditKind):
    """A kind folded from per-layer orthonormal directions V_l (a ``Direction`` file)."""

    accepts_gap = False  # whether the kind folds an image-gap direction (image-gap only)

    def parameters(self, ctx: Context) -> Parameters:
        from ..fold import check_orthonormal

        direction, base_check = self.direction(ctx)
        vectors = direction.select(ctx.plan.layers, ctx.plan.rank)
        for layer, v in vectors.items():
            check_orthonormal(v, f"direction layer {layer}")
        return Parameters(vectors, replace(direction, meta=scrub(direction.meta)), base_check)

    def check_request(self, ctx: Context) -> None:
        self.direction(ctx)

    def direction(self, ctx: Context) -> tuple[Any, dict[str, Any] | None]:
        """The direction (from --direction FILE or measured) and the base-LLM check."""
        if ctx.opts.direction_file is not None:
            return load_direction_file(ctx, self.accepts_gap), None
        return self.measure(ctx)

    def measure(self, ctx: Context) -> tuple[Any, dict[str, Any] | None]:
        return steering_direction(ctx)

    def load(self, path: Path, plan: Plan) -> Any:
        from ..direction import Direction

        return Direction.load(path).select(plan.layers, plan.rank)

    def record_fields(self, saved: Any, plan: Plan) -> dict[str, Any]:
        return {"stats": {str(layer): saved.stats.get(layer) for layer in plan.layers}}

    def example_parameters(self, plan: Plan, path: Path) -> Path:
        """Random orthonormal directions (seeded) of the plan's rank for every layer it uses."""
        import torch

        from ..direction import Direction

        generator = torch.Generator().manual_seed(0)
        d, rank = plan.layout.hidden_size, plan.rank
        layers = sorted(set(plan.layers) | {e.layer for e in plan.edits if e.layer is not None})
        vectors = {
            layer: torch.linalg.qr(torch.randn(d, rank, generator=generator)).Q.T.contiguous()
            for layer in layers
        }
        meta = {"rank": rank, **({"kind": "image-gap"} if self.accepts_gap else {})}
        Direction(vectors, meta=meta).save(path)
        return path

    def fold(self, checkpoint, plan, edit, before, params, prepared):
        return fold_map(checkpoint, plan, edit, before, params)

    def lora_factors(self, checkpoint, plan, params):
        """(I + beta V^T V) W = W + (beta V^T)(V W): lora_B = beta V^T, lora_A = V W, exactly
        (behind a post-norm, V is the orthonormal basis of g ⊙ V the fold uses)."""
        factors = {}
        for edit in plan.edits:
            if edit.kind == "experts":
                raise PlanError(
                    f"{edit.key} is a fused experts tensor: PEFT's LoRA targets Linear modules "
                    "(its target_parameters support is not used here)"
                )
            if edit.key.endswith(".bias"):
                raise PlanError(
                    f"{edit.key}: the writer has a bias, whose change (I + beta V^T V) b is a "
                    "bias shift, not a LoRA update"
                )
            v = edit_vectors(checkpoint, plan, edit, params).float()
            weight = checkpoint.read(edit.key).float()
            factors[edit.key.removesuffix(".weight")] = (v @ weight, plan.beta * v.T)
        return factors


def load_direction_file(ctx: Context, accepts_gap: bool):
    """``--direction FILE``, checked against the VLM and the kind."""
    from ..direction import Direction
    from ..public import public_name

    path, layout, fmt = ctx.opts.direction_file, ctx.layout, ctx.opts.direction_format
    if fmt != "native":  # another tool's file, converted to this project's layers
        from ..formats import import_direction

        if accepts_gap:
            raise DirectionError(f"image-gap folds its own measured direction, not a {fmt} file")
        return import_direction(path, fmt, layout.num_layers, layout.hidden_size)
    direction = Direction.load(path)
    if direction.hidden_size != layout.hidden_size:
        raise DirectionError(
            f"direction {path} has hidden size {direction.hidden_size}, the VLM's text model "
            f"has {layout.hidden_size}; it was computed for another model"
        )
    is_gap = direction.meta.get("kind") == "image-gap"
    if is_gap != accepts_gap:
        mode = ctx.opts.recipe.mode
        raise DirectionError(
            f"direction {public_name(str(path))} is "
            + ("an image-gap direction" if is_gap else "a safety steering direction")
            + f", but the mode is {mode}; "
            + ("use --mode image-gap" if is_gap else "image-gap needs an image-gap direction")
        )
    base_model = direction.meta.get("base_model")
    from ..recipe_data import SELF

    renumbered = "source_layers" in direction.meta
    if layout.cross_layers and base_model not in (None, SELF) and not renumbered:
        raise DirectionError(
            f"direction {path} is numbered by {base_model}'s layers, but "
            f"{layout.family.model_type}'s cross-attention layers {list(layout.cross_layers)} "
            "shift the numbering; compute it for this VLM: vlmguard-edit direction "
            f"{base_model} --vlm {ctx.opts.source} ..."
        )
    return direction


def steering_direction(ctx: Context) -> tuple[Any, dict[str, Any] | None]:
    """The base LLM's (or the VLM's own, 'self') safety steering direction, and how that LLM
    compares with the VLM's language model: config differences and per-writer weight drift."""
    from ..anchors import load_anchors
    from ..direction import Direction, check_base_matches, check_direction_request
    from ..recipe_data import SELF

    opts, layout, layers = ctx.opts, ctx.layout, ctx.plan.layers
    recipe = opts.recipe
    if recipe.base_llm.id is None:
        raise InputError(
            "say where the steering direction comes from: --base-llm ID (or 'self' for the "
            "VLM's own language model), --direction FILE, or a recipe with base_llm"
        )
    anchors = load_anchors(recipe.anchors)
    is_self = recipe.base_llm.id == SELF
    base, base_check = ctx.source, None
    if not is_self:
        # A dry run only checks the base LLM's config, so it downloads nothing else.
        base_id, revision = recipe.base_llm.id, recipe.base_llm.revision
        base = resolve_model(base_id, revision, opts.allow_pickle, config_only=opts.dry_run)
        base_check = {"config_warnings": check_base_matches(base, ctx.checkpoint.config)}
    layer_map = layout.direction_layers(layers, in_base=not is_self)
    check_direction_request(base, anchors, sorted(set(layer_map.values())), recipe.rank, is_self)
    if opts.dry_run:
        # A dry run reads no weights: describe the plan with a placeholder direction.
        placeholder = import_torch().eye(layout.hidden_size)[: recipe.rank]
        return Direction(dict.fromkeys(layers, placeholder)), base_check
    direction = _compute(ctx, base, anchors, is_self, layer_map)
    if base_check is not None:
        base_check.update(_drift(base, ctx.checkpoint, layout, layers))
    return direction, base_check


def _compute(ctx: Context, base, anchors, is_self: bool, layer_map) -> Any:
    from ..direction import compute_direction

    opts, recipe = ctx.opts, ctx.opts.recipe
    return compute_direction(
        base,
        anchors,
        ctx.plan.layers,
        recipe.rank,
        is_vlm=is_self,
        template=recipe.base_llm.template,
        batch_size=recipe.batch_size,
        device=opts.device,
        dtype=opts.dtype,
        allow_pickle=opts.allow_pickle,
        trust_remote_code=opts.trust_remote_code,
        progress=opts.progress,
        layer_map=layer_map,
    )


def _drift(base, checkpoint: Checkpoint, layout: Layout, layers: list[int]) -> dict[str, Any]:
    """Per-writer weight drift between the base LLM and the VLM's language model; warns when
    the median is far (its hidden states may not match the base LLM's)."""
    from ..direction import weight_drift

    drift = weight_drift(base, checkpoint, layout, layers)
    found: dict[str, Any] = {"weight_drift": drift}
    if drift:
        median = sorted(d["relative_difference"] for d in drift.values())[len(drift) // 2]
        found["median_relative_difference"] = median
        if median > DRIFT_WARNING:
            log.warning(
                "the VLM's language model has drifted far from %s (median relative weight "
                "difference %.2f over the edited writers): its hidden states may not match "
                "the base LLM's; consider --base-llm self",
                base.id,
                median,
            )
    return found


# ---------------------------------------------------------------- the writers' plan and fold


def writer_edits(
    checkpoint: Checkpoint, layout: Layout, chosen: dict[int, list], beta: float
) -> list[PlannedEdit]:
    """The planned weight (and bias) of every chosen writer, per layer."""
    normed = [w for writers in chosen.values() for w in writers if w.post_norm]
    if normed and beta != -1.0:
        raise PlanError(
            f"{layout.family.model_type} has a norm between {normed[0].module} and the residual "
            f"add ({normed[0].post_norm}): only the projection (beta -1) can be folded exactly "
            f"there; got beta {beta:g}"
        )
    edits = [
        _writer_edit(checkpoint, layout, layer, writer, key)
        for layer, writers in chosen.items()
        for writer in writers
        for key in (writer.weight, writer.bias)
        if key is not None
    ]
    expected = sum(len(writers) for writers in chosen.values())
    weights = sum(1 for e in edits if e.key.endswith(".weight") or e.kind == "experts")
    if weights != expected or not edits:
        raise PlanError(f"the plan edits {weights} writer weights, expected {expected}; refusing")
    return edits


def _writer_edit(checkpoint: Checkpoint, layout: Layout, layer: int, writer, key: str):
    info = checkpoint.info(key)
    if info.dtype not in FLOAT_DTYPES:
        raise PlanError(f"{key} is {info.dtype}; only float weights can be edited")
    if writer.fused:
        return _experts_edit(checkpoint, layout, writer, key, info)
    if info.shape[0] != layout.hidden_size:
        raise PlanError(
            f"{key} has shape {list(info.shape)}; expected the output dimension "
            f"{layout.hidden_size} first (out_features, in_features)"
        )
    file = checkpoint.key_to_file[key]
    return PlannedEdit(
        key, file, layer, writer.module, info.dtype, info.shape, norm=writer.post_norm
    )


def _experts_edit(checkpoint: Checkpoint, layout: Layout, writer, key: str, info) -> PlannedEdit:
    """A fused (E, a, b) expert tensor: which axis is the hidden size, from the shapes alone."""
    hidden = layout.hidden_size
    if len(info.shape) != 3:
        raise PlanError(f"{key} has shape {list(info.shape)}; expected fused experts (E, ., .)")
    _, a, b = info.shape
    if a == b:
        raise PlanError(
            f"{key} has square experts {list(info.shape)}: which axis is the hidden size cannot "
            "be decided from the shapes; refusing rather than guessing"
        )
    if hidden not in (a, b):
        raise PlanError(f"{key} has shape {list(info.shape)}; neither axis is hidden {hidden}")
    axis = 1 if a == hidden else 2
    file = checkpoint.key_to_file[key]
    return PlannedEdit(
        key, file, writer.layer, writer.module, info.dtype, info.shape, "experts", axis=axis
    )


def fold_map(checkpoint: Checkpoint, plan: Plan, edit: PlannedEdit, before, vectors):
    """W <- (I + beta V^T V) W for one writer tensor (every expert's matrix of a fused one;
    behind a post-norm, V -> an orthonormal basis of g ⊙ V, beta -1)."""
    from ..fold import apply_map

    torch = import_torch()
    v = edit_vectors(checkpoint, plan, edit, vectors)
    if edit.kind == "experts":  # every expert's matrix, hidden axis first for apply_map
        out = torch.empty_like(before)
        for e in range(before.shape[0]):
            w = before[e] if edit.axis == 1 else before[e].T
            folded = apply_map(w, v, plan.beta)
            out[e] = folded if edit.axis == 1 else folded.T
        return out
    return apply_map(before, v, plan.beta)


def edit_vectors(checkpoint: Checkpoint, plan: Plan, edit: PlannedEdit, vectors):
    """The rows the map of one writer uses: V_l, or behind a norm with gain g (beta -1) the
    orthonormal basis of g ⊙ V_l, so that what reaches the residual loses every V_l."""
    from ..fold import norm_weighted

    v = vectors[edit.layer]
    if edit.norm is None:
        return v
    gain = checkpoint.read(edit.norm).float() + plan.layout.family.norm_offset
    return norm_weighted(v, gain)


def writer_hooks(model, plan, vectors, checkpoint, attention_only: bool = False):
    """Each edited writer's output mapped by (I + beta V^T V) at run time; behind a post-norm
    (beta -1), projected off the orthonormal basis of g ⊙ V, as the fold does."""
    from ..runtime import WriterHooks

    if not any(edit.norm for edit in plan.edits):
        return WriterHooks(model, vectors, plan.beta, attention_only)
    return _post_norm_hooks(model, plan, vectors, checkpoint)


@contextlib.contextmanager
def _post_norm_hooks(model, plan, vectors, checkpoint):
    from ..fold import map_hidden
    from ..learned import find_module, memory_names

    handles = []
    try:
        for edit in plan.edits:
            if not edit.key.endswith(".weight"):
                continue
            _, module = find_module(model, memory_names(edit.key.removesuffix(".weight")))
            v = edit_vectors(checkpoint, plan, edit, vectors)

            def hook(_m, _i, out, v=v):
                return map_hidden(out, v, plan.beta)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
