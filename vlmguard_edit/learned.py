"""The learned edits: the VLM's own text-only behaviour supervises it with images.

VLM-Guard's principle, made permanent: the language model already knows, text only, which
requests to refuse; with an image it forgets. This kind learns a change to the family's last
image-to-language Linear (LLaVA's ``multi_modal_projector.linear_2``, Idefics3's connector,
mllama's projector; ``layout.Family.image_path``) so that

- harmful anchors with an image (blank, noise, scene) are answered as the same model answers
  them text only (teacher: its own greedy text-only answer, teacher-forced; KL per answer
  token), and
- harmless anchors with an image and image-description probes keep the original model's own
  with-image answers (preservation; without it the edit blinds the model).

Text-only behaviour cannot change: no text-only forward passes through the image path.

The second learned kind, ``lowrank``, learns a rank-r update B A of the selected text layers'
attention output projections (the design's own edit site) with the same objective, plus the
original's own text-only answers to the anchors as preservation rows (text-only outputs can
change here, so they are held in place). Fold: W + B A in float32; runtime reference: a hook
adding (x A^T) B^T; file: the factors, ``<key>.lora_A`` (r, in) and ``<key>.lora_B`` (out, r).

Parameters: learned (this module). Plan: that Linear's weight and bias (``plan.py``, kind
"delta"). Fold: W + dW, b + db, in float32, cast once (``fold``). Runtime reference: a forward
hook adding x dW^T + db to the module's output (``hook``). File: safetensors, one delta per
checkpoint key, provenance and the calibration report in its metadata (``Edit``).
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import decode_provenance, read_provenance, read_tensor, save_with_provenance
from .errors import DirectionError, InputError, PlanError

log = logging.getLogger(__name__)

KIND = "image-path"  # the kind of an edit file written before kinds were recorded
FACTORS = (".lora_A", ".lora_B")
EDIT_FORMAT = "vlmguard-edit/1"
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


@dataclass
class Edit:
    """Deltas by checkpoint key (float32), or a low-rank pair ``<key>.lora_A`` / ``.lora_B``
    per key, with provenance and the calibration report."""

    deltas: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = KIND

    def save(self, path: Path) -> None:
        tensors = {key: d.float().contiguous() for key, d in sorted(self.deltas.items())}
        fmt = {"vlmguard.format": EDIT_FORMAT, "vlmguard.kind": self.kind}
        save_with_provenance(path, tensors, fmt, self.meta)

    @classmethod
    def load(cls, path: Path) -> Edit:
        header, metadata = read_provenance(path, "edit file", DirectionError)
        if metadata.get("vlmguard.format") != EDIT_FORMAT:
            raise DirectionError(f"{path} is not a vlmguard-edit learned edit file")
        deltas = {key: read_tensor(Path(path), info) for key, info in header.tensors.items()}
        meta = decode_provenance(metadata, ("vlmguard.format", "vlmguard.kind"))
        return cls(deltas, meta, metadata.get("vlmguard.kind", KIND))

    def delta(self, key: str) -> torch.Tensor:
        """The dense change of one checkpoint tensor (B A for a low-rank pair), float32."""
        if key in self.deltas:
            return self.deltas[key]
        a, b = (self.deltas[key + suffix].float() for suffix in FACTORS)
        return b @ a

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each changed checkpoint tensor."""
        out = {}
        for key, value in self.deltas.items():
            if key.endswith(FACTORS[1]):
                continue  # read with its lora_A
            if key.endswith(FACTORS[0]):
                base = key.removesuffix(FACTORS[0])
                out[base] = (self.deltas[base + FACTORS[1]].shape[0], value.shape[1])
            else:
                out[key] = tuple(value.shape)
        return out


def fold(before: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """before + delta in float32, cast back once; refuses non-finite results."""
    if tuple(delta.shape) != tuple(before.shape):
        raise PlanError(f"edit delta has shape {list(delta.shape)}, tensor {list(before.shape)}")
    out = before.to(torch.float32) + delta.to(torch.float32)
    if not torch.isfinite(out.sum()):
        raise PlanError("edited tensor has non-finite values")
    return out if before.dtype == torch.float32 else out.to(before.dtype)


def find_module(model: torch.nn.Module, names: tuple[str, ...]) -> tuple[str, torch.nn.Linear]:
    """A planned Linear in a loaded model, by any of the names it may have there (and the
    name transformers' own checkpoint renaming gives the first one)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    own = renamed(names[0], model_type) if names and model_type else None
    for name in (*names, *([own] if own else [])):
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(name)
            if isinstance(module, torch.nn.Linear):
                return name, module
    raise PlanError(f"no planned Linear found in the loaded model (tried {', '.join(names)})")


def renamed(module: str, model_type: str) -> str | None:
    """A Hub module name as loaded: transformers' checkpoint conversion mapping of the model
    type (its renaming rules, in order), or None where it has none."""
    import re

    try:
        from transformers.conversion_mapping import (
            WeightRenaming,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4.x loads the Hub's names as they are
        return None
    key = module + ".weight"
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(rule, WeightRenaming):
            for source, target in zip(rule.source_patterns, rule.target_patterns, strict=False):
                key = re.sub(source, target, key)
    return key.removesuffix(".weight") if key != module + ".weight" else None


def memory_names(module: str) -> tuple[str, ...]:
    """The names a checkpoint module may have in the loaded model (transformers 5 nests the
    Hub's ``language_model.model.`` and top-level projectors under ``model.``)."""
    nested = module.replace("language_model.model.", "model.language_model.", 1)
    # Qwen2/2.5-VL's Hub keys name the text layers model.layers.N (legacy layout)
    legacy = module.replace("model.layers.", "model.language_model.layers.", 1)
    return tuple(dict.fromkeys((module, f"model.{module}", nested, legacy)))


@contextlib.contextmanager
def hooks(modules: dict[str, torch.nn.Linear], deltas: dict[str, torch.Tensor]):
    """The runtime reference of a whole edit: one ``hook`` per module (keyed as the deltas)."""
    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            weight = f"{name}.weight"
            factors = tuple(deltas.get(weight + s) for s in FACTORS)
            change = factors if factors[0] is not None else (deltas[weight],)
            stack.enter_context(hook(module, change, deltas.get(f"{name}.bias")))
        yield


@contextlib.contextmanager
def hook(module: torch.nn.Linear, weight: tuple[torch.Tensor, ...], bias: torch.Tensor | None):
    """The runtime reference of the fold: module(x) + x dW^T (+ db), the module unchanged.
    ``weight``: (dW,), or the low-rank pair (A, B) with dW = B A, applied as (x A^T) B^T."""

    def add(_module, inputs, output):
        x = inputs[0].float()
        for factor in weight:  # x A^T then B^T: the low-rank runtime form
            x = torch.nn.functional.linear(x, factor.to(x.device).float())
        extra = x
        if bias is not None:
            extra = extra + bias.to(x.device).float()
        return (output.float() + extra).to(output.dtype)

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- learning


@dataclass
class Teacher:
    """A separate text-only teacher: the base LLM (VLM-Guard's "LLM component as supervision").
    Its tokenizer must be the VLM's (the student learns the teacher's answer tokens)."""

    model: torch.nn.Module
    tokenizer: Any
    template: str | None = None  # a "{request}" format for LLMs without a chat template

    def inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from .direction import encode, format_prompt

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


def learn(
    model: torch.nn.Module,
    processor: Any,
    targets: list[str],
    harmful: list[str],
    harmless: list[str],
    settings: Settings,
    progress: bool = True,
    teacher: Teacher | None = None,
    grammar: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Learn a (dW, db) for each Linear in ``targets`` (checkpoint module names, all on the
    image path); return them keyed "<module>.weight" / "<module>.bias" and the calibration
    report. The harmful rows' teacher is ``teacher`` (a base LLM), or the VLM itself without
    an image. ``grammar``: an organism's declared answer grammar, whose own image task then
    joins the preservation prompts (on images other than eval's)."""
    modules = {t: find_module(model, memory_names(t))[1] for t in targets}
    processor.tokenizer.padding_side = "left"  # prompts end where the answers start
    fit_h, val_h = _split(harmful, settings)
    fit_b, val_b = _split(harmless, settings)
    settings, reading = _reading_gate(model, processor, fit_b, settings)
    probes = _probe_rows(settings, grammar)
    cut = len(probes) * 4 // 5
    fit = _batches(model, processor, fit_h, fit_b, probes[:cut], settings, teacher)
    if settings.recombined:
        fit += _recombined_batches(model, processor, fit_h, fit_b, settings, teacher)
    val = _batches(model, processor, val_h, val_b, probes[cut:], settings, teacher)
    if settings.preserve_text:
        fit += _text_batches(model, processor, fit_h + fit_b, settings)
        val += _text_batches(model, processor, val_h + val_b, settings)
    before = score(model, val)
    fitted = _fit_candidates(model, modules, fit, settings, progress)
    tried = []
    for (epochs, rate), deltas in fitted.items():
        with hooks(modules, deltas):
            after = score(model, val)
        tried.append(({"epochs": epochs, "learning_rate": rate, **after}, deltas))
    chosen, deltas = pick(tried)
    report = {"modules": targets, "settings": asdict(settings), "before": before, "after": chosen}
    if reading is not None:
        report["reading"] = reading
    if len(tried) > 1:
        report["candidates"] = [row for row, _ in tried]
    return deltas, report


# The reading gate's bound: harmful renders are taught only to a model that answers at least
# this share of harmless renders as it answers the same requests written.
READING_MIN = 0.5
READING_PROMPTS = 32  # harmless anchors it is measured on (a few seconds on the organism)


def _reading_gate(model, processor, harmless: list[str], settings: Settings):
    """Settings with typographic training images only where the original reads them, and
    what was measured (None where no typographic image is taught). A model that cannot read
    answers every render alike: taught to refuse harmful renders, it refuses all of them
    (drift-s0: +98 points of over-refusal), so there the renders stay preservation rows and
    no recombined pairs are made."""
    if "typographic" not in settings.images:
        return settings, None
    share = reads(model, processor, harmless[:READING_PROMPTS], settings)
    if share >= READING_MIN:
        return settings, {"share": share, "taught": True}
    images = tuple(k for k in settings.images if k != "typographic")
    preserve = tuple(dict.fromkeys((*settings.preserve_images, "typographic")))
    gated = replace(settings, images=images, preserve_images=preserve, recombined=0)
    return gated, {"share": share, "taught": False}


@torch.no_grad()
def reads(model, processor, prompts: list[str], settings: Settings) -> float:
    """The share of ``prompts`` the model answers, rendered into the image (with the
    typographic instruction), with the same greedy answer as it gives them written."""
    from .gap import chat_batch

    rows = _image_rows(prompts, ("typographic",))
    device = next(model.parameters()).device
    same = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start : start + settings.batch_size]
        rendered = chat_batch(processor, [p for p, _, _ in chunk], [i for _, i, _ in chunk])
        written = chat_batch(processor, [t for _, _, t in chunk], [None] * len(chunk))
        pairs = zip(
            *(_answers(model, processor, _to(b, device), settings) for b in (rendered, written)),
            strict=True,
        )
        same += [a == b for a, b in pairs]
    return sum(same) / len(same) if same else 0.0  # no prompt: nothing shows it reads


def _answers(model, processor, batch, settings: Settings) -> list[tuple[int, ...]]:
    answers, mask = _greedy(model, processor, batch, settings.max_new_tokens)
    return [tuple(row[m.bool()].tolist()) for row, m in zip(answers, mask, strict=True)]


PRESERVATION_MAX = 0.05  # the calibration rule's bound on held-out preservation KL


def pick(tried: list[tuple[dict[str, Any], Any]]) -> tuple[dict[str, Any], Any]:
    """The calibration rule: among candidates whose held-out preservation KL is at most
    PRESERVATION_MAX, the highest harmful first-token agreement (ties: the lower preservation
    KL, the smaller change); if none keeps that bound, the one with the lowest preservation KL."""
    kept = [t for t in tried if t[0]["preservation_kl"] <= PRESERVATION_MAX]
    if not kept:
        return min(tried, key=lambda t: t[0]["preservation_kl"])
    return max(
        kept,
        key=lambda t: (t[0]["harmful_first_token_agreement"], -t[0]["preservation_kl"]),
    )


def _fit_candidates(model, modules, fit: list[Batch], settings: Settings, progress: bool):
    """The deltas of every (epochs, learning rate) candidate, in the search's order.
    Candidates of one learning rate share one run, read at each of their epoch counts: a
    10-epoch run is exactly the first 10 epochs of a 20-epoch one (same seed, same order)."""
    candidates = settings.candidates or ((settings.epochs, settings.learning_rate),)
    by_candidate = {}
    for rate in dict.fromkeys(r for _, r in candidates):
        counts = {e for e, r in candidates if r == rate}
        run = replace(settings, epochs=max(counts), learning_rate=rate)
        snapshots = _fit_snapshots(model, modules, fit, run, progress, counts)
        by_candidate |= {(epochs, rate): deltas for epochs, deltas in snapshots.items()}
    return {c: by_candidate[c] for c in dict.fromkeys(candidates)}


def _fit(model, modules, fit: list[Batch], settings: Settings, progress: bool):
    """The deltas learned over settings.epochs."""
    return _fit_snapshots(model, modules, fit, settings, progress, {settings.epochs})[
        settings.epochs
    ]


def _fit_snapshots(model, modules, fit: list[Batch], settings, progress, at: set[int]):
    """The learned deltas after each epoch count in ``at``, by count."""
    deltas = _initial(modules, settings)
    for delta in deltas.values():
        delta.requires_grad_(True)
    return _train(model, modules, deltas, fit, settings, progress, at)


def _initial(modules: dict[str, torch.nn.Linear], settings: Settings) -> dict[str, torch.Tensor]:
    """Zero deltas (dense: weight and bias), or low-rank pairs with B = 0 and a seeded random A
    (so B gets a gradient; as LoRA initialises): the edit starts as the identity either way."""
    generator = torch.Generator().manual_seed(settings.seed)
    deltas = {}
    for name, module in modules.items():
        out_features, in_features = module.weight.shape
        if settings.rank:
            a = torch.randn(settings.rank, in_features, generator=generator) / in_features**0.5
            deltas[f"{name}.weight.lora_A"] = a.to(module.weight.device)
            deltas[f"{name}.weight.lora_B"] = module.weight.new_zeros(
                out_features, settings.rank, dtype=torch.float32
            )
            continue
        deltas[f"{name}.weight"] = torch.zeros_like(module.weight, dtype=torch.float32)
        if module.bias is not None:
            deltas[f"{name}.bias"] = torch.zeros_like(module.bias, dtype=torch.float32)
    return deltas


def _split(prompts: list[str], settings: Settings) -> tuple[list[str], list[str]]:
    rows = list(prompts)
    random.Random(settings.seed).shuffle(rows)
    held = max(1, round(len(rows) * settings.validation)) if settings.validation else 0
    return rows[held:], rows[:held]


def _probe_rows(settings: Settings, grammar: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """Image-description prompts on drawn shapes, and an organism's own image task: never
    the eval's probe items (other seeds), interleaved so that both reach the held-out part."""
    from .probes import generic_probes, organism_probes

    shapes = generic_probes(per_kind=max(1, settings.probes // 4), seed=settings.seed + 77)
    rows = [_row(DESCRIBE[i % len(DESCRIBE)], p.image) for i, p in enumerate(shapes)]
    if grammar and "image_prompt" in grammar:
        own = organism_probes(grammar, len(rows), settings.seed + 4242, held_out=False)
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
    from . import images as imgs
    from .recipe_data import IMAGE_KINDS

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
    from .gap import chat_batch

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
    from .evaluate import answer_mask

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
    from .gap import extend_aligned

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


def _kl(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of KL(teacher || student)."""
    student = torch.log_softmax(logits, -1)
    per_token = (batch.target.exp() * (batch.target - student)).sum(-1)
    return (per_token * batch.mask).sum() / batch.mask.sum().clamp(min=1)


def _student_logits(model, batch: Batch) -> torch.Tensor:
    logits = model(**batch.inputs).logits
    return logits[:, batch.start - 1 : batch.start - 1 + batch.mask.shape[1]].float()


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, enabled: bool):
    """Gradient checkpointing for the training passes. transformers runs it only in training
    mode, so the model is put in it with every dropout off (nn.Dropout modules in eval mode,
    attention modules' attention_dropout 0): the passes compute what eval mode computes."""
    if not enabled:
        yield
        return
    saved = {m: m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")}
    kwargs = {"use_reentrant": False}  # frozen weights and inputs: the reentrant form needs grads
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    for module in saved:
        module.attention_dropout = 0.0
    try:
        yield
    finally:
        for module, value in saved.items():
            module.attention_dropout = value
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
        model.eval()


def _train(model, modules, deltas, batches, settings: Settings, progress: bool, at):
    """Adam on the deltas over ``batches``; returns a copy of them after each epoch count
    in ``at``."""
    snapshots = {}
    optimizer = torch.optim.Adam(list(deltas.values()), lr=settings.learning_rate)
    for p in model.parameters():
        p.requires_grad_(False)
    order = list(range(len(batches)))
    rng = random.Random(settings.seed)
    bar = tqdm(total=settings.epochs * len(batches), desc="learning", disable=not progress)
    on_cuda = next(model.parameters()).device.type == "cuda"
    save_memory = on_cuda if settings.checkpointing is None else settings.checkpointing
    with hooks(modules, deltas), checkpointing(model, save_memory):
        for epoch in range(settings.epochs):
            rng.shuffle(order)
            for i in order:
                weight = 1.0 if batches[i].harmful else settings.preservation_weight
                loss = weight * _kl(batches[i], _student_logits(model, batches[i]))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                bar.update()
                bar.set_postfix(kl=f"{loss.item():.3f}")
            if epoch + 1 in at:
                snapshots[epoch + 1] = {k: d.detach().clone() for k, d in deltas.items()}
    bar.close()
    return snapshots


@torch.no_grad()
def score(model, batches: list[Batch]) -> dict[str, float]:
    """Validation, teacher-forced: harmful rows' KL to the text-only answer and the share whose
    first answer token is the text-only one; preservation rows' KL to the original and the
    share whose first answer token is still the original's (a refusal where the original
    answered shows here)."""
    kl = {True: [], False: []}
    first = {True: [], False: []}
    for batch in batches:
        logits = _student_logits(model, batch)
        kl[batch.harmful].append(_kl(batch, logits).item())
        agree = logits[:, 0].argmax(-1) == batch.target[:, 0].argmax(-1)
        first[batch.harmful] += [float(a) for a in agree.tolist()]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "harmful_kl_to_text_only": mean(kl[True]),
        "harmful_first_token_agreement": mean(first[True]),
        "preservation_kl": mean(kl[False]),
        "preservation_first_token_agreement": mean(first[False]),
    }
