"""The supported model families as data: for each transformers model type, where its text
layers' keys are, which Linears write to the residual stream, its projector and image path,
and the families refused by name with the reason. layout.py matches checkpoints against it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Module paths (relative to a decoder layer) of the Linear layers that add to the residual stream.
LLAMA_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str
    text_model_types: tuple[str, ...]
    # Candidate key prefixes of the text decoder's layer list, one per known key layout:
    # the Hub / save_pretrained ("legacy") layout first, then transformers 5's in-memory one.
    layer_prefixes: tuple[str, ...]
    writers: tuple[str, ...] = LLAMA_WRITERS
    # The multimodal projector's output bias (one key per layout): image tokens only.
    projector_bias: tuple[str, ...] = ()
    value_proj: str = "self_attn.v_proj"
    input_norm: str = "input_layernorm.weight"
    # A norm between a writer and the residual add: writer module -> norm module. The norm's
    # gain is weight + norm_offset (Gemma's RMSNorm multiplies by 1 + weight).
    post_norms: tuple[tuple[str, str], ...] = ()
    norm_offset: float = 0.0
    # MoE: a writer that a layer may have as fused 3-D expert tensors instead, e.g.
    # "mlp.down_proj" -> ("mlp.experts", "down_proj"): the tensor mlp.experts.down_proj holds
    # every expert's down projection, (E, H, I) or (E, I, H) (see plan: decided from shapes).
    fused: tuple[tuple[str, tuple[str, str]], ...] = ()
    # Writers only some layers have (Llama 4's shared expert in its MoE layers).
    extra_writers: tuple[str, ...] = ()
    # The post_norms apply only with these text models (empty: always). PaliGemma 1's Gemma
    # has no norm after its writers, PaliGemma 2's Gemma 2 has.
    post_norm_text_types: tuple[str, ...] = ()
    # Interleaved cross-attention layers (mllama): the text config key listing them, and the
    # writers those layers have instead of ``writers``.
    cross_layers_key: str | None = None
    cross_writers: tuple[str, ...] = ()
    # MoE: the text config key with the number of routed experts (checked against the keys).
    experts_key: str | None = None
    # Layers the checkpoint may have beyond num_hidden_layers that transformers ignores
    # (GLM's multi-token-prediction layer): copied unchanged, never edited.
    trailing_layers: int = 0
    # The last image-to-language Linear (module name, one per key layout): what the learned
    # image-path edit changes. Empty: the family has none mapped (image-path is refused).
    image_path: tuple[str, ...] = ()
    # Why a family has no image_path (its image tokens come from no single Linear).
    no_image_path: str = ""
    # A writer that some layers have under another name: writer -> its stand-ins, e.g. the
    # linear-attention layers of a hybrid write through linear_attn.out_proj, not o_proj.
    alternatives: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (text config key, reason): a model whose text config sets the key (truthy) is refused
    # with the reason, e.g. a family's MoE variant whose writers have no exact fold.
    refused_when: tuple[tuple[str, str], ...] = ()


_LLAVA_PREFIXES = ("language_model.model.layers", "model.language_model.layers")
_LLAVA_PROJECTOR = (
    "multi_modal_projector.linear_2.bias",
    "model.multi_modal_projector.linear_2.bias",
)
_LLAVA_IMAGE_PATH = tuple(k.removesuffix(".bias") for k in _LLAVA_PROJECTOR)

_TEXT_MODEL_PREFIXES = ("model.text_model.layers",)  # Idefics3 / SmolVLM: one layout
_CONNECTOR_IMAGE_PATH = ("model.connector.modality_projection.proj",)  # pixel shuffle, Linear
# Qwen2-VL / Qwen2.5-VL: the Hub keeps the text-only LLM's names beside ``visual.*``.
_QWEN_VL_PREFIXES = ("model.layers", "model.language_model.layers")
# The vision merger's last Linear writes the image tokens' embeddings (Qwen2-VL, Qwen2.5-VL).
_QWEN_VL_PROJECTOR = ("visual.merger.mlp.2.bias", "model.visual.merger.mlp.2.bias")
_QWEN3_VL_PROJECTOR = ("model.visual.merger.linear_fc2.bias",)
_GLM_NORMS = (
    ("self_attn.o_proj", "post_self_attn_layernorm"),
    ("mlp.down_proj", "post_mlp_layernorm"),
)
_GEMMA4_MOE = (
    "its MoE layers add a second, separately normed expert branch inside the feed-forward "
    "post-norm (a norm of a sum of norms): no exact writer fold is mapped; the dense Gemma 4 "
    "models are supported"
)
# MiniCPM-V 4.6 / 4.7 / OCR: no image-path Linear proved.
_MINICPM_NO_IMAGE_PATH = (
    "the merger's last Linear (model.merger.mlp.0.linear_2) feeds a downsampling step through "
    "which the self-test saw no change of the output: not proved"
)
# GLM-4.xV's vision merger ends in a gated MLP: its down_proj writes the image tokens.
_GLM_IMAGE_PATH = ("model.visual.merger.down_proj",)
_LINEAR_ATTENTION = (("self_attn.o_proj", ("linear_attn.out_proj",)),)
_GOT_PROJECTOR = (
    "multi_modal_projector.multimodal_projector.bias",
    "model.multi_modal_projector.multimodal_projector.bias",
)

# GLM-4.1V: post-norms with gain w after both writers (GLM-4.6V, GLM-OCR, GLMGA share it).
_GLM4V = Family(
    "glm4v",
    ("glm4v_text",),
    ("model.language_model.layers",),
    post_norms=_GLM_NORMS,
    image_path=_GLM_IMAGE_PATH,
)
# MiniCPM-V 4.6 / 4.7 / OCR: a Qwen 3.5 text model (hybrid linear attention), one layout.
_MINICPM_V = Family(
    "minicpmv4_6",
    ("qwen3_5_text",),
    ("model.language_model.layers",),
    alternatives=_LINEAR_ATTENTION,
    no_image_path=_MINICPM_NO_IMAGE_PATH,
)

# Only families whose projector ends in a Linear with a bias and whose text model uses
# RMSNorm (the attention-aware shift assumes it) list projector_bias; the others refuse
# --mode projector-shift.
FAMILIES: dict[str, Family] = {
    "llava": Family(
        "llava",
        ("llama", "mistral"),
        _LLAVA_PREFIXES,
        projector_bias=_LLAVA_PROJECTOR,
        image_path=_LLAVA_IMAGE_PATH,
    ),
    "llava_next": Family(
        "llava_next",
        ("llama", "mistral"),
        _LLAVA_PREFIXES,
        projector_bias=_LLAVA_PROJECTOR,
        image_path=_LLAVA_IMAGE_PATH,
    ),
    "llava_onevision": Family(
        "llava_onevision",
        ("qwen2",),
        _LLAVA_PREFIXES,
        projector_bias=_LLAVA_PROJECTOR,
        image_path=_LLAVA_IMAGE_PATH,
    ),
    # Pixtral's tower has attention.o_proj / feed_forward.down_proj: the exact LM prefix
    # keeps them out.
    # Mistral 3 (Pixtral tower); with a Mistral 4 text model (Mistral Small 4): multi-head
    # latent attention still writes through self_attn.o_proj, and the MoE layers through
    # every routed expert's down projection (fused) and the shared experts.
    "mistral3": Family(
        "mistral3",
        ("mistral", "mistral4"),
        _LLAVA_PREFIXES,
        image_path=_LLAVA_IMAGE_PATH,
        fused=(("mlp.down_proj", ("mlp.experts", "down_proj")),),
        extra_writers=("mlp.shared_experts.down_proj",),
        experts_key="n_routed_experts",
    ),
    "internvl": Family(
        "internvl",
        ("qwen2", "llama"),
        _LLAVA_PREFIXES,
        projector_bias=_LLAVA_PROJECTOR,
        image_path=_LLAVA_IMAGE_PATH,
    ),
    # Cohere's parallel block adds attention and MLP outputs to the same residual: the writer
    # fold is exact all the same (it maps each writer's output).
    "aya_vision": Family(
        "aya_vision", ("cohere", "cohere2"), _LLAVA_PREFIXES, image_path=_LLAVA_IMAGE_PATH
    ),
    "idefics3": Family(
        "idefics3", ("llama",), _TEXT_MODEL_PREFIXES, image_path=_CONNECTOR_IMAGE_PATH
    ),
    "smolvlm": Family(
        "smolvlm", ("llama",), _TEXT_MODEL_PREFIXES, image_path=_CONNECTOR_IMAGE_PATH
    ),
    # Qwen2.5-VL's tower has mlp.down_proj (with bias) under visual.blocks: kept out likewise.
    "qwen2_vl": Family(
        "qwen2_vl",
        ("qwen2_vl_text", "qwen2_vl"),
        _QWEN_VL_PREFIXES,
        projector_bias=_QWEN_VL_PROJECTOR,
        image_path=tuple(k.removesuffix(".bias") for k in _QWEN_VL_PROJECTOR),
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        ("qwen2_5_vl_text", "qwen2_5_vl"),
        _QWEN_VL_PREFIXES,
        projector_bias=_QWEN_VL_PROJECTOR,
        image_path=tuple(k.removesuffix(".bias") for k in _QWEN_VL_PROJECTOR),
    ),
    # Deepstack adds visual features to the first layers' residual stream at image tokens:
    # a path beside the writers, not a writer of the text; left alone.
    "qwen3_vl": Family(
        "qwen3_vl",
        ("qwen3_vl_text",),
        ("model.language_model.layers",),
        projector_bias=_QWEN3_VL_PROJECTOR,
        image_path=tuple(k.removesuffix(".bias") for k in _QWEN3_VL_PROJECTOR),
    ),
    # Every expert's down projection is a writer; dense layers (mlp_only_layers) keep
    # mlp.down_proj. Deepstack adds visual features to the first layers' residual stream.
    "qwen3_vl_moe": Family(
        "qwen3_vl_moe",
        ("qwen3_vl_moe_text",),
        ("model.language_model.layers",),
        fused=(("mlp.down_proj", ("mlp.experts", "down_proj")),),
        projector_bias=_QWEN3_VL_PROJECTOR,
        image_path=tuple(k.removesuffix(".bias") for k in _QWEN3_VL_PROJECTOR),
    ),
    # MoE layers (every interleave_moe_layer_step-th): fused experts used as x @ W, (E, I, H),
    # plus a shared expert; dense layers: feed_forward.down_proj. The vision model has
    # self_attn.o_proj (with bias) under vision_model.*: kept out by the prefix.
    "llama4": Family(
        "llama4",
        ("llama4_text",),
        ("language_model.model.layers",),
        writers=("self_attn.o_proj", "feed_forward.down_proj"),
        fused=(("feed_forward.down_proj", ("feed_forward.experts", "down_proj")),),
        extra_writers=("feed_forward.shared_expert.down_proj",),
        value_proj="self_attn.v_proj",
        image_path=("multi_modal_projector.linear_1", "model.multi_modal_projector.linear_1"),
    ),
    # A norm after each writer: only the projection (beta -1) is exact there, by projecting the
    # writer's output off u ∝ g ⊙ v (see fold.norm_weighted).
    "gemma3": Family(
        "gemma3",
        ("gemma3_text",),
        _LLAVA_PREFIXES,
        post_norms=(
            ("self_attn.o_proj", "post_attention_layernorm"),
            ("mlp.down_proj", "post_feedforward_layernorm"),
        ),
        norm_offset=1.0,
        no_image_path=(
            "its projector multiplies by a raw weight matrix (mm_input_projection_weight, "
            "x @ W), not a Linear; not mapped"
        ),
    ),
    # Gemma 4: Gemma 3's post-norms (gain w, not 1 + w) and, in the small models, a third
    # writer per layer: the per-layer-input path's per_layer_projection, normed by
    # post_per_layer_input_norm before its residual add. layer_scalar scales the whole
    # residual stream, which keeps a direction projected out projected out. Its MoE models
    # (enable_moe_block) are refused in refused_when.
    "gemma4": Family(
        "gemma4",
        ("gemma4_text",),
        _LLAVA_PREFIXES,
        post_norms=(
            ("self_attn.o_proj", "post_attention_layernorm"),
            ("mlp.down_proj", "post_feedforward_layernorm"),
            ("per_layer_projection", "post_per_layer_input_norm"),
        ),
        extra_writers=("per_layer_projection",),
        image_path=("model.embed_vision.embedding_projection",),
        refused_when=(("enable_moe_block", _GEMMA4_MOE),),
    ),
    # Gemma 4 unified: no vision tower (patches are embedded by embed_vision's own Linears),
    # Gemma 4's post-norms (gain w) without the per-layer-input path.
    "gemma4_unified": Family(
        "gemma4_unified",
        ("gemma4_unified_text",),
        _LLAVA_PREFIXES,
        post_norms=(
            ("self_attn.o_proj", "post_attention_layernorm"),
            ("mlp.down_proj", "post_feedforward_layernorm"),
        ),
        image_path=(  # the Hub's name, then transformers 5's
            "model.embed_vision.embedding_projection",
            "model.embed_vision.multimodal_embedder.embedding_projection",
        ),
        refused_when=(("enable_moe_block", _GEMMA4_MOE),),
    ),
    # PaliGemma 2's Gemma 2 has Gemma 3's post-norms; PaliGemma 1's Gemma has none (its
    # post_attention_layernorm is the usual pre-MLP norm).
    "paligemma": Family(
        "paligemma",
        ("gemma", "gemma2"),
        _LLAVA_PREFIXES,
        post_norms=(
            ("self_attn.o_proj", "post_attention_layernorm"),
            ("mlp.down_proj", "post_feedforward_layernorm"),
        ),
        norm_offset=1.0,
        post_norm_text_types=("gemma2",),
        image_path=("multi_modal_projector.linear", "model.multi_modal_projector.linear"),
    ),
    # GLM-4.1V: post-norms with gain w (not 1 + w); its tower has visual.merger.down_proj and
    # visual.blocks.N.mlp.down_proj, kept out by the prefix.
    "glm4v": _GLM4V,
    # GLM-4.5V: GLM-4.1V's layout without post-norms, plus MoE layers (from
    # first_k_dense_replace on) with per-expert 2-D down projections on the Hub (fused
    # (E, H, I) in a transformers 5 save) and shared experts; the Hub checkpoint also holds
    # a multi-token-prediction layer after the last one, which transformers ignores.
    "glm4v_moe": Family(
        "glm4v_moe",
        ("glm4v_moe_text",),
        ("model.language_model.layers",),
        fused=(("mlp.down_proj", ("mlp.experts", "down_proj")),),
        extra_writers=("mlp.shared_experts.down_proj",),
        experts_key="n_routed_experts",
        trailing_layers=1,
        image_path=_GLM_IMAGE_PATH,
    ),
    # Kimi K2.5: a DeepSeek V3 text model (multi-head latent attention writing through
    # self_attn.o_proj; MoE layers through every routed expert's down projection, per-expert
    # 2-D under the Hub's blocks.N, fused in a transformers 5 save, and the shared experts).
    "kimi_k25": Family(
        "kimi_k25",
        ("deepseek_v3",),
        ("language_model.model.blocks", "model.language_model.layers"),
        fused=(("mlp.down_proj", ("mlp.experts", "down_proj")),),
        extra_writers=("mlp.shared_experts.down_proj",),
        experts_key="n_routed_experts",
        image_path=("mm_projector.proj.2", "model.mm_projector.out_proj"),
    ),
    # HunYuan-VL: the Hub keeps the text model's names (model.layers) beside the tower's
    # vit.layers (kept out by the prefix); the patch merger's last Linear is its mlp.
    "hunyuan_vl": Family(
        "hunyuan_vl",
        ("hunyuan_vl_text",),
        _QWEN_VL_PREFIXES,
        image_path=("vit.perceive.mlp", "model.vision_tower.patch_merger.mlp"),
    ),
    # Llama 3.2 Vision: cross-attention layers interleaved with the Llama 3.1 layers, writing
    # through tanh-gated cross_attn.o_proj and mlp.down_proj (a scalar gate: the fold is exact).
    # The vision model has self_attn.o_proj under vision_model.*: kept out by the prefix.
    "mllama": Family(
        "mllama",
        ("mllama_text_model",),
        _LLAVA_PREFIXES,
        cross_layers_key="cross_attention_layers",
        cross_writers=("cross_attn.o_proj", "mlp.down_proj"),
        image_path=("multi_modal_projector", "model.multi_modal_projector"),
    ),
    # ---- proved by the self-test (inspect --self-test), LLaVA-like or plain Llama writers
    "vipllava": Family(
        "vipllava",
        ("llama",),
        _LLAVA_PREFIXES,
        projector_bias=_LLAVA_PROJECTOR,
        image_path=_LLAVA_IMAGE_PATH,
    ),
    "llava_next_video": Family(
        "llava_next_video",
        ("llama", "mistral", "qwen2"),
        _LLAVA_PREFIXES,
        projector_bias=_LLAVA_PROJECTOR,
        image_path=_LLAVA_IMAGE_PATH,
    ),
    # The image and video towers have self_attn.out_proj under image_tower / video_tower:
    # the exact LM prefix keeps them out.
    "video_llava": Family(
        "video_llava",
        ("llama",),
        _LLAVA_PREFIXES,
        projector_bias=_LLAVA_PROJECTOR,
        image_path=_LLAVA_IMAGE_PATH,
    ),
    # Cohere 2's LayerNorm: no attention-aware shift (no projector_bias), as aya_vision.
    "cohere2_vision": Family(
        "cohere2_vision",
        ("cohere2",),
        ("model.language_model.layers",),
        image_path=("model.multi_modal_projector.linear_2",),
    ),
    "lighton_ocr": Family(
        "lighton_ocr",
        ("qwen3",),
        ("model.language_model.layers",),
        image_path=("model.vision_projection.linear_2",),
    ),
    "got_ocr2": Family(
        "got_ocr2",
        ("qwen2",),
        _LLAVA_PREFIXES,
        projector_bias=_GOT_PROJECTOR,
        image_path=tuple(k.removesuffix(".bias") for k in _GOT_PROJECTOR),
    ),
    "pp_chart2table": Family(
        "pp_chart2table",
        ("qwen2",),
        _LLAVA_PREFIXES,
        projector_bias=_GOT_PROJECTOR,
        image_path=tuple(k.removesuffix(".bias") for k in _GOT_PROJECTOR),
    ),
    # The connector ends in a perceiver resampler (attention over learned latents, then a
    # norm): no last Linear to learn, so image-path is refused; the writers are plain.
    "idefics2": Family(
        "idefics2",
        ("mistral",),
        _TEXT_MODEL_PREFIXES,
        no_image_path=(
            "its connector ends in a perceiver resampler (latents cross-attending to the "
            "image, with a residual stream and a norm of their own): no single Linear writes "
            "the image tokens"
        ),
    ),
    # Images reach the text model through a visual embedding table (a soft lookup), not a
    # Linear: image-path is refused; the writers are plain.
    "ovis2": Family(
        "ovis2",
        ("qwen2",),
        ("model.language_model.layers",),
        no_image_path=(
            "its image tokens are a probability-weighted mix of the rows of a visual embedding "
            "table (visual_embeddings_table, x @ E), not a Linear's output"
        ),
    ),
    "hyperclovax_vision_v2": Family(
        "hyperclovax_vision_v2",
        ("hyperclovax",),
        ("model.language_model.layers",),
        image_path=("model.vision_projector", "model.projector"),
    ),
    "qianfan_ocr": Family(
        "qianfan_ocr",
        ("qwen3",),
        ("language_model.model.encoder.layers", "model.language_model.layers"),
        image_path=("mlp1.3", "model.multi_modal_projector.linear_2"),
    ),
    # Qwen 3.5: hybrid layers, Gated DeltaNet (linear attention, written through
    # linear_attn.out_proj) and gated full attention (self_attn.o_proj); MiniCPM-V 4.6 / 4.7
    # are built on it (their merger's last Linear is not the image path the self-test can
    # see change: no image-path mapped for them).
    "qwen3_5": Family(
        "qwen3_5",
        ("qwen3_5_text",),
        ("model.language_model.layers",),
        alternatives=_LINEAR_ATTENTION,
        image_path=("model.visual.merger.linear_fc2",),
    ),
    "qwen3_5_moe": Family(
        "qwen3_5_moe",
        ("qwen3_5_moe_text",),
        ("model.language_model.layers",),
        alternatives=_LINEAR_ATTENTION,
        fused=(("mlp.down_proj", ("mlp.experts", "down_proj")),),
        experts_key="num_experts",
        extra_writers=("mlp.shared_expert.down_proj",),
        image_path=("model.visual.merger.linear_fc2",),
    ),
    "minicpmv4_6": _MINICPM_V,
    "minicpm_ocr": replace(_MINICPM_V, model_type="minicpm_ocr"),
    "minicpmv4_7": replace(_MINICPM_V, model_type="minicpmv4_7"),
    # GLM-4.6V, GLM-OCR and GLMGA: GLM-4.1V's layout (post-norms after both writers).
    "glm46v": replace(_GLM4V, model_type="glm46v"),
    "glm_ocr": replace(_GLM4V, model_type="glm_ocr", text_model_types=("glm_ocr_text",)),
    "glmga": replace(_GLM4V, model_type="glmga"),
    "deepseek_vl": Family(
        "deepseek_vl",
        ("llama",),
        ("model.language_model.layers",),
        projector_bias=("model.aligner.linear2.bias",),
        image_path=("model.aligner.linear2",),
    ),
    "exaone4_5": Family(
        "exaone4_5",
        ("exaone4",),
        ("model.language_model.layers",),
        image_path=("model.visual.merger.mlp.2",),  # Qwen2.5-VL's merger
    ),
    "video_llama_3": Family(
        "video_llama_3",
        ("qwen2",),
        ("model.language_model.layers",),
        projector_bias=("model.projector.readout.2.bias",),
        image_path=("model.projector.readout.2",),
    ),
    "paddleocr_vl": Family(
        "paddleocr_vl",
        ("paddleocr_vl_text",),
        ("model.layers", "model.language_model.layers"),
        image_path=("mlp_AR.linear_2", "model.projector.linear_2"),
    ),
    # Fuyu: a Persimmon decoder (attention output self_attn.dense, MLP dense_4h_to_h, fused
    # query_key_value) that takes image patches through one Linear, vision_embed_tokens.
    "fuyu": Family(
        "fuyu",
        ("persimmon",),
        _LLAVA_PREFIXES,
        writers=("self_attn.dense", "mlp.dense_4h_to_h"),
        value_proj="self_attn.query_key_value",
        image_path=("vision_embed_tokens", "model.vision_embed_tokens"),
    ),
    # LFM2-VL: hybrid layers, gated short convolutions (written through conv.out_proj, a
    # Linear: the fold is exact there too) and attention (self_attn.out_proj); the MLP writes
    # through feed_forward.w2.
    "lfm2_vl": Family(
        "lfm2_vl",
        ("lfm2",),
        ("model.language_model.layers",),
        writers=("self_attn.out_proj", "feed_forward.w2"),
        alternatives=(("self_attn.out_proj", ("conv.out_proj",)),),
        image_path=("model.multi_modal_projector.linear_2",),
    ),
    # Aria: every layer MoE, all experts' down projections in one fused (E, I, H) tensor (the
    # Hub's mlp.experts.fc2.weight, transformers 5's mlp.experts.down_proj), plus shared experts.
    "aria": Family(
        "aria",
        ("aria_text",),
        _LLAVA_PREFIXES,
        fused=(
            ("mlp.down_proj", ("mlp.experts", "fc2.weight")),
            ("mlp.down_proj", ("mlp.experts", "down_proj")),
        ),
        extra_writers=("mlp.shared_experts.down_proj",),
        image_path=(
            "multi_modal_projector.feed_forward.linear_out",
            "model.multi_modal_projector.feed_forward.linear_out",
        ),
    ),
}

# Families we know and refuse, with the reason (so users are told, not silently mis-edited).
REFUSED: dict[str, str] = {
    "gemma3n": (
        "post-projection norms plus AltUp/LAuReL residual paths: AltUp mixes four residual "
        "streams by learned coefficients and LAuReL adds a low-rank path beside attention, so "
        "the writers are not the only residual writes (no exact direction fold); the learned "
        "kinds' o_proj change would fold exactly, but its MobileNet-V5 vision tower needs timm "
        "(not a dependency of this project), so no self-test can prove them; Gemma 4 is supported"
    ),
    "phi4_multimodal": "the language model is used with LoRA adapters (vision-lora/, "
    "speech-lora/) that also write to the residual stream; folding the base weights alone "
    "would be incomplete",
    # Every other image-text-to-text type of transformers 5.23, with why (inspect --self-test
    # and docs/families.md): not a decoder-only chat VLM, or not mapped / proved yet.
    "apertus1p5": (
        "(transformers 5.24) its default config does not shrink generically (audio token "
        "ranges beyond the shrunken vocabulary); not mapped yet"
    ),
    "hy_v4_vl": (
        "(transformers 5.24) multi-head latent attention whose RoPE sections do not shrink "
        "generically; not mapped yet"
    ),
    "inkling2_loop": (
        "(transformers 5.24) its default config does not shrink generically (the vision "
        "config names the text width); not mapped yet"
    ),
    "blip": "an encoder-decoder captioning model (BLIP), not a chat VLM",
    "blip-2": "a Q-Former between the vision tower and the LLM (OPT or Flan-T5); not mapped",
    "chameleon": (
        "images are VQ tokens in the text vocabulary (no image-to-language Linear) and its "
        "default config does not shrink generically; not mapped yet"
    ),
    "cohere_compass": (
        "its default config does not shrink generically (layer types); not mapped yet"
    ),
    "cosmos3_edge": (
        "its default config does not shrink generically (architecture validation); not mapped yet"
    ),
    "cosmos3_omni": (
        "the text decoder's layers are not under a known prefix (a nested omni model); not "
        "mapped yet"
    ),
    "deepseek_ocr2": "its default config does not shrink generically; not mapped yet",
    "deepseek_vl_hybrid": (
        "two vision towers; its shrink keeps 97M parameters (the high-resolution tower); not "
        "proved yet"
    ),
    "diffusion_gemma": (
        "a diffusion language model (no autoregressive answers to guard), with per-layer configs"
    ),
    "dots3_note": "per-layer configs that do not shrink generically; not mapped yet",
    "emu3": (
        "images are VQ tokens in the text vocabulary (no image-to-language Linear); not mapped yet"
    ),
    "ernie4_5_vl_moe": (
        "modality-split MoE experts (text and vision experts in one layer); not mapped yet"
    ),
    "evolla": "a protein-language model, not an image-text one",
    "fast_vlm": "its vision tower needs timm, not a dependency of this project; not proved yet",
    "florence2": (
        "an encoder-decoder (BART-style) model: the decoder's cross-attention reads the image, "
        "no decoder-only residual stream to guard"
    ),
    "git": (
        "a captioning model (GIT: image features prepended to a BERT-style decoder), not a chat VLM"
    ),
    "glm5_next": (
        "its default config does not shrink generically: its sparse-attention (DSA) layers must "
        "be NoPE with as many key/value heads as heads; not mapped yet"
    ),
    "granite4_vision": (
        "its default config leaves deepstack_layer_map unset (which vision layers feed which "
        "text layers through its window Q-Former downsamplers, a path beside the writers), so "
        "no default model can be built; not mapped yet"
    ),
    "granite_docling": "its default config does not shrink generically (token ids); not mapped yet",
    "idefics": (
        "IDEFICS 1: gated cross-attention blocks and a perceiver with learned latents; its "
        "shrink keeps billions of parameters; not mapped"
    ),
    "inkling2": (
        "its default config does not shrink generically (architecture validation); not mapped yet"
    ),
    "inkling_mm_model": (
        "its default config does not shrink generically (layer types); not mapped yet"
    ),
    "instructblip": (
        "a Q-Former between the vision tower and the LLM, and a T5 or OPT decoder; not mapped"
    ),
    "instructblipvideo": (
        "a Q-Former between the vision tower and the LLM, and a T5 or OPT decoder; not mapped"
    ),
    "janus": (
        "image generation and understanding in one model (a VQ head beside the LM); its shrink "
        "keeps 114M parameters; not mapped"
    ),
    "kosmos-2": (
        "its text model is a decoder with its own grounding tokens and its shrink keeps over a "
        "billion parameters; not mapped"
    ),
    "kosmos-2.5": "an OCR model whose shrink keeps hundreds of millions of parameters; not mapped",
    "lfm3_vl": "its default config does not shrink generically (token ids); not mapped yet",
    "minimax_m3_vl": "its default config does not shrink generically (layer types); not mapped yet",
    "mistral4": (
        "the text-only Mistral 4 causal LM (transformers maps Mistral4ForCausalLM here); a "
        "Mistral 4 VLM checkpoint is model type mistral3 with a mistral4 text model, which is "
        "supported"
    ),
    "mistral_large4": (
        "its Hub checkpoints keep Mistral's native key names (layers.N.attention.wo, "
        "layers.N.experts.E.w2, shared_experts.w2, vision_language_adapter.w_out), which "
        "transformers renames on load, and its attention adds an indexer; not mapped yet"
    ),
    "molmo2": (
        "the Hub keeps OLMo's key names (model.transformer.blocks.N.self_attn.attn_out, "
        "mlp.ff_out, vision_backbone.image_projector.w2) and its image input needs token "
        "pooling indices and image grids built by its processor; not mapped yet"
    ),
    "muse_glimmer": "its shrink keeps 42M parameters; not mapped yet",
    "muse_spark": "its default config does not shrink generically (layer types); not mapped yet",
    "nemotron_h_omni": (
        "a Mamba-2 hybrid: mixer layers write through mixer.out_proj beside attention and MLP "
        "layers; not mapped yet"
    ),
    "perception_lm": (
        "its vision tower needs timm, not a dependency of this project; not proved yet"
    ),
    "pi0": "a vision-language-action robot policy (actions, not answers, are its output)",
    "pix2struct": "an encoder-decoder over flattened image patches, not a chat VLM",
    "pp_formulanet": "an encoder-decoder formula recogniser, not a chat VLM",
    "qwen2_5_omni_thinker": (
        "an omni (audio, video, image) model whose shrink keeps 640M parameters; not mapped yet"
    ),
    "qwen3_omni_moe_thinker": (
        "an omni (audio, video, image) MoE model whose shrink keeps 650M parameters; not mapped yet"
    ),
    "qwen4_exp": "its default config does not shrink generically (head sizes); not mapped yet",
    "shieldgemma2": (
        "an image safety classifier (it rates images, it does not answer requests): nothing to "
        "guard"
    ),
    "step3p7": "its default config does not shrink generically (layer types); not mapped yet",
    "t5gemma2": "an encoder-decoder (T5Gemma 2), not a decoder-only residual stream to guard",
    "udop": "an encoder-decoder document model, not a chat VLM",
    "unlimited_ocr": "its default config does not shrink generically (layer types); not mapped yet",
    "vision-encoder-decoder": "a generic encoder-decoder wrapper (captioning, OCR), not a chat VLM",
}


# What a family has besides plain residual writers (shown by `inspect`).
NOTES: dict[str, str] = {
    "aya_vision": "parallel block: attention and MLP both read LN(x) and add to the same "
    "residual; the writer fold is exact for it",
    "qwen2_vl": "the Hub keeps the text layers under model.layers.N (text-only LLM names)",
    "qwen2_5_vl": "the vision tower has visual.blocks.N.mlp.down_proj (kept out by the prefix)",
    "mistral3": "the Pixtral tower has attention.o_proj and feed_forward.down_proj (kept out "
    "by the prefix)",
    "qwen3_vl_moe": "MoE: every expert's down projection (fused 3-D tensor) is a writer; "
    "deepstack adds visual features to the first layers' residual stream (not edited)",
    "llama4": "MoE layers: every expert's down projection (fused, used as x @ W) and the "
    "shared expert are writers; the vision model's o_proj is kept out by the prefix",
    "gemma3": "an RMSNorm (gain 1 + w) sits between each writer and the residual add: only "
    "beta -1 is supported, folded against the norm-gain-weighted direction",
    "gemma4": "an RMSNorm (gain w) sits between each writer (o_proj, down_proj and the "
    "per-layer-input path's per_layer_projection) and the residual add: only beta -1, folded "
    "against the norm-gain-weighted direction; layer_scalar scales the whole residual stream",
    "gemma4_unified": "an RMSNorm (gain w) after each writer: only beta -1, folded against the "
    "norm-gain-weighted direction",
    "qwen3_vl": "deepstack adds visual features to the residual stream after the first "
    "layers at image tokens (a path beside the writers, not edited)",
    "paligemma": "PaliGemma 2 (Gemma 2): an RMSNorm (gain 1 + w) after each writer, only beta "
    "-1, folded against the norm-gain-weighted direction; PaliGemma 1: plain writers",
    "glm4v": "an RMSNorm (gain w) after each writer: only beta -1 is supported, folded "
    "against the norm-gain-weighted direction; the tower's down_proj is kept out by the prefix",
    "glm4v_moe": "MoE layers: every routed expert's down projection (per-expert 2-D on the "
    "Hub, fused in a transformers 5 save) and the shared experts are writers; a trailing "
    "multi-token-prediction layer is copied unchanged",
    "mllama": "cross-attention layers (tanh-gated cross_attn.o_proj and mlp.down_proj) sit "
    "between the Llama layers: base LLM layer i is the i-th non-cross-attention layer, and a "
    "cross-attention layer uses the direction of the layer before it",
}
