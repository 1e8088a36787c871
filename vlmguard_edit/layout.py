"""Which checkpoint keys are the language model's residual writers, per family and key layout.

Families are data (``families.py``): adding one means adding a ``Family`` entry there (and a
test); this module matches a checkpoint's keys against them. Writers are found
under the language model's exact layer prefix, never by a bare regex on ``o_proj`` /
``down_proj``: several vision towers use those names too (Mistral3's Pixtral tower, Llama 4,
Qwen2.5-VL...). The layout must account for every layer the config declares, or we refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .errors import UnsupportedModelError
from .families import FAMILIES, NOTES, REFUSED, Family


@dataclass(frozen=True)
class Writer:
    layer: int
    module: str  # e.g. "self_attn.o_proj"
    weight: str  # checkpoint key
    bias: str | None  # checkpoint key, when the writer has a bias
    post_norm: str | None = None  # checkpoint key of the norm weight between it and the residual
    fused: bool = False  # weight is a fused (E, ., .) tensor of every expert's projection


@dataclass(frozen=True)
class Layout:
    family: Family
    layer_prefix: str
    num_layers: int
    hidden_size: int
    writers: dict[int, tuple[Writer, ...]]
    projector_bias: str | None  # checkpoint key, when the family has one and it is present
    num_heads: int
    num_kv_heads: int
    # Cross-attention layers (mllama): a text-only forward skips them, and the base LLM has
    # no counterpart, so base layer i is the VLM's i-th layer that is not one of them.
    cross_layers: tuple[int, ...] = ()
    trailing_layers: tuple[int, ...] = ()  # beyond num_layers, ignored by transformers
    image_path: str | None = None  # the image-path Linear's module name in this checkpoint

    def layer_key(self, layer: int, name: str) -> str:
        return f"{self.layer_prefix}.{layer}.{name}"

    def direction_layer(self, layer: int, in_base: bool) -> int:
        """The layer whose output residual stream the direction of VLM ``layer`` is taken
        at: the same layer, or for a cross-attention layer the layer before it (its input,
        which a text-only forward passes through unchanged); as a base-LLM index when
        ``in_base`` (cross-attention layers removed from the count)."""
        source = layer
        while source in self.cross_layers:
            source -= 1
        if source < 0:
            raise UnsupportedModelError(
                f"layer {layer} is a cross-attention layer with no text layer before it: no "
                "direction can be taken for it"
            )
        if in_base:
            source -= sum(1 for c in self.cross_layers if c < source)
        return source

    def direction_layers(self, layers: list[int], in_base: bool) -> dict[int, int]:
        """direction_layer for each of ``layers``: VLM layer -> layer measured."""
        return {layer: self.direction_layer(layer, in_base) for layer in layers}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def _unknown(model_type: Any) -> str:
    """One line for a type in neither table: the nearest supported names (a typo, a sibling),
    not all of them."""
    import difflib

    near = difflib.get_close_matches(str(model_type), sorted(FAMILIES), n=3, cutoff=0.6)
    hint = f"; nearest supported: {', '.join(near)}" if near else ""
    return (
        f"model type {model_type!r} is not supported yet: none of the {len(FAMILIES)} families "
        f"in docs/families.md{hint} (to map it: docs/families.md, Adding a family)"
    )


def detect_family(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type in REFUSED:
        reason = REFUSED[model_type]
        if "not mapped yet" in reason or "not proved yet" in reason:
            reason += " (to map it: docs/families.md, Adding a family)"
        raise UnsupportedModelError(f"model type {model_type!r} is not supported: {reason}")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(_unknown(model_type))
    family = FAMILIES[model_type]
    text_type = text_config(config).get("model_type")
    if not isinstance(config.get("text_config"), dict):
        raise UnsupportedModelError(
            f"this {model_type} config.json has no text_config: vlmguard-edit reads the text "
            "model's type, depth and width from it (expected text_config with model_type one "
            f"of {', '.join(family.text_model_types)}); the config looks incomplete"
        )
    if text_type not in family.text_model_types:
        raise UnsupportedModelError(
            f"{model_type} with a {text_type!r} text model is not supported "
            f"(supported text models: {', '.join(family.text_model_types)})"
        )
    for key, reason in family.refused_when:
        if text_config(config).get(key):
            raise UnsupportedModelError(f"{model_type} with {key} is not supported: {reason}")
    if family.post_norm_text_types and text_type not in family.post_norm_text_types:
        family = replace(family, post_norms=())
    return family


def find_layout(config: dict[str, Any], keys: list[str]) -> Layout:
    """Match the checkpoint's keys against the family's known layouts; refuse anything unclear."""
    family = detect_family(config)
    text = text_config(config)
    num_layers = int(text["num_hidden_layers"])
    prefix = _layer_prefix(family, keys)
    by_layer, extra = _layer_names(family, keys, prefix, num_layers)
    cross_key = family.cross_layers_key
    cross = tuple(sorted(text.get(cross_key) or ())) if cross_key else ()
    if any(not 0 <= layer < num_layers for layer in cross):
        raise UnsupportedModelError(f"{cross_key} {list(cross)} out of range")
    num_experts = int(text.get(family.experts_key) or 0) if family.experts_key else None
    writers = {
        layer: _layer_writers(family, names, prefix, layer, layer in cross, num_experts)
        for layer, names in by_layer.items()
    }
    projector = [k for k in family.projector_bias if k in set(keys)]
    heads = int(text.get("num_attention_heads", 0))
    return Layout(
        family,
        prefix,
        num_layers,
        int(text["hidden_size"]),
        writers,
        projector[0] if projector else None,
        heads,
        int(text.get("num_key_value_heads") or heads),
        cross,
        tuple(extra),
        next((m for m in family.image_path if f"{m}.weight" in set(keys)), None),
    )


def _layer_prefix(family: Family, keys: list[str]) -> str:
    """The one prefix the language model's layers sit under in this checkpoint."""
    present = [p for p in family.layer_prefixes if any(k.startswith(p + ".") for k in keys)]
    if not present:
        raise UnsupportedModelError(
            f"no language-model layer keys found for {family.model_type}; expected keys under "
            f"{' or '.join(family.layer_prefixes)}"
        )
    if len(present) > 1:
        raise UnsupportedModelError(f"ambiguous key layout: keys under both {present}")
    return present[0]


def _layer_names(
    family: Family, keys: list[str], prefix: str, num_layers: int
) -> tuple[dict[int, set[str]], list[int]]:
    """Each text layer's key names below it, and the trailing layers past the configured
    count (e.g. GLM's multi-token-prediction layer: copied, never edited)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)")
    by_layer: dict[int, set[str]] = {}
    for key in keys:
        match = pattern.fullmatch(key)
        if match:
            by_layer.setdefault(int(match.group(1)), set()).add(match.group(2))
    found_layers = sorted(by_layer)
    extra = found_layers[num_layers:]
    if found_layers[:num_layers] != list(range(num_layers)) or len(extra) > family.trailing_layers:
        raise UnsupportedModelError(
            f"config declares {num_layers} text layers but the checkpoint has layers "
            f"{_span(found_layers)} under {prefix}"
        )
    for layer in extra:
        del by_layer[layer]
    return by_layer, extra


def _layer_writers(
    family: Family, names: set[str], prefix: str, layer: int, cross: bool, num_experts
) -> tuple[Writer, ...]:
    """The residual writers of one layer (a cross-attention layer's own list where it has one)."""
    found: list[Writer] = []
    for wanted in family.cross_writers if cross else family.writers:
        module = _present(wanted, names, dict(family.alternatives).get(wanted, ()))
        found += _module_writers(family, names, prefix, layer, module, num_experts)
    for module in family.extra_writers:
        if f"{module}.weight" in names:
            found.append(_writer(family, names, prefix, layer, module))
    return tuple(found)


def _module_writers(family, names, prefix, layer, module, num_experts) -> list[Writer]:
    """One writer module: a plain Linear, one fused experts tensor, or one per expert."""
    # one fused-tensor name per key layout may be listed for a writer (Aria's Hub
    # mlp.experts.fc2.weight, transformers 5's mlp.experts.down_proj)
    options = [f for w, f in family.fused if w == module]
    fused = next((f for f in options if ".".join(f) in names), options[0] if options else None)
    if f"{module}.weight" not in names and fused and ".".join(fused) in names:
        key = f"{prefix}.{layer}.{'.'.join(fused)}"
        return [Writer(layer, fused[0], key, None, fused=True)]
    if f"{module}.weight" not in names and fused:
        experts = _per_expert(names, fused, num_experts, f"{prefix}.{layer}")
        if experts:
            return [
                Writer(layer, name, f"{prefix}.{layer}.{name}.weight", None) for name in experts
            ]
    return [_writer(family, names, prefix, layer, module)]


def _writer(family: Family, names: set[str], prefix: str, layer: int, module: str) -> Writer:
    """A plain Linear writer of one layer, with its bias and the norm after it, if any."""
    if f"{module}.weight" not in names:
        raise UnsupportedModelError(f"layer {layer} has no {prefix}.{layer}.{module}.weight")
    bias = f"{prefix}.{layer}.{module}.bias" if f"{module}.bias" in names else None
    norm = dict(family.post_norms).get(module)
    if norm is not None and f"{norm}.weight" not in names:
        raise UnsupportedModelError(
            f"layer {layer} has no {prefix}.{layer}.{norm}.weight (the norm after {module})"
        )
    norm_key = f"{prefix}.{layer}.{norm}.weight" if norm else None
    return Writer(layer, module, f"{prefix}.{layer}.{module}.weight", bias, norm_key)


def _present(module: str, names: set[str], stand_ins: tuple[str, ...]) -> str:
    """The writer, or the first stand-in this layer has instead of it."""
    if f"{module}.weight" in names:
        return module
    return next((m for m in stand_ins if f"{m}.weight" in names), module)


def span(values: list[int]) -> str:
    """'16-31' for a run of layers, '2,5,9' otherwise (shared by the CLI, the card, inspect)."""
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 1:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def _per_expert(
    names: set[str], fused: tuple[str, str], expected: int | None, where: str
) -> list[str]:
    """Per-expert 2-D writers, e.g. mlp.experts.{0..E-1}.down_proj: every expert or none."""
    pattern = re.compile(re.escape(fused[0]) + r"\.(\d+)\." + re.escape(fused[1]) + r"\.weight")
    found = sorted(int(m.group(1)) for name in names if (m := pattern.fullmatch(name)))
    if not found:
        return []
    if found != list(range(len(found))) or (expected is not None and len(found) != expected):
        raise UnsupportedModelError(
            f"{where}.{fused[0]}: found experts {span(found)}, expected "
            f"{expected if expected is not None else 'a contiguous range from 0'}"
        )
    return [f"{fused[0]}.{e}.{fused[1]}" for e in found]


def _span(values: list[int]) -> str:
    if not values:
        return "none"
    return f"{span(values)} ({len(values)} layer{'s' if len(values) > 1 else ''})"


def describe(config: dict[str, Any], keys: list[str]) -> list[str]:
    """What `vlmguard-edit inspect` prints: family, layout, layers, writers, what is not a
    plain writer, and whether and how convert supports the model."""
    model_type = config.get("model_type")
    text = text_config(config)
    lines = [f"model type      {model_type} (text model {text.get('model_type')})"]
    try:
        layout = find_layout(config, keys)
    except UnsupportedModelError as exc:
        return [*lines, f"convert         NOT SUPPORTED: {exc}"]
    lines += _shape_lines(layout, config)
    groups: dict[tuple[str, ...], list[int]] = {}
    for layer, writers in sorted(layout.writers.items()):
        groups.setdefault(_writer_names(writers), []).append(layer)
    for names, layers in groups.items():
        lines.append(f"writers         layers {_span(layers)}: {', '.join(names)}")
    return lines + _support_lines(layout, keys)


def _shape_lines(layout: Layout, config: dict[str, Any]) -> list[str]:
    """Key layout, sizes, and the layers that are not plain text layers."""
    family = layout.family
    first = layout.layer_prefix == family.layer_prefixes[0]
    which = "Hub / save_pretrained" if first else "transformers 5 module names"
    lines = [
        f"key layout      {layout.layer_prefix}.N  ({which})",
        f"text layers     {layout.num_layers} x hidden {layout.hidden_size}, "
        f"{layout.num_heads} heads / {layout.num_kv_heads} kv heads",
    ]
    if layout.cross_layers:
        others = layout.num_layers - len(layout.cross_layers)
        lines.append(
            f"cross-attn      layers {_span(list(layout.cross_layers))}: skipped without an "
            f"image; base LLM layers map to the other {others}"
        )
    deepstack = (config.get("vision_config") or {}).get("deepstack_visual_indexes")
    if deepstack:
        lines.append(
            "extra path      deepstack: visual features added to the residual stream after "
            f"text layers {span(list(range(len(deepstack))))} at image tokens (not a writer; "
            "not edited)"
        )
    if layout.trailing_layers:
        lines.append(
            f"trailing        layers {_span(list(layout.trailing_layers))} beyond the config's "
            "count (multi-token prediction; transformers ignores them): copied, never edited"
        )
    return lines


def _writer_names(writers: tuple[Writer, ...]) -> tuple[str, ...]:
    """One layer's writers as `inspect` names them (per-expert writers as one entry)."""
    names: list[str] = []
    for w in writers:
        name = w.module
        if re.search(r"\.\d+\.", name):
            collapsed = re.sub(r"\.\d+\.", ".{e}.", name)
            if names and names[-1].startswith(collapsed):
                continue
            count = sum(1 for o in writers if re.sub(r"\.\d+\.", ".{e}.", o.module) == collapsed)
            name = f"{collapsed} ({count} experts, 2-D)"
        elif w.fused:
            name += " (fused experts)"
        names.append(
            name
            + (" (+bias)" if w.bias else "")
            + (f" -> {w.post_norm.rsplit('.', 2)[-2]}" if w.post_norm else "")
        )
    return tuple(names)


def _support_lines(layout: Layout, keys: list[str]) -> list[str]:
    """Look-alike tensors outside the language model, notes, and what convert can do."""
    lines = []
    inside = re.compile(re.escape(layout.layer_prefix) + r"\.\d+\.")
    lookalike = sorted(
        k for k in keys if re.search(r"(o_proj|down_proj)\.weight$", k) and not inside.match(k)
    )
    if lookalike:
        lines.append(
            f"look-alikes     {len(lookalike)} o_proj/down_proj tensors outside the language "
            f"model, never edited (e.g. {lookalike[0]})"
        )
    if layout.family.model_type in NOTES:
        lines.append(f"note            {NOTES[layout.family.model_type]}")
    shift = (
        f"yes ({layout.projector_bias})"
        if layout.projector_bias
        else "no (no projector output bias known for this family)"
    )
    normed = any(w.post_norm for ws in layout.writers.values() for w in ws)
    how = (
        "the projection only (beta -1), folded against the norm-gain-weighted direction"
        if normed
        else "writers mode folds (I + beta V^T V) into every writer of the selected layers"
    )
    return [*lines, "convert         supported: " + how, f"projector-shift {shift}"]


# The family data stays importable from here, where users and tests have found it.
__all__ = ["FAMILIES", "NOTES", "REFUSED", "Family", "Layout", "Writer", "describe"]
__all__ += ["detect_family", "find_layout", "span", "text_config"]
