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
from vlmguard_edit import selftest, tiny
from vlmguard_edit.errors import UnsupportedModelError
from vlmguard_edit.kinds import KINDS
from vlmguard_edit.layout import FAMILIES

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
    assert "idefics3: 5 passed, 0 failed" in result.output


def test_a_refused_family_is_one_line():
    with pytest.raises(UnsupportedModelError, match=r"gemma4.*not supported: post-projection"):
        selftest.run({"model_type": "gemma4", "text_config": {}})
    result = CliRunner().invoke(main, ["inspect", "gemma4", "--self-test", "-q"])
    assert result.exit_code != 0 and "not supported" in result.output


def test_every_image_text_to_text_type_is_supported_or_refused_with_a_reason():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vlmguard_edit.layout import REFUSED, detect_family

    assert set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) <= set(FAMILIES) | set(REFUSED)
    assert not set(FAMILIES) & set(REFUSED)
    for name, reason in REFUSED.items():
        with pytest.raises(UnsupportedModelError, match="not supported: " + re.escape(reason)):
            detect_family({"model_type": name})
    assert len(FAMILIES) >= 35
