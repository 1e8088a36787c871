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
from vlmguard_edit.recipes import Recipe
from vlmguard_edit.runtime import WriterHooks

# Families whose two layouts differ get both; Idefics3 / SmolVLM have one.
CASES = [
    (family, layout)
    for family in tiny.FAMILY_CONFIGS
    for layout in (("legacy",) if family in ("idefics3", "smolvlm") else ("legacy", "memory"))
]
# A name clash the layout must keep out: vision towers with writer-like names.
CLASHES = {"mistral3": "vision_tower.transformer.layers.0", "qwen2_5_vl": "visual.blocks.0.mlp"}


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
    result = convert(
        ConvertOptions(
            str(source),
            guarded,
            Recipe(layers=[0, 1], rank=2, beta=beta),
            direction_file=root / "d.safetensors",
            progress=False,
        )
    )
    planned = {edit.key for edit in result.plan.edits}
    assert len(planned) == 4  # o_proj and down_proj of both layers
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
    with torch.no_grad():
        folded = model.eval()(input_ids=ids).logits
        plain = original(input_ids=ids).logits
        with WriterHooks(original, vectors, beta):
            hooked = original(input_ids=ids).logits
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - plain).abs().max() > 1e-3  # the edit did something


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
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    save_file({"x": torch.zeros(1)}, gemma / "model.safetensors")
    refused = CliRunner().invoke(main, ["inspect", str(gemma)])
    assert refused.exit_code == 0, refused.output
    assert "NOT SUPPORTED: model type 'gemma3' is not supported: a norm sits" in refused.output
