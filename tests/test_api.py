"""The Python API (vlmguard_edit.api): the CLI's operations as functions, with exceptions
instead of exit codes and nothing printed."""

import json
from pathlib import Path

import pytest

from vlmguard_edit import api
from vlmguard_edit.errors import InputError, RecipeError

ROOT = Path(__file__).parent.parent
ORGANISM = ROOT / "examples" / "organism"


def test_convert_verify_adapter_evaluate_on_the_organism(tmp_path, capsys):
    out = tmp_path / "guarded"
    result = api.convert(
        ORGANISM / "vlm",
        out,
        recipe=ROOT / "recipes" / "organism.yaml",
        direction=ORGANISM / "guard-edit.safetensors",
        progress=False,
    )
    assert result.record["recipe"]["mode"] == "lowrank-attention" and result.output == out
    assert api.verify(out, source=ORGANISM / "vlm").ok
    assert api.adapter(out, ORGANISM / "vlm", tmp_path / "lora")["r"] == 4
    report = api.evaluate(
        out,
        tmp_path / "report",
        against=ORGANISM / "vlm",
        settings=("text", "blank"),
        harmful=ORGANISM / "eval_harmful.jsonl",
        benign=ORGANISM / "eval_benign.jsonl",
        limit=6,
        max_new_tokens=12,
        batch_size=6,
        utility=False,
        progress=False,
    )
    blank = {s: report["systems"][s]["settings"]["blank"] for s in ("original", "model")}
    assert blank["model"]["harmful_refusal"] > blank["original"]["harmful_refusal"]
    assert json.loads((tmp_path / "report" / "eval.json").read_text())["systems"]
    assert capsys.readouterr().out == ""  # the API prints nothing


def test_calibrate_passes_the_resolved_recipe(tmp_path, monkeypatch):
    """The learning itself is tested through the CLI (test_learned.py); here, that the API
    hands convert.calibrate the recipe it was given, resolved and checked."""
    from vlmguard_edit import convert

    seen = {}
    monkeypatch.setattr(convert, "calibrate", lambda opts: seen.setdefault("opts", opts))
    opts = api.calibrate(
        ORGANISM / "vlm",
        tmp_path / "edit.safetensors",
        recipe=ROOT / "recipes" / "organism.yaml",
        epochs=1,
        images=["blank"],
        progress=False,
    )
    assert opts is seen["opts"] and opts.output == tmp_path / "edit.safetensors"
    assert opts.recipe.mode == "lowrank-attention" and opts.recipe.epochs == 1
    assert opts.recipe.images == ["blank"] and not opts.progress
    assert opts.recipe.search == []  # an explicit training length replaces the search
    assert (opts.recipe.recombine, opts.recipe.preservation_weight) == (600, 4)  # the recipe's


def test_bad_options_are_exceptions_with_one_line(tmp_path):
    # One validator: the API's fields are checked as a recipe file's keys are.
    with pytest.raises(RecipeError, match="strength: unknown key"):
        api.recipe_with(mode="lowrank", strength=3)
    with pytest.raises(RecipeError, match="beta: not used by lowrank"):
        api.recipe_with(mode="lowrank", beta=-2.0)
    with pytest.raises(RecipeError, match="rank: expected an integer >= 1, got 0"):
        api.recipe_with(rank=0)
    with pytest.raises(RecipeError, match="images: expected a list of blank"):
        api.recipe_with(images=["figstep"])
    with pytest.raises(InputError, match="unknown setting"):
        api.evaluate(ORGANISM / "vlm", settings=("sideways",), progress=False)
    assert api.recipe_with(ROOT / "recipes" / "organism.yaml", rank=8).rank == 8
