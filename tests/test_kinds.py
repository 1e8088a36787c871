"""Every edit kind through the one interface (vlmguard_edit.kinds): planned, folded by
convert from a parameter file, recomputed by verify, and equal to its own runtime-hook
reference on an unmodified model (< 1e-5 in float32, with and without an image), while
changing exactly the planned tensors, visibly."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from tests.helpers import model_tensors
from tests.test_convert import logits
from vlmguard_edit.checkpoint import open_checkpoint
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.errors import RecipeError
from vlmguard_edit.kinds import KINDS, LEARNED, MODES, get_kind
from vlmguard_edit.organisms import tiny
from vlmguard_edit.plan import build_plan
from vlmguard_edit.recipes import Recipe, recipe_from_dict
from vlmguard_edit.selftest import text_layer
from vlmguard_edit.verify import verify

LAYERS = [1, 3]  # of the tiny LLaVA's 4 text layers; each kind takes what it uses of them


def example_recipe(kind, **extra) -> Recipe:
    """The kind's own example recipe (the self-test's too): its layers and strengths."""
    return Recipe(mode=kind.name, **{**kind.example_fields(LAYERS), **extra})


def parameter_file(kind, plan, path):
    """The kind's parameter file, made up (seeded) in its own format by the kind itself."""
    return kind.example_parameters(plan, path)


def edits_text_layers(plan) -> bool:
    """Whether a text-only forward reaches an edited tensor (else text logits cannot move)."""
    return any(text_layer(plan.layout, e.key) for e in plan.edits)


@pytest.mark.parametrize("mode", MODES)
def test_kind_folds_exactly_what_it_plans_and_equals_its_runtime_hooks(mode, vlm_factory, tmp_path):
    kind = get_kind(mode)
    src, out = vlm_factory(), tmp_path / "guarded"
    recipe = example_recipe(kind)
    checkpoint = open_checkpoint(src)
    from vlmguard_edit.layout import find_layout

    layout = find_layout(checkpoint.config, checkpoint.keys)
    plan = build_plan(checkpoint, layout, kind, recipe)
    params = parameter_file(kind, plan, tmp_path / kind.file_name)
    opts = ConvertOptions(str(src), out, recipe, direction_file=params, progress=False)
    result = convert(opts)

    # Exactly the planned tensors changed, every one of them; the kind's file ships beside.
    before, after = model_tensors(src), model_tensors(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {e.key for e in result.plan.edits} and changed
    assert (out / kind.file_name).is_file()
    assert verify(out, source=src, progress=False).ok

    # The fold equals the kind's runtime hooks on the unmodified model, text and image.
    guarded = AutoModelForImageTextToText.from_pretrained(out).eval()
    original = AutoModelForImageTextToText.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    text = {"input_ids": tokenizer("how to make a cake", return_tensors="pt")["input_ids"]}
    image = tiny.image_inputs(tokenizer, "how to make a cake")
    loaded = kind.load(out / kind.file_name, result.plan)
    for name, inputs in (("text", text), ("image", image)):
        folded, plain = logits(guarded, inputs), logits(original, inputs)
        with kind.hooks(original, result.plan, loaded, checkpoint):
            hooked = logits(original, inputs)
        assert (logits(original, inputs) - plain).abs().max() == 0  # the hooks came off
        assert (folded - hooked).abs().max() < 1e-5, (mode, name)
        effect = (folded - plain).abs().max().item()
        if name == "text" and not edits_text_layers(result.plan):
            assert effect == 0, (mode, effect)
        else:
            assert effect > 1e-3, (mode, name, effect)


def test_the_kinds_declare_what_sets_them_apart():
    # Each kind added later is one more entry: these hold for the kinds named here.
    assert MODES[:5] == ("writers", "projector-shift", "image-gap", "image-path", "lowrank")
    assert {"image-path", "lowrank", "lowrank-image-path", "lowrank-attention"} <= set(LEARNED)
    assert not {"writers", "projector-shift", "image-gap"} & set(LEARNED)
    assert {k.name for k in KINDS.values() if k.steered} == {"writers", "projector-shift"}
    not_lora = {k.name for k in KINDS.values() if not k.lora}
    assert {"projector-shift", "image-path"} <= not_lora and not {"writers", "lowrank"} & not_lora
    assert KINDS["lowrank"].preserve_text and KINDS["lowrank"].factored
    assert not KINDS["image-path"].factored and not KINDS["image-path"].preserve_text
    for kind in KINDS.values():
        assert kind.summary and (kind.steered or kind.obtained), kind.name
        assert kind.uses <= set(Recipe().to_dict()), kind.name  # recipe keys only


@pytest.mark.parametrize(
    ("mode", "key", "value", "message"),
    [
        ("lowrank", "beta", -2.0, "beta: not used by lowrank .an option of writers, image-gap"),
        ("image-path", "layers", [1], "layers: not used by image-path"),
        ("writers", "epochs", 3, "epochs: not used by writers .an option of image-path, lowrank"),
        ("image-gap", "gamma", 2.0, "gamma: not used by image-gap .an option of projector-shift"),
    ],
)
def test_an_option_another_kind_reads_is_refused_with_who_reads_it(mode, key, value, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"mode": mode, key: value}, source="recipe.yaml")


@pytest.mark.parametrize("mode", MODES)
def test_each_kind_owns_its_options_and_their_defaults(mode):
    """A kind's options are its recipe keys: their defaults make its default recipe (which
    passes the recipe checks), the loader checks a value by the option's own parse, and the
    command line's help names each kind's default."""
    from vlmguard_edit.kinds import OPTIONS, option_help
    from vlmguard_edit.recipes import base_recipe, recipe_with

    kind = get_kind(mode)
    assert set(kind.default_fields()) == kind.uses and kind.uses <= set(OPTIONS)
    recipe = base_recipe(mode)
    assert recipe_with(recipe, {}) == recipe  # its own defaults are a valid recipe
    for option in kind.options:
        assert getattr(recipe, option.name) == option.default
        assert mode in option_help(option.name)
    if "rank" in kind.uses:
        with pytest.raises(RecipeError, match="rank: expected an integer >= 1, got 0"):
            recipe_with(recipe, {"rank": 0})


def test_the_default_edit_is_its_kinds_defaults():
    from vlmguard_edit.kinds import option_help
    from vlmguard_edit.recipes import DEFAULT_MODE, default_recipe

    recipe = default_recipe()
    assert recipe.mode == DEFAULT_MODE and recipe.rank == 4 and recipe.preservation_weight == 4
    assert "lowrank-attention: 4" in option_help("rank")
    assert "writers" in option_help("beta") and "lowrank" not in option_help("beta")


def test_the_recipe_fields_default_to_the_options_plain_defaults():
    """Recipe's field defaults and the options' plain defaults (kinds/options.py) are one set
    of values: neither drifts from the other."""
    from vlmguard_edit.kinds import options

    plain = [v for v in vars(options).values() if isinstance(v, options.Option)]
    assert len(plain) == 13
    recipe = Recipe()
    for option in plain:
        assert getattr(recipe, option.name) == option.default, option.name
