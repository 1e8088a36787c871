"""Recipe + checkpoint headers -> the edit plan. No tensor data is read here.

The plan lists every tensor that changes (key, shard, layer, map) and every file that is
copied or dropped. It fails on anything it cannot decide before any byte is written, and
``--dry-run`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import FLOAT_DTYPES, Checkpoint, classify_files
from .errors import PlanError
from .layout import Layout


@dataclass(frozen=True)
class PlannedEdit:
    key: str
    file: str
    layer: int  # whose direction is used
    module: str
    dtype: str
    shape: tuple[int, ...]
    kind: str = "map"  # "map": (I + beta V^T V) x;  "shift": b + gamma u;  "delta": x + dx
    norm: str | None = None  # the post-norm weight key: the map uses u ∝ (w + offset) ⊙ v
    # Fused experts (kind "experts"): the axis of each expert's matrix that is the hidden size
    # (1: (E, H, I), used as F.linear; 2: (E, I, H), used as x @ W).
    axis: int = 0


@dataclass
class Plan:
    layout: Layout
    layers: list[int]
    rank: int
    beta: float
    edits: list[PlannedEdit]
    copied: list[str]  # other files, copied byte for byte
    dropped: list[str]  # other-format weight files left out (they would be unguarded)
    mode: str = "writers"
    gamma: float = 1.0
    shift_direction: str = "attention"

    @property
    def map_text(self) -> str:
        if self.mode == "projector-shift":
            u = (
                "u ∝ g ⊙ (W_o W_v)^T V_l[0]"
                if self.shift_direction == "attention"
                else "u = V_l[0]"
            )
            return (
                f"b <- b + {self.gamma:g} * u on the projector output ({u}, layer {self.layers[0]})"
            )
        if self.mode == "image-path":
            modules = list(dict.fromkeys(e.module for e in self.edits))
            where = modules[0] + (f" and {len(modules) - 1} more" if len(modules) > 1 else "")
            return f"W <- W + dW, b <- b + db on {where} (learned; image path only)"
        if self.mode == "lowrank":
            return f"W_o <- W_o + B A on attention o_proj (learned, rank {self.rank}, per layer)"
        if self.mode == "image-gap":
            return "W_o <- (I - d_l d_l^T) W_o on attention o_proj   (d_l: image-gap direction)"
        text = f"W <- (I + {self.beta:g} * V_l^T V_l) W   (V_l: rank {self.rank}, per layer)"
        if any(edit.norm for edit in self.edits):
            text += "; behind a post-norm with gain g, V_l -> orthonormal basis of g ⊙ V_l"
        return text

    def describe(self) -> list[str]:
        lines = [
            f"family {self.layout.family.model_type}, layers under {self.layout.layer_prefix} "
            f"({self.layout.num_layers} text layers, hidden {self.layout.hidden_size})",
            f"map: {self.map_text}",
            f"{len(self.edits)} tensors change in {len(self.layers)} layers:",
        ]
        lines += [
            f"  layer {e.layer:>3}  {e.key}  {e.dtype} {list(e.shape)}  [{e.file}]"
            for e in self.edits
        ]
        lines.append(f"{len(self.copied)} other files copied unchanged")
        if self.dropped:
            lines.append(
                f"{len(self.dropped)} other-format weight files left out: {', '.join(self.dropped)}"
            )
        return lines


def build_plan(
    checkpoint: Checkpoint,
    layout: Layout,
    layers: list[int],
    rank: int,
    beta: float,
    mode: str = "writers",
    gamma: float = 1.0,
    shift_direction: str = "attention",
) -> Plan:
    bad = [layer for layer in layers if not 0 <= layer < layout.num_layers]
    if bad:
        raise PlanError(
            f"layer(s) {bad} out of range: the model has text layers 0..{layout.num_layers - 1}"
        )
    copied, dropped = classify_files(checkpoint.path, set(checkpoint.shards))
    if mode == "image-path":
        edits = _image_path_edits(checkpoint, layout)
        return Plan(layout, [], rank, beta, edits, copied, dropped, mode)
    if mode == "lowrank":
        edits = _lowrank_edits(checkpoint, layout, layers)
        return Plan(layout, list(layers), rank, beta, edits, copied, dropped, mode)
    if mode == "projector-shift":
        edit = _projector_shift_edit(checkpoint, layout, layers)
        extra = (mode, gamma, shift_direction)
        return Plan(layout, list(layers), rank, beta, [edit], copied, dropped, *extra)
    edits = []
    # image-gap: only the attention output projection (each layer's first writer).
    chosen = {
        layer: layout.writers[layer][:1] if mode == "image-gap" else layout.writers[layer]
        for layer in layers
    }
    normed = [w for layer in layers for w in chosen[layer] if w.post_norm]
    if normed and mode == "image-gap":
        raise PlanError(
            f"{layout.family.model_type} has a norm between {normed[0].module} and the residual "
            "add; image-gap is measured at the writer's output and is not supported there"
        )
    if normed and beta != -1.0:
        raise PlanError(
            f"{layout.family.model_type} has a norm between {normed[0].module} and the residual "
            f"add ({normed[0].post_norm}): only the projection (beta -1) can be folded exactly "
            f"there; got beta {beta:g}"
        )
    for layer in layers:
        for writer in chosen[layer]:
            for key in (writer.weight, writer.bias):
                if key is None:
                    continue
                info = checkpoint.info(key)
                if info.dtype not in FLOAT_DTYPES:
                    raise PlanError(f"{key} is {info.dtype}; only float weights can be edited")
                if writer.fused:
                    edits.append(_experts_edit(checkpoint, layout, writer, key, info))
                    continue
                if info.shape[0] != layout.hidden_size:
                    raise PlanError(
                        f"{key} has shape {list(info.shape)}; expected the output dimension "
                        f"{layout.hidden_size} first (out_features, in_features)"
                    )
                edits.append(
                    PlannedEdit(
                        key,
                        checkpoint.key_to_file[key],
                        layer,
                        writer.module,
                        info.dtype,
                        info.shape,
                        norm=writer.post_norm,
                    )
                )
    expected = sum(len(chosen[layer]) for layer in layers)
    weights = sum(1 for e in edits if e.key.endswith(".weight") or e.kind == "experts")
    if weights != expected or not edits:
        raise PlanError(f"the plan edits {weights} writer weights, expected {expected}; refusing")
    if mode == "image-gap" and any(not e.module.endswith("attn.o_proj") for e in edits):
        raise PlanError(f"{layout.family.model_type}: the first writer is not an attention o_proj")
    return Plan(layout, list(layers), rank, beta, edits, copied, dropped, mode)


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


def _projector_shift_edit(checkpoint: Checkpoint, layout: Layout, layers: list[int]) -> PlannedEdit:
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


def _image_path_edits(checkpoint: Checkpoint, layout: Layout) -> list[PlannedEdit]:
    """The family's last image-to-language Linear: weight and (if any) bias."""
    module = layout.image_path
    if module is None:
        known = " or ".join(layout.family.image_path) or "none mapped for this family"
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


def _lowrank_edits(checkpoint: Checkpoint, layout: Layout, layers: list[int]) -> list[PlannedEdit]:
    """Each selected layer's attention output projection weight (its first writer). A weight
    change is exact behind a post-norm too: the fold is the Linear itself."""
    if not layers:
        raise PlanError("lowrank needs at least one layer")
    edits = []
    for layer in layers:
        writer = layout.writers[layer][0]
        if not writer.module.endswith("o_proj") or writer.fused:
            raise PlanError(
                f"{layout.family.model_type} layer {layer}: the first writer {writer.module} is "
                "not an attention o_proj; lowrank cannot be used"
            )
        info = checkpoint.info(writer.weight)
        if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
            raise PlanError(
                f"{writer.weight} is {info.dtype} {list(info.shape)}; expected a float matrix"
            )
        module = writer.weight.removesuffix(".weight")
        file = checkpoint.key_to_file[writer.weight]
        edits.append(
            PlannedEdit(writer.weight, file, layer, module, info.dtype, info.shape, "delta")
        )
    return edits
