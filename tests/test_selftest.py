"""The family self-test (vlmguard-edit inspect MODEL --self-test): every family in the layout
data proved on a shrunken random instance of its own default config, every edit kind it
supports checked; the self-test can fail; it runs on a config.json alone."""

import contextlib
import json
import os
import re

import pytest
from click.testing import CliRunner

from cli import main
from vlmguard_edit import selftest
from vlmguard_edit.errors import UnsupportedModelError
from vlmguard_edit.kinds import KINDS
from vlmguard_edit.layout import FAMILIES
from vlmguard_edit.organisms import tiny

# CI proves the families test_families.py does not build, and qwen2_vl and mllama (their own
# image-input formats); VLMGUARD_SELFTEST=all proves every one (bench/families.py does too).
SAMPLE = sorted({f for f in FAMILIES if f not in tiny.FAMILY_CONFIGS} | {"qwen2_vl", "mllama"})
PROVED = sorted(FAMILIES) if os.environ.get("VLMGUARD_SELFTEST") == "all" else SAMPLE


@pytest.mark.parametrize("family", PROVED)
def test_every_family_passes_its_self_test(family):
    checks = selftest.run(selftest.for_model_type(family))
    failed = [c.line() for c in checks if c.status == "failed"]
    assert not failed, failed
    passed = {c.kind for c in checks if c.status == "passed"}
    assert {"writers", "lowrank"} <= passed, passed  # every family takes the text edits
    if FAMILIES[family].image_path:
        assert "image-path" in passed
    unsupported = [c for c in checks if c.status == "unsupported"]
    assert all(c.detail for c in unsupported)  # each with the planner's reason


def test_the_self_test_fails_a_fold_that_is_not_its_hook(monkeypatch):
    kind = KINDS["lowrank"]
    monkeypatch.setattr(type(kind), "hooks", lambda *a: contextlib.nullcontext())
    checks = selftest.run(selftest.for_model_type("llava"))
    lowrank = [c for c in checks if c.kind == "lowrank"]
    assert lowrank and all(c.status == "failed" for c in lowrank)
    assert all("folded - hooked" in c.detail for c in lowrank)
    assert any(c.status == "passed" for c in checks if c.kind == "writers")  # the rest holds


def test_shrink_keeps_token_ids_in_the_vocabulary_and_one_layer_of_each_kind():
    config = {
        "model_type": "qwen3_5",
        "image_token_id": 248056,
        "text_config": {
            "hidden_size": 4096,
            "vocab_size": 248320,
            "num_hidden_layers": 32,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "rope_parameters": {"mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25},
            "head_dim": 256,
        },
        "vision_config": {"hidden_size": 1152, "depth": 27},
    }
    small = selftest.shrink(config)
    text = small["text_config"]
    assert small["image_token_id"] == selftest.IMAGE_TOKEN < text["vocab_size"]
    assert text["layer_types"] == ["linear_attention", "full_attention"]
    assert text["num_hidden_layers"] == 2 and text["hidden_size"] == 64
    assert sum(text["rope_parameters"]["mrope_section"]) == int(16 * 0.25) // 2
    assert small["vision_config"] == {"hidden_size": 32, "depth": 1}
    assert config["text_config"]["hidden_size"] == 4096  # the input is not changed


def test_cli_self_test_on_a_config_json_alone(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(selftest.for_model_type("idefics3")))
    result = CliRunner().invoke(main, ["inspect", str(path), "--self-test", "-q"])
    assert result.exit_code == 0, result.output
    assert "image-path           legacy  passed" in result.output
    rows = {line.split()[0]: line.split()[2] for line in result.output.splitlines()[:-1]}
    assert set(rows) == set(KINDS)  # every kind was checked
    passed = sum(status == "passed" for status in rows.values())
    assert passed >= len(KINDS) - 1  # only projector-shift: idefics3 has no projector bias
    assert f"idefics3: {passed} passed, 0 failed" in result.output


def test_a_refused_family_is_one_line():
    with pytest.raises(UnsupportedModelError, match=r"gemma3n.*not supported: post-projection"):
        selftest.run({"model_type": "gemma3n", "text_config": {}})
    result = CliRunner().invoke(main, ["inspect", "gemma3n", "--self-test", "-q"])
    assert result.exit_code != 0 and "not supported" in result.output


def test_gemma4_writes_through_three_normed_writers_and_its_moe_models_are_refused(tmp_path):
    from vlmguard_edit.layout import detect_family

    config = selftest.shrink(selftest.for_model_type("gemma4"))
    writers = {w.module: w.post_norm for w in _writers(config, tmp_path)[0]}
    assert set(writers) == {"self_attn.o_proj", "mlp.down_proj", "per_layer_projection"}
    assert all(norm is not None for norm in writers.values())  # each behind its post-norm
    config["text_config"]["enable_moe_block"] = True
    with pytest.raises(UnsupportedModelError, match=r"gemma4 with enable_moe_block.*norm of a sum"):
        detect_family(config)


def test_mistral3_with_a_mistral4_text_model_is_proved_experts_and_all(tmp_path):
    config = selftest.for_model_type("mistral3")
    config["text_config"] = selftest.for_model_type("mistral4")  # Mistral Small 4: MLA + MoE
    checks = selftest.run(config)
    assert not [c.line() for c in checks if c.status == "failed"]
    assert {"writers", "lowrank", "image-path"} <= {c.kind for c in checks if c.status == "passed"}
    moe = {w.module for w in _writers(selftest.shrink(config), tmp_path)[1]}  # 0 is dense
    assert moe == {"self_attn.o_proj", "mlp.experts", "mlp.shared_experts.down_proj"}


def test_shrink_keeps_the_kept_layers_entries_of_every_per_layer_list():
    text = selftest.shrink(selftest.for_model_type("mistral_large4"))["text_config"]
    assert text["num_hidden_layers"] == 2
    assert text["mlp_layer_types"] == ["dense", "sparse"] and text["kv_source_layers"] == [0, 1]
    gemma = selftest.shrink(selftest.for_model_type("gemma4"))["text_config"]
    # one sliding and one full-attention layer; the full one keeps its own (shrunk) head_dim
    assert gemma["layer_types"] == ["sliding_attention", "full_attention"]
    assert gemma["per_layer_config"] == {"1": {"head_dim": 16}}


def _writers(config, tmp_path):
    """The writers by layer of a random build of a shrunken ``config`` (save_pretrained keys),
    as convert finds them."""
    from vlmguard_edit.checkpoint import open_checkpoint
    from vlmguard_edit.layout import find_layout

    checkpoint = open_checkpoint(selftest.build(config, tmp_path, "legacy"))
    return find_layout(checkpoint.config, checkpoint.keys).writers


def test_every_family_names_its_image_path_or_why_it_has_none():
    from vlmguard_edit.errors import PlanError
    from vlmguard_edit.kinds.image_path import image_path_edits
    from vlmguard_edit.layout import Layout

    assert not [n for n, f in FAMILIES.items() if bool(f.image_path) == bool(f.no_image_path)]
    layout = Layout(FAMILIES["ovis2"], "model.language_model.layers", 1, 8, {}, None, 1, 1)
    with pytest.raises(PlanError, match=r"ovis2: no image-to-language Linear found \(its image"):
        image_path_edits(None, layout)  # the planner says why


def test_every_image_text_to_text_type_is_supported_or_refused_with_a_reason():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vlmguard_edit.layout import REFUSED, detect_family

    assert set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) <= set(FAMILIES) | set(REFUSED)
    assert not set(FAMILIES) & set(REFUSED)
    for name, reason in REFUSED.items():
        with pytest.raises(UnsupportedModelError, match="not supported: " + re.escape(reason)):
            detect_family({"model_type": name})
    assert len(FAMILIES) >= 35
