"""Tiny models built from configs, for the offline demo and the tests (seconds on a CPU).

A word-level tokenizer with a chat template, a tiny Llama base LLM, and a tiny LLaVA whose
language model is an exact copy of that base LLM, saved in either key layout, sharded or
not, in any float dtype. Nothing is downloaded.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXT_WORDS = (
    "a an the and or to of in on for with at by from how make build write get "
    "sure here is are step first then finally sorry i can not cannot help that this it "
    "you your image picture shows cat dog house car describe what"
)


def build_tokenizer(words: list[str] | None = None, special: tuple[str, ...] = ()):
    """A word-level tokenizer: ``words``, or by default the anchor set's words and a few more;
    ``special``: more special tokens (a processor's image tokens), ids after SPECIAL's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if words is None:
        anchors = resources.files("vlmguard_edit").joinpath("data/anchors.jsonl").read_text("utf-8")
        found = set(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", f"{anchors} {TEXT_WORDS}".lower()))
        words = sorted(found - {'"', "{", "}", ":", ","})
    specials = SPECIAL + list(special)
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def text_config(
    vocab_size: int, num_layers: int = 4, hidden: int = 64, arch: str = "llama", **overrides
):
    from transformers import LlamaConfig, MistralConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    settings.update(overrides)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **settings)
    return LlamaConfig(**settings)


def llava_kwargs(text_config, tokenizer, vision_hidden: int = 32) -> dict:
    """LlavaConfig arguments: a 2-layer CLIP tower on 28x28 images (4 patches of 14)."""
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=vision_hidden,
    )
    return dict(
        vision_config=vision,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        image_seq_length=4,
    )


def build_base(
    out: Path, seed: int = 0, num_layers: int = 4, arch: str = "llama", **overrides
) -> Path:
    """A tiny random Llama (or Mistral) base LLM with the tokenizer, saved to ``out``."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = text_config(len(tokenizer), num_layers, arch=arch, **overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_llava(
    out: Path,
    base: Path,
    seed: int = 1,
    layout: str = "legacy",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    family: str = "llava",
) -> Path:
    """A tiny LLaVA (or LLaVA-NeXT) whose language model is an exact copy of ``base``.

    layout: "legacy" (``language_model.model.layers.N``, what save_pretrained writes), "hub"
    (legacy with the vision tower under ``vision_tower.vision_model.``, as on the Hub and in
    transformers 4.x) or "memory" (``model.language_model.layers.N``, transformers 5's names).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    common = llava_kwargs(base_model.config, tokenizer)
    torch.manual_seed(seed)
    if family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    elif family == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        config = LlavaNextConfig(**common, image_grid_pinpoints=[[28, 28]])
        model = LlavaNextForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown tiny family {family}")
    model.get_decoder().load_state_dict(base_model.model.state_dict())
    model.get_output_embeddings().load_state_dict(base_model.lm_head.state_dict())
    model = model.to(dtype).eval()
    kwargs = {"save_original_format": layout in ("legacy", "hub")}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    if layout == "hub":
        _nest_vision_tower(out)
    tokenizer.save_pretrained(out)
    return out


def build_mllama(out: Path, base: Path, cross_layers: tuple[int, ...] = (1, 4)) -> Path:
    """A tiny Llama 3.2 Vision whose text layers that are not cross-attention layers are an
    exact copy of ``base``'s, in order (base layer i -> the i-th of them), as in the real
    11B model (frozen Llama 3.1 8B). Random vision model and cross-attention layers."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    b = base_model.config
    total = b.num_hidden_layers + len(cross_layers)
    spec = dict(FAMILY_CONFIGS["mllama"])
    spec["text_config"] = dict(
        spec["text_config"],
        vocab_size=b.vocab_size,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=total,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        rms_norm_eps=b.rms_norm_eps,
        rope_parameters=dict(b.rope_parameters),
        bos_token_id=b.bos_token_id,
        eos_token_id=b.eos_token_id,
        pad_token_id=b.pad_token_id,
        cross_attention_layers=list(cross_layers),
    )
    spec["image_token_index"] = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model("mllama", **spec))
    text = model.get_decoder()
    own = [j for j in range(total) if j not in cross_layers]
    with torch.no_grad():
        for i, j in enumerate(own):
            text.layers[j].load_state_dict(base_model.model.layers[i].state_dict())
        text.norm.load_state_dict(base_model.model.norm.state_dict())
        text.embed_tokens.weight[: b.vocab_size] = base_model.model.embed_tokens.weight
        model.get_output_embeddings().load_state_dict(base_model.lm_head.state_dict())
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _nest_vision_tower(folder: Path) -> None:
    """transformers 5 saves the CLIP tower as ``vision_tower.*``; the Hub's checkpoints (and
    transformers 4.x) have ``vision_tower.vision_model.*``. Rename, for a Hub-like layout."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    def rename(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        return key

    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            tensors = {rename(k): handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata()
        save_file(tensors, shard, metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def image_inputs(
    tokenizer, text: str, seed: int = 0, family: str = "llava"
) -> dict[str, torch.Tensor]:
    """input_ids with the image tokens of the tiny vision tower, and random pixels.

    LLaVA: 4 patches. LLaVA-NeXT: base crop 4 + one grid crop 4 + 2 row newlines = 10.
    """
    image = tokenizer.convert_tokens_to_ids("<image>")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    count = 10 if family == "llava_next" else 4
    input_ids = torch.tensor([ids[:1] + [image] * count + ids[1:]])
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": input_ids,
        "pixel_values": torch.randn(1, 3, 28, 28, generator=generator),
    }
    if family == "llava_next":
        inputs["pixel_values"] = inputs["pixel_values"][:, None].repeat(1, 2, 1, 1, 1)
        inputs["image_sizes"] = torch.tensor([[28, 28]])
    return inputs


_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
_MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
_QWEN_TOKENS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=7)
_QWEN_VISION = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=2)
_QWEN3_ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}
_QWEN3_VISION = dict(
    _QWEN_VISION,
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    out_hidden_size=64,
    deepstack_visual_indexes=[0],
)
_GLM_ROPE = {  # partial rotary: mrope_section sums to the rotary half-dim (16 * 0.5 / 2)
    "rope_type": "default",
    "rope_theta": 10000.0,
    "mrope_section": [1, 1, 2],
    "partial_rotary_factor": 0.5,
}
_GLM_VISION = dict(
    _QWEN_VISION, depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, image_size=28
)
_GLM_TOKENS = dict(image_token_id=5, video_token_id=6, image_start_token_id=7, image_end_token_id=8)

# Tiny configs (2 text layers x 64, a 1-layer vision tower) of every family layout.FAMILIES
# supports besides llava / llava_next (built by build_llava from a trained base).
FAMILY_CONFIGS: dict[str, dict] = {
    "llava_onevision": dict(
        text_config=dict(model_type="qwen2", **_TEXT),
        vision_config=_SIGLIP,
        image_token_index=5,
        video_token_index=6,
    ),
    "mistral3": dict(
        text_config=dict(model_type="mistral", **_TEXT),
        vision_config=dict(_SIGLIP, model_type="pixtral", head_dim=16),
        image_token_index=5,
    ),
    "internvl": dict(
        text_config=dict(model_type="qwen2", **_TEXT),
        vision_config=dict(
            _SIGLIP, model_type="internvl_vision", image_size=[28, 28], patch_size=[14, 14]
        ),
        image_token_id=5,
    ),
    "aya_vision": dict(
        text_config=dict(model_type="cohere2", **_TEXT), vision_config=_SIGLIP, image_token_index=5
    ),
    "idefics3": dict(
        text_config=dict(model_type="llama", **_TEXT),
        vision_config=dict(_SIGLIP, model_type="idefics3_vision"),
        image_token_id=5,
    ),
    "smolvlm": dict(
        text_config=dict(model_type="llama", **_TEXT),
        vision_config=dict(_SIGLIP, model_type="smolvlm_vision"),
        image_token_id=5,
    ),
    "qwen2_vl": dict(
        text_config=dict(model_type="qwen2_vl_text", rope_scaling=_MROPE, **_TEXT),
        vision_config=dict(_QWEN_VISION, depth=1, embed_dim=32, hidden_size=64),
        **_QWEN_TOKENS,
    ),
    "gemma3": dict(
        text_config=dict(model_type="gemma3_text", sliding_window=64, **_TEXT),
        vision_config=_SIGLIP,
        mm_tokens_per_image=4,
        image_token_index=5,
        boi_token_index=6,
        eoi_token_index=7,
    ),
    "qwen3_vl_moe": dict(
        text_config=dict(
            model_type="qwen3_vl_moe_text",
            rope_scaling=_QWEN3_ROPE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,  # not square with hidden 64: the orientation is decidable
            mlp_only_layers=[1],  # layer 1 dense: both writer kinds in one model
            **_TEXT,
        ),
        vision_config=_QWEN3_VISION,
        **_QWEN_TOKENS,
    ),
    "llama4": dict(
        text_config=dict(
            model_type="llama4_text",
            **{**_TEXT, "intermediate_size": 48},  # the experts' I (not square with 64)
            intermediate_size_mlp=96,  # the dense layers'
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,  # layer 0 dense, layer 1 MoE
            no_rope_layers=[1, 1],
        ),
        vision_config=dict(
            _SIGLIP,
            model_type="llama4_vision_model",
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
            pixel_shuffle_ratio=0.5,
        ),
        image_token_index=5,
    ),
    "qwen3_vl": dict(
        text_config=dict(
            model_type="qwen3_vl_text",
            rope_scaling=_QWEN3_ROPE,
            **_TEXT,
        ),
        vision_config=_QWEN3_VISION,
        **_QWEN_TOKENS,
    ),
    "paligemma": dict(
        text_config=dict(model_type="gemma", **_TEXT),
        vision_config=dict(_SIGLIP, projection_dim=64),
        image_token_index=5,
    ),
    # PaliGemma 2: a Gemma 2 text model, with norms after the writers
    "paligemma2": dict(
        model_type="paligemma",
        text_config=dict(model_type="gemma2", sliding_window=64, **_TEXT),
        vision_config=dict(_SIGLIP, projection_dim=64),
        image_token_index=5,
    ),
    "glm4v": dict(
        text_config=dict(
            model_type="glm4v_text",
            rope_parameters=_GLM_ROPE,
            **_TEXT,
        ),
        vision_config=_GLM_VISION,
        **_GLM_TOKENS,
    ),
    # GLM-4.5V: layer 0 dense, layer 1 MoE (4 routed experts + a shared one)
    "glm4v_moe": dict(
        text_config=dict(
            model_type="glm4v_moe_text",
            rope_parameters=_GLM_ROPE,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=48,  # not square with hidden 64
            first_k_dense_replace=1,
            num_experts_per_tok=2,
            **_TEXT,
        ),
        vision_config=_GLM_VISION,
        **_GLM_TOKENS,
    ),
    # Llama 3.2 Vision: layer 1 is a cross-attention layer (the base LLM has 2 layers)
    "mllama": dict(
        text_config=dict(
            model_type="mllama_text_model",
            cross_attention_layers=[1],
            **{**{k: v for k, v in _TEXT.items() if k != "head_dim"}, "num_hidden_layers": 3},
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_global_layers=1,
            attention_heads=2,
            intermediate_size=64,
            vision_output_dim=64,
            image_size=28,
            patch_size=14,
            max_num_tiles=1,
            intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1]],
        ),
        image_token_index=5,
    ),
    "qwen2_5_vl": dict(
        text_config=dict(model_type="qwen2_5_vl_text", rope_scaling=_MROPE, **_TEXT),
        vision_config=dict(
            _QWEN_VISION,
            depth=1,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            fullatt_block_indexes=[0],
        ),
        **_QWEN_TOKENS,
    ),
}


def build_family(
    out: Path, model_type: str, layout: str = "legacy", seed: int = 0, **text_overrides
) -> Path:
    """A random tiny VLM of ``model_type`` (see FAMILY_CONFIGS), saved in ``layout``:
    "legacy" (the Hub / save_pretrained key names), "memory" (transformers 5's), or "hub"
    (legacy with fused MoE experts in the Hub's (E, I, H) orientation, as 4.57 saves them)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = dict(FAMILY_CONFIGS[model_type])
    spec["text_config"] = {**spec["text_config"], **text_overrides}
    config = AutoConfig.for_model(spec.pop("model_type", model_type), **spec)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():  # random norm gains: the default (all equal) ones hide mistakes
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.empty_like(param).uniform_(-0.5, 0.5))
            if name.endswith("_gate") and "cross_attn" in name:  # mllama's start at 0 (closed)
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out, save_original_format=layout in ("legacy", "hub"))
    if layout == "hub":
        _transpose_experts(out)
    return out


def _transpose_experts(folder: Path) -> None:
    """transformers 5 saves fused experts as (E, H, I) / (E, 2I, H); the Hub has them as
    (E, I, H) / (E, H, 2I). Swap the last two axes of every fused expert tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            tensors = {
                k: handle.get_tensor(k).transpose(1, 2).contiguous()
                if k.endswith(("experts.down_proj", "experts.gate_up_proj"))
                else handle.get_tensor(k)
                for k in handle.keys()  # noqa: SIM118
            }
            metadata = handle.metadata()
        save_file(tensors, shard, metadata=metadata)
