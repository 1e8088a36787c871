"""The guarded checkpoint's model card (README.md with Hub metadata) and provenance file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import file_entry
from .errors import InputError
from .layout import span
from .recipes import LEARNED
from .writes import remove_stale, replace_file

TAGS = ["vlmguard-edit", "vlm-guard", "safety", "steering"]
_LICENSE_KEYS = ("license", "license_name", "license_link")

CARD = "README.md"  # the model card, in the guarded folder
RECORD = "vlmguard.json"  # provenance and file hashes, in the guarded folder


def source_license(source: Path) -> dict[str, Any]:
    """License fields from the source's own model card metadata, if it has one."""
    readme = source / "README.md"
    if not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # a malformed source card must not stop the conversion
        return {}
    return {k: data[k] for k in _LICENSE_KEYS if data.get(k)}


def write_card(out: Path, record: dict[str, Any], license_fields: dict[str, Any]) -> None:
    source_id = record["source"]["id"]
    direction = record["direction"]
    recipe = record["recipe"]
    hub_id = record["source"]["hub_id"]
    data = ModelCardData(
        # The Hub links base_model; a local source has no Hub id to link to.
        base_model=hub_id,
        base_model_relation="finetune" if hub_id else None,
        pipeline_tag="image-text-to-text",
        library_name="transformers",
        tags=TAGS,
        **license_fields,
    )
    layers = recipe["layers"]
    source_of_v = (
        f"a safety steering direction V_l (rank {recipe['rank']}) was taken from the base LLM "
        f"**{direction['base_model']}** (SVD of last-token hidden-state differences between "
        f"{direction['num_anchor_pairs']} harmful and harmless anchor prompts)"
    )
    if recipe.get("mode") in LEARNED:
        what, how = _learned_text(record)
    elif recipe.get("mode") == "image-gap":
        what = (
            f"Only the attention output projections (`o_proj`) of layers {span(layers)} of the "
            "language model changed."
        )
        how = (
            "For every edited layer l, an image-gap direction d_l was measured on the source "
            f"model itself: the mean change that a blank image causes in layer l's attention "
            f"output at the last prompt token, over {direction['num_anchor_pairs']} harmful "
            "and harmless anchor prompt pairs, with its component along the text-only mean "
            "removed. Each o_proj became\n\n"
            "    W_o <- (I - d_l d_l^T) W_o\n\n"
            "so the attention no longer writes along d_l: the image's push there is removed, "
            "while text-only prompts, which carry nothing along d_l on average, barely change."
        )
    elif recipe.get("mode") == "projector-shift":
        what = (
            "Only the bias of the multimodal projector's output layer changed, so the edit acts "
            "only when an image is in the prompt: text-only behaviour is exactly the original's."
        )
        how = (
            f"For layer {layers[0]}, {source_of_v}; the projector's output bias became\n\n"
            f"    b <- b + gamma * u        gamma = {recipe['gamma']:g}\n\n"
            + (
                "with u the unit image-token state that layer's attention maps most strongly "
                "onto V_l[0]: u ∝ g ⊙ (Σ_h W_o^h W_v^h)^T V_l[0] (g: the layer's input-norm gain)."
                if recipe.get("shift_direction", "attention") == "attention"
                else "with u = V_l[0]."
            )
        )
    else:
        what = (
            "Only the language model's residual writers (attention `o_proj` and MLP `down_proj`) "
            f"of layers {span(layers)} changed."
        )
        how = (
            f"For every edited layer l, {source_of_v}, and each writer W of layer l became\n\n"
            f"    {record['map']}\n\n"
            "(beta = -1 removes the component of each write along V_l; beta > 0 amplifies it)."
        )
    held = "learned deltas" if recipe.get("mode") in LEARNED else "directions"
    body = f"""
# {Path(str(source_id)).name}, guarded with vlmguard-edit

This is **{source_id}** with a VLM-Guard safety edit (arXiv 2502.10486) folded into its
weights by vlmguard-edit. It loads and runs like the original: no hooks, no custom code.
{what} Everything else (vision tower, embeddings, tokenizer, configs) is byte-identical to
the source.

## What was done
{how}
{len(record["edits"])} tensor(s) changed. `vlmguard.json` lists each with its BLAKE3 hash before
and after, and `{direction["file"]}` holds the {held} with their provenance.

## Reproduce
From the folder that holds this one (local paths are relative to it):
```
{record["command"]}
```

## Usage
```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("<this repo or folder>")
processor = AutoProcessor.from_pretrained("<this repo or folder>")
```

## Caveats
The edit's effect on refusals must be measured for each model; see the vlmguard-edit README
for how the defaults were chosen. The license of the source model applies.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    replace_file(out / CARD, str(card))


def _learned_text(record: dict[str, Any]) -> tuple[str, str]:
    recipe, direction = record["recipe"], record["direction"]
    modules = list(dict.fromkeys(edit["module"] for edit in record["edits"]))
    module = ", ".join(f"`{m}`" for m in modules)
    lowrank = recipe["mode"] == "lowrank"
    what = (
        f"Only the attention output projections of {len(modules)} text layers changed, each by "
        f"a rank-{recipe['rank']} product B A; text-only answers were held to the original's "
        "own while it was learned (they can move slightly: see the held-out numbers below)."
        if lowrank
        else f"Only {module} changed (the image-to-language path, which a text-only prompt "
        "never reaches), so the edit acts only when an image is in the prompt: text-only "
        "behaviour is exactly the original's."
    )
    report = direction.get("calibration") or {}
    before, after = report.get("before") or {}, report.get("after") or {}
    change = "B A of those projections" if lowrank else f"dW, db of {module}"
    epochs = after.get("epochs", recipe["epochs"])  # the calibrated candidate's, with a search
    rate = after.get("learning_rate", recipe["learning_rate"])
    how = (
        f"A change {change} was learned ({epochs} epochs, Adam {rate:g}) so that, with an "
        f"image ({', '.join(recipe['images'])}), "
        f"the model answers {direction['num_anchor_pairs']} harmful anchor prompts as it does "
        "text only (its own text-only answers are the teacher: the language model supervises "
        "the VLM), while harmless prompts and image descriptions keep the original's "
        "with-image answers"
        + (" and text-only answers" if lowrank else "")
        + ". The weights became\n\n"
        f"    {record['map']}\n"
    )
    if after:
        how += (
            "\nOn held-out anchors (teacher-forced; every candidate in `calibration.md`): "
            "first answer token agreeing with the "
            f"text-only answer {before.get('harmful_first_token_agreement', 0):.0%} -> "
            f"{after['harmful_first_token_agreement']:.0%}; KL to the original on harmless "
            f"and description prompts {after['preservation_kl']:.3f}.\n"
        )
    return what, how


def load_record(folder: Path) -> dict[str, Any]:
    path = folder / RECORD
    if not path.is_file():
        raise InputError(f"{folder} has no {RECORD}: it is not a vlmguard-edit output")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc


def record_files(folder: Path, names: list[str]) -> None:
    """Re-hash ``names`` (relative paths) into the record after our own later changes
    (`eval --update-card`), so that `verify` still accounts for every file."""
    record = load_record(folder)
    record["files"] = dict(
        sorted({**record.get("files", {}), **{n: file_entry(folder / n) for n in names}}.items())
    )
    write_record(folder, record)


def write_record(out: Path, record: dict[str, Any]) -> None:
    remove_stale(out / RECORD)
    replace_file(out / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
