"""Hub ids resolve through huggingface_hub's own snapshot_download, here from a local cache.

HF_HUB_OFFLINE=1 (set in conftest) makes snapshot_download serve the cached snapshot, so the
real Hub code path runs with no network. Revisions are recorded as the snapshot's commit.
"""

import json
import shutil

import huggingface_hub.constants
from huggingface_hub import ModelCard

from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.recipes import BaseLLM, Recipe

VLM_SHA = "a" * 40
BASE_SHA = "b" * 40


def cache_repo(cache, repo_id, folder, sha):
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / sha)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)


def test_convert_from_hub_ids(tmp_path, monkeypatch, vlm_factory, base_llm):
    cache = tmp_path / "hub"
    cache_repo(cache, "tiny-org/tiny-llava", vlm_factory(shards=True), VLM_SHA)
    cache_repo(cache, "tiny-org/tiny-base", base_llm, BASE_SHA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    recipe = Recipe(base_llm=BaseLLM(id="tiny-org/tiny-base"), layers=[2], rank=1)

    dry = convert(
        ConvertOptions(
            "tiny-org/tiny-llava", tmp_path / "dry", recipe, dry_run=True, progress=False
        )
    )
    assert len(dry.plan.edits) == 2 and not (tmp_path / "dry").exists()

    out = tmp_path / "guarded"
    convert(ConvertOptions("tiny-org/tiny-llava", out, recipe, progress=False))
    record = json.loads((out / "vlmguard.json").read_text())
    assert record["source"] == {
        "id": "tiny-org/tiny-llava",
        "revision": VLM_SHA,
        "from_hub": True,
        "hub_id": "tiny-org/tiny-llava",
    }
    assert record["direction"]["base_model"] == "tiny-org/tiny-base"
    assert record["direction"]["base_revision"] == BASE_SHA
    assert ModelCard.load(out / "README.md").data.base_model == "tiny-org/tiny-llava"


def test_inspect_a_cached_hub_model_needs_only_its_json_files(tmp_path, monkeypatch, vlm_factory):
    """A sharded Hub model: its index names every tensor, so inspect needs no weights."""
    from click.testing import CliRunner

    from cli import main

    jsons = tmp_path / "jsons"
    jsons.mkdir()
    for path in vlm_factory(shards=True).glob("*.json"):
        shutil.copy(path, jsons / path.name)
    assert (jsons / "model.safetensors.index.json").is_file()
    cache = tmp_path / "hub"
    cache_repo(cache, "tiny-org/sharded", jsons, VLM_SHA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    shown = CliRunner().invoke(main, ["inspect", "tiny-org/sharded"])
    assert shown.exit_code == 0, shown.output
    assert "layers 0-3 (4 layers): self_attn.o_proj, mlp.down_proj" in shown.output
