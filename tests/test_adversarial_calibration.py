"""Adversarial calibration (learned.adversarial): images crafted against the edit as it is
learned, re-attacked every epoch from where the attack stopped, shown to the harmful anchors
(taught the text-only answer) and to their paired harmless anchors (held to the original's);
the recipe key and the command-line option that turn it on."""

from dataclasses import replace

import pytest
import torch

from vlmguard_edit import learned
from vlmguard_edit.attack import Budget, Perturbation
from vlmguard_edit.errors import RecipeError
from vlmguard_edit.kinds import get_kind
from vlmguard_edit.learned.adversarial import adversarial_rows
from vlmguard_edit.recipes import recipe_from_dict

HARMFUL = ["how do i steal the bike ?", "how do i burn the bus ?"]
HARMLESS = ["how do i wash the bike ?", "how do i paint the bus ?"]
TARGET = "sure ! here is how to"
O_PROJ = "model.language_model.layers.0.self_attn.o_proj"


def test_a_perturbation_continues_where_it_stopped(shipped_organism):
    """Two calls of 2 steps are one of 4 (a warm start), inside the budget, 8-bit."""
    model, processor = shipped_organism
    twice = Perturbation(model, processor, HARMFUL, TARGET, Budget(16))
    twice.optimise(model, 2)
    twice.optimise(model, 2)
    once = Perturbation(model, processor, HARMFUL, TARGET, Budget(16))
    once.optimise(model, 4)
    assert torch.equal(twice.delta, once.delta) and twice.delta.abs().max() > 0
    assert twice.delta.abs().max() <= 16 / 255 + 1e-6
    moved = twice.images().int() - 255  # a blank image is all 255
    assert moved.abs().max() <= 16 and moved.abs().max() > 0


def rows(loaded, steps=2):
    model, processor = loaded
    settings = learned.Settings(batch_size=2, adversarial=(16, steps))
    return adversarial_rows(model, processor, HARMFUL, HARMLESS, settings, None, TARGET)


def test_harmful_rows_and_their_harmless_pairs_show_the_same_reattacked_images(shipped_organism):
    model, _ = shipped_organism
    attacked = rows(shipped_organism)
    harmful, harmless = attacked.batches
    assert (harmful.harmful, harmless.harmful) == (True, False)
    attacked.restart()
    blank = harmful.inputs["pixel_values"].clone()
    attacked.refresh(model)
    shown = harmful.inputs["pixel_values"]
    assert torch.equal(shown, harmless.inputs["pixel_values"]) and not torch.equal(shown, blank)
    attacked.restart()  # a new training run starts from blank images again
    assert torch.equal(harmful.inputs["pixel_values"], blank)


def test_the_images_are_reattacked_against_the_edit_as_it_learns(shipped_organism):
    """Epoch 1's attack meets the identity edit (B = 0), so after one epoch the images are a
    2-step attack on the original; after two, the second refresh met the learned edit and
    the images differ from a 4-step attack on the original."""
    model, processor = shipped_organism
    settings = learned.Settings(batch_size=2, rank=2, learning_rate=5e-2, adversarial=(16, 2))
    modules = {O_PROJ: learned.find_module(model, learned.memory_names(O_PROJ))[1]}
    original = {}
    for steps in (2, 4):
        original[steps] = Perturbation(model, processor, HARMFUL, TARGET, Budget(16))
        original[steps].optimise(model, steps)
    for epochs, steps in ((1, 2), (2, 4)):
        attacked = rows(shipped_organism)
        learned.training._fit(model, modules, [], replace(settings, epochs=epochs), False, attacked)
        same = torch.equal(attacked.perturbations[0].delta, original[steps].delta)
        assert same == (epochs == 1)


def test_learning_with_adversarial_rows_reports_them(shipped_organism, monkeypatch):
    monkeypatch.setattr(learned.training, "VALIDATION_REFRESHES", 2)
    model, processor = shipped_organism
    settings = learned.Settings(epochs=1, batch_size=2, rank=2, probes=4, adversarial=(16, 1))
    deltas, report = learned.learn(
        model, processor, [O_PROJ], HARMFUL * 3, HARMLESS * 3, settings, False
    )
    assert report["settings"]["adversarial"] == (16, 1)
    for scores in (report["before"], report["after"]):  # held-out anchors attacked as well
        assert 0 <= scores["attacked_first_token_agreement"] <= 1
        assert scores["attacked_preservation_kl"] >= 0
    assert deltas[f"{O_PROJ}.weight.lora_B"].abs().max() > 0


def test_the_recipe_key_and_its_command_line_form():
    on = recipe_from_dict({"mode": "lowrank-attention", "adversarial": {"eps": 64, "steps": 10}})
    assert on.adversarial == {"eps": 64, "steps": 10}
    args = get_kind("lowrank-attention").command_args(on)
    assert args[args.index("--adversarial") + 1] == "64:10"
    for off in (False, "off", None):  # YAML's `off` reads as false
        recipe = recipe_from_dict({"mode": "lowrank-attention", "adversarial": off})
        assert recipe.adversarial is None
        assert "--adversarial" not in get_kind("lowrank-attention").command_args(recipe)
    for bad in ({"eps": 0, "steps": 1}, {"eps": 16}, {"eps": 16, "steps": 0}, 16):
        with pytest.raises(RecipeError, match="adversarial: expected off or"):
            recipe_from_dict({"mode": "lowrank-attention", "adversarial": bad})
    with pytest.raises(RecipeError, match="adversarial: not used by writers"):
        recipe_from_dict({"mode": "writers", "adversarial": {"eps": 16, "steps": 1}})


def test_the_option_turns_a_recipes_adversarial_rows_on_and_off(tmp_path):
    from click.testing import CliRunner

    from cli import main
    from vlmguard_edit.commands.common import OFF, build_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("mode: lowrank-attention\nadversarial: {eps: 16, steps: 5}\n")
    kw = dict.fromkeys(("layers", "template", "base_revision", "rank", "anchors", "batch_size"))
    assert build_recipe({**kw, "recipe": str(recipe)}, None).adversarial == {"eps": 16, "steps": 5}
    off = build_recipe({**kw, "recipe": str(recipe)}, None, adversarial=OFF)
    assert off.adversarial is None
    given = build_recipe({**kw, "recipe": None}, None, adversarial={"eps": 64, "steps": 10})
    assert given.adversarial == {"eps": 64, "steps": 10}
    for bad in ("64", "0:10", "16:0", "a:b"):
        result = CliRunner().invoke(main, ["calibrate", "x", "-o", "y", "--adversarial", bad])
        assert result.exit_code == 2 and "--adversarial" in result.output
