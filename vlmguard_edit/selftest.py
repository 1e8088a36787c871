"""The family self-test: prove that convert is exact on a model's own architecture.

From a model's config (its config.json, a Hub id's, or ``AutoConfig.for_model(type)``) build a
shrunken random instance (widths, depths, heads, experts and the vision tower shrunk by the
generic rules below; per-family overrides only where those fail), save it in each key layout
(the Hub's and transformers 5's, where they differ), convert it with every edit kind the
family supports, and check each output: the edited tensors are exactly the plan's, every
other tensor is bit-identical (vision tower included), it loads with plain
``from_pretrained`` without missing or unexpected keys, and the fold equals the kind's own
runtime hooks (< 1e-5 in float32) with and without an image while changing the model
visibly. A kind a family cannot take is reported with the planner's reason, not as a failure.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, VlmguardError

TOLERANCE = 1e-5  # folded vs hooked logits, float32
VISIBLE = 1e-3  # the least logit change that counts as the edit doing something
MAX_PARAMETERS = 30_000_000  # a shrink that leaves more did not shrink (refused, not built)
IMAGE_TOKEN = 5  # the shrunken vocabulary's image token (ids 0-2: pad, bos, eos)
LAYOUTS = ("legacy", "memory")  # the Hub's key names, transformers 5's
BASE = "vlmguard-edit/self-test"  # the card's base_model (the source is a temporary folder)

# Generic shrink: any of these keys a sub-config has (as an int) takes this value.
TEXT_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "intermediate_size_mlp": 128,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,  # DeepSeek V3 routing groups: 4 experts make one
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "vocab_size_per_layer_input": 256,  # Gemma 4's per-layer-input embeddings
    "hidden_size_per_layer_input": 16,
}
VISION_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "depth": 1,
    "num_attention_heads": 2,
    "num_heads": 2,
    "embed_dim": 32,
    "out_hidden_size": 64,
    "image_size": 28,
    "patch_size": 14,
    "num_global_layers": 1,
    "head_dim": 16,
    "num_key_value_heads": 2,
}
TEXT_KEYS = ("text_config", "llm_config", "language_config")
VISION_KEYS = ("vision_config", "vision_tower_config")


@dataclass
class Check:
    """One kind on one key layout: passed, failed (with why) or not supported (why)."""

    kind: str
    layout: str
    status: str  # "passed", "failed", "unsupported"
    detail: str = ""

    def line(self) -> str:
        return f"{self.kind:20} {self.layout:7} {self.status:11} {self.detail}".rstrip()


# ---------------------------------------------------------------- the shrunken config


def shrink(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its text and vision sub-configs shrunk and its special token ids
    moved into the shrunken vocabulary (the image token becomes IMAGE_TOKEN)."""
    out = copy.deepcopy(config)
    for key in TEXT_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = _shrink_part(out[key], TEXT_SIZES)
    for key in VISION_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = _shrink_part(out[key], VISION_SIZES)
    text = next((out[k] for k in TEXT_KEYS if isinstance(out.get(k), dict)), None)
    if text is None:
        out = _shrink_part(out, TEXT_SIZES)  # a flat config: the text model's own keys
    else:  # top-level copies of the text model's sizes (PaliGemma's) follow it
        for key, source in (("hidden_size", "hidden_size"), ("vocab_size", "vocab_size")):
            if isinstance(out.get(key), int):
                out[key] = text.get(source, TEXT_SIZES[source])
        for part in (out, *(out[k] for k in VISION_KEYS if isinstance(out.get(k), dict))):
            if isinstance(part.get("projection_dim"), int):
                part["projection_dim"] = text.get("hidden_size", 64)
    _small_token_ids(out)
    return _merge(out, OVERRIDES.get(out.get("model_type"), {}))


_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}  # sums to head_dim 16 / 2
_GLM_ROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
# Per-family patches where the generic shrink fails (merged into the shrunken config).
OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"text_config": {"rope_parameters": _MROPE}, "vision_config": {"hidden_size": 64}},
    "qwen2_5_vl": {"text_config": {"rope_parameters": _MROPE}},
    "glm4v": {"text_config": {"rope_parameters": _GLM_ROPE}},
    "glm4v_moe": {"text_config": {"rope_parameters": _GLM_ROPE}},
    "glm46v": {"text_config": {"rope_parameters": _GLM_ROPE}},
    "glm_ocr": {"text_config": {"rope_parameters": _GLM_ROPE}},
    "glmga": {"text_config": {"rope_parameters": _GLM_ROPE}},
    "paddleocr_vl": {"text_config": {"rope_parameters": _MROPE}},
    "video_llama_3": {"text_config": {"rope_parameters": _MROPE}},
    "gemma3": {"mm_tokens_per_image": 4},
    "kimi_k25": {
        "projection_hidden_size": 32,  # the projector's input: the tower's width
        "text_config": {"head_dim": 8},  # DeepSeek V3 rotates head_dim = qk_rope_head_dim
    },
    "hunyuan_vl": {  # its default leaves the multimodal RoPE sections unset
        "text_config": {"rope_parameters": _MROPE},
        "vision_config": {"out_hidden_size": 64, "text_hidden_size": 64},
    },
    "gemma4_unified": {  # no vision config by default either
        "vision_config": {
            "model_type": "gemma4_unified_vision",
            "patch_size": 4,
            "pooling_kernel_size": 2,
            "mm_embed_dim": 32,
            "mm_posemb_size": 16,
            "output_proj_dims": 32,
        },
    },
    "gemma4": {  # its default config has no vision tower: a tiny one
        "vision_config": {
            "model_type": "gemma4_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "patch_size": 4,
            "pooling_kernel_size": 2,
            "position_embedding_size": 16,
        },
    },
    "paligemma": {"vision_config": {"projection_dim": 64}},
    "exaone4_5": {
        "text_config": {"rope_parameters": _MROPE},
        "vision_config": {"fullatt_block_indexes": [0]},
    },
    "llava_next": {"image_grid_pinpoints": [[28, 28]]},
    "llava_onevision": {"image_grid_pinpoints": [[28, 28]]},
    "llava_next_video": {"image_grid_pinpoints": [[28, 28]]},
    "vipllava": {"vision_feature_layers": [-2, -1]},  # of a 1-layer tower
    "aria": {"projector_patch_to_query_dict": {4: 4, 16: 4}},  # patches -> query tokens
    "llama4": {
        "vision_config": {
            "intermediate_size": 128,  # the pixel-shuffled width its adapter takes
            "vision_output_dim": 32,
            "projector_input_dim": 32,
            "projector_output_dim": 32,
            "pixel_shuffle_ratio": 0.5,
        },
        "text_config": {"interleave_moe_layer_step": 2, "no_rope_layers": [1, 1]},
    },
    "mllama": {
        "text_config": {"cross_attention_layers": [1], "num_hidden_layers": 3},
        "vision_config": {
            "attention_heads": 2,
            "vision_output_dim": 64,
            "max_num_tiles": 1,
            "intermediate_layers_indices": [0],
            "supported_aspect_ratios": [[1, 1]],
        },
    },
}


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _shrink_part(part: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    part = dict(part)
    depth = part.get("num_hidden_layers")
    for key, value in sizes.items():
        if isinstance(part.get(key), int) and not isinstance(part[key], bool):
            part[key] = value
    if "head_dim" in part and part["head_dim"] is None:  # derived later from widths that
        part["head_dim"] = sizes["head_dim"]  # no longer hold; both sizes sets divide to 16
    kept = list(range(part.get("num_hidden_layers") or 0))
    if isinstance(part.get("layer_types"), list):  # hybrids: one layer of each kind, in order
        kinds = list(dict.fromkeys(part["layer_types"]))
        kept = _kept_layers(part["layer_types"], kinds if len(kinds) > 1 else kinds * 2)
        part["layer_types"] = [part["layer_types"][i] for i in kept]
        part["num_hidden_layers"] = len(kept)
    if isinstance(depth, int) and depth > len(kept):
        _keep_layers(part, depth, kept, sizes)
    _fit_rope(part)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(part.get(key), int) and part[key] >= part.get("vocab_size", 256):
            part[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    return part


def _kept_layers(types: list[str], wanted: list[str]) -> list[int]:
    """The original layers the shrunken ones stand for: in order, the next one of each type."""
    kept: list[int] = []
    for kind in wanted:
        start = kept[-1] + 1 if kept else 0
        kept.append(next(i for i in range(start, len(types)) if types[i] == kind))
    return kept


def _keep_layers(part: dict[str, Any], depth: int, kept: list[int], sizes: dict[str, int]) -> None:
    """Per-layer lists (one entry per original layer: layer_types, mistral_large4's
    mlp_layer_types and kv_source_layers, ...) keep the kept layers' entries; Gemma 4's
    per_layer_config, keyed by layer index, keeps theirs (shrunk), renumbered."""
    for key, value in list(part.items()):
        if isinstance(value, list) and len(value) == depth:
            part[key] = [value[i] for i in kept]
    patches = part.get("per_layer_config")
    if isinstance(patches, dict):
        patches = {int(k): v for k, v in patches.items()}
        part["per_layer_config"] = {
            str(new): {k: sizes.get(k, v) for k, v in patches[old].items()}
            for new, old in enumerate(kept)
            if old in patches
        }


def _fit_rope(part: dict[str, Any]) -> None:
    """Multimodal RoPE sections must sum to the (rotary) half head dim: rescale them."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = part.get(key)
        if not isinstance(rope, dict) or not isinstance(rope.get("mrope_section"), list):
            continue
        half = int(part.get("head_dim", 16) * rope.get("partial_rotary_factor", 1.0)) // 2
        sections = rope["mrope_section"]
        scaled = [max(1, s * half // sum(sections)) for s in sections]
        scaled[0] += half - sum(scaled)
        part[key] = {**rope, "mrope_section": scaled}


def _small_token_ids(config: dict[str, Any]) -> None:
    """Top-level *_token_id / *_token_index ids beyond the shrunken vocabulary, renumbered
    (the image token first, as IMAGE_TOKEN) so that every id is a real embedding row."""
    names = sorted(k for k in config if k.endswith(("token_id", "token_index")))
    names.sort(key=lambda k: not k.startswith("image_token"))
    free = iter(range(IMAGE_TOKEN, 64))
    for key in names:
        if isinstance(config[key], int) and not isinstance(config[key], bool):
            config[key] = next(free)


def for_model_type(model_type: str) -> dict[str, Any]:
    """The default config of a transformers model type, as a config.json dict."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type).to_dict()


# ---------------------------------------------------------------- the random instance


def build(config: dict[str, Any], folder: Path, layout: str, seed: int = 0) -> Path:
    """A random model of the shrunken ``config`` saved in ``layout``; refuses one whose
    shrink left more than MAX_PARAMETERS (counted on the meta device: nothing allocated)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = {k: v for k, v in config.items() if k not in ("transformers_version", "architectures")}
    model_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        count = sum(
            p.numel() for p in AutoModelForImageTextToText.from_config(model_config).parameters()
        )
    if count > MAX_PARAMETERS:
        raise InputError(f"the shrunken model still has {count / 1e6:.0f}M parameters")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(model_config).eval()
    _random_norms(model)
    model.save_pretrained(folder, save_original_format=layout == "legacy")
    return folder


@torch.no_grad()
def _random_norms(model: torch.nn.Module) -> None:
    """Random norm gains and biases (all-equal or zero ones hide mistakes: a zero bias maps to
    itself); cross-attention gates opened."""
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            param.add_(torch.empty_like(param).uniform_(-0.5, 0.5))
        elif name.endswith("bias") and not param.any():
            param.uniform_(-0.1, 0.1)
        if name.endswith("_gate") and "cross_attn" in name:
            param.uniform_(0.5, 1.5)


# ---------------------------------------------------------------- image inputs


def image_inputs(model: torch.nn.Module, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A prompt with one random image in the family's input format: the family's own builder
    (IMAGE_BUILDERS) or, by default, a square image of the vision config's size with as many
    image tokens as the model's get_image_features returns rows."""
    generator = torch.Generator().manual_seed(3)
    builder = IMAGE_BUILDERS.get(config["model_type"], _square_image)
    return builder(model, config, generator)


def _prompt(count: int) -> torch.Tensor:
    return torch.tensor([[1, 10, 11] + [IMAGE_TOKEN] * count + [12, 13]])


def _image_size(config: dict[str, Any]) -> int:
    size = (config.get("vision_config") or {}).get("image_size", 28)
    return size if isinstance(size, int) else 28


def _square_image(model, config, generator) -> dict[str, torch.Tensor]:
    """A square image as a 4-D batch, or 5-D (one crop) for towers that take crops; with
    ``image_sizes`` where get_image_features asks for them. Token count: the rows it returns,
    or the count a forward then says it has features for."""

    if not hasattr(model, "get_image_features"):  # the forward says how many it has
        return _fit_tokens(
            model, {"input_ids": _prompt(1), "pixel_values": _pixels(config, generator)}
        )
    inner = getattr(getattr(model, "model", None), "get_image_features", None)
    wants = _required(model.get_image_features) | (_required(inner) if inner else set())
    sizes = (_image_size(config), 2 * _image_size(config))  # 2x: more than one merged token
    shapes = [(1, *crops, 3, s, s) for s in sizes for crops in ((), (1,), (2,))]
    for shape in shapes:
        size = shape[-1]
        batch = {"pixel_values": torch.randn(*shape, generator=generator)}
        if "image_sizes" in wants:
            batch["image_sizes"] = torch.tensor([[size, size]])
        if "target_sizes" in wants:  # in patches (MiniCPM-V)
            patch = (config.get("vision_config") or {}).get("patch_size", 14)
            batch["target_sizes"] = torch.tensor([[size // patch, size // patch]])
        try:
            with torch.no_grad():
                features = model.get_image_features(**batch)
        except (ValueError, RuntimeError, IndexError):
            continue
        rows = getattr(features, "pooler_output", features)
        if rows is None:  # no pooled rows: a first guess, which _fit_tokens corrects
            rows = [torch.zeros(1, 1)]
        rows = rows if isinstance(rows, (list, tuple)) else [rows]
        count = sum(int(torch.tensor(r.shape[:-1]).prod()) for r in rows)
        return _fit_tokens(model, {"input_ids": _prompt(count), **batch})
    raise InputError("no square image (4-D, or 5-D with 1 or 2 crops; 1x or 2x the size) fits")


def _required(function) -> set[str]:
    """The parameters a function cannot be called without."""
    import inspect

    empty = inspect.Parameter.empty
    return {n for n, p in inspect.signature(function).parameters.items() if p.default is empty}


def _pixels(config, generator) -> torch.Tensor:
    size = _image_size(config)
    return torch.randn(1, 3, size, size, generator=generator)


def _fit_tokens(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where a model adds rows of its own (LLaVA-NeXT's row ends), its forward names the
    number of features it has: the prompt is rebuilt with that many image tokens."""
    import inspect
    import re

    inner = getattr(getattr(model, "model", None), "forward", model.forward)
    if any("mm_token_type_ids" in inspect.signature(f).parameters for f in (model.forward, inner)):
        batch = {**batch, "mm_token_type_ids": None}  # filled in by _with_ids
    batch = _with_ids(batch, batch["input_ids"])
    try:
        with torch.no_grad():
            model(**batch)
        return batch
    except ValueError as exc:
        found = re.search(r"features:? (\d+)", str(exc))
        if not found:
            raise
        number = int(found.group(1))  # rows, or rows x width where a model counts elements
    width = model.config.get_text_config().hidden_size
    for count in dict.fromkeys((number, number // width)):
        fitted = _with_ids(batch, _prompt(count))
        try:
            with torch.no_grad():
                model(**fitted)
            return fitted
        except ValueError:
            continue
    raise InputError(f"no image token count fits the {number} features the model reports")


def _with_ids(batch: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
    """The batch with these input ids (and, where it has them, their image-token types)."""
    out = {**batch, "input_ids": ids}
    if "mm_token_type_ids" in out:
        out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return out


def _mllama_image(model, config, generator) -> dict[str, torch.Tensor]:
    """One tile of one image, attended to by every text position."""
    size = _image_size(config)
    ids = _prompt(1)
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(1, 1, 1, 3, size, size, generator=generator),
        "aspect_ratio_ids": torch.tensor([[1]]),
        "aspect_ratio_mask": torch.tensor([[[1]]]),
        "cross_attention_mask": torch.ones(1, ids.shape[1], 1, 1, dtype=torch.long),
    }


def _qwen_image(model, config, generator) -> dict[str, torch.Tensor]:
    """Flattened 14x14 patches x 2 frames on a 2x2 grid, merged 2x2 into one image token."""
    vision = config.get("vision_config") or {}
    patch, frames = vision.get("patch_size", 14), vision.get("temporal_patch_size", 2)
    ids = _prompt(1)
    return {
        "input_ids": ids,
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
        "pixel_values": torch.randn(4, 3 * frames * patch * patch, generator=generator),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
    }


def _patch_grid_image(model, config, generator) -> dict[str, torch.Tensor]:
    """Four patches on a 2x2 grid (image_grid_thw), flattened or as small images, with the
    merge size where the model asks for one (VideoLLaMA 3) and the count the forward reports."""
    vision = config.get("vision_config") or {}
    patch, frames = vision.get("patch_size", 14), vision.get("temporal_patch_size", 1)
    shapes = ((4, 3 * frames * patch * patch), (4, 3, patch, patch), (1, 4, 3, patch, patch))
    for shape in shapes:
        batch = {
            "input_ids": _prompt(1),
            "pixel_values": torch.randn(*shape, generator=generator),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
        }
        if "image_merge_sizes" in _required(model.model.get_image_features):
            batch["image_merge_sizes"] = torch.tensor([2])
        try:
            return _fit_tokens(model, batch)
        except (ValueError, RuntimeError, IndexError, InputError):
            continue
    raise InputError("no patch-grid image input fits this vision tower")


def _navit_image(model, config, generator) -> dict[str, torch.Tensor]:
    """A NaViT-style tower (SigLIP 2): a 4x4 grid of flattened patches with its shape and
    mask; the count the forward reports."""
    patch = (config.get("vision_config") or {}).get("patch_size", 16)
    batch = {
        "input_ids": _prompt(1),
        "pixel_values": torch.randn(1, 16, 3 * patch * patch, generator=generator),
        "spatial_shapes": torch.tensor([[4, 4]]),
        "pixel_attention_mask": torch.ones(1, 16, dtype=torch.bool),
    }
    return _fit_tokens(model, batch)


def _gemma4_image(model, config, generator) -> dict[str, torch.Tensor]:
    """Gemma 4's tower takes flattened patches with their (x, y) grid positions and pools
    each k x k block into one token: a 2k x 2k grid. Gemma 4 unified has no tower: each row
    is a k x k block of patches already. The token count is the one the forward reports."""
    vision = config.get("vision_config") or {}
    patch, k = vision.get("patch_size", 16), vision.get("pooling_kernel_size", 2)
    unified = config["model_type"] == "gemma4_unified"
    side, width = (2, 3 * (patch * k) ** 2) if unified else (2 * k, 3 * patch * patch)
    grid = torch.tensor([[x, y] for y in range(side) for x in range(side)])
    batch = {
        "input_ids": _prompt(1),
        "pixel_values": torch.rand(1, side * side, width, generator=generator),
        "image_position_ids": grid[None],
    }
    return _fit_tokens(model, batch)


def _fuyu_image(model, config, generator) -> dict[str, torch.Tensor]:
    """Fuyu takes raw patches (no tower): four of patch_size^2 x 3 values, one token each."""
    patch = config.get("patch_size", 30)
    patches = torch.randn(1, 4, 3 * patch * patch, generator=generator)
    return {"input_ids": _prompt(4), "image_patches": patches}


IMAGE_BUILDERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "gemma4": _gemma4_image,
    "kimi_k25": _patch_grid_image,
    "hunyuan_vl": _patch_grid_image,
    "gemma4_unified": _gemma4_image,
    "qwen2_vl": _qwen_image,
    "qwen2_5_vl": _qwen_image,
    "qwen3_vl": _qwen_image,
    "qwen3_vl_moe": _qwen_image,
    "glm4v": _qwen_image,
    "glm4v_moe": _qwen_image,
    "glm46v": _qwen_image,
    "glm_ocr": _qwen_image,
    "glmga": _qwen_image,
    "hyperclovax_vision_v2": _qwen_image,
    "qwen3_5": _qwen_image,
    "qwen3_5_moe": _qwen_image,
    "exaone4_5": _qwen_image,
    "mllama": _mllama_image,
    "video_llama_3": _patch_grid_image,
    "fuyu": _fuyu_image,
    "lfm2_vl": _navit_image,
    "paddleocr_vl": _patch_grid_image,
}


# ---------------------------------------------------------------- the checks


# Layers and strengths per kind (the tiny text model has 2 layers, or one of each kind).
def _recipe(kind, layers: list[int]):
    from .recipes import Recipe

    return Recipe(mode=kind.name, **kind.example_fields(layers))


def parameter_file(kind, plan, folder: Path) -> Path:
    """The kind's parameter file, made up (seeded) where it would be measured or learned
    (the kind's own ``example_parameters``)."""
    folder.mkdir(parents=True, exist_ok=True)
    return kind.example_parameters(plan, folder / kind.file_name)


@dataclass
class Source:
    """One key layout's random model, opened once for every kind checked on it: its tensors,
    the loaded model, and its prompts (text only, and with an image; or why there is none)."""

    path: Path
    layout: str
    checkpoint: Any
    tensors: dict[str, torch.Tensor]
    model: torch.nn.Module
    inputs: dict[str, dict[str, torch.Tensor]]
    no_image: str | None = None


def open_source(path: Path, layout: str, config: dict[str, Any]) -> Source:
    from transformers import AutoModelForImageTextToText

    from .checkpoint import open_checkpoint

    checkpoint = open_checkpoint(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    source = Source(
        path, layout, checkpoint, _tensors(checkpoint), model, {"text": {"input_ids": _prompt(0)}}
    )
    try:
        source.inputs["image"] = image_inputs(model, config)
    except Exception as exc:  # reported per kind: the family has no image input the test can make
        source.no_image = f"no image input for this family ({type(exc).__name__}: {str(exc)[:120]})"
    return source


def check_kind(kind, source: Source, work: Path) -> Check:
    """Convert ``source`` with ``kind`` and check the output (see the module docstring)."""
    from transformers import AutoModelForImageTextToText

    from .checkpoint import open_checkpoint
    from .convert import ConvertOptions, convert
    from .errors import PlanError
    from .layout import find_layout
    from .plan import build_plan

    checkpoint = source.checkpoint
    layout = find_layout(checkpoint.config, checkpoint.keys)
    layers = [i for i in range(layout.num_layers) if i not in layout.cross_layers]
    recipe = _recipe(kind, layers)
    try:
        plan = build_plan(checkpoint, layout, kind, recipe)
    except (PlanError, VlmguardError) as exc:
        return Check(kind.name, source.layout, "unsupported", str(exc).splitlines()[0])
    params = parameter_file(kind, plan, work / "parameters")
    out = work / "guarded"
    try:
        options = ConvertOptions(
            str(source.path), out, recipe, params, base_model=BASE, progress=False
        )
        plan = convert(options).plan
        folded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
        problems = _compare(source, _tensors(open_checkpoint(out)), plan, info) or _equivalence(
            kind, plan, source, out, folded.eval()
        )
    except VlmguardError as exc:
        return Check(kind.name, source.layout, "unsupported", str(exc).splitlines()[0])
    except Exception as exc:  # a self-test reports what broke, whatever it is
        return Check(kind.name, source.layout, "failed", f"{type(exc).__name__}: {exc}"[:300])
    return Check(kind.name, source.layout, "failed" if problems else "passed", "; ".join(problems))


def _tensors(checkpoint) -> dict[str, torch.Tensor]:
    return {key: checkpoint.read(key) for key in checkpoint.keys}


def _compare(source: Source, after: dict[str, torch.Tensor], plan, info) -> list[str]:
    """Edited tensors == the plan; every other tensor bit-identical; clean load."""
    before = source.tensors
    if before.keys() != after.keys():
        return [f"tensor names differ: {sorted(before.keys() ^ after.keys())[:3]}"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    planned = {e.key for e in plan.edits}
    problems = []
    if changed != planned:
        problems.append(f"changed {sorted(changed ^ planned)[:3]} against the plan")
    if info["missing_keys"] or info["unexpected_keys"]:
        problems.append(
            f"load: missing {info['missing_keys'][:2]}, unexpected {info['unexpected_keys'][:2]}"
        )
    return problems


def _equivalence(kind, plan, source: Source, out: Path, folded_model) -> list[str]:
    """Folded == the kind's hooks on the original, text only and with an image; visible."""
    if source.no_image:
        return [source.no_image]
    original = source.model
    loaded = kind.load(out / kind.file_name, plan)
    text_edited = any(text_layer(plan.layout, e.key) for e in plan.edits)
    problems = []
    for name, batch in source.inputs.items():
        with torch.no_grad():
            folded, plain = _logits(folded_model, batch), _logits(original, batch)
            with kind.hooks(original, plan, loaded, source.checkpoint):
                hooked = _logits(original, batch)
        gap, effect = (folded - hooked).abs().max().item(), (folded - plain).abs().max().item()
        if gap >= TOLERANCE:
            problems.append(f"{name}: folded - hooked {gap:.1e}")
        if name == "text" and not text_edited:
            if effect != 0:
                problems.append(f"text: an image-only edit changed text logits by {effect:.1e}")
        elif effect <= VISIBLE:
            problems.append(f"{name}: the edit is not visible ({effect:.1e})")
    return problems


def text_layer(layout, key: str) -> bool:
    """Whether ``key`` is in a text layer a text-only forward runs (not a cross-attention
    layer, which only image prompts reach)."""
    prefix = layout.layer_prefix + "."
    if not key.startswith(prefix):
        return False
    return int(key[len(prefix) :].split(".", 1)[0]) not in layout.cross_layers


def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


# ---------------------------------------------------------------- the whole self-test


def run(config: dict[str, Any], progress: Callable[[str], None] | None = None) -> list[Check]:
    """Shrink ``config``, build it in each key layout, check every edit kind on each."""
    from transformers.utils import logging as hf_logging

    from .kinds import KINDS
    from .layout import detect_family

    detect_family(config)  # an unsupported or refused family: its one-line reason, first
    small = shrink(config)
    checks = []
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load otherwise
    # A kind's standing advice (writers') is about guarding a model, not about proving the
    # fold on random weights: the self-test's own converts keep it to themselves.
    convert_log = logging.getLogger("vlmguard_edit.convert")
    level = convert_log.level
    convert_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="vlmguard-selftest-") as tmp:
            for layout in _layouts(small, Path(tmp)):
                source = open_source(Path(tmp) / layout / "source", layout, small)
                for kind in KINDS.values():
                    if progress:
                        progress(f"{kind.name} ({layout} keys)")
                    checks.append(check_kind(kind, source, Path(tmp) / layout / kind.name))
    finally:
        hf_logging.enable_progress_bar()
        convert_log.setLevel(level)
    return checks


def _layouts(config: dict[str, Any], root: Path) -> list[str]:
    """Build the model in each key layout; keep a layout only where its key names differ."""
    from .checkpoint import open_checkpoint

    names, seen = [], []
    for layout in LAYOUTS:
        keys = set(open_checkpoint(build(config, root / layout / "source", layout)).keys)
        if keys not in seen:
            names.append(layout)
            seen.append(keys)
    return names


def load_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """A config dict from a model type, a config.json, a folder, or a Hub id (JSON only)."""
    path = Path(model).expanduser()
    if path.is_file():
        return json.loads(path.read_text())
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from transformers import CONFIG_MAPPING

    if model in CONFIG_MAPPING:
        return for_model_type(model)
    from .checkpoint import resolve_model

    source = resolve_model(model, revision, config_only=True)
    return json.loads((Path(source.path) / "config.json").read_text())
