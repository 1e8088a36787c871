"""Every supported family beyond LLaVA, in each of its key layouts, on tiny random models:
the edited tensors are exactly the plan's (every other tensor, vision tower and projector
included, is bit-identical), the output loads with plain transformers without missing or
unexpected keys, and the fold equals the runtime hook within 1e-5 in float32 while clearly
changing the model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.helpers import model_tensors
from vlmguard_edit.checkpoint import open_checkpoint
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.direction import Direction
from vlmguard_edit.errors import DirectionError, PlanError, UnsupportedModelError
from vlmguard_edit.kinds.base import DIRECTION_NAME
from vlmguard_edit.layout import find_layout
from vlmguard_edit.organisms import tiny
from vlmguard_edit.recipes import BaseLLM, Recipe
from vlmguard_edit.runtime import WriterHooks, text_layers

# Families whose two layouts differ get both; Idefics3 / SmolVLM have one.
# Llama 4, Qwen3-VL, GLM-4.1V: the legacy names are the module names.
ONE_LAYOUT = ("idefics3", "smolvlm", "llama4", "qwen3_vl", "glm4v")
LAYOUTS = {"qwen3_vl_moe": ("legacy", "hub")}  # same names; experts (E,H,I) vs Hub (E,I,H)
CASES = [
    (family, layout)
    for family in tiny.FAMILY_CONFIGS
    for layout in (
        ("legacy",) if family in ONE_LAYOUT else LAYOUTS.get(family, ("legacy", "memory"))
    )
]
# A name clash the layout must keep out: vision towers with writer-like names.
CLASHES = {
    "mistral3": "vision_tower.transformer.layers.0",
    "qwen2_5_vl": "visual.blocks.0.mlp",
    "llama4": "vision_model.model.layers.0.self_attn.o_proj",
    "glm4v": "visual.blocks.0.mlp.down_proj",
    "mllama": "vision_model.transformer.layers.0.self_attn.o_proj",
    "glm4v_moe": "visual.blocks.0.mlp.down_proj",
}
# Tensors edited in layers 0 and 1: o_proj and down_proj (or the experts) of both, unless...
EDITED = {
    "llama4": {"legacy": 5},  # + the shared expert of MoE layer 1
    # layer 1: o_proj, 4 per-expert 2-D down projections (Hub) or one fused tensor, shared
    "glm4v_moe": {"legacy": 8, "memory": 5},
}


# Norms between the writers and the residual add (randomised gains, see tiny.build_family):
# (o_proj's norm, down_proj's norm), and the gain's offset (Gemma: 1 + w; GLM: w).
_GEMMA_NORMS = (("post_attention_layernorm", "post_feedforward_layernorm"), 1.0)
POST_NORM = {
    "gemma3": _GEMMA_NORMS,
    "paligemma2": _GEMMA_NORMS,
    "glm4v": (("post_self_attn_layernorm", "post_mlp_layernorm"), 0.0),
}


class PostNormHooks:
    """Reference for post-norm families, written apart from vlmguard_edit: project each
    writer's output off the span of g ⊙ v_i (g = offset + w), via an SVD basis."""

    def __init__(self, model, vectors, beta, norms, offset):
        assert beta == -1.0
        self.handles = []
        self.model, self.vectors, self.norms, self.offset = model, vectors, norms, offset

    def __enter__(self):
        layers = text_layers(self.model)
        for index, v in self.vectors.items():
            layer = layers[index]
            attn_norm, mlp_norm = (getattr(layer, name) for name in self.norms)
            pairs = ((layer.self_attn.o_proj, attn_norm), (layer.mlp.down_proj, mlp_norm))
            for writer, norm in pairs:
                weighted = (self.offset + norm.weight.detach().double())[None, :] * v.double()
                basis = torch.linalg.svd(weighted, full_matrices=False).Vh.float()  # (m, d)

                def hook(_m, _i, out, basis=basis):
                    return out - (out @ basis.T) @ basis

                self.handles.append(writer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def norm_outputs(model, ids, names):
    """The post-norm outputs (what is added to the residual stream) of every layer."""
    captured, handles = {}, []
    for index, layer in enumerate(text_layers(model)):
        for name in names:
            module = getattr(layer, name)
            handles.append(
                module.register_forward_hook(
                    lambda _m, _i, out, key=(index, name): captured.__setitem__(key, out[0])
                )
            )
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize(("family", "layout"), CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("beta", [-1.0, 2.0])
def test_family_fold(family, layout, beta, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"{family}-{layout}")
    source = tiny.build_family(root / "source", family, layout)
    generator = torch.Generator().manual_seed(1)
    vectors = {
        layer: torch.linalg.qr(torch.randn(64, 2, generator=generator)).Q.T.contiguous()
        for layer in (0, 1)
    }
    Direction(vectors, meta={"rank": 2}).save(root / "d.safetensors")
    guarded = root / "guarded"
    options = ConvertOptions(
        str(source),
        guarded,
        Recipe(layers=[0, 1], rank=2, beta=beta),
        direction_file=root / "d.safetensors",
        progress=False,
    )
    if family in POST_NORM and beta != -1.0:
        with pytest.raises(PlanError, match="only the projection"):
            convert(options)
        assert not guarded.exists()
        return
    result = convert(options)
    planned = {edit.key for edit in result.plan.edits}
    # o_proj and down_proj (or the fused experts) of both layers; Llama 4's MoE layer also
    # has its shared expert
    assert len(planned) == EDITED.get(family, {}).get(layout, 4)
    if family == "llama4":
        kinds = {(e.layer, e.kind, e.axis) for e in result.plan.edits if "feed_forward" in e.key}
        assert kinds == {(0, "map", 0), (1, "experts", 2), (1, "map", 0)}
    if family == "qwen3_vl_moe":  # layer 0 is MoE, layer 1 dense; orientation from shapes
        experts = [e for e in result.plan.edits if e.kind == "experts"]
        assert [e.layer for e in experts] == [0]
        assert experts[0].axis == (2 if layout == "hub" else 1)
    before, after = model_tensors(source), model_tensors(guarded)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == planned
    if family in CLASHES:  # the look-alike tensors exist and were left alone
        assert any(CLASHES[family] in k for k in before)
        assert not any(CLASHES[family] in k for k in changed)

    model, info = AutoModelForImageTextToText.from_pretrained(guarded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = AutoModelForImageTextToText.from_pretrained(source).eval()
    inputs = {"input_ids": torch.tensor([[1, 10, 11, 12, 13, 14]])}
    if family == "mllama":  # image states, so that the cross-attention layer 1 runs at all
        inputs["cross_attention_states"] = torch.randn(1, 4, 64, generator=generator)

    def reference(vectors):
        if family in POST_NORM:
            return PostNormHooks(original, vectors, beta, *POST_NORM[family])
        return WriterHooks(original, vectors, beta)

    with torch.no_grad():
        folded = model.eval()(**inputs).logits
        plain = original(**inputs).logits
        with reference(vectors):
            hooked = original(**inputs).logits
        if family == "mllama":  # the cross-attention layer's edit is part of the match
            with reference({0: vectors[0]}):
                layer_0_only = original(**inputs).logits
            assert (folded - layer_0_only).abs().max() > 1e-4
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - plain).abs().max() > 1e-3  # the edit did something
    if family in POST_NORM:  # what reaches the residual stream has no component along V
        ids = inputs["input_ids"]
        reaching = norm_outputs(model, ids, POST_NORM[family][0])
        for (layer, _), out in reaching.items():
            along = (out @ vectors[layer].T).abs().max()
            assert along < 1e-4 * out.abs().max(), (layer, float(along))
        untouched = norm_outputs(original, ids, POST_NORM[family][0])
        assert max((o @ vectors[k[0]].T).abs().max() for k, o in untouched.items()) > 1e-2


def test_projector_shift_refused_without_a_projector_bias(tmp_path):
    source = tiny.build_family(tmp_path / "m", "mistral3")
    with pytest.raises(PlanError, match="no multimodal projector output bias found"):
        convert(
            ConvertOptions(
                str(source),
                tmp_path / "out",
                Recipe(layers=[0], rank=1, mode="projector-shift"),
                direction_file=None,
                dry_run=True,
                progress=False,
            )
        )
    assert open_checkpoint(source).keys  # the source is untouched and readable


def test_inspect_command(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from cli import main

    source = tiny.build_family(tmp_path / "m3", "mistral3")
    shown = CliRunner().invoke(main, ["inspect", str(source)])
    assert shown.exit_code == 0, shown.output
    assert "language_model.model.layers.N  (Hub / save_pretrained)" in shown.output
    assert "layers 0-1 (2 layers): self_attn.o_proj, mlp.down_proj" in shown.output
    assert "2 o_proj/down_proj tensors outside the language model" in shown.output
    assert "projector-shift no" in shown.output
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma3n", "text_config": {}}))
    save_file({"x": torch.zeros(1)}, gemma / "model.safetensors")
    refused = CliRunner().invoke(main, ["inspect", str(gemma)])
    assert refused.exit_code == 0, refused.output
    assert "NOT SUPPORTED: model type 'gemma3n' is not supported: post-projection norms" in (
        refused.output
    )
    glm = CliRunner().invoke(main, ["inspect", str(tiny.build_family(tmp_path / "glm", "glm4v"))])
    assert "-> post_self_attn_layernorm, mlp.down_proj -> post_mlp_layernorm" in glm.output
    assert "supported: the projection only (beta -1)" in glm.output
    assert "look-alikes     2 o_proj/down_proj tensors" in glm.output
    qwen3 = CliRunner().invoke(
        main, ["inspect", str(tiny.build_family(tmp_path / "q", "qwen3_vl"))]
    )
    assert "deepstack: visual features added to the residual stream after text layers 0 at" in (
        qwen3.output
    )
    mllama = CliRunner().invoke(
        main, ["inspect", str(tiny.build_family(tmp_path / "ml", "mllama"))]
    )
    assert "cross-attn      layers 1 (1 layer): skipped without an image" in mllama.output
    assert "layers 0,2 (2 layers): self_attn.o_proj, mlp.down_proj" in mllama.output
    assert "layers 1 (1 layer): cross_attn.o_proj, mlp.down_proj" in mllama.output
    moe = CliRunner().invoke(main, ["inspect", str(tiny.build_family(tmp_path / "g", "glm4v_moe"))])
    assert (
        "layers 1 (1 layer): self_attn.o_proj, mlp.experts.{e}.down_proj (4 experts, 2-D), "
        "mlp.shared_experts.down_proj"
    ) in moe.output


def test_square_experts_are_refused(tmp_path):
    source = tiny.build_family(tmp_path / "sq", "qwen3_vl_moe", moe_intermediate_size=64)
    with pytest.raises(PlanError, match="square experts"):
        convert(
            ConvertOptions(
                str(source),
                tmp_path / "out",
                Recipe(layers=[0], rank=1, beta=-1.0),
                direction_file=None,
                dry_run=True,
                progress=False,
            )
        )


def test_mllama_layer_mapping():
    """Llama 3.2 Vision numbers its layers with the cross-attention layers in between: base
    layer i is the i-th other layer, and a cross-attention layer takes the layer before it."""
    layout = find_layout(
        {"model_type": "mllama", "text_config": mllama_text(8, [3, 6])}, mllama_keys(8, [3, 6])
    )
    assert layout.cross_layers == (3, 6)
    in_base = [layout.direction_layer(j, in_base=True) for j in range(8)]
    in_self = [layout.direction_layer(j, in_base=False) for j in range(8)]
    assert in_base == [0, 1, 2, 2, 3, 4, 4, 5]
    assert in_self == [0, 1, 2, 2, 4, 5, 5, 7]
    writers = {j: [w.module for w in layout.writers[j]] for j in (2, 3)}
    assert writers == {
        2: ["self_attn.o_proj", "mlp.down_proj"],
        3: ["cross_attn.o_proj", "mlp.down_proj"],
    }
    first = find_layout(
        {"model_type": "mllama", "text_config": mllama_text(3, [0])}, mllama_keys(3, [0])
    )
    with pytest.raises(UnsupportedModelError, match="no text layer before it"):
        first.direction_layer(0, in_base=True)
    # config and keys disagree about which layers are cross-attention layers: refused
    with pytest.raises(UnsupportedModelError, match=r"layer 3 has no .*cross_attn\.o_proj"):
        find_layout(
            {"model_type": "mllama", "text_config": mllama_text(8, [3, 6])},
            mllama_keys(8, [4, 6]),
        )


def mllama_text(layers, cross):
    return {
        "model_type": "mllama_text_model",
        "num_hidden_layers": layers,
        "hidden_size": 64,
        "cross_attention_layers": cross,
    }


def mllama_keys(layers, cross):
    prefix = "language_model.model.layers"
    return [
        f"{prefix}.{j}.{'cross_attn' if j in cross else 'self_attn'}.o_proj.weight"
        for j in range(layers)
    ] + [f"{prefix}.{j}.mlp.down_proj.weight" for j in range(layers)]


def test_mllama_direction_from_the_base_llm(base_llm, tmp_path):
    """Grafted like the real 11B (frozen Llama 3.1): the direction convert computes from the
    base LLM equals, layer for layer, the one from the VLM's own language model; the
    cross-attention layers get the direction of the layer before them; the drift report
    compares the right base layers (all identical here)."""
    vlm = tiny.build_mllama(tmp_path / "mllama", base_llm, cross_layers=(1, 4))
    layers = list(range(6))
    outs = {}
    for name, base in (("base", str(base_llm)), ("self", "self")):
        outs[name] = tmp_path / name
        convert(
            ConvertOptions(
                str(vlm),
                outs[name],
                Recipe(base_llm=BaseLLM(base), layers=layers, rank=1, beta=-1.0),
                progress=False,
            )
        )
    from_base = Direction.load(outs["base"] / DIRECTION_NAME)
    from_self = Direction.load(outs["self"] / DIRECTION_NAME)
    assert from_base.meta["source_layers"] == {"0": 0, "1": 0, "2": 1, "3": 2, "4": 2, "5": 3}
    assert from_self.meta["source_layers"] == {"1": 0, "4": 3} | {str(j): j for j in (0, 2, 3, 5)}
    for layer in layers:
        cosine = (from_base.vectors[layer] @ from_self.vectors[layer].T).abs().item()
        assert cosine > 0.999, (layer, cosine)
    assert torch.equal(from_base.vectors[1], from_base.vectors[0])
    assert not torch.equal(from_base.vectors[2], from_base.vectors[0])
    record = json.loads((outs["base"] / "vlmguard.json").read_text())
    drift = record["base_llm_check"]
    assert drift["config_warnings"] == []  # 6 VLM layers = 4 base layers + 2 cross-attention
    assert sorted(drift["weight_drift"]) == [
        f"{j}.{m}" for j in (0, 2, 3, 5) for m in ("mlp.down_proj", "self_attn.o_proj")
    ]
    assert all(d["relative_difference"] == 0.0 for d in drift["weight_drift"].values())

    def convert_with(direction_file, name, layers=layers):
        options = ConvertOptions(
            str(vlm),
            tmp_path / name,
            Recipe(layers=layers, rank=1, beta=-1.0),
            direction_file=direction_file,
            progress=False,
        )
        convert(options)
        return Direction.load(tmp_path / name / DIRECTION_NAME)

    # A base-LLM direction file numbered by the base LLM's layers is refused for mllama.
    plain = tmp_path / "plain.safetensors"
    Direction(dict(from_base.vectors), meta={"base_model": str(base_llm), "rank": 1}).save(plain)
    with pytest.raises(DirectionError, match=r"numbered by .* layers"):
        convert_with(plain, "refused")
    assert not (tmp_path / "refused").exists()
    # `vlmguard-edit direction BASE --vlm VLM` numbers the file by the VLM's layers: accepted.
    from click.testing import CliRunner

    from cli import main

    mapped = tmp_path / "mapped.safetensors"
    args = ["direction", str(base_llm), "--vlm", str(vlm), "--layers", "0-5", "--rank", "1"]
    result = CliRunner().invoke(main, [*args, "-o", str(mapped), "-q"])
    assert result.exit_code == 0, result.output
    assert Direction.load(mapped).meta["source_layers"] == from_base.meta["source_layers"]
    # below the first cross-attention layer the numbers agree; the file still says it is
    # numbered for the VLM, so convert accepts it
    low = tmp_path / "low.safetensors"
    args = ["direction", str(base_llm), "--vlm", str(vlm), "--layers", "0", "--rank", "1"]
    assert CliRunner().invoke(main, [*args, "-o", str(low), "-q"]).exit_code == 0
    assert Direction.load(low).meta["source_layers"] == {"0": 0}
    assert torch.equal(convert_with(low, "low", layers=[0]).vectors[0], from_base.vectors[0])
    accepted = convert_with(mapped, "accepted")
    assert all(torch.equal(accepted.vectors[j], from_base.vectors[j]) for j in layers)


def test_per_expert_writers_and_trailing_layers():
    """GLM-4.5V on the Hub: per-expert 2-D down projections (all of them or refused) and a
    multi-token-prediction layer after the last one (kept out of the writers)."""
    text = {
        "model_type": "glm4v_moe_text",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "n_routed_experts": 3,
    }
    config = {"model_type": "glm4v_moe", "text_config": text}
    prefix = "model.language_model.layers"

    def keys(layers=2, experts=(0, 1, 2)):
        out = []
        for j in range(layers):
            out.append(f"{prefix}.{j}.self_attn.o_proj.weight")
            out += [f"{prefix}.{j}.mlp.experts.{e}.down_proj.weight" for e in experts]
            out.append(f"{prefix}.{j}.mlp.shared_experts.down_proj.weight")
        return out

    layout = find_layout(config, keys(layers=3))
    assert layout.trailing_layers == (2,) and sorted(layout.writers) == [0, 1]
    assert [w.module for w in layout.writers[1]] == [
        "self_attn.o_proj",
        "mlp.experts.0.down_proj",
        "mlp.experts.1.down_proj",
        "mlp.experts.2.down_proj",
        "mlp.shared_experts.down_proj",
    ]
    with pytest.raises(UnsupportedModelError, match="declares 2 text layers"):
        find_layout(config, keys(layers=4))
    with pytest.raises(UnsupportedModelError, match=r"found experts 0,2, expected 3"):
        find_layout(config, keys(experts=(0, 2)))
    with pytest.raises(UnsupportedModelError, match=r"found experts 0-3, expected 3"):
        find_layout(config, keys(experts=(0, 1, 2, 3)))


def image_inputs(family, generator):
    """One image token (id 5) after a 28x28 image, in each family's input format."""
    ids = torch.tensor([[1, 10, 11, 5, 12, 13]])
    if family.startswith("qwen"):  # flattened 14x14 patches x 2 frames, merged 2x2 -> 1 token
        return {
            "input_ids": ids,
            "mm_token_type_ids": (ids == 5).long(),
            "pixel_values": torch.randn(4, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
        }
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=generator)}


@pytest.mark.parametrize(
    ("family", "layout"),
    [
        ("internvl", "legacy"),
        ("qwen2_vl", "legacy"),
        ("qwen2_vl", "memory"),
        ("qwen2_5_vl", "legacy"),
        ("qwen3_vl", "legacy"),
        ("qwen3_vl_moe", "legacy"),
    ],
)
def test_projector_shift_families(family, layout, tmp_path):
    """The image-only edit on families whose projector (or vision merger) ends in a Linear
    with a bias: only that bias changes, text-only logits are bit-identical, and image
    prompts match a hook adding gamma * v to that Linear's output."""
    from vlmguard_edit.runtime import ProjectorShiftHook

    source = tiny.build_family(tmp_path / "source", family, layout)
    generator = torch.Generator().manual_seed(2)
    v = torch.nn.functional.normalize(torch.randn(1, 64, generator=generator), dim=1)
    Direction({0: v, 1: v}, meta={"rank": 1}).save(tmp_path / "d.safetensors")
    recipe = Recipe(layers=[1], rank=1, mode="projector-shift", gamma=2.0, shift_direction="ssd")
    result = convert(
        ConvertOptions(
            str(source),
            tmp_path / "guarded",
            recipe,
            direction_file=tmp_path / "d.safetensors",
            progress=False,
        )
    )
    [edit] = result.plan.edits
    assert edit.kind == "shift" and edit.key.endswith(
        ("merger.mlp.2.bias", "linear_fc2.bias", "linear_2.bias")
    )
    before, after = model_tensors(source), model_tensors(tmp_path / "guarded")
    assert {k for k in before if not torch.equal(before[k], after[k])} == {edit.key}
    assert torch.allclose(after[edit.key], before[edit.key] + 2.0 * v[0], atol=1e-6)
    guarded = AutoModelForImageTextToText.from_pretrained(tmp_path / "guarded").eval()
    original = AutoModelForImageTextToText.from_pretrained(source).eval()
    image = image_inputs(family, generator)
    text = {k: val for k, val in image.items() if k in ("input_ids", "mm_token_type_ids")}
    if "mm_token_type_ids" in text:
        text["mm_token_type_ids"] = torch.zeros_like(text["mm_token_type_ids"])
    with torch.no_grad():
        assert torch.equal(guarded(**text).logits, original(**text).logits)
        folded = guarded(**image).logits
        plain = original(**image).logits
        with ProjectorShiftHook(original, v[0], 2.0):
            hooked = original(**image).logits
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - plain).abs().max() > 1e-3


@pytest.mark.parametrize(("family", "layout"), CASES, ids=lambda x: str(x))
def test_lowrank_fold_on_every_family(family, layout, tmp_path_factory):
    """The learned lowrank kind on every family and key layout: only the text layers'
    attention o_proj weights change, by B A; the output loads cleanly; the fold equals the
    factored runtime hook < 1e-5 in float32 (post-norm families included: the change is
    inside the Linear) and visibly changes the model."""
    from vlmguard_edit import learned
    from vlmguard_edit.kinds import get_kind
    from vlmguard_edit.plan import build_plan

    root = tmp_path_factory.mktemp(f"lowrank-{family}-{layout}")
    source = tiny.build_family(root / "source", family, layout)
    checkpoint = open_checkpoint(source)
    layout_ = find_layout(checkpoint.config, checkpoint.keys)
    layers = [i for i in range(layout_.num_layers) if i not in layout_.cross_layers]
    plan = build_plan(checkpoint, layout_, get_kind("lowrank"), Recipe(layers=layers, rank=2))
    generator = torch.Generator().manual_seed(2)
    deltas = {}
    for e in plan.edits:
        deltas[f"{e.key}.lora_A"] = torch.randn(2, e.shape[1], generator=generator)
        deltas[f"{e.key}.lora_B"] = 0.3 * torch.randn(e.shape[0], 2, generator=generator)
    learned.Edit(deltas, {"source": "test"}, "lowrank").save(root / "e.safetensors")
    guarded = root / "guarded"
    recipe = Recipe(mode="lowrank", rank=2)
    convert(ConvertOptions(str(source), guarded, recipe, root / "e.safetensors", progress=False))
    before, after = model_tensors(source), model_tensors(guarded)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {e.key for e in plan.edits} and all("o_proj" in k for k in changed)
    model, info = AutoModelForImageTextToText.from_pretrained(guarded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = AutoModelForImageTextToText.from_pretrained(source).eval()
    modules = {
        e.module: learned.find_module(original, learned.memory_names(e.module))[1]
        for e in plan.edits
    }
    inputs = {"input_ids": torch.tensor([[1, 10, 11, 12, 13, 14]])}
    with torch.no_grad():
        folded = model.eval()(**inputs).logits
        plain = original(**inputs).logits
        with learned.hooks(modules, deltas):
            hooked = original(**inputs).logits
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - plain).abs().max() > 1e-3
