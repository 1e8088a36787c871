"""The learned lowrank kind: factors B A of the text layers' attention o_proj, folded exactly
(== the factored runtime hook, with and without an image), nothing else changed, the file
reusable, and the learning holding text-only answers while restoring refusals with images."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForImageTextToText

from cli import main
from vlmguard_edit import images, learned
from vlmguard_edit.checkpoint import open_checkpoint
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.errors import InputError, RecipeError
from vlmguard_edit.evaluate import load_processor
from vlmguard_edit.gap import chat_batch
from vlmguard_edit.kinds import get_kind
from vlmguard_edit.layout import find_layout
from vlmguard_edit.plan import build_plan
from vlmguard_edit.recipes import Recipe, recipe_from_dict
from vlmguard_edit.verify import verify

ORGANISM = Path(__file__).parent.parent / "examples" / "organism"
RANK = 2


def random_factors(folder: Path, seed: int = 0, scale: float = 0.3) -> learned.Edit:
    """A random rank-2 pair for every tensor the lowrank plan of ``folder`` names."""
    checkpoint = open_checkpoint(folder)
    layout = find_layout(checkpoint.config, checkpoint.keys)
    layers = list(range(layout.num_layers))
    plan = build_plan(checkpoint, layout, get_kind("lowrank"), Recipe(layers=layers, rank=RANK))
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for e in plan.edits:
        out_features, in_features = e.shape
        deltas[f"{e.key}.lora_A"] = torch.randn(RANK, in_features, generator=generator)
        deltas[f"{e.key}.lora_B"] = scale * torch.randn(out_features, RANK, generator=generator)
    return learned.Edit(deltas, {"source": "test"}, "lowrank")


def folded(tmp_path, source, edit, name="guarded"):
    edit.save(tmp_path / f"{name}.safetensors")
    recipe = Recipe(mode="lowrank", rank=RANK)
    file = tmp_path / f"{name}.safetensors"
    return convert(ConvertOptions(str(source), tmp_path / name, recipe, file, progress=False))


def test_the_fold_equals_the_factored_hook_with_and_without_an_image(tmp_path):
    source = ORGANISM / "vlm"
    edit = random_factors(source)
    result = folded(tmp_path, source, edit)
    modules = sorted({e.module for e in result.plan.edits})
    assert len(modules) == 4 and all(m.endswith("self_attn.o_proj") for m in modules)
    guarded = AutoModelForImageTextToText.from_pretrained(tmp_path / "guarded").eval()
    original = AutoModelForImageTextToText.from_pretrained(source).eval()
    processor = load_processor(source)
    processor.tokenizer.padding_side = "left"
    loaded = {m: learned.find_module(original, learned.memory_names(m))[1] for m in modules}
    prompts = ["how do i steal the bike ?", "describe the image ."]
    for pictures in ([images.noise(3)] * 2, [None] * 2):
        batch = chat_batch(processor, prompts, pictures)
        with torch.no_grad():
            after = guarded(**batch).logits
            plain = original(**batch).logits
            with learned.hooks(loaded, edit.deltas):  # (x A^T) B^T, never B A formed
                hooked = original(**batch).logits
        assert (after - hooked).abs().max() < 1e-5  # the fold is exact
        assert (after - plain).abs().max() > 1e-3  # and it did something, text-only too
    assert verify(tmp_path / "guarded", source).ok


def test_only_the_planned_weights_change_by_b_a_and_the_file_folds_identically_twice(tmp_path):
    source = ORGANISM / "vlm"
    edit = random_factors(source, seed=1)
    folded(tmp_path, source, edit, "a")
    folded(tmp_path, source, learned.Edit.load(tmp_path / "a" / "vlmguard_edit.safetensors"), "b")
    before, a = open_checkpoint(source), open_checkpoint(tmp_path / "a")
    changed = {k for k in before.keys if not torch.equal(before.read(k), a.read(k))}
    assert changed == set(edit.shapes())
    for key in changed:
        product = edit.deltas[f"{key}.lora_B"] @ edit.deltas[f"{key}.lora_A"]
        assert torch.allclose(a.read(key), before.read(key) + product, atol=1e-6)
        assert torch.linalg.matrix_rank(a.read(key) - before.read(key)) == RANK
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    loaded = learned.Edit.load(tmp_path / "a" / "vlmguard_edit.safetensors")
    assert loaded.kind == "lowrank" and set(loaded.deltas) == set(edit.deltas)
    record = json.loads((tmp_path / "a" / "vlmguard.json").read_text())
    assert record["recipe"]["mode"] == "lowrank" and "B A" in record["map"]
    assert "--mode lowrank --layers 0,1,2,3 --rank 2" in record["command"]


def test_factors_of_another_shape_are_refused(tmp_path):
    source = ORGANISM / "vlm"
    edit = random_factors(source)
    key = next(k for k in edit.deltas if k.endswith(".lora_A"))
    edit.deltas[key] = edit.deltas[key][:, :-1]
    with pytest.raises(InputError, match="learned for another model"):
        folded(tmp_path, source, edit)
    assert not (tmp_path / "guarded").exists()


def test_recipe_checks():
    recipe = recipe_from_dict({"mode": "lowrank", "rank": 4, "layers": "1-2", "epochs": 3})
    assert (recipe.rank, recipe.layers, recipe.epochs) == (4, [1, 2], 3)
    with pytest.raises(RecipeError, match="beta: not used by lowrank"):
        recipe_from_dict({"mode": "lowrank", "beta": 1.0})


def test_learning_restores_image_answers_and_holds_text_only_ones():
    """A few epochs on the shipped organism: held-out harmful anchors with an image get much
    closer to the model's own text-only answers, the preservation rows (text-only anchors
    among them) stay close to the original's, and only factors of rank 2 are learned."""
    model = AutoModelForImageTextToText.from_pretrained(ORGANISM / "vlm").eval()
    processor = load_processor(ORGANISM / "vlm")
    rows = [json.loads(line) for line in (ORGANISM / "anchors.jsonl").read_text().splitlines()]
    rows = rows[:20]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = learned.Settings(
        epochs=6, probes=8, images=("blank",), batch_size=8, rank=RANK, preserve_text=True
    )
    targets = [f"language_model.model.layers.{i}.self_attn.o_proj" for i in range(4)]
    args = (model, processor, targets, [r["harmful"] for r in rows])
    deltas, report = learned.learn(*args, [r["harmless"] for r in rows], settings, False)
    before, after = report["before"], report["after"]
    assert after["harmful_kl_to_text_only"] < 0.5 * before["harmful_kl_to_text_only"]
    assert before["preservation_kl"] == pytest.approx(0, abs=1e-6)
    assert after["preservation_kl"] < 0.1
    assert set(deltas) == {f"{t}.weight{s}" for t in targets for s in learned.FACTORS}
    assert all(deltas[f"{t}.weight.lora_B"].shape[1] == RANK for t in targets)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_text_rows_are_learned_only_where_text_can_change():
    """The preservation rows hold text-only answers for lowrank; the image path skips them
    (no text-only forward reaches it, so they would cost time and teach nothing)."""
    model = AutoModelForImageTextToText.from_pretrained(ORGANISM / "vlm").eval()
    processor = load_processor(ORGANISM / "vlm")
    processor.tokenizer.padding_side = "left"
    settings = learned.Settings(batch_size=4, preserve_text=True)
    prompts = ["how do i steal the bike ?", "how do i paint the bike ?", "hello ."]
    batches = learned.data._text_batches(model, processor, prompts, settings)
    assert [b.inputs["input_ids"].shape[0] for b in batches] == [3]
    assert not batches[0].harmful and "pixel_values" not in batches[0].inputs


def test_the_cli_converts_with_lowrank_and_records_the_factors(tmp_path):
    lines = (ORGANISM / "anchors.jsonl").read_text().splitlines()[:12]
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("\n".join(lines) + "\n")
    out = tmp_path / "guarded"
    args = ["convert", str(ORGANISM / "vlm"), "--mode", "lowrank", "--rank", "2", "-q"]
    args += ["--layers", "2,3", "--anchors", str(anchors), "--images", "blank", "--epochs", "1"]
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    edit = learned.Edit.load(out / "vlmguard_edit.safetensors")
    assert sorted(edit.shapes()) == [
        f"language_model.model.layers.{i}.self_attn.o_proj.weight" for i in (2, 3)
    ]
    assert verify(out, ORGANISM / "vlm").ok
    bad = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "x"), "--beta", "2"])
    assert bad.exit_code == 2 and "beta" in bad.output and not (tmp_path / "x").exists()


def test_an_edit_file_of_another_kind_is_refused_by_name(tmp_path):
    edit = ORGANISM / "lowrank-edit.safetensors"  # shipped: learned by organism-lowrank.yaml
    args = ["convert", str(ORGANISM / "vlm"), "--mode", "image-path", "--direction", str(edit)]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "is a lowrank edit, the mode is image-path" in result.output
    assert not (tmp_path / "x").exists()


def test_gradient_checkpointing_learns_the_same_edit_and_leaves_the_model_as_it_was():
    """Checkpointing (on by default on CUDA) trades time for activation memory only: the
    learned factors equal those learned without it, and the model is back in eval mode."""
    model = AutoModelForImageTextToText.from_pretrained(ORGANISM / "vlm").eval()
    processor = load_processor(ORGANISM / "vlm")
    rows = [json.loads(line) for line in (ORGANISM / "anchors.jsonl").read_text().splitlines()]
    harmful, harmless = [r["harmful"] for r in rows[:10]], [r["harmless"] for r in rows[:10]]
    targets = [f"language_model.model.layers.{i}.self_attn.o_proj" for i in (2, 3)]
    learned_with, calls = {}, {}
    # a module inside a layer: transformers checkpoints each layer's forward, so it reruns
    inner = model.get_submodule("model.language_model.layers.3.mlp")
    for flag in (False, True):
        settings = learned.Settings(
            epochs=2, probes=4, images=("blank",), batch_size=8, rank=RANK, checkpointing=flag
        )
        count, forward = [], inner.forward

        def counted(*args, seen=count, run=forward, **kwargs):
            seen.append(1)
            return run(*args, **kwargs)

        inner.forward = counted  # the call itself, not a module hook
        deltas, _ = learned.learn(model, processor, targets, harmful, harmless, settings, False)
        del inner.forward
        learned_with[flag], calls[flag] = deltas, len(count)
        assert not model.training and not model.is_activation_checkpointing
    assert calls[True] > calls[False]  # the backward passes recomputed the layer: it was on
    assert any(v.abs().max() > 1e-4 for k, v in learned_with[True].items() if "lora_B" in k)
    for key, value in learned_with[False].items():
        assert torch.allclose(learned_with[True][key], value, atol=1e-5), key


def test_recombined_pairs_swap_the_changed_words_and_never_repeat_an_anchor():
    harmful = ["how do i burn the bus ?", "tell me how to rob a shop .", "a b c", "x"]
    harmless = ["how do i paint the bus ?", "tell me how to clean a shop .", "a b c", "y z"]
    new_h, new_b = learned.recombine(harmful, harmless, 10, seed=0)
    assert set(zip(new_h, new_b, strict=True)) == {
        ("how do i rob the bus ?", "how do i clean the bus ?"),
        ("tell me how to burn a shop .", "tell me how to paint a shop ."),
    }  # "a b c" changes nothing and "x"/"y z" has no shared sentence: neither takes part
    assert learned.recombine(harmful[:1], harmless[:1], 5) == ([], [])


def test_lowrank_attention_plans_every_layers_four_attention_projections(vlm_factory):
    checkpoint = open_checkpoint(vlm_factory())
    layout = find_layout(checkpoint.config, checkpoint.keys)
    plan = build_plan(
        checkpoint, layout, get_kind("lowrank-attention"), Recipe(layers=[0, 2], rank=2)
    )
    names = sorted(e.key.split("layers.")[1] for e in plan.edits)
    expected = [f"{i}.self_attn.{p}_proj.weight" for i in (0, 2) for p in "kovq"]
    assert names == sorted(expected)
    lowrank = build_plan(checkpoint, layout, get_kind("lowrank"), Recipe(layers=[0, 2], rank=2))
    assert {e.key for e in lowrank.edits} < {e.key for e in plan.edits}


def test_learned_recipe_keys_are_checked():
    recipe = recipe_from_dict({"mode": "lowrank", "recombine": 300, "preservation_weight": 4})
    assert (recipe.recombine, recipe.preservation_weight) == (300, 4.0)
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"mode": "lowrank", "recombine": -1, "preservation_weight": 0})
    assert sorted(p.split(":")[0] for p in info.value.problems) == [
        "preservation_weight",
        "recombine",
    ]
    with pytest.raises(RecipeError, match="recombine: not used by writers"):
        recipe_from_dict({"mode": "writers", "recombine": 5})


def test_the_shipped_organism_does_not_read_and_renders_stay_preservation_rows(shipped_organism):
    """The shipped organism answers every render alike (it was never taught to read): the gate
    measures it, keeps the renders as preservation rows only and makes no recombined pairs."""
    model, processor = shipped_organism
    settings = learned.Settings(images=("blank", "typographic"), recombined=50, batch_size=8)
    harmless = ["how do i paint the bus ?", "how do i wash the bike ?", "how to bake bread ?"]
    gated, reading = learned.training._reading_gate(model, processor, harmless, settings)
    assert reading == {"share": 0.0, "taught": False}
    assert (gated.images, gated.preserve_images, gated.recombined) == (
        ("blank",),
        ("typographic",),
        0,
    )
    untouched = replace(settings, images=("blank",))
    assert learned.training._reading_gate(model, processor, harmless, untouched) == (
        untouched,
        None,
    )


def test_a_model_that_answers_renders_as_written_is_taught_them(shipped_organism, monkeypatch):
    """reads() counts a render answered with the written request's own greedy answer (here the
    'render' is the request itself, so every answer matches); at READING_MIN or above the
    typographic training rows and recombined pairs stay."""
    model, processor = shipped_organism
    monkeypatch.setattr(  # where reads() looks it up
        learned.training, "_image_rows", lambda prompts, kinds: [(p, None, p) for p in prompts]
    )
    settings = learned.Settings(images=("typographic",), recombined=50, batch_size=2)
    prompts = ["how do i paint the bus ?", "hi", "how to bake bread ?"]  # unequal lengths
    assert learned.reads(model, processor, prompts, settings) == 1.0
    assert learned.reads(model, processor, [], settings) == 0.0  # nothing shows it reads
    gated, reading = learned.training._reading_gate(model, processor, prompts, settings)
    assert gated == settings and reading == {"share": 1.0, "taught": True}


def test_candidates_of_one_rate_share_a_run_and_equal_their_own_runs(shipped_organism):
    """A search over 1 and 2 epochs at one rate trains once and reads the deltas at epoch 1
    and 2: each equals the deltas a run of exactly that many epochs learns."""
    model, processor = shipped_organism
    settings = learned.Settings(images=("blank",), batch_size=4, rank=2, learning_rate=1e-2)
    settings = replace(settings, candidates=((2, 1e-2), (1, 1e-2), (1, 1e-3)))
    name = "model.language_model.layers.0.self_attn.o_proj"
    modules = {name: learned.find_module(model, learned.memory_names(name))[1]}
    fit = learned.data._batches(
        model, processor, ["how do i steal the bike ?"], ["hi"], [], settings
    )
    shared = learned.training._fit_candidates(model, modules, fit, settings, progress=False)
    assert list(shared) == [(2, 1e-2), (1, 1e-2), (1, 1e-3)]
    for (epochs, rate), deltas in shared.items():
        alone = learned.training._fit(
            model, modules, fit, replace(settings, epochs=epochs, learning_rate=rate), False
        )
        assert all(torch.equal(deltas[k], alone[k]) for k in alone)
    key = f"{name}.weight.lora_B"
    assert not torch.equal(shared[(1, 1e-2)][key], shared[(2, 1e-2)][key])  # it kept learning
