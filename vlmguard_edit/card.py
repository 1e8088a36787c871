"""The guarded checkpoint's model card (README.md with Hub metadata) and provenance file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import file_entry
from .errors import InputError
from .kinds import get_kind
from .writes import remove_stale, replace_file

log = logging.getLogger(__name__)

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
    if not hub_id:
        log.warning(
            "the card names no base_model, so the Hub's model tree will not link it to its "
            "source; pass --base-model ORG/NAME"
        )
    data = ModelCardData(
        # The Hub links base_model; a local source has no Hub id to link to.
        base_model=hub_id,
        base_model_relation="finetune" if hub_id else None,
        pipeline_tag="image-text-to-text",
        library_name="transformers",
        tags=TAGS,
        **license_fields,
    )
    kind = get_kind(recipe["mode"])
    what, how = kind.card_text(record)
    body = f"""
# {Path(str(source_id)).name}, guarded with vlmguard-edit

This is **{source_id}** with a VLM-Guard safety edit (arXiv 2502.10486) folded into its
weights by vlmguard-edit. It loads and runs like the original: no hooks, no custom code.
{what} Everything else (vision tower, embeddings, tokenizer, configs) is byte-identical to
the source.

## What was done
{how}
{len(record["edits"])} tensor(s) changed. `vlmguard.json` lists each with its BLAKE3 hash before
and after, and `{direction["file"]}` holds the {kind.held} with their provenance.

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


def learned_text(record: dict[str, Any], lowrank: bool) -> tuple[str, str]:
    """(what, how) of a learned edit; ``lowrank``: B A of o_proj, else the image path."""
    recipe, direction = record["recipe"], record["direction"]
    modules = list(dict.fromkeys(edit["module"] for edit in record["edits"]))
    module = ", ".join(f"`{m}`" for m in modules)
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
    images = (report.get("settings") or {}).get("images", recipe["images"])  # after the gate
    how = (
        f"A change {change} was learned ({epochs} epochs, Adam {rate:g}) so that, with an "
        f"image ({', '.join(images)}), "
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
