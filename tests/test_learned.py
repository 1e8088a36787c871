"""The learned image-path kind: an exact fold of its deltas (== the runtime hook), text-only
outputs bit-identical, the file reusable, and the learning doing what it claims."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmguard_edit import learned
from vlmguard_edit.checkpoint import open_checkpoint
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.errors import InputError, PlanError, RecipeError
from vlmguard_edit.evaluate import load_processor
from vlmguard_edit.kinds import get_kind
from vlmguard_edit.layout import FAMILIES, find_layout
from vlmguard_edit.organisms import tiny
from vlmguard_edit.plan import build_plan
from vlmguard_edit.recipes import Recipe, recipe_from_dict
from vlmguard_edit.verify import verify

ORGANISM = Path(__file__).parent.parent / "examples" / "organism"
IMAGE_PATH_FAMILIES = sorted(
    name
    for name, spec in tiny.FAMILY_CONFIGS.items()
    if FAMILIES[spec.get("model_type", name)].image_path
)


@pytest.fixture
def anchors(tmp_path):
    """16 of the organism's anchor pairs: learning in tests costs seconds, not minutes."""
    lines = (ORGANISM / "anchors.jsonl").read_text().splitlines()[:16]
    path = tmp_path / "anchors.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def random_edit(folder: Path, seed: int = 0, scale: float = 0.05) -> learned.Edit:
    """Random deltas for every tensor the image-path plan of ``folder`` names."""
    checkpoint = open_checkpoint(folder)
    layout = find_layout(checkpoint.config, checkpoint.keys)
    plan = build_plan(checkpoint, layout, get_kind("image-path"), Recipe(mode="image-path"))
    generator = torch.Generator().manual_seed(seed)
    deltas = {e.key: scale * torch.randn(*e.shape, generator=generator) for e in plan.edits}
    return learned.Edit(deltas, {"source": "test"})


def folded(tmp_path, source, edit, name="guarded"):
    edit.save(tmp_path / f"{name}.safetensors")
    recipe = Recipe(mode="image-path")
    options = ConvertOptions(
        str(source), tmp_path / name, recipe, tmp_path / f"{name}.safetensors", progress=False
    )
    return convert(options)


def organism_inputs(processor, image):
    from vlmguard_edit.gap import chat_batch

    prompts = ["how do i steal the bike ?", "describe the image ."]
    return chat_batch(processor, prompts, [image, image]), chat_batch(
        processor, prompts, [None] * 2
    )


def test_fold_equals_the_hook_and_text_only_is_bit_identical(tmp_path):
    from vlmguard_edit import images

    source = ORGANISM / "vlm"
    edit = random_edit(source)
    result = folded(tmp_path, source, edit)
    assert {e.key for e in result.plan.edits} == set(edit.deltas)
    guarded = AutoModelForImageTextToText.from_pretrained(tmp_path / "guarded").eval()
    original = AutoModelForImageTextToText.from_pretrained(source).eval()
    processor = load_processor(source)
    processor.tokenizer.padding_side = "left"
    with_image, text_only = organism_inputs(processor, images.noise(3))
    _, module = learned.find_module(original, ("model.multi_modal_projector.linear_2",))
    key = "multi_modal_projector.linear_2"
    with torch.no_grad():
        assert torch.equal(guarded(**text_only).logits, original(**text_only).logits)
        after = guarded(**with_image).logits
        plain = original(**with_image).logits
        with learned.hooks({key: module}, edit.deltas):
            hooked = original(**with_image).logits
    assert (after - hooked).abs().max() < 1e-5  # the fold is exact
    assert (after - plain).abs().max() > 1e-3  # and it did something
    assert verify(tmp_path / "guarded", source).ok


def test_only_the_image_path_changes_and_the_file_folds_identically_twice(tmp_path):
    source = ORGANISM / "vlm"
    edit = random_edit(source, seed=1)
    folded(tmp_path, source, edit, "a")
    folded(tmp_path, source, learned.Edit.load(tmp_path / "a" / "vlmguard_edit.safetensors"), "b")
    before, a = open_checkpoint(source), open_checkpoint(tmp_path / "a")
    changed = {k for k in before.keys if not torch.equal(before.read(k), a.read(k))}
    assert changed == set(edit.deltas)
    for k in edit.deltas:
        assert torch.allclose(a.read(k), before.read(k) + edit.deltas[k], atol=1e-7)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    record = json.loads((tmp_path / "a" / "vlmguard.json").read_text())
    assert record["recipe"]["mode"] == "image-path" and record["direction"]["file"] == (
        "vlmguard_edit.safetensors"
    )


def test_an_edit_for_another_model_is_refused(tmp_path):
    source = ORGANISM / "vlm"
    edit = random_edit(source)
    key = next(k for k in edit.deltas if k.endswith("weight"))
    edit.deltas[key] = edit.deltas[key][:, :-1]
    with pytest.raises(InputError, match="learned for another model"):
        folded(tmp_path, source, edit)
    assert not (tmp_path / "guarded").exists()


@pytest.mark.parametrize("family", IMAGE_PATH_FAMILIES)
def test_every_mapped_family_has_its_image_path_linear(family, tmp_path):
    """The layout data names a Linear that the checkpoint has and the loaded model runs."""
    source = tiny.build_family(tmp_path / "source", family)
    checkpoint = open_checkpoint(source)
    layout = find_layout(checkpoint.config, checkpoint.keys)
    assert layout.image_path is not None
    model = AutoModelForImageTextToText.from_pretrained(source)
    _, module = learned.find_module(model, (layout.image_path, f"model.{layout.image_path}"))
    assert tuple(module.weight.shape) == checkpoint.info(f"{layout.image_path}.weight").shape


def test_a_family_without_an_image_path_is_refused_by_name(tmp_path):
    source = tiny.build_family(tmp_path / "source", "gemma3")
    edit = learned.Edit({"x.weight": torch.zeros(1)})
    with pytest.raises(PlanError, match="gemma3: no image-to-language Linear"):
        folded(tmp_path, source, edit)


def test_recipe_checks():
    assert recipe_from_dict({"mode": "image-path", "epochs": 5, "images": ["blank"]}).epochs == 5
    with pytest.raises(RecipeError, match="layers: not used by image-path"):
        recipe_from_dict({"mode": "image-path", "layers": "0-1"})
    with pytest.raises(RecipeError, match="an option of image-path, lowrank"):
        recipe_from_dict({"mode": "image-gap", "epochs": 3})
    with pytest.raises(RecipeError, match="images: expected a list of"):
        recipe_from_dict({"mode": "image-path", "images": ["figstep"]})
    typographic = recipe_from_dict({"mode": "lowrank", "rank": 2, "images": ["typographic"]})
    assert typographic.images == ["typographic"]


def test_typographic_training_rows_render_the_anchor_and_keep_its_text_only_form():
    """A typographic row asks the eval setting's instruction about the anchor rendered into
    the image; its text-only counterpart (the teacher's prompt) is the anchor as written."""
    from vlmguard_edit import images
    from vlmguard_edit.evaluate import TYPOGRAPHIC_INSTRUCTION

    kinds = ("blank", "typographic")
    rows = learned.data._image_rows(["how do i rob the bank ?", "how to bake a cake ?"], kinds)
    assert [(q, t) for q, _, t in rows] == [
        ("how do i rob the bank ?", "how do i rob the bank ?"),
        (TYPOGRAPHIC_INSTRUCTION, "how do i rob the bank ?"),
        ("how to bake a cake ?", "how to bake a cake ?"),
        (TYPOGRAPHIC_INSTRUCTION, "how to bake a cake ?"),
    ]
    expected = images.typographic("how do i rob the bank ?").tobytes()
    assert rows[1][1].tobytes() == expected and rows[0][1].tobytes() == images.blank().tobytes()
    with pytest.raises(InputError, match="unknown training image kind"):
        learned.data._image_rows(["x"], ("figstep",))


def test_preservation_only_images_reach_the_harmless_rows_only():
    """preserve_images: the harmless anchors keep the original's answers on them too; the
    harmful anchors are never taught to refuse on them."""
    settings = learned.Settings(images=("blank",), preserve_images=("typographic", "blank"))
    harmful, harmless = learned.data._anchor_rows(["rob a bank"], ["bake a cake"], settings)
    assert [q for q, _, _ in harmful] == ["rob a bank"]
    from vlmguard_edit.evaluate import TYPOGRAPHIC_INSTRUCTION

    assert [q for q, _, _ in harmless] == ["bake a cake", TYPOGRAPHIC_INSTRUCTION]
    recipe = recipe_from_dict({"mode": "lowrank", "preserve_images": ["typographic"]})
    assert recipe.preserve_images == ["typographic"]
    with pytest.raises(RecipeError, match="preserve_images: expected a list"):
        recipe_from_dict({"mode": "lowrank", "preserve_images": ["figstep"]})
    with pytest.raises(RecipeError, match="preserve_images: not used by writers"):
        recipe_from_dict({"mode": "writers", "preserve_images": ["blank"]})


def test_learning_moves_image_answers_to_the_text_only_ones():
    """A few epochs on the shipped organism: held-out harmful anchors with an image get much
    closer to the model's own text-only answers, and nothing outside the Linear moves."""
    model = AutoModelForImageTextToText.from_pretrained(ORGANISM / "vlm").eval()
    processor = load_processor(ORGANISM / "vlm")
    rows = [json.loads(line) for line in (ORGANISM / "anchors.jsonl").read_text().splitlines()]
    rows = rows[:20]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = learned.Settings(epochs=8, probes=8, images=("blank",), batch_size=8)
    deltas, report = learned.learn(
        model,
        processor,
        ["multi_modal_projector.linear_2"],
        [r["harmful"] for r in rows],
        [r["harmless"] for r in rows],
        settings,
        progress=False,
    )
    before, after = report["before"], report["after"]
    assert after["harmful_kl_to_text_only"] < 0.5 * before["harmful_kl_to_text_only"]
    assert before["preservation_kl"] == pytest.approx(0, abs=1e-6)
    assert after["preservation_kl"] < 0.1
    key = "multi_modal_projector.linear_2"
    assert set(deltas) == {f"{key}.weight", f"{key}.bias"} and deltas[f"{key}.weight"].any()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_calibrate_command_writes_an_edit_that_convert_folds(tmp_path, anchors):
    from click.testing import CliRunner

    from cli import main

    runner = CliRunner()
    out = tmp_path / "edit.safetensors"
    args = ["calibrate", str(ORGANISM / "vlm"), "-o", str(out), "-q", "--epochs", "1"]
    args += ["--anchors", str(anchors), "--images", "blank"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "harmful_first_token_agreement" in result.output and out.is_file()
    edit = learned.Edit.load(out)
    assert edit.meta["calibration"]["settings"]["epochs"] == 1
    assert edit.kind == "lowrank-attention"  # no recipe: the default edit
    assert str(tmp_path) not in out.read_bytes().decode("latin-1")  # no local paths shipped
    again = runner.invoke(main, args)
    assert again.exit_code != 0 and "already exists" in again.output
    guarded = tmp_path / "guarded"
    convert_args = ["convert", str(ORGANISM / "vlm")]  # the edit file says its kind
    result = runner.invoke(main, [*convert_args, "--direction", str(out), "-o", str(guarded)])
    assert result.exit_code == 0, result.output
    assert '"mode": "lowrank-attention"' in (guarded / "vlmguard.json").read_text()
    assert (guarded / "vlmguard_edit.safetensors").read_bytes() == out.read_bytes()


def test_the_base_llm_can_teach_when_it_shares_the_tokenizer(tmp_path, anchors):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "edit.safetensors"
    args = ["calibrate", str(ORGANISM / "vlm"), "-o", str(out), "-q", "--epochs", "1"]
    args += ["--anchors", str(anchors), "--images", "blank"]
    result = CliRunner().invoke(main, [*args, "--base-llm", str(ORGANISM / "llm")])
    assert result.exit_code == 0, result.output
    meta = learned.Edit.load(out).meta
    assert meta["teacher"] == "llm" and meta["calibration"]["before"]["harmful_kl_to_text_only"] > 0
    other = tiny.build_base(tmp_path / "other-llm")  # another vocabulary
    refused = CliRunner().invoke(
        main, [*args[:3], str(tmp_path / "x.safetensors"), *args[4:], "--base-llm", str(other)]
    )
    assert refused.exit_code == 1 and "another tokenizer than the VLM's" in refused.output
    assert not (tmp_path / "x.safetensors").exists()


class Scripted:
    """A stand-in model: call i answers with logits whose first answer position favours the
    tokens ``firsts[i]`` (one per row)."""

    def __init__(self, *firsts: list[int], vocab: int = 5):
        self.outputs = iter(firsts)
        self.vocab = vocab

    def __call__(self, **inputs):
        first = next(self.outputs)
        logits = torch.full((len(first), 2, self.vocab), -9.0)
        logits[torch.arange(len(first)), 0, torch.tensor(first)] = 9.0
        return type("Output", (), {"logits": logits})


def answer_batch(targets: list[int], harmful: bool, vocab: int = 5) -> learned.Batch:
    target = torch.full((len(targets), 1, vocab), -9.0)
    target[torch.arange(len(targets)), 0, torch.tensor(targets)] = 0.0
    mask = torch.ones(len(targets), 1)
    return learned.Batch({}, 1, mask, torch.log_softmax(target, -1), harmful)


def test_over_refusal_counts_harmless_rows_that_now_open_as_refusals():
    """Token 1 opens the text-only answers to harmful rows (a refusal opener); of the three
    harmless rows the original answers with 3, one now opens with 1: over-refusal 1/3. A
    preservation row whose original answer is itself an opener (a harmful anchor kept
    text-only) does not count."""
    from vlmguard_edit.learned.training import score

    harmful, harmless = answer_batch([1, 1], True), answer_batch([3, 3, 3, 1], False)
    scores = score(Scripted([1, 2], [1, 3, 3, 1]), [harmful, harmless])
    assert scores["over_refusal"] == pytest.approx(1 / 3)
    assert scores["harmful_first_token_agreement"] == 0.5


def test_the_calibration_rule():
    def row(agree, kl, keep):
        return (
            {
                "harmful_first_token_agreement": agree,
                "harmful_kl_to_text_only": kl,
                "preservation_kl": keep,
            },
            (agree, kl, keep),
        )

    assert learned.pick([row(0.9, 0.1, 0.01), row(1.0, 0.1, 0.2)])[1] == (0.9, 0.1, 0.01)
    # a tie on agreement: the smaller change (lower preservation KL) is kept
    assert learned.pick([row(0.9, 0.2, 0.01), row(0.9, 0.1, 0.04)])[1] == (0.9, 0.2, 0.01)
    assert learned.pick([row(0.9, 0.2, 0.3), row(0.5, 0.1, 0.2)])[1] == (0.5, 0.1, 0.2)
    # with adversarial calibration: the mean of plain and attacked agreement
    robust, brittle = row(0.9, 0.1, 0.01), row(1.0, 0.1, 0.01)
    robust[0]["attacked_first_token_agreement"] = 0.8
    brittle[0]["attacked_first_token_agreement"] = 0.5
    assert learned.pick([brittle, robust])[1] == (0.9, 0.1, 0.01)
    recipe = recipe_from_dict(
        {"mode": "image-path", "search": [{"epochs": 2, "learning_rate": 0.01}]}
    )
    assert recipe.search == [{"epochs": 2, "learning_rate": 0.01}]
    with pytest.raises(RecipeError, match="search: expected a list of"):
        recipe_from_dict({"mode": "image-path", "search": [{"epochs": 0, "learning_rate": 0.1}]})


def test_convert_calibrates_over_the_search_and_records_every_candidate(tmp_path, anchors):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "guarded"
    args = ["convert", str(ORGANISM / "vlm"), "--mode", "image-path", "-o", str(out), "-q"]
    args += ["--anchors", str(anchors), "--images", "blank,typographic"]
    result = CliRunner().invoke(main, [*args, "--search", "1:1e-4,1:1e-2"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "vlmguard.json").read_text())
    report = record["direction"]["calibration"]
    assert [(c["epochs"], c["learning_rate"]) for c in report["candidates"]] == [
        (1, 1e-4),
        (1, 1e-2),
    ]
    assert report["after"] in report["candidates"]
    assert "--search 1:0.0001,1:0.01" in record["command"]
    # the calibration report travels with the weights: one row per candidate, one chosen
    table = (out / "calibration.md").read_text()
    assert "| 1 epochs, lr 0.0001 |" in table and "| 1 epochs, lr 0.01 |" in table
    assert table.count("| yes |") == 1 and "| unedited |" in table
    from PIL import Image

    assert Image.open(out / "calibration.png").size[0] > 300
    assert {"calibration.md", "calibration.png"} <= set(record["files"])
    # the organism cannot read: the reading gate kept its renders as preservation rows only,
    # and the report, the table and the card say so
    assert report["reading"] == {"share": 0.0, "taught": False}
    assert (report["settings"]["images"], report["settings"]["preserve_images"]) == (
        ["blank"],
        ["typographic"],
    )
    assert "Reading: 0% of harmless anchors" in table
    assert "with an image (blank)," in (out / "README.md").read_text()
    assert verify(out).ok
    bad = CliRunner().invoke(main, [*args[:5], str(tmp_path / "x"), "--search", "1e-3"])
    assert bad.exit_code == 2 and "EPOCHS:RATE" in bad.output


def test_mllama_cross_attention_writers_are_on_the_image_path(tmp_path):
    """mllama: the projector and the cross-attention layers' writers (which a text-only
    forward skips) are learned and folded; fold == hooks with an image, text-only identical."""
    from vlmguard_edit import images
    from vlmguard_edit.organisms import organism

    member = organism.build_organism(
        tmp_path / "m", seed=4, progress=False, stage1_steps=2, stage2_steps=2, variant="mllama"
    )
    source = member / "vlm"
    edit = random_edit(source, seed=3)
    result = folded(tmp_path, source, edit)
    modules = {e.module for e in result.plan.edits}
    assert modules == {
        "multi_modal_projector",
        "language_model.model.layers.2.cross_attn.o_proj",
        "language_model.model.layers.2.mlp.down_proj",
    }
    guarded = AutoModelForImageTextToText.from_pretrained(tmp_path / "guarded").eval()
    original = AutoModelForImageTextToText.from_pretrained(source).eval()
    processor = load_processor(source)
    processor.tokenizer.padding_side = "left"
    with_image, text_only = organism_inputs(processor, images.scene(2))
    loaded = {m: learned.find_module(original, learned.memory_names(m))[1] for m in modules}
    with torch.no_grad():
        assert torch.equal(guarded(**text_only).logits, original(**text_only).logits)
        after = guarded(**with_image).logits
        plain = original(**with_image).logits
        with learned.hooks(loaded, edit.deltas):
            hooked = original(**with_image).logits
    assert (after - hooked).abs().max() < 1e-5 and (after - plain).abs().max() > 1e-3
