"""Build tiny random VLMs with THIS environment's transformers (CI runs it under 4.57, the last
4.x): sources written the way Hub checkpoints of these families were, for make_fixtures.py
to convert with transformers 5 and check_load.py to load back here.

    python tests/compat/make_sources.py SOURCES

Families whose key layout or config differs between the releases: Qwen2-VL (the legacy
``model.layers.N`` text keys beside ``visual.*``) and Llama 3.2 Vision (cross-attention
layers, tanh gates opened so that they matter). Needs only torch and transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CASES = {
    "qwen2_vl": dict(
        text_config=dict(
            model_type="qwen2_vl_text",
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            **TEXT,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=5,
        video_token_id=6,
        vision_start_token_id=7,
    ),
    "mllama": dict(
        text_config=dict(
            model_type="mllama_text_model",
            cross_attention_layers=[1],
            rope_scaling={"rope_type": "default"},
            **{**TEXT, "num_hidden_layers": 3},
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
}


def main(out: Path) -> None:
    for name, spec in CASES.items():
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(name, **spec))
        with torch.no_grad():  # random norm gains; open mllama's tanh gates (0 at init)
            for key, param in model.named_parameters():
                if "norm" in key and key.endswith("weight"):
                    param.add_(torch.empty_like(param).uniform_(-0.5, 0.5))
                if key.endswith("_gate") and "cross_attn" in key:
                    param.uniform_(0.5, 1.5)
        model.eval().save_pretrained(out / name / "source")
        print(f"{name}: {out / name / 'source'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
