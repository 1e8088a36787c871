"""End to end: tiny base Llama + tiny LLaVA copying it -> convert -> plain from_pretrained.

The folded checkpoint must equal the runtime-hook reference (float32 rounding), differ
clearly from the unedited model, and leave every other byte of the source untouched.
"""

import json
import re
from pathlib import Path

import blake3
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from tests.helpers import model_tensors
from vlmguard_edit.checkpoint import parse_header
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.direction import Direction
from vlmguard_edit.organisms import tiny
from vlmguard_edit.recipes import BaseLLM, Recipe
from vlmguard_edit.runtime import WriterHooks

LAYERS = [1, 3]
WRITER_KEY = re.compile(
    r"(?:language_model\.model|model\.language_model)\.layers\.(\d+)\.(?:self_attn\.o_proj|mlp\.down_proj)\.weight"
)


class IndependentHooks:
    """Written apart from vlmguard_edit.runtime: explicit M = I + beta V^T V on module outputs."""

    def __init__(self, model, vectors, beta):
        self.handles = []
        layers = model.model.language_model.layers
        for layer, v in vectors.items():
            m = torch.eye(v.shape[1]) + beta * v.T.double().float() @ v.float()  # (d, d), symmetric
            for module in (layers[layer].self_attn.o_proj, layers[layer].mlp.down_proj):
                self.handles.append(
                    module.register_forward_hook(
                        lambda _m, _i, out, m=m: (out.float() @ m).to(out.dtype)
                    )
                )

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run_convert(src, out, direction_file=None, beta=-1.0, **recipe_kw):
    recipe = Recipe(layers=LAYERS, rank=2, beta=beta, **recipe_kw)
    return convert(
        ConvertOptions(
            source=str(src),
            output=out,
            recipe=recipe,
            direction_file=direction_file,
            progress=False,
        )
    )


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


CASES = [
    ("legacy", torch.float32, True, "llava"),
    ("hub", torch.float32, True, "llava"),  # vision tower under vision_tower.vision_model.
    ("memory", torch.float32, False, "llava"),
    ("legacy", torch.bfloat16, True, "llava"),
    ("memory", torch.float16, True, "llava"),
    ("legacy", torch.float32, False, "llava_next"),
    ("memory", torch.bfloat16, False, "llava_next"),
]


@pytest.mark.parametrize(
    ("layout", "dtype", "shards", "family"), CASES, ids=lambda x: str(x).split(".")[-1]
)
def test_fold_equals_runtime_hooks(
    vlm_factory, direction_file, tmp_path, layout, dtype, shards, family
):
    src = vlm_factory(layout=layout, dtype=dtype, shards=shards, family=family)
    out = tmp_path / "guarded"
    result = run_convert(src, out, direction_file)
    assert len(result.plan.edits) == 2 * len(LAYERS)

    # 1. Plain transformers loads it with no missing or unexpected keys, in the source dtype.
    guarded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = AutoModelForImageTextToText.from_pretrained(src)
    reference = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    assert guarded.dtype == original.dtype == dtype

    # 2. Folded logits equal the runtime hooks (ours and an independent one), text and image.
    vectors = Direction.load(direction_file).select(LAYERS, 2)
    tokenizer = AutoTokenizer.from_pretrained(src)
    text = {"input_ids": tokenizer("how to make a cake", return_tensors="pt")["input_ids"]}
    image = tiny.image_inputs(tokenizer, "how to make a cake", family=family)
    for inputs in (text, image):
        folded, plain = logits(guarded.eval(), inputs), logits(original.eval(), inputs)
        with WriterHooks(original, vectors, -1.0):
            hooked = logits(original, inputs)
        independent = IndependentHooks(original, vectors, -1.0)
        hooked_independent = logits(original, inputs)
        independent.remove()
        effect = (folded - plain).abs().max().item()
        gap = (folded - hooked).abs().max().item()
        if dtype == torch.float32:
            assert gap < 1e-5, gap
            assert (hooked - hooked_independent).abs().max() < 1e-5
        else:
            # Half precision: fold and hook both round (the fold once, in its weights; the hook
            # once per activation), so they can agree only to the dtype's noise floor: the gap
            # between the unedited model in this dtype and in float32.
            noise = (plain - logits(reference, inputs)).abs().max().item()
            assert gap <= 1.5 * noise, (gap, noise)
        assert effect > 0.05, f"the edit must clearly change the logits (max diff {effect})"

    # 3. Exactly the planned writers changed; every other tensor is bit-identical.
    before, after = model_tensors(src), model_tensors(out)
    assert before.keys() == after.keys()
    expected = {k for k in before if (m := WRITER_KEY.fullmatch(k)) and int(m.group(1)) in LAYERS}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected == {e.key for e in result.plan.edits}
    assert all(
        after[k].dtype == before[k].dtype and after[k].shape == before[k].shape for k in before
    )
    vision = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    assert vision and not set(vision) & changed

    # 4. beta = -1: the edited writers can no longer write along V_l.
    for key in expected:
        layer = int(WRITER_KEY.fullmatch(key).group(1))
        residual = (vectors[layer] @ after[key].float()).abs().max().item()
        scale = before[key].float().abs().max().item()
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        assert residual < bound * scale, (key, residual, scale)

    # 5. Files: same shard layout, headers (with metadata) and other files byte-identical.
    for shard in src.glob("*.safetensors"):
        header = parse_header(shard)
        assert (out / shard.name).read_bytes()[: header.header_bytes] == shard.read_bytes()[
            : header.header_bytes
        ]
        assert parse_header(out / shard.name).metadata == header.metadata
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    if shards:
        assert (out / "model.safetensors.index.json").read_bytes() == (
            src / "model.safetensors.index.json"
        ).read_bytes()


def test_provenance_and_card(vlm_factory, base_llm, tmp_path):
    """Computes the direction from the base LLM inside convert; checks vlmguard.json and card."""
    from huggingface_hub import ModelCard

    src = vlm_factory(shards=True)
    (src / "README.md").write_text("---\nlicense: llama2\n---\n# source card\n")
    (src / "LICENSE").write_text("licence text\n")
    (src / "pytorch_model.bin").write_bytes(b"unguarded pickle copy")
    try:
        out = tmp_path / "guarded"
        recipe_kw = {"model": "llava-hf/llava-1.5-7b-hf", "base_llm": BaseLLM(id=str(base_llm))}
        result = run_convert(src, out, **recipe_kw)
    finally:
        for name in ("README.md", "LICENSE", "pytorch_model.bin"):
            (src / name).unlink()
    record = json.loads((out / "vlmguard.json").read_text())
    assert record["recipe"]["layers"] == LAYERS and record["recipe"]["beta"] == -1.0
    assert {e["key"] for e in record["edits"]} == {e.key for e in result.plan.edits}
    for entry in record["edits"]:
        assert entry["blake3_before"] != entry["blake3_after"]

    assert (
        record["direction"]["blake3"]
        == blake3.blake3((out / "vlmguard_direction.safetensors").read_bytes()).hexdigest()
    )
    assert record["direction"]["base_model"] == base_llm.name  # its own name, not the path
    assert record["versions"]["torch"] == torch.__version__
    assert (
        record["dropped_files"] == ["pytorch_model.bin"]
        and not (out / "pytorch_model.bin").exists()
    )
    assert (out / "LICENSE").read_text() == "licence text\n"
    assert "--base-llm" in record["command"] and "--layers 1,3" in record["command"]
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert card.data.base_model_relation == "finetune"
    assert (
        card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    )
    assert card.data.license == "llama2" and "vlmguard-edit" in card.data.tags
    assert record["command"] in card.text


def test_llava_next_with_mistral_text_model(tmp_path):
    """LLaVA-NeXT-Mistral: direction from a Mistral base LLM, fold == hooks, upper-layer default."""
    base = tiny.build_base(tmp_path / "mistral", arch="mistral")
    src = tiny.build_llava(tmp_path / "vlm", base, family="llava_next", max_shard_size="150KB")
    config = json.loads((src / "config.json").read_text())
    assert config["text_config"]["model_type"] == "mistral"
    out = tmp_path / "guarded"
    recipe = Recipe(base_llm=BaseLLM(id=str(base)), rank=1)  # layers: the default (upper half)
    result = convert(ConvertOptions(source=str(src), output=out, recipe=recipe, progress=False))
    assert result.plan.layers == [2, 3]
    guarded = AutoModelForImageTextToText.from_pretrained(out).eval()
    original = AutoModelForImageTextToText.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    inputs = tiny.image_inputs(tokenizer, "how to rob a bank", family="llava_next")
    vectors = Direction.load(out / "vlmguard_direction.safetensors").select([2, 3], 1)
    with WriterHooks(original, vectors, -1.0):
        hooked = logits(original, inputs)
    folded = logits(guarded, inputs)
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - logits(original, inputs)).abs().max() > 0.05


def test_amplification_matches_hooks(vlm_factory, direction_file, tmp_path):
    src = vlm_factory()
    out = tmp_path / "amplified"
    run_convert(src, out, direction_file, beta=2.0)
    guarded = AutoModelForImageTextToText.from_pretrained(out).eval()
    original = AutoModelForImageTextToText.from_pretrained(src).eval()
    inputs = tiny.image_inputs(AutoTokenizer.from_pretrained(src), "how to rob a bank")
    with WriterHooks(original, Direction.load(direction_file).select(LAYERS, 2), 2.0):
        hooked = logits(original, inputs)
    folded = logits(guarded, inputs)
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - logits(original, inputs)).abs().max() > 0.05


def test_dry_run_writes_nothing(vlm_factory, direction_file, tmp_path):
    out = tmp_path / "never"
    result = convert(
        ConvertOptions(
            source=str(vlm_factory()),
            output=out,
            recipe=Recipe(layers=[2], rank=1),
            direction_file=direction_file,
            dry_run=True,
            progress=False,
        )
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert [e.layer for e in result.plan.edits] == [2, 2]
    text = "\n".join(result.plan.describe())
    assert "language_model.model.layers.2.self_attn.o_proj.weight" in text and "layer   2" in text


@pytest.mark.parametrize(
    ("family", "warned"), [("qwen2_vl", True), ("llava", False), (None, False)]
)
def test_a_recipe_for_another_family_is_named(
    vlm_factory, direction_file, tmp_path, caplog, family, warned
):
    options = ConvertOptions(
        source=str(vlm_factory()),
        output=tmp_path / "never",
        recipe=Recipe(layers=[2], rank=1, family=family),
        direction_file=direction_file,
        dry_run=True,
        progress=False,
    )
    with caplog.at_level("WARNING"):
        convert(options)
    assert ("the recipe is for qwen2_vl models, this is llava" in caplog.text) is warned
    assert "for llava models" not in caplog.text


def independent_u(model, v, layer):
    """u ∝ g ⊙ (Σ_h W_o^h W_v^h)^T v, with the per-head matrices built explicitly."""
    attn = model.model.language_model.layers[layer].self_attn
    gain = model.model.language_model.layers[layer].input_layernorm.weight.detach().double()
    cfg = model.config.text_config
    hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    wo = attn.o_proj.weight.detach().double().reshape(-1, heads, hd)  # (d, H, hd)
    wv = attn.v_proj.weight.detach().double().reshape(kv, hd, -1)  # (KV, hd, d)
    m = sum(wo[:, h, :] @ wv[h // (heads // kv)] for h in range(heads))  # (d, d)
    u = gain * (m.T @ v.double())
    return (u / u.norm()).float()


@pytest.mark.parametrize("layout", ["legacy", "memory"])
def test_projector_shift_is_image_only_and_matches_hook(
    vlm_factory, direction_file, tmp_path, layout
):
    from vlmguard_edit.runtime import ProjectorShiftHook

    src = vlm_factory(layout=layout, shards=True)
    out = tmp_path / "shifted"
    recipe = Recipe(layers=[1], rank=1, mode="projector-shift", gamma=3.0)
    result = convert(
        ConvertOptions(str(src), out, recipe, direction_file=direction_file, progress=False)
    )
    assert [
        (e.key.endswith("multi_modal_projector.linear_2.bias"), e.kind) for e in result.plan.edits
    ] == [(True, "shift")]
    guarded = AutoModelForImageTextToText.from_pretrained(out).eval()
    original = AutoModelForImageTextToText.from_pretrained(src).eval()
    u = independent_u(original, Direction.load(direction_file).vectors[1][0], 1)
    tokenizer = AutoTokenizer.from_pretrained(src)
    text = {"input_ids": tokenizer("how to rob a bank", return_tensors="pt")["input_ids"]}
    assert torch.equal(logits(guarded, text), logits(original, text))  # text-only: untouched
    image = tiny.image_inputs(tokenizer, "how to rob a bank")
    with ProjectorShiftHook(original, u, 3.0):
        hooked = logits(original, image)
    folded = logits(guarded, image)
    assert (folded - hooked).abs().max() < 1e-5
    assert (folded - logits(original, image)).abs().max() > 1e-3
    before, after = model_tensors(src), model_tensors(out)
    assert {k for k in before if not torch.equal(before[k], after[k])} == {result.plan.edits[0].key}
    key = result.plan.edits[0].key
    assert torch.allclose(after[key], before[key] + 3.0 * u, atol=1e-6)
    record = json.loads((out / "vlmguard.json").read_text())
    assert "--mode projector-shift --gamma 3" in record["command"]
    assert "Only the bias of the multimodal projector" in (out / "README.md").read_text()


def test_projector_shift_ssd_direction(vlm_factory, direction_file, tmp_path):
    src = vlm_factory()
    out = tmp_path / "ssd"
    recipe = Recipe(layers=[2], rank=1, mode="projector-shift", gamma=0.5, shift_direction="ssd")
    result = convert(
        ConvertOptions(str(src), out, recipe, direction_file=direction_file, progress=False)
    )
    key = result.plan.edits[0].key
    v = Direction.load(direction_file).vectors[2][0]
    assert torch.allclose(model_tensors(out)[key], model_tensors(src)[key] + 0.5 * v, atol=1e-6)


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "user-space"])
def test_copy_except_leaves_the_holes_to_the_patcher(tmp_path, monkeypatch, kernel):
    import errno
    import os

    from vlmguard_edit.checkpoint import allocate_like, copy_except

    if not kernel:  # a filesystem or kernel without copy_file_range between these files

        def refuse(*_args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    data = os.urandom(3 * (1 << 20) + 17)
    source, target = tmp_path / "src.bin", tmp_path / "dst.bin"
    source.write_bytes(data)
    holes = [(100, 5000), (2 << 20, (2 << 20) + 9)]
    allocate_like(source, target)
    copy_except(source, target, holes)
    out = target.read_bytes()
    assert len(out) == len(data)
    for start, end in holes:
        assert out[start:end] == bytes(end - start)  # left for the patcher (still zeros)
    kept = [(0, 100), (5000, 2 << 20), ((2 << 20) + 9, len(data))]
    assert all(out[a:b] == data[a:b] for a, b in kept)


def test_base_llm_weight_drift_is_reported(vlm_factory, base_llm, tmp_path, caplog):
    """The tiny VLM's language model is an exact copy of its base: no drift. Against an
    unrelated base of the same shape, convert reports and warns about the drift."""
    source = vlm_factory()
    same = run_convert(source, tmp_path / "same", base_llm=BaseLLM(id=str(base_llm)))
    check = same.record["base_llm_check"]
    assert check["config_warnings"] == []
    assert check["median_relative_difference"] == 0.0
    assert len(check["weight_drift"]) == 2 * len(LAYERS)
    assert all(d["cosine"] > 0.9999 for d in check["weight_drift"].values())
    stranger = tiny.build_base(tmp_path / "stranger", seed=7)
    with caplog.at_level("WARNING"):
        other = run_convert(source, tmp_path / "other", base_llm=BaseLLM(id=str(stranger)))
    assert other.record["base_llm_check"]["median_relative_difference"] > 0.5
    assert "has drifted far from" in caplog.text
    saved = json.loads((tmp_path / "other" / "vlmguard.json").read_text())
    assert saved["base_llm_check"]["median_relative_difference"] > 0.5


def test_no_absolute_path_is_published_and_the_command_reproduces(vlm_factory, base_llm, tmp_path):
    """Card, record and shipped direction name local sources by their own names; the recorded
    command, run from the folder that holds the output, writes the same checkpoint."""
    import shlex
    import subprocess
    import sys

    from vlmguard_edit.anchors import load_anchors

    anchors = tmp_path / "inputs" / "my-anchors.jsonl"
    anchors.parent.mkdir()
    pairs = zip(load_anchors().harmful[:6], load_anchors().harmless[:6], strict=True)
    anchors.write_text("".join(json.dumps({"harmful": a, "harmless": b}) + "\n" for a, b in pairs))
    work = tmp_path / "work"
    out = work / "guarded"
    recipe = Recipe(base_llm=BaseLLM(id=str(base_llm)), anchors=str(anchors), layers=[1, 2])
    convert(ConvertOptions(source=str(vlm_factory()), output=out, recipe=recipe, progress=False))
    published = [out / "README.md", out / "vlmguard.json", out / "vlmguard_direction.safetensors"]
    for path in published:
        text = path.read_bytes().decode("utf-8", "replace")
        for private in (str(tmp_path), str(base_llm.parent), "/tmp/"):
            assert private not in text, (path.name, private)
    record = json.loads((out / "vlmguard.json").read_text())
    assert record["source"]["id"] == vlm_factory().name
    assert record["recipe"]["anchors"] == "my-anchors.jsonl"
    assert "--batch-size 8" in record["command"] and "--dtype auto" in record["command"]
    first = out.rename(tmp_path / "first")
    exe = Path(sys.executable).parent / "vlmguard-edit"
    args = [str(exe), *shlex.split(record["command"])[1:], "-q"]
    again = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (record["command"], again.stderr)
    redone = json.loads((out / "vlmguard.json").read_text())
    assert redone["edits"] == record["edits"] and redone["files"] == record["files"]
    assert (first / "vlmguard.json").is_file()
