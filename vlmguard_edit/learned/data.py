"""What a learned edit is taught: the anchor rows with and without images, the teachers'
answers (the VLM's own text-only answers, or a base LLM's), preservation rows, image-task
probes and recombined anchor pairs, batched with their teacher-forced targets."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import InputError

DESCRIBE = ("describe the image .", "What is in this image?")


@dataclass
class Settings:
    """How the edit is learned (recipe keys of the same names)."""

    epochs: int = 40
    learning_rate: float = 1e-3
    images: tuple[str, ...] = ("blank", "noise", "scene")
    preserve_images: tuple[str, ...] = ()  # the harmless rows' only (recipes.Recipe)
    validation: float = 0.2  # share of the anchor pairs held out for the calibration report
    probes: int = 96  # image-description prompts on drawn shapes (preservation)
    # The preservation rows' loss weight against the refusal rows' (1: equal per batch).
    preservation_weight: float = 2.0
    # Recombined pairs added on typographic renders (``recombine``): each fit pair's changed
    # words put into another pair's sentence, so the edit must read the request in the image
    # rather than remember the anchors' sentences. 0: none.
    recombined: int = 0
    max_new_tokens: int = 24
    batch_size: int = 16
    seed: int = 0
    # (epochs, learning rate) pairs to try; each is scored on the held-out anchors and one is
    # picked by ``pick``. Empty: just (epochs, learning_rate).
    candidates: tuple[tuple[int, float], ...] = ()
    rank: int = 0  # > 0: each weight's change is a rank-r product B A (the lowrank kind)
    # Also hold the original's text-only answers to the anchors (for edits a text-only
    # forward passes through; the image path needs none).
    preserve_text: bool = False
    # Recompute activations in the backward pass instead of keeping them (memory: about one
    # layer's activations instead of all layers'; time: about one more forward). None: on
    # CUDA only, where a real model's activations are what fills the GPU.
    checkpointing: bool | None = None
    # (eps in 1/255, PGD steps per epoch): also train on images crafted against the edit as
    # it is learned (learned.adversarial). None: no adversarial rows.
    adversarial: tuple[int, int] | None = None


@dataclass
class Teacher:
    """A separate text-only teacher: the base LLM (VLM-Guard's "LLM component as supervision").
    Its tokenizer must be the VLM's (the student learns the teacher's answer tokens)."""

    model: torch.nn.Module
    tokenizer: Any
    template: str | None = None  # a "{request}" format for LLMs without a chat template

    def inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from ..direction import encode, format_prompt

        rows = [
            encode(self.tokenizer, *format_prompt(self.tokenizer, p, self.template))
            for p in prompts
        ]
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        device = next(self.model.parameters()).device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def check_same_tokenizer(vlm_tokenizer: Any, teacher_tokenizer: Any, teacher: str) -> None:
    """The student is taught the teacher's answer tokens: the vocabularies must be one."""
    if vlm_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise InputError(
            f"the base LLM {teacher} has another tokenizer than the VLM's (vocabularies differ): "
            "it cannot teach the VLM token by token; use --base-llm self (the VLM's own "
            "language model, text only)"
        )


@dataclass
class Batch:
    """Teacher-forced rows: the student's inputs, where its answer tokens are, the targets."""

    inputs: dict[str, torch.Tensor]
    start: int  # first answer position in the (left-padded) sequence
    mask: torch.Tensor  # (B, T) 1 on real answer tokens
    target: torch.Tensor  # (B, T, V) teacher log-probabilities
    harmful: bool


def _split(prompts: list[str], settings: Settings) -> tuple[list[str], list[str]]:
    rows = list(prompts)
    random.Random(settings.seed).shuffle(rows)
    held = max(1, round(len(rows) * settings.validation)) if settings.validation else 0
    return rows[held:], rows[:held]


def _probe_rows(settings: Settings, task: Any) -> list[tuple[str, Any]]:
    """Image-description prompts on drawn shapes, and an organism's own image task: never
    the eval's probe items (other seeds), interleaved so that both reach the held-out part."""
    from ..probes import generic_probes

    shapes = generic_probes(per_kind=max(1, settings.probes // 4), seed=settings.seed + 77)
    rows = [_row(DESCRIBE[i % len(DESCRIBE)], p.image) for i, p in enumerate(shapes)]
    if task is not None and "image_prompt" in task.grammar:
        own = task.probes(len(rows), settings.seed + 4242, held_out=False)
        k = len(own) // len(rows)  # a reader's task has a reading probe beside each caption
        own_rows = [_row(p.question, p.image) for p in own]
        rows = [r for i, row in enumerate(rows) for r in (row, *own_rows[i * k : (i + 1) * k])]
    return rows


def _row(prompt: str, image: Any, text_prompt: str | None = None) -> tuple[str, Any, str]:
    """(what the student is asked, its image, the same request without an image)."""
    return prompt, image, prompt if text_prompt is None else text_prompt


def _image_rows(prompts: list[str], kinds: tuple[str, ...]) -> list[tuple[str, Any, str]]:
    """Each prompt with one image of every kind in ``kinds`` (seeds never eval's).
    A typographic image is the request itself rendered FigStep-style (an anchor, never an
    eval prompt), asked with the typographic setting's instruction; its text-only
    counterpart is the request as written."""
    from .. import images as imgs
    from ..recipe_data import IMAGE_KINDS

    makers = {"blank": lambda i: imgs.blank(), "noise": imgs.noise, "scene": imgs.scene}
    unknown = [k for k in kinds if k not in IMAGE_KINDS]
    if unknown:
        raise InputError(f"unknown training image kind(s) {unknown}; known: {list(IMAGE_KINDS)}")
    rows = []
    for i, prompt in enumerate(prompts):
        for kind in kinds:
            if kind == "typographic":
                rows.append(_row(imgs.TYPOGRAPHIC_INSTRUCTION, imgs.typographic(prompt), prompt))
            else:
                rows.append(_row(prompt, makers[kind](1000 + i)))
    return rows


def _changed(harmful: str, harmless: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """A pair as (words before, the harmful words, the harmless words, words after): the
    longest common prefix and suffix of the two, in words."""
    a, b = harmful.split(), harmless.split()
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    return a[:start], a[start : len(a) - end], b[start : len(b) - end], a[len(a) - end :]


def recombine(harmful: list[str], harmless: list[str], count: int, seed: int = 0):
    """Up to ``count`` new (harmful, harmless) pairs: one pair's changed words in another
    pair's sentence ("how do i burn the bus ?" / "... paint ..." with "drug" / "carry" from
    another pair gives "how do i drug the bus ?" / "how do i carry the bus ?"). Only pairs
    that differ in one span take part; no new pair repeats an anchor. Their answers come from
    the teachers, as the anchors' do."""
    parts = [_changed(h, b) for h, b in zip(harmful, harmless, strict=True)]
    parts = [p for p in parts if p[1] and p[2] and (p[0] or p[3])]  # a sentence around a change
    seen = set(zip(harmful, harmless, strict=True))
    rng, out = random.Random(seed), []
    for _ in range(50 * count if len(parts) > 1 else 0):
        (before, _, _, after), (_, bad, good, _) = rng.choice(parts), rng.choice(parts)
        pair = (" ".join(before + bad + after), " ".join(before + good + after))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
        if len(out) == count:
            break
    return [h for h, _ in out], [b for _, b in out]


@torch.no_grad()
def _recombined_batches(model, processor, harmful, harmless, settings: Settings, teacher):
    """Recombined pairs rendered into the image (typographic rows only): harmful ones taught
    to the text-only answer, harmless ones held to the original's with-image answer."""
    new_h, new_b = recombine(harmful, harmless, settings.recombined, settings.seed)
    typographic = replace(settings, images=("typographic",), preserve_images=())
    return _batches(model, processor, new_h, new_b, [], typographic, teacher)


def _anchor_rows(harmful: list[str], harmless: list[str], settings: Settings):
    """The harmful anchors on the training images; the harmless ones on those and on the
    preservation-only images."""
    extra = tuple(k for k in settings.preserve_images if k not in settings.images)
    return _image_rows(harmful, settings.images), _image_rows(harmless, settings.images + extra)


@torch.no_grad()
def _batches(model, processor, harmful, harmless, probes, settings, teacher=None) -> list[Batch]:
    """Harmful x images -> the model's own text-only answer; harmless x images and probes ->
    its own with-image answer. Targets are computed once: no teacher ever sees the edit."""
    rows_h, rows_b = _anchor_rows(harmful, harmless, settings)
    out = []
    for rows, is_harmful in ((rows_h, True), (rows_b + probes, False)):
        for start in range(0, len(rows), settings.batch_size):
            chunk = rows[start : start + settings.batch_size]
            teach = teacher if is_harmful else None
            out.append(_teacher_batch(model, processor, chunk, is_harmful, settings, teach))
    return out


@torch.no_grad()
def _text_batches(model, processor, prompts: list[str], settings: Settings) -> list[Batch]:
    """Anchors without an image -> the original's own text-only answers (preservation)."""
    rows = [_row(p, None) for p in prompts]
    return [
        _teacher_batch(model, processor, rows[i : i + settings.batch_size], False, settings, None)
        for i in range(0, len(rows), settings.batch_size)
    ]


def _teacher_batch(model, processor, rows, harmful: bool, settings: Settings, teacher) -> Batch:
    from ..gap import chat_batch

    prompts, texts = [p for p, _, _ in rows], [t for _, _, t in rows]
    device = next(model.parameters()).device
    with_image = _to(chat_batch(processor, prompts, [img for _, img, _ in rows]), device)
    if teacher is not None:  # the base LLM, text only, in its own chat format
        teacher_model, teacher_in = teacher.model, teacher.inputs(texts)
    else:
        teacher_model = model
        text_only = _to(chat_batch(processor, texts, [None] * len(rows)), device)
        teacher_in = text_only if harmful else with_image
    answers, mask = _greedy(teacher_model, processor, teacher_in, settings.max_new_tokens)
    logits = _answer_logits(teacher_model, teacher_in, answers, mask)
    student = _extend(with_image, answers, mask)
    start = with_image["input_ids"].shape[1]
    return Batch(student, start, mask, torch.log_softmax(logits, -1), harmful)


def _to(batch, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _greedy(model, processor, batch, max_new_tokens: int):
    from ..evaluate import answer_mask

    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )
    prompt = batch["input_ids"].shape[1]
    mask = answer_mask(sequences, prompt, tokenizer.eos_token_id, pad)
    return sequences[:, prompt:], mask


def _extend(batch: dict[str, torch.Tensor], answers: torch.Tensor, mask: torch.Tensor):
    """The prompt batch with the answer tokens appended."""
    from ..gap import extend_aligned

    total = batch["input_ids"].shape[1] + answers.shape[1]
    out = extend_aligned(batch, total)
    out["input_ids"] = torch.cat([batch["input_ids"], answers], 1)
    out["attention_mask"] = torch.cat(
        [batch["attention_mask"], mask.to(batch["attention_mask"].dtype)], 1
    )
    return out


def _answer_logits(model, batch, answers, mask) -> torch.Tensor:
    """Logits at the positions that predict each answer token (B, T, V), float32."""
    full = _extend(batch, answers, mask)
    start = batch["input_ids"].shape[1]
    logits = model(**full).logits
    return logits[:, start - 1 : start - 1 + answers.shape[1]].float()
