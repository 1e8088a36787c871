"""Writers are found under the language model's exact layer prefix, never by name alone."""

import pytest

from vlmguard_edit.errors import UnsupportedModelError
from vlmguard_edit.layout import find_layout

CONFIG = {
    "model_type": "llava",
    "text_config": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8},
}


def lm_keys(prefix, layers=2, bias=False):
    keys = []
    for layer in range(layers):
        for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            keys.append(f"{prefix}.{layer}.{module}.weight")
            if bias and module in ("self_attn.o_proj", "mlp.down_proj"):
                keys.append(f"{prefix}.{layer}.{module}.bias")
    return keys


# Vision towers that reuse the writer names (measured: Pixtral in Mistral3/Pixtral-LLaVA, Llama 4).
DECOYS = [
    "vision_tower.transformer.layers.0.attention.o_proj.weight",
    "vision_tower.transformer.layers.0.feed_forward.down_proj.weight",
    "vision_model.model.layers.0.self_attn.o_proj.weight",
    "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight",
    "multi_modal_projector.linear_2.weight",
]


@pytest.mark.parametrize("prefix", ["language_model.model.layers", "model.language_model.layers"])
def test_both_layouts_and_decoys_ignored(prefix):
    layout = find_layout(CONFIG, lm_keys(prefix, bias=True) + DECOYS)
    assert layout.layer_prefix == prefix and layout.num_layers == 2 and layout.hidden_size == 8
    keys = {w.weight for ws in layout.writers.values() for w in ws} | {
        w.bias for ws in layout.writers.values() for w in ws
    }
    assert keys == {k for k in lm_keys(prefix, bias=True) if "o_proj" in k or "down_proj" in k}
    assert not keys & set(DECOYS)


def test_missing_writer():
    keys = [
        k
        for k in lm_keys("language_model.model.layers")
        if k != "language_model.model.layers.1.mlp.down_proj.weight"
    ]
    with pytest.raises(UnsupportedModelError, match=r"layer 1 has no .*mlp.down_proj.weight"):
        find_layout(CONFIG, keys)


def test_layer_count_must_match_config():
    with pytest.raises(
        UnsupportedModelError, match=r"declares 2 text layers but the checkpoint has layers 0-2"
    ):
        find_layout(CONFIG, lm_keys("language_model.model.layers", layers=3))


def test_no_lm_keys():
    with pytest.raises(UnsupportedModelError, match="no language-model layer keys"):
        find_layout(CONFIG, ["model.layers.0.self_attn.o_proj.weight", *DECOYS])


def test_ambiguous_layout():
    keys = lm_keys("language_model.model.layers") + lm_keys("model.language_model.layers")
    with pytest.raises(UnsupportedModelError, match="ambiguous"):
        find_layout(CONFIG, keys)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model_type": "gemma3n", "text_config": {}},
            "'gemma3n' is not supported: post-projection norms plus AltUp",
        ),
        (
            {"model_type": "phi4_multimodal"},
            "'phi4_multimodal' is not supported: the language model is used with LoRA adapters",
        ),
        (
            {"model_type": "kosmos-2"},
            "'kosmos-2' is not supported: its text model is a decoder with its own grounding",
        ),
        (
            {"model_type": "my_new_vlm"},
            r"'my_new_vlm' is not supported yet: none of the \d+ families in docs/families.md "
            r"\(to map it",
        ),
        (
            {"model_type": "qwen2vl"},
            r"'qwen2vl' is not supported yet: .*; nearest supported: qwen2_vl\b",
        ),
        (
            {"model_type": "llava", "text_config": {"model_type": "qwen2"}},
            "'qwen2' text model is not supported",
        ),
    ],
)
def test_refused_families_named(config, message):
    with pytest.raises(UnsupportedModelError, match=message):
        find_layout(config, [])
