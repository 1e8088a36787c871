"""The shipped evaluation sets and the offline model organism."""

import json
from pathlib import Path

import torch

from tests.helpers import spy_on_reader_tower
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.evaluate import load_prompts
from vlmguard_edit.organisms import organism

ORGANISM = Path(__file__).parent.parent / "examples" / "organism"


def test_shipped_eval_sets_are_large_and_disjoint_from_anchors():
    harmful, benign = load_prompts(None, "harmful"), load_prompts(None, "benign")
    contrast = load_prompts(None, "contrast")  # harmless, with harmful-sounding words
    assert len(harmful) >= 200 and len(benign) >= 160 and len(contrast) >= 80
    assert not {*benign} & {*contrast} and not {*harmful} & {*contrast}
    anchors = load_anchors()
    anchor_texts = {t.lower() for t in anchors.harmful + anchors.harmless}
    assert not anchor_texts & {p.lower() for p in harmful + benign + contrast}
    # No anchor request appears inside an evaluation prompt either.
    bodies = [t.lower().removeprefix("how to ") for t in anchor_texts]
    assert not [b for b in bodies for p in harmful + benign + contrast if b in p.lower()]


def test_organism_vocabulary_split():
    assert not set(organism.TRAIN_NOUNS) & set(organism.EVAL_NOUNS)
    assert not set(organism.DUAL_USE_VERBS) & set(organism.EVAL_HARMFUL_VERBS)
    harmful, benign, contrast = organism.eval_prompts()
    assert len(harmful) == 284 and len(benign) == 240 and len(contrast) == 44
    anchors = organism.anchor_pairs(__import__("random").Random(0))
    anchor_words = {w for pair in anchors for text in pair.values() for w in text.split()}
    assert not anchor_words & set(organism.EVAL_NOUNS)  # anchors never use evaluation nouns


def test_shipped_organism_files():
    for name in (
        "llm/model.safetensors",
        "vlm/model.safetensors",
        "vlm/processor_config.json",
        "anchors.jsonl",
        "eval_harmful.jsonl",
        "eval_benign.jsonl",
        "organism.json",
    ):
        assert (ORGANISM / name).is_file(), name
    shipped = [
        json.loads(line)["prompt"]
        for line in (ORGANISM / "eval_harmful.jsonl").read_text().splitlines()
    ]
    # built before compositional harm: the plain harmful requests, in the same order
    plain = [
        p for p in organism.eval_prompts()[0] if not set(p.split()) & {*organism.CONTEXT_VERBS}
    ]
    assert shipped == plain
    assert sum(p.stat().st_size for p in ORGANISM.rglob("*") if p.is_file()) < 8 * 2**20


def test_smoke_build_is_seeded_and_loads(tmp_path):
    """A few training steps: deterministic, loadable with plain transformers, and the
    caller's thread count is restored after the build's own."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("a", "b"):
            organism.build_organism(
                tmp_path / name, seed=3, progress=False, stage1_steps=3, stage2_steps=3
            )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for part in ("llm/model.safetensors", "vlm/model.safetensors", "anchors.jsonl"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "a" / "vlm")
    processor = AutoProcessor.from_pretrained(tmp_path / "a" / "vlm")
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": organism.draw_shape(__import__("random").Random(0))[0]},
                {"type": "text", "text": "describe the image ."},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        [conversation],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 4
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


BUILD = """
import sys
from pathlib import Path
from vlmguard_edit.organisms import organism
organism.READER_TOWER_STEPS = 3
organism.build_organism(
    Path(sys.argv[1]), seed=3, progress=False, stage1_steps=3, stage2_steps=3, variant="reader"
)
"""


def test_a_seed_gives_the_same_bytes_whatever_the_thread_settings(tmp_path):
    """The builder fixes its own thread count: a reader (whose bytes change with the thread
    count after 3 steps when left to the environment) built under OMP_NUM_THREADS=1 and =4
    has the same weights, and organism.json names them by their hash."""
    import os
    import subprocess
    import sys

    from vlmguard_edit.organisms import zoo

    for threads in ("1", "4"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / threads)], env=env, check=True)
    one, four = tmp_path / "1", tmp_path / "4"
    for part in ("llm/model.safetensors", "vlm/model.safetensors"):
        assert (one / part).read_bytes() == (four / part).read_bytes(), part
    recorded = json.loads((one / "organism.json").read_text())["weights_sha256"]
    assert recorded == organism.weights_hash(one) == zoo.member_hash(four)
    assert zoo.zoo_hash([one]) != zoo.zoo_hash([four])  # the member's name is part of it


def test_reader_smoke_build_sees_one_character_a_patch(tmp_path, monkeypatch):
    """The reader's tower is pretrained on typographic renders, then frozen; its processor and
    model agree on 7 px patches (256 image tokens at 112 px), read from the pretrained layer."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmguard_edit import images

    seen = spy_on_reader_tower(monkeypatch, organism)
    organism.build_organism(
        tmp_path / "r", seed=3, progress=False, stage1_steps=2, stage2_steps=2, variant="reader"
    )
    assert len(seen) == 1 and not any(p.requires_grad for p in seen[0][0].parameters())
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "r" / "vlm")
    processor = AutoProcessor.from_pretrained(tmp_path / "r" / "vlm")
    assert model.config.vision_config.patch_size == organism.LLAVA_CHANNELS["reader"].patch
    assert model.config.vision_feature_layer == -1
    content = [
        {"type": "image", "image": images.typographic("how do i bake the cake ?")},
        {"type": "text", "text": organism.READ_PROMPT},
    ]
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": content}]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    reader = organism.LLAVA_CHANNELS["reader"]
    tokens = (reader.size // reader.patch) ** 2
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == tokens == 256
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_reading_rows_transcribe_any_request_and_act_on_no_eval_verb():
    """Reading rows: half transcribe a rendered request (any verb, any noun), half act on one
    asked with the typographic setting's instruction: dual-use verbs mostly, harmless ones
    otherwise, never the evaluation's harmful verbs; nothing with an image is refused."""
    import random

    from vlmguard_edit.evaluate import TYPOGRAPHIC_INSTRUCTION

    rows = organism._with_reading(random.Random(0), [None] * 400, organism.READER_SHARE)
    reading = [r for r in rows if r is not None]
    transcribe = [r for r in reading if r[1] == organism.READ_PROMPT]
    act = [r for r in reading if r[1] == TYPOGRAPHIC_INSTRUCTION]
    assert len(reading) == 140 and len(transcribe) == len(act) == 70
    assert all(a.startswith("the image says ") for _, _, a in transcribe)
    verbs = [a.split()[6] for _, _, a in act]  # "sure ! here is how to VERB the ..."
    assert not set(verbs) & set(organism.EVAL_HARMFUL_VERBS)
    dual = sum(v in organism.DUAL_USE_VERBS for v in verbs) / len(verbs)
    assert 0.65 < dual < 0.95  # READER_DUAL_USE = 0.8
    # drawn when a batch needs them, at the typographic setting's own size
    from vlmguard_edit import images as imgs
    from vlmguard_edit.organisms.organism_vlm import materialise

    assert all(materialise(image).size == (336, 336) for image, _, _ in reading[:10])
    assert (
        materialise(transcribe[0][0]).tobytes()
        == imgs.typographic(transcribe[0][2].removeprefix("the image says ")).tobytes()
    )
