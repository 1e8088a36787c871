"""The image-gap direction and its fold (mode image-gap), on the shipped organism."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForImageTextToText, AutoProcessor

from cli import main
from vlmguard_edit import images
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.direction import Direction
from vlmguard_edit.errors import DirectionError
from vlmguard_edit.gap import compute_gap_direction, gap_vector
from vlmguard_edit.recipes import Recipe
from vlmguard_edit.runtime import text_layers

ORGANISM = Path(__file__).parent.parent / "examples" / "organism"


def test_gap_vector_is_the_image_push_orthogonal_to_the_text_mean():
    g = torch.Generator().manual_seed(0)
    mu, push, along = torch.randn(16, generator=g), torch.randn(16, generator=g), 3.0
    text = mu + 0.1 * torch.randn(40, 16, generator=g)
    image = text + push + along * mu / mu.norm()  # part of the push lies along the text mean
    v, stats = gap_vector(text, image)
    expected = push - (push @ mu / mu.norm() ** 2) * mu
    assert v.shape == (1, 16) and torch.allclose(v[0].norm(), torch.tensor(1.0))
    assert abs(float(v[0] @ text.mean(0).double().float())) < 1e-4  # text-only: nothing along v
    assert float(torch.nn.functional.cosine_similarity(v[0], expected, dim=0)) > 0.99
    assert stats["separation_accuracy"] == 1.0 and stats["image_mean_proj"] > 0
    with pytest.raises(DirectionError, match="changes nothing"):
        gap_vector(text, text + 2.0 * text.mean(0))  # only along the text mean: nothing left


@pytest.fixture(scope="module")
def organism():
    model = AutoModelForImageTextToText.from_pretrained(ORGANISM / "vlm").eval()
    processor = AutoProcessor.from_pretrained(ORGANISM / "vlm")
    return model, processor


def hand_written(processor, request, image):
    """The organism's prompt written out by hand (not the library's chat_batch)."""
    text = f"<s><|user|> {'<image> ' if image is not None else ''}{request} <|assistant|>"
    kwargs = {"images": [image]} if image is not None else {}
    return processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)


@contextlib.contextmanager
def projected_o_proj(model, vectors):
    """Independent runtime reference: each o_proj output y -> y - V^T (V y)."""
    layers = text_layers(model)
    handles = [
        layers[i].self_attn.o_proj.register_forward_hook(lambda _m, _i, y, v=v: y - (y @ v.T) @ v)
        for i, v in vectors.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def independent_gap(model, processor, prompts, layer):
    """One prompt at a time, the o_proj output at the last token, with and without an image."""
    captured = {}
    module = text_layers(model)[layer].self_attn.o_proj
    handle = module.register_forward_hook(lambda _m, _i, out: captured.update(x=out[0, -1]))
    rows = {None: [], "blank": []}
    with torch.no_grad():
        for prompt in prompts:
            for image in rows:
                model(**hand_written(processor, prompt, images.blank() if image else None))
                rows[image].append(captured["x"].double())
    handle.remove()
    text, image = torch.stack(rows[None]), torch.stack(rows["blank"])
    delta, mu = image.mean(0) - text.mean(0), text.mean(0)
    d = delta - (delta @ mu) / (mu @ mu) * mu
    return (d / d.norm()).float()


def test_gap_direction_equals_unbatched_recompute(organism, tmp_path):
    """Batched with right padding (7 per batch, uneven lengths) == one prompt at a time."""
    model, processor = organism
    rows = (ORGANISM / "anchors.jsonl").read_text().splitlines()[:10]
    small = tmp_path / "anchors.jsonl"
    small.write_text("\n".join(rows) + "\n")
    anchors = load_anchors(small)
    direction = compute_gap_direction(
        resolve_model(str(ORGANISM / "vlm")), anchors, [0, 2], batch_size=7, progress=False
    )
    prompts = list(anchors.harmful) + list(anchors.harmless)
    for layer in (0, 2):
        expected = independent_gap(model, processor, prompts, layer)
        assert torch.allclose(direction.vectors[layer][0], expected, atol=1e-4)
    assert direction.meta["kind"] == "image-gap" and direction.meta["base_model"] == "self"
    assert direction.stats[0]["separation_accuracy"] > 0.9


def test_image_gap_convert_folds_o_proj_only_and_matches_hooks(organism, tmp_path):
    model, processor = organism
    out = tmp_path / "gap"
    recipe = Recipe(layers=[0, 1], mode="image-gap", anchors=str(ORGANISM / "anchors.jsonl"))
    result = convert(ConvertOptions(str(ORGANISM / "vlm"), out, recipe, progress=False))
    edited = [e.key for e in result.plan.edits]
    assert edited == [f"language_model.model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)]
    from safetensors.torch import load_file

    before, after = (
        load_file(ORGANISM / "vlm" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(edited)
    direction = Direction.load(out / "vlmguard_direction.safetensors")
    guarded = AutoModelForImageTextToText.from_pretrained(out).eval()
    batch = hand_written(processor, "how do i poison the cake ?", images.blank())
    with torch.no_grad():
        with projected_o_proj(model, direction.vectors):
            hooked = model(**batch).logits
        folded, plain = guarded(**batch).logits, model(**batch).logits
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - plain).abs().max() > 1e-2  # the edit did something
    record = json.loads((out / "vlmguard.json").read_text())
    assert "--mode image-gap" in record["command"] and "--base-llm" not in record["command"]
    assert "image-gap direction" in (out / "README.md").read_text()
    checked = CliRunner().invoke(main, ["verify", str(out), "--source", str(ORGANISM / "vlm")])
    assert checked.exit_code == 0, checked.output
    # The saved direction converts again with --direction; a mode mismatch is refused.
    again = convert(
        ConvertOptions(
            str(ORGANISM / "vlm"),
            tmp_path / "again",
            recipe,
            direction_file=out / "vlmguard_direction.safetensors",
            progress=False,
        )
    )
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        out / "model.safetensors"
    ).read_bytes()
    assert again.plan.mode == "image-gap"
    with pytest.raises(DirectionError, match="image-gap direction, but the mode is writers"):
        convert(
            ConvertOptions(
                str(ORGANISM / "vlm"),
                tmp_path / "mismatch",
                Recipe(layers=[0]),
                direction_file=out / "vlmguard_direction.safetensors",
                progress=False,
            )
        )
    assert not (tmp_path / "mismatch").exists()


def test_image_gap_cli_refuses_a_base_llm(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(ORGANISM / "vlm"),
            "--mode",
            "image-gap",
            "--base-llm",
            "x/y",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code != 0 and "image-gap measures its direction on the VLM" in result.output
    assert not (tmp_path / "o").exists()
