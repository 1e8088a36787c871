"""Cards the Hub links correctly from local folders: a Hugging Face cache snapshot names its
repository and revision, --base-model names it for any other folder, and a card without
base_model comes with a warning."""

import json
import shutil

from huggingface_hub import ModelCard

from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.recipes import Recipe


def guard(src, out, direction_file, **kw):
    recipe = Recipe(layers=[1, 3], rank=1)
    opts = ConvertOptions(str(src), out, recipe, direction_file=direction_file, progress=False)
    convert(ConvertOptions(**{**opts.__dict__, **kw}))
    record = json.loads((out / "vlmguard.json").read_text())
    return record, ModelCard.load(out / "README.md").data.to_dict()


def test_a_cache_snapshot_names_its_repo_and_revision(vlm_factory, direction_file, tmp_path):
    rev = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-tiny" / "snapshots" / rev
    shutil.copytree(vlm_factory(), snapshot)
    record, card = guard(snapshot, tmp_path / "out", direction_file)
    assert record["source"]["hub_id"] == "llava-hf/llava-tiny"
    assert record["source"]["revision"] == rev
    assert card["base_model"] == "llava-hf/llava-tiny"
    assert str(tmp_path) not in json.dumps(record)  # the local path is never recorded


def test_base_model_names_any_folder_and_its_absence_is_warned(
    vlm_factory, direction_file, tmp_path, caplog
):
    src = vlm_factory()
    record, card = guard(src, tmp_path / "named", direction_file, base_model="org/tiny-vlm")
    assert card["base_model"] == "org/tiny-vlm" and record["source"]["hub_id"] == "org/tiny-vlm"
    assert "--base-model org/tiny-vlm" in record["command"]
    assert "names no base_model" not in caplog.text
    record, card = guard(src, tmp_path / "unnamed", direction_file)
    assert "base_model" not in card and record["source"]["hub_id"] is None
    assert "names no base_model" in caplog.text and "--base-model ORG/NAME" in caplog.text


def test_base_model_must_be_a_hub_id(vlm_factory, tmp_path):
    from click.testing import CliRunner

    from cli import main

    args = ["convert", str(vlm_factory()), "-o", str(tmp_path / "o"), "--base-model", "/x/y"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "not a Hub id like org/name" in refused.output
    assert not (tmp_path / "o").exists()
