"""Stage 2 of the organism for VLM families whose image path differs from LLaVA's.

Each family is data (its extra special tokens, its image-slot text in the chat template) and
one function that builds the VLM around the trained base LLM with the base LLM's weights
copied in. Training goes through the family's own processor, so the prompts, image tokens
and pixel tensors it learns from are exactly those ``eval`` builds:

- ``idefics3``: a SigLIP-like tower, pixel shuffle, one Linear connector
  (``model.connector.modality_projection.proj``); the language model is ``model.text_model``.
- ``mllama`` (Llama 3.2 Vision): the image never enters the token sequence; gated
  cross-attention layers, inserted between the base LLM's layers, read it (gates start closed).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MLLAMA_CROSS_LAYERS = (2,)  # between base layers 1 and 2 (of 4; of 8: still one)


@dataclass(frozen=True)
class Channel:
    """An image channel's geometry: the side in px the processor feeds the tower, the
    tower's patch side, and how many image states the language model reads."""

    size: int
    patch: int
    tokens: int


@dataclass(frozen=True)
class Family:
    name: str
    special: tuple[str, ...]  # tokens the processor needs beyond the organism's own
    image_slot: str  # what the chat template writes for an image
    # (base llm, tokenizer, channel, vision config overrides) -> VLM
    build: Callable[[Any, Any, Channel, dict], Any]
    processor: Callable[[Any, str, Channel], Any]  # (tokenizer, template, channel) -> processor
    # narrow: the development zoo's first members (4 image tokens); wide: a real attack
    # surface (>= 64 image tokens, 112 px: ~37,600 pixel values an attacker controls)
    channels: dict[str, Channel]


def _idefics3(llm, tokenizer, channel: Channel, tower: dict | None = None):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    vision = dict(
        model_type="idefics3_vision",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=channel.size,
        patch_size=channel.patch,
    )
    vision.update(tower or {})
    config = Idefics3Config(
        text_config=llm.config.to_dict(),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    vlm = Idefics3ForConditionalGeneration(config)
    vlm.get_decoder().load_state_dict(llm.model.state_dict())
    vlm.get_output_embeddings().load_state_dict(llm.lm_head.state_dict())
    return vlm


def _idefics3_processor(tokenizer, template: str, channel: Channel):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    edge = {"longest_edge": channel.size}
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size=edge, max_image_size=edge)
    return Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        image_seq_len=channel.tokens,
        chat_template=template,
    )


def _mllama(llm, tokenizer, channel: Channel, tower: dict | None = None):
    """As the real 11B model: the base LLM's layers in order, cross-attention layers between."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    base = llm.config
    total = base.num_hidden_layers + len(MLLAMA_CROSS_LAYERS)
    text = {k: v for k, v in base.to_dict().items() if k not in ("head_dim", "model_type")}
    text.update(num_hidden_layers=total, cross_attention_layers=list(MLLAMA_CROSS_LAYERS))
    vision = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=128,
        vision_output_dim=128,
        image_size=channel.size,
        patch_size=channel.patch,
        max_num_tiles=1,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1]],
    )
    vision.update(tower or {})
    config = MllamaConfig(
        text_config=dict(model_type="mllama_text_model", **text),
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    vlm = MllamaForConditionalGeneration(config)
    _copy_into_mllama(vlm, llm, total)
    return vlm


@torch.no_grad()
def _copy_into_mllama(vlm, llm, total: int) -> None:
    text = vlm.get_decoder()
    own = [j for j in range(total) if j not in MLLAMA_CROSS_LAYERS]
    for i, j in enumerate(own):
        text.layers[j].load_state_dict(llm.model.layers[i].state_dict())
    text.norm.load_state_dict(llm.model.norm.state_dict())
    text.embed_tokens.weight[: llm.config.vocab_size] = llm.model.embed_tokens.weight
    vlm.get_output_embeddings().load_state_dict(llm.lm_head.state_dict())


def _mllama_processor(tokenizer, template: str, channel: Channel):
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    size = {"height": channel.size, "width": channel.size}
    images = MllamaImageProcessorPil(size=size, max_image_tiles=1)
    return MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)


FAMILIES = {
    "idefics3": Family(
        "idefics3",
        ("<fake_token_around_image>", "<global-img>"),
        "<image>",
        _idefics3,
        _idefics3_processor,
        # pixel shuffle (scale 2) merges 2 x 2 patches into one token
        {"narrow": Channel(56, 14, 4), "wide": Channel(112, 7, 64)},
    ),
    "mllama": Family(
        "mllama",
        ("<|image|>",),
        "<|image|>",
        _mllama,
        _mllama_processor,
        # one tile; cross-attention reads every patch state and the class state
        {"narrow": Channel(28, 14, 5), "wide": Channel(112, 14, 65)},
    ),
}


def build(
    family: str, llm, tokenizer, template: str, channel: str = "narrow", tower: dict | None = None
):
    """The family's VLM (vision tower frozen, as LLaVA's) and its processor; ``tower``:
    vision config overrides (a reader's larger tower)."""
    spec = FAMILIES[family]
    geometry = spec.channels[channel]
    vlm = spec.build(llm, tokenizer, geometry, tower or {})
    for name, param in vlm.named_parameters():
        param.requires_grad_("vision_model." not in name)
    processor = spec.processor(tokenizer, template.replace("<image>", spec.image_slot), geometry)
    return vlm, processor


def train(vlm, processor, data: list, steps: int, lr: float, rng: random.Random, progress: bool):
    """Stage 2 through the processor: each step's 32 rows are prompted as eval prompts them,
    the answer appended; the loss covers the answer tokens only."""

    order = list(range(len(data)))
    rng.shuffle(order)
    count = min(steps, len(order) // 32)
    inputs = (
        _batch(processor, [data[i] for i in order[k * 32 : (k + 1) * 32]]) for k in range(count)
    )
    train_steps(vlm, inputs, steps, lr, progress)


def materialise(image: Any) -> Any:
    """A stage-2 row's image: a PIL image, or a function that draws it (drawn per batch, so
    that thousands of large renders are never held at once)."""
    return image() if callable(image) else image


def _batch(processor, rows: list) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer for each (image or None, request, answer) row, labels on
    the answer (the word-level tokenizer never merges across the space between them)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    texts, images, answers = [], [], []
    for image, request, answer in rows:
        content = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": request})
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        texts.append(f"{prompt} {answer} </s>")
        images.append([materialise(image)] if image is not None else [])
        answers.append(len(tokenizer(f" {answer} </s>", add_special_tokens=False)["input_ids"]))
    kwargs = {"images": images} if any(images) else {}
    batch = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    labels = torch.full_like(batch["input_ids"], -100)
    lengths = batch["attention_mask"].sum(1).tolist()
    for row, (length, count) in enumerate(zip(lengths, answers, strict=True)):
        labels[row, length - count : length] = batch["input_ids"][row, length - count : length]
    batch["labels"] = labels
    return dict(batch)


def train_steps(model, inputs, steps: int, lr: float, progress: bool = True) -> None:
    """AdamW on the trainable parameters, one step per input dict (labels included), at most
    ``steps``; shared by every organism family's training."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    bar = tqdm(total=steps, desc="training", unit="step", disable=not progress)
    for step, batch in enumerate(inputs):
        if step >= steps:
            break
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
