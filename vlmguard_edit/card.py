"""The guarded checkpoint's model card (README.md with Hub metadata) and provenance file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .record import CARD
from .writes import replace_file

log = logging.getLogger(__name__)

# (what changed, how it was obtained, what the shipped file holds): the kind's own words.
CardText = tuple[str, str, str]

TAGS = ["vlmguard-edit", "vlm-guard", "safety", "steering"]
_LICENSE_KEYS = ("license", "license_name", "license_link")


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


def write_card(
    out: Path, record: dict[str, Any], license_fields: dict[str, Any], text: CardText
) -> None:
    """The card of a guarded folder; ``text``: what the edit kind says of itself."""
    source_id = record["source"]["id"]
    direction = record["direction"]
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
    what, how, held = text
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
