"""Recipes are strict data; every shipped recipe validates."""

from pathlib import Path

import pytest

from vlmguard_edit.errors import RecipeError
from vlmguard_edit.recipes import load_recipe, parse_layers, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.y*ml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"llava-1.5-7b.yaml", "llava-1.5-13b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    # Every recipe says where its edit comes from: a base LLM's direction and its layers, the
    # VLM's image-gap direction at its layers, or the VLM itself teaching its image path.
    assert recipe.model
    from vlmguard_edit.kinds import LEARNED

    if recipe.mode in LEARNED:  # learned: layers are every text layer
        assert recipe.layers is None and recipe.search
    else:
        assert (recipe.base_llm.id or recipe.mode == "image-gap") and recipe.layers
    # A real model's recipe names its family (convert checks it; docs/families.md lists it);
    # the organism recipes serve every organism builder's family.
    local = Path(recipe.model).is_absolute()
    assert (recipe.family is None) == local, "a real-model recipe says its family"
    first = path.read_text("utf-8").splitlines()[0]
    assert first.startswith("# vlmguard-edit convert"), "a recipe starts with its command line"


def test_all_problems_reported_with_paths():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(
            {
                "model": "x/y",
                "mode": "writers",
                "layer": [1],
                "rank": 0,
                "beta": "strong",
                "base_llm": {"id": "a/b", "templat": "x"},
                "layers": "5-2",
                "family": "not_a_family",
            }
        )
    problems = info.value.problems
    assert any(p.startswith("layer: unknown key") for p in problems)
    assert any(p.startswith("rank: expected") for p in problems)
    assert any(p.startswith("beta: expected") for p in problems)
    assert any(p.startswith("base_llm.templat: unknown key") for p in problems)
    assert any(p.startswith("layers: bad layer range") for p in problems)
    assert any(p.startswith("family: expected a supported family") for p in problems)
    assert len(problems) == 6


def test_template_needs_placeholder():
    with pytest.raises(RecipeError, match=r"base_llm.template: must contain"):
        recipe_from_dict({"base_llm": {"id": "a/b", "template": "USER: ASSISTANT:"}})


def test_base_llm_forms():
    assert recipe_from_dict({"base_llm": "self"}).base_llm.id == "self"
    with pytest.raises(RecipeError, match=r"base_llm.id: missing"):
        recipe_from_dict({"base_llm": {"template": "{request}"}})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("3", [3]), ("8-10", [8, 9, 10]), ("1,5-6, 2", [1, 2, 5, 6]), ([4, 2, 4], [2, 4]), (7, [7])],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec) == expected


@pytest.mark.parametrize("spec", ["", "a", "3-1", "-1", [True], 1.5])
def test_parse_layers_rejects(spec):
    with pytest.raises(ValueError):
        parse_layers(spec)


def test_relative_anchor_file_resolved_against_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text("model: a/b\nanchors: mine.jsonl\n")
    recipe = load_recipe(tmp_path / "sub" / "r.yaml")
    assert recipe.anchors == str((tmp_path / "sub" / "mine.jsonl").resolve())


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_projector_shift_recipe():
    recipe = recipe_from_dict({"mode": "projector-shift", "layers": [0], "gamma": 1.5})
    assert (
        recipe.mode == "projector-shift"
        and recipe.gamma == 1.5
        and recipe.shift_direction == "attention"
    )
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(
            {"mode": "projector-shift", "layers": [0, 1], "gamma": "x", "shift_direction": "up"}
        )
    problems = " ".join(info.value.problems)
    assert (
        "exactly one layer" in problems
        and "gamma: expected" in problems
        and "shift_direction" in problems
    )
    with pytest.raises(RecipeError, match="mode: expected one of writers, projector-shift"):
        recipe_from_dict({"mode": "steer"})


def test_image_gap_recipe():
    recipe = recipe_from_dict({"mode": "image-gap", "layers": "0-1"})
    assert recipe.mode == "image-gap" and recipe.layers == [0, 1] and recipe.base_llm.id is None
    assert recipe_from_dict({"mode": "image-gap", "base_llm": "self"}).base_llm.id == "self"
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(
            {"mode": "image-gap", "base_llm": "org/llm", "rank": 2, "beta": 2, "gamma": 1}
        )
    problems = " ".join(info.value.problems)
    assert all(
        word in problems
        for word in ("base_llm: image-gap", "rank: image-gap", "beta: image-gap", "gamma")
    )


def test_recipe_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x.yaml").write_text("model: ../vlm\nbase_llm:\n  id: org/base\n")
    recipe = load_recipe(tmp_path / "r" / "x.yaml")
    assert recipe.model == str((tmp_path / "vlm").resolve()) and recipe.base_llm.id == "org/base"


def test_organism_recipe_points_at_the_shipped_organism():
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "organism.yaml")
    assert Path(recipe.model, "config.json").is_file() and recipe.base_llm.id is None
    assert Path(recipe.anchors).is_file() and recipe.mode == "lowrank-attention"
    assert recipe.rank == 4 and len(recipe.search) == 2 and recipe.layers is None
    assert "typographic" in recipe.images and recipe.recombine == 600  # behind the reading gate
    lowrank = load_recipe(Path(__file__).parent.parent / "recipes" / "organism-lowrank.yaml")
    assert lowrank.mode == "lowrank" and lowrank.preserve_images == ["typographic"]
    image_path = load_recipe(Path(__file__).parent.parent / "recipes" / "organism-image-path.yaml")
    assert image_path.mode == "image-path" and len(image_path.search) == 2
    previous = load_recipe(Path(__file__).parent.parent / "recipes" / "organism-image-gap.yaml")
    assert previous.mode == "image-gap" and previous.layers == [0, 1]


def test_one_default_everywhere(direction_file, tmp_path):
    """No recipe file, a recipe without mode, and the Python API all start from the default
    edit (learned lowrank-attention); another mode starts from the plain values; a parameter
    file names its own kind; writers always says what the zoo measured of it."""
    import torch

    from vlmguard_edit import api
    from vlmguard_edit.direction import Direction
    from vlmguard_edit.recipes import default_recipe, strength_warnings

    default = default_recipe()
    assert default.mode == "lowrank-attention" and default.rank == 4
    assert "typographic" in default.images and default.preservation_weight == 4.0
    assert recipe_from_dict({}) == default
    assert recipe_from_dict({"anchors": "x.jsonl"}).mode == "lowrank-attention"
    assert api.recipe_with() == default and api.recipe_with(rank=8).rank == 8
    writers = api.recipe_with(mode="writers")
    assert writers.rank == 1 and writers.search == []
    assert any("removes text-only refusals" in w for w in strength_warnings(writers))
    assert not strength_warnings(default)
    shipped = Path(__file__).resolve().parent.parent / "examples" / "organism"
    assert api.file_mode(shipped / "guard-edit.safetensors") == "lowrank-attention"
    assert api.file_mode(shipped / "lowrank-edit.safetensors") == "lowrank"
    assert api.file_mode(direction_file) == "writers"
    gap = tmp_path / "gap.safetensors"
    Direction({0: torch.eye(1, 8)}, meta={"kind": "image-gap"}).save(gap)
    assert api.file_mode(gap) == "image-gap"
    real = [load_recipe(p) for p in RECIPES if not p.stem.startswith("organism")]
    assert sum(r.mode == "lowrank-attention" for r in real) == len(real) - 1  # all but paligemma
