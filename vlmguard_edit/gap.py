"""The image-gap direction: what an image adds to the attention output at the reading token.

The safety alignment gap is that the same request is refused without an image and answered
with one. For each selected layer l of the VLM, run every anchor prompt (harmful and
harmless) twice, text only and with a blank image, and take the output of layer l's attention
output projection at the last prompt token:

    a_l(p), a_l(p, image)                       (2N, d)
    delta_l = mean(a_l(p, image)) - mean(a_l(p))  what the image adds, on average
    mu_l    = mean(a_l(p))                        what text-only prompts carry there anyway
    d_l     = delta_l - (delta_l . mu^) mu^       the part of the image's push that text-only
                                                  prompts do not have
    V_l     = d_l / |d_l|                         (1, d)

Folding the projection W_o <- (I - V_l^T V_l) W_o into the attention output projections then
removes the image's push along d_l, while text-only prompts (which have, on average, nothing
along d_l) are barely changed. Measured on the model organism (README, "What works"): this
restores refusals with an image at a small fraction of the KL of every other edit tried; the
un-orthogonalised delta_l does not (it removes text-only signal too).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from . import images as imgs
from .anchors import AnchorSet
from .checkpoint import ModelSource, default_device
from .compat import family_of, forward_errors
from .direction import Direction, load_truncated, weights_sha256
from .errors import DirectionError
from .runtime import writer_modules

log = logging.getLogger(__name__)

KIND = "image-gap"


def chat_batch(processor: Any, prompts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
    """One user turn per prompt (with its image, if any), the generation prompt added,
    padded to a batch with the processor's tokenizer padding side."""
    conversations = []
    for prompt, image in zip(prompts, images, strict=True):
        content = [{"type": "image", "image": image}] if image is not None else []
        content.append({"type": "text", "text": prompt})
        conversations.append([{"role": "user", "content": content}])
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )


def extend_aligned(batch: dict[str, torch.Tensor], total: int) -> dict[str, torch.Tensor]:
    """The prompt batch's extra inputs for a sequence grown to ``total`` tokens: inputs aligned
    with the prompt's tokens (mllama's cross_attention_mask) carry their last position over
    the new tokens, as generate does; input_ids / attention_mask are left out."""
    length = batch["input_ids"].shape[1]
    out = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key != "pixel_values" and value.ndim >= 2 and value.shape[1] == length < total:
            tail = value[:, -1:].expand(-1, total - length, *value.shape[2:])
            value = torch.cat([value, tail], 1)
        out[key] = value
    return out


@torch.no_grad()
def attention_outputs(
    model: torch.nn.Module,
    processor: Any,
    prompts: list[str],
    image: Any,
    layers: list[int],
    batch_size: int,
    progress: bool = True,
    desc: str = "prompt batches",
) -> dict[int, torch.Tensor]:
    """Per layer, the attention output projection's output at each prompt's last token (N, d).

    Prompts are right-padded and the last real token is picked by its index, so every row is
    what an unbatched run computes. A layer whose attention does not run (mllama's
    cross-attention layers without an image) contributes zeros."""
    device = next(model.parameters()).device
    modules = writer_modules(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        modules[layer][0].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out.detach())
        )
        for layer in layers
    ]
    processor.tokenizer.padding_side = "right"
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            chunk = prompts[start : start + batch_size]
            batch = chat_batch(processor, chunk, [image] * len(chunk))
            batch = {k: v.to(device) for k, v in batch.items()}
            captured.clear()
            with forward_errors(family_of(model)):
                model(**batch, use_cache=False)
            last = batch["attention_mask"].sum(1) - 1
            rows = torch.arange(len(chunk), device=device)
            for layer in layers:
                if layer in captured:
                    out[layer].append(captured[layer][rows, last].float().cpu())
                else:
                    out[layer].append(
                        torch.zeros(len(chunk), model.config.get_text_config().hidden_size)
                    )
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def gap_vector(text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """text, image: (N, d) attention outputs of the same prompts without and with an image.
    Returns V (1, d) float32, orthogonal to the text-only mean, and statistics."""
    text, image = text.double(), image.double()
    delta = image.mean(0) - text.mean(0)
    mu = text.mean(0)
    mu_hat = mu / mu.norm().clamp_min(1e-12)
    d = delta - (delta @ mu_hat) * mu_hat
    if d.norm() <= 1e-6 * max(float(delta.norm()), 1e-12):
        raise DirectionError(
            "the image changes nothing at the reading token beyond the text-only mean: no "
            "image-gap direction to fold"
        )
    v = d / d.norm()
    on_text, on_image = text @ v, image @ v
    midpoint = (on_text.mean() + on_image.mean()) / 2
    correct = (on_image > midpoint).sum() + (on_text <= midpoint).sum()
    pooled = torch.sqrt((on_text.var() + on_image.var()) / 2).clamp_min(1e-12)
    stats = {
        "gap_norm": round(float(delta.norm()), 6),
        "kept_fraction": round(float(d.norm() / delta.norm()), 6),
        "text_mean_proj": round(float(on_text.mean()), 6),
        "image_mean_proj": round(float(on_image.mean()), 6),
        "separation_accuracy": round(float(correct) / (2 * len(text)), 6),
        "separation_d": round(float((on_image.mean() - on_text.mean()) / pooled), 6),
    }
    return v[None].float(), stats


def compute_gap_direction(
    source: ModelSource,
    anchors: AnchorSet,
    layers: list[int],
    *,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Direction:
    """The image-gap direction of a VLM at each selected layer (VLM layer numbering)."""
    from transformers import AutoProcessor

    device = default_device(device)
    model = load_truncated(source, max(layers), True, device, dtype, False, trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DirectionError(
            f"cannot load the processor of {source.id} ({exc.__class__.__name__}); the image-gap "
            "direction runs the VLM on images and needs its processor files"
        ) from exc
    if getattr(processor, "chat_template", None) is None:
        raise DirectionError(f"{source.id}'s processor has no chat template to wrap the prompts")
    prompts = list(anchors.harmful) + list(anchors.harmless)
    blank = imgs.blank()
    log.info("attention outputs of %d anchor prompts, without and with an image", len(prompts))
    text = attention_outputs(model, processor, prompts, None, layers, batch_size, progress, "text")
    image = attention_outputs(
        model, processor, prompts, blank, layers, batch_size, progress, "with image"
    )
    vectors, stats = {}, {}
    for layer in layers:
        vectors[layer], stats[layer] = gap_vector(text[layer], image[layer])
    meta = {
        "kind": KIND,
        "base_model": "self",
        "source_model": source.id,
        "base_revision": source.revision,
        "weights_sha256": weights_sha256(model),
        "anchors": anchors.name,
        "anchors_sha256": anchors.sha256,
        "num_anchor_pairs": len(anchors),
        "template": "processor chat template",
        "image": f"blank {blank.width}x{blank.height} {blank.mode} {blank.getpixel((0, 0))}",
        "rank": 1,
        "layers": list(layers),
        "hidden_size": int(next(iter(vectors.values())).shape[1]),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "tool_version": __version__,
    }
    return Direction(vectors, stats, meta)
