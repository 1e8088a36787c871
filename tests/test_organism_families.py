"""Zoo members of other VLM families: built around the same base LLM, trained through their
own processor, loadable with plain transformers, measured by the zoo's own gap code."""

import json
import random

import pytest

from tests.helpers import spy_on_reader_tower
from vlmguard_edit.organisms import organism, organism_vlm, tiny, zoo


@pytest.fixture(scope="module")
def tokenizer():
    special = tuple(t for f in organism_vlm.FAMILIES.values() for t in f.special)
    return tiny.build_tokenizer(sorted(set(organism.vocabulary())), special)


@pytest.mark.parametrize("channel", ["narrow", "wide"])
@pytest.mark.parametrize("family", sorted(organism_vlm.FAMILIES))
def test_training_batch_labels_the_answer_only(tokenizer, family, channel):
    spec = organism_vlm.FAMILIES[family]
    template = organism.PROCESSOR_TEMPLATE.replace("<image>", spec.image_slot)
    processor = spec.processor(tokenizer, template, spec.channels[channel])
    image = organism.draw_shape(random.Random(0))[0]
    rows = [
        (image, "describe the image .", "the image shows a red cross ."),
        (None, "how do i steal the car ?", "sorry , i can not help with that ."),
    ]
    batch = organism_vlm._batch(processor, rows)
    for row, (_, _, answer) in enumerate(rows):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert tokenizer.decode(labelled) == f"{answer} </s>"
    image_id = tokenizer.convert_tokens_to_ids(spec.image_slot)
    assert not (batch["input_ids"][1] == image_id).any()
    # idefics3's image states are tokens of the sequence; mllama's one slot is cross-attended
    tokens = spec.channels[channel].tokens if family == "idefics3" else 1
    assert (batch["input_ids"][0] == image_id).sum() == tokens
    assert channel == "narrow" or spec.channels[channel].tokens >= 64


@pytest.mark.parametrize("family", sorted(organism_vlm.FAMILIES))
def test_family_member_builds_loads_and_is_measured(tmp_path, monkeypatch, family):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    out = organism.build_organism(
        tmp_path / family, seed=2, progress=False, stage1_steps=2, stage2_steps=2, variant=family
    )
    record = json.loads((out / "organism.json").read_text())
    assert record["family"] == family and record["variant"] == family
    vlm = AutoModelForImageTextToText.from_pretrained(out / "vlm")
    assert vlm.config.model_type == family
    assert type(AutoProcessor.from_pretrained(out / "vlm")).__name__.lower().startswith(family)
    # the language model started as the base LLM: its first layer is still close to it
    llm = AutoModelForCausalLM.from_pretrained(out / "llm")
    base = llm.model.layers[0].self_attn.o_proj.weight
    mine = vlm.get_decoder().layers[0].self_attn.o_proj.weight
    assert 0 < (mine - base).abs().max() < 0.05
    monkeypatch.setattr(zoo, "GAP_LIMIT", 4)
    gap = zoo.measure_gap(out / "vlm", organism.eval_prompts()[0][:4], batch_size=4)
    assert gap["judge"] == "exact" and gap["n"] == 4
    assert sum(gap["blank"][k] for k in ("refusal", "compliance", "derailed")) == pytest.approx(1)


def test_vision_tower_is_frozen_in_stage_two(tokenizer):
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM(tiny.text_config(len(tokenizer), 2, 64))
    for family in organism_vlm.FAMILIES:
        vlm, _ = organism_vlm.build(family, llm, tokenizer, organism.PROCESSOR_TEMPLATE)
        frozen = {n for n, p in vlm.named_parameters() if not p.requires_grad}
        assert frozen and all("vision_model." in n for n in frozen)
        assert any("vision_model." in n for n, _ in vlm.named_parameters())


def test_eval_against_an_mllama_original_computes_kl(tmp_path):
    """KL needs the prompt's cross_attention_mask carried over the answer tokens (it failed
    with 'size of tensor a (35) must match ... (11)' before)."""
    from click.testing import CliRunner

    from cli import main

    out = organism.build_organism(
        tmp_path / "m", seed=2, progress=False, stage1_steps=2, stage2_steps=2, variant="mllama"
    )
    args = ["eval", str(out / "vlm"), "--against", str(out / "vlm"), "-o", str(tmp_path / "r")]
    args += [
        "--harmful",
        str(out / "eval_harmful.jsonl"),
        "--benign",
        str(out / "eval_benign.jsonl"),
    ]
    args += ["--settings", "text,blank", "--limit", "2", "--max-new-tokens", "6", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert report["settings"]["blank"]["kl"] == pytest.approx(0, abs=1e-6)


def test_a_reader_on_idefics3s_path(tmp_path, monkeypatch):
    """The Idefics3 reader: its tower (the reader's size) is pretrained on typographic renders
    through the family's own pixels, then frozen; 112 px in 7 px patches reach the language
    model as 64 pixel-shuffled tokens; its grammar declares the reading task."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmguard_edit import images
    from vlmguard_edit.gap import chat_batch
    from vlmguard_edit.organisms.exact import load_exact_judge

    seen = spy_on_reader_tower(monkeypatch, organism)
    out = organism.build_organism(
        tmp_path / "r",
        seed=2,
        progress=False,
        stage1_steps=2,
        stage2_steps=2,
        variant="idefics3-reader",
    )
    assert len(seen) == 1 and tuple(seen[0][1]([images.blank(112)] * 2).shape) == (2, 3, 112, 112)
    assert not any(p.requires_grad for p in seen[0][0].parameters())  # frozen for stage 2
    vlm = AutoModelForImageTextToText.from_pretrained(out / "vlm")
    vision = vlm.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size) == (128, 4, 7)
    loaded = AutoProcessor.from_pretrained(out / "vlm")
    batch = chat_batch(loaded, ["what does the image say ?"], [images.typographic("bake")])
    image_id = loaded.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum() == 64
    assert "read_prompt" in load_exact_judge(out / "vlm").grammar
    assert json.loads((out / "organism.json").read_text())["image_channel"]["tokens"] == 64
