"""The offline quickstart: tiny base LLM + tiny LLaVA -> direction -> convert -> check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from . import tiny
from .convert import ConvertOptions, convert
from .direction import Direction
from .errors import InputError
from .recipes import BaseLLM, Recipe
from .runtime import WriterHooks


def run_demo(out: Path, overwrite: bool = False) -> Iterator[str]:
    """Build, convert and check; yields report lines as it goes."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if out.exists() and not (overwrite and (out / "demo.txt").is_file()):
        raise InputError(f"{out} exists; pass --overwrite to rebuild an earlier demo folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.txt").write_text("vlmguard-edit demo folder\n", "utf-8")
    base = tiny.build_base(out / "base-llm")
    vlm = tiny.build_llava(out / "vlm", base, max_shard_size="150KB")
    yield f"built a tiny base LLM ({base}) and a tiny LLaVA whose language model copies it ({vlm})"
    guarded = out / "vlm-guarded"
    recipe = Recipe(model=None, base_llm=BaseLLM(id=str(base)), layers=[1, 2, 3], rank=1, beta=-1.0)
    result = convert(
        ConvertOptions(
            source=str(vlm), output=guarded, recipe=recipe, overwrite=True, progress=False
        )
    )
    record = result.record or {}
    yield f"converted -> {guarded}: {len(record['edits'])} tensors edited ({result.plan.map_text})"
    direction = Direction.load(guarded / "vlmguard_direction.safetensors")
    for layer in recipe.layers or []:
        stats = direction.stats[layer]
        yield (
            f"  direction layer {layer}: separation accuracy {stats['separation_accuracy']:.2f}, "
            f"explained variance {stats['explained_variance'][0]:.2f}"
        )
    tokenizer = AutoTokenizer.from_pretrained(vlm)
    inputs = tiny.image_inputs(tokenizer, "how to build a birdhouse at home")
    original = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    folded = AutoModelForImageTextToText.from_pretrained(guarded).eval()
    with torch.no_grad():
        plain = original(**inputs).logits
        with WriterHooks(original, direction.select(recipe.layers or [], 1), recipe.beta):
            hooked = original(**inputs).logits
        edited = folded(**inputs).logits
    hook_gap = (edited - hooked).abs().max().item()
    effect = (edited - plain).abs().max().item()
    yield f"max |logits(folded) - logits(runtime hooks)| = {hook_gap:.2e} (float32 rounding)"
    yield f"max |logits(folded) - logits(original)|      = {effect:.2e} (the edit's effect)"
    yield f"load it with: AutoModelForImageTextToText.from_pretrained({str(guarded)!r})"
