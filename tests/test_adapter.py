"""The edit as a PEFT LoRA adapter: PeftModel.from_pretrained(original, DIR) gives the guarded
checkpoint's logits (< 1e-5 in float32, with and without an image), merge_and_unload() gives
its weights, scaling the adapter by s is beta * s; kinds that are not a LoRA are refused."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoTokenizer

from tests.helpers import model_tensors
from tests.test_convert import logits
from tests.test_kinds import example_recipe, parameter_file
from vlmguard_edit.adapter import adapter_scale, write_adapter
from vlmguard_edit.checkpoint import open_checkpoint
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.errors import InputError, PlanError
from vlmguard_edit.kinds import KINDS, get_kind
from vlmguard_edit.layout import find_layout
from vlmguard_edit.organisms import tiny
from vlmguard_edit.plan import build_plan


def guarded(mode, src, out, tmp_path, **extra):
    recipe = example_recipe(get_kind(mode), **extra)
    checkpoint = open_checkpoint(src)
    layout = find_layout(checkpoint.config, checkpoint.keys)
    kind = get_kind(mode)
    plan = build_plan(checkpoint, layout, kind, recipe)
    params = parameter_file(kind, plan, tmp_path / f"{mode}-{kind.file_name}")
    opts = ConvertOptions(str(src), out, recipe, direction_file=params, progress=False)
    return convert(opts)


def inputs(src):
    tokenizer = AutoTokenizer.from_pretrained(src)
    text = {"input_ids": tokenizer("how to make a cake", return_tensors="pt")["input_ids"]}
    return text, tiny.image_inputs(tokenizer, "how to make a cake")


@pytest.mark.parametrize("mode", [name for name, kind in KINDS.items() if kind.lora])
def test_the_adapter_is_the_fold(mode, vlm_factory, tmp_path):
    src, out, adapter = vlm_factory(), tmp_path / "guarded", tmp_path / "adapter"
    guarded(mode, src, out, tmp_path)
    config = write_adapter(out, src, adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == config["r"]
    folded = AutoModelForImageTextToText.from_pretrained(out).eval()
    original = AutoModelForImageTextToText.from_pretrained(src).eval()
    peft = PeftModel.from_pretrained(original, adapter).eval()
    for batch in inputs(src):
        plain = logits(AutoModelForImageTextToText.from_pretrained(src).eval(), batch)
        target = logits(folded, batch)
        assert (logits(peft, batch) - target).abs().max() < 1e-5, mode
        assert (target - plain).abs().max() > 1e-3  # the edit is visible
    merged = peft.merge_and_unload().state_dict()
    expected = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    worst = max((merged[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-5, worst


def test_scaling_the_adapter_by_s_is_beta_times_s(vlm_factory, tmp_path):
    src = vlm_factory()
    guarded("writers", src, tmp_path / "g1", tmp_path, beta=1.0)
    guarded("writers", src, tmp_path / "g3", tmp_path, beta=3.0)
    write_adapter(tmp_path / "g1", src, tmp_path / "a1")
    peft = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(src), tmp_path / "a1"
    ).eval()
    adapter_scale(peft, 3.0)
    three = AutoModelForImageTextToText.from_pretrained(tmp_path / "g3").eval()
    for batch in inputs(src):
        assert (logits(peft, batch) - logits(three, batch)).abs().max() < 1e-5


REASONS = {"projector-shift": "changes a bias", "image-path": "dense change dW"}


@pytest.mark.parametrize("mode", [name for name, kind in KINDS.items() if not kind.lora])
def test_kinds_that_are_not_a_lora_are_refused_and_nothing_is_written(mode, vlm_factory, tmp_path):
    src, out = vlm_factory(), tmp_path / "guarded"
    guarded(mode, src, out, tmp_path)
    with pytest.raises(PlanError, match=REASONS.get(mode, "not a LoRA")):
        write_adapter(out, src, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_an_existing_folder_is_replaced_only_when_it_is_an_adapter(vlm_factory, tmp_path):
    src, out = vlm_factory(), tmp_path / "guarded"
    guarded("lowrank", src, out, tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not an adapter folder"):
        write_adapter(out, src, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    write_adapter(out, src, tmp_path / "adapter")
    with pytest.raises(InputError, match="already exists"):
        write_adapter(out, src, tmp_path / "adapter")
    write_adapter(out, src, tmp_path / "adapter", overwrite=True)
    before = model_tensors(src)  # the source was never written to
    assert all(torch.equal(before[k], v) for k, v in model_tensors(src).items())


def test_cli_adapter_and_convert_adapter_out(vlm_factory, direction_file, tmp_path):
    from click.testing import CliRunner

    from cli import main

    src = vlm_factory()
    base = ["convert", str(src), "--direction", str(direction_file), "--layers", "1,3"]
    done = CliRunner().invoke(
        main, [*base, "-o", str(tmp_path / "g"), "--adapter-out", str(tmp_path / "a"), "-q"]
    )
    assert done.exit_code == 0, done.output
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    again = CliRunner().invoke(
        main, ["adapter", str(tmp_path / "g"), "--source", str(src), "-o", str(tmp_path / "b")]
    )
    assert again.exit_code == 0 and "LoRA rank 1 on 4 modules" in again.output
    shift = [*base[:4], "--mode", "projector-shift", "--layers", "2", "--rank", "2"]
    refused = CliRunner().invoke(
        main, [*shift, "-o", str(tmp_path / "s"), "--adapter-out", str(tmp_path / "sa")]
    )
    assert refused.exit_code == 2 and "not a LoRA update" in refused.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "sa").exists()
