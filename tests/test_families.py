"""Every supported family beyond LLaVA, in each of its key layouts, on tiny random models:
the edited tensors are exactly the plan's (every other tensor, vision tower and projector
included, is bit-identical), the output loads with plain transformers without missing or
unexpected keys, and the fold equals the runtime hook within 1e-5 in float32 while clearly
changing the model."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from vlmguard_edit import tiny
from vlmguard_edit.checkpoint import open_checkpoint
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.direction import Direction
from vlmguard_edit.errors import PlanError
from vlmguard_edit.recipes import Recipe
from vlmguard_edit.runtime import WriterHooks

# Families whose two layouts differ get both; Idefics3 / SmolVLM have one.
ONE_LAYOUT = ("idefics3", "smolvlm", "llama4")  # Llama 4: legacy names = module names
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
}


# Norms between the writers and the residual add (randomised gains, see tiny.build_family).
POST_NORM = {"gemma3": ("post_attention_layernorm", "post_feedforward_layernorm")}


class PostNormHooks:
    """Reference for post-norm families, written apart from vlmguard_edit: project each
    writer's output off the span of g ⊙ v_i (g = 1 + w, Gemma's gain), via an SVD basis."""

    def __init__(self, model, vectors, beta):
        assert beta == -1.0
        self.handles = []
        self.model, self.vectors = model, vectors

    def __enter__(self):
        layers = self.model.model.language_model.layers
        for index, v in self.vectors.items():
            layer = layers[index]
            pairs = (
                (layer.self_attn.o_proj, layer.post_attention_layernorm),
                (layer.mlp.down_proj, layer.post_feedforward_layernorm),
            )
            for writer, norm in pairs:
                weighted = (1.0 + norm.weight.detach().double())[None, :] * v.double()
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
    for index, layer in enumerate(model.model.language_model.layers):
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


def tensors(folder):
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                out[key] = handle.get_tensor(key)
    return out


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
    assert len(planned) == (5 if family == "llama4" else 4)
    if family == "llama4":
        kinds = {(e.layer, e.kind, e.axis) for e in result.plan.edits if "feed_forward" in e.key}
        assert kinds == {(0, "map", 0), (1, "experts", 2), (1, "map", 0)}
    if family == "qwen3_vl_moe":  # layer 0 is MoE, layer 1 dense; orientation from shapes
        experts = [e for e in result.plan.edits if e.kind == "experts"]
        assert [e.layer for e in experts] == [0]
        assert experts[0].axis == (2 if layout == "hub" else 1)
    before, after = tensors(source), tensors(guarded)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == planned
    if family in CLASHES:  # the look-alike tensors exist and were left alone
        assert any(CLASHES[family] in k for k in before)
        assert not any(CLASHES[family] in k for k in changed)

    model, info = AutoModelForImageTextToText.from_pretrained(guarded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = AutoModelForImageTextToText.from_pretrained(source).eval()
    ids = torch.tensor([[1, 10, 11, 12, 13, 14]])
    reference = PostNormHooks if family in POST_NORM else WriterHooks
    with torch.no_grad():
        folded = model.eval()(input_ids=ids).logits
        plain = original(input_ids=ids).logits
        with reference(original, vectors, beta):
            hooked = original(input_ids=ids).logits
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - plain).abs().max() > 1e-3  # the edit did something
    if family in POST_NORM:  # what reaches the residual stream has no component along V
        reaching = norm_outputs(model, ids, POST_NORM[family])
        for (layer, _), out in reaching.items():
            along = (out @ vectors[layer].T).abs().max()
            assert along < 1e-4 * out.abs().max(), (layer, float(along))
        untouched = norm_outputs(original, ids, POST_NORM[family])
        assert max((o @ vectors[k[0]].T).abs().max() for k, o in untouched.items()) > 1e-2


def test_projector_shift_refused_without_a_projector_bias(tmp_path):
    source = tiny.build_family(tmp_path / "m", "mistral3")
    with pytest.raises(Exception, match="projector"):
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
    assert "layers 0..1 (2 layers): self_attn.o_proj, mlp.down_proj" in shown.output
    assert "2 o_proj/down_proj tensors outside the language model" in shown.output
    assert "projector-shift no" in shown.output
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "glm4v", "text_config": {}}))
    save_file({"x": torch.zeros(1)}, gemma / "model.safetensors")
    refused = CliRunner().invoke(main, ["inspect", str(gemma)])
    assert refused.exit_code == 0, refused.output
    assert "NOT SUPPORTED: model type 'glm4v' is not supported: post-projection norms" in (
        refused.output
    )


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
