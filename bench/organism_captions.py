"""Does an edit keep the organism's image understanding? Caption accuracy on shape images.

The organism was trained to answer "describe the image ." with "the image shows a {color}
{shape} ."; an answer counts as correct when it names both. Reproduce:

    python bench/organism_captions.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import organism_search as search

from vlmguard_edit import evaluate as ev
from vlmguard_edit import organism
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.direction import compute_direction


def accuracy(subject: ev.Subject, count: int = 96) -> float:
    rng = random.Random(123)
    shapes = [organism.draw_shape(rng) for _ in range(count)]
    correct = 0
    for start in range(0, count, 16):
        chunk = shapes[start : start + 16]
        batch = subject.inputs(["describe the image ."] * len(chunk), [img for img, _, _ in chunk])
        out = subject.generate(("caption", "benign", start), batch, 12)
        answers = subject.processor.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        correct += sum(
            color in a and shape in a for a, (_, color, shape) in zip(answers, chunk, strict=True)
        )
    return correct / count


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = search.ORGANISM
    direction = compute_direction(
        resolve_model(str(root / "llm")),
        load_anchors(root / "anchors.jsonl"),
        [0, 1, 2, 3],
        1,
        progress=False,
    )
    v = direction.select([0, 1, 2, 3], 1)

    def summed(m):
        total = sum(search.attention_aware(m, v[i], i)[0] for i in range(4))
        return torch.nn.functional.normalize(total, dim=0)[None]

    edits = {
        "none": None,
        "attention-aware shift +0.25 u0": lambda m: search.projector_shift(
            m, search.attention_aware(m, v[0], 0), 0.25
        ),
        "attention-aware shift +0.5 u0": lambda m: search.projector_shift(
            m, search.attention_aware(m, v[0], 0), 0.5
        ),
        "attention-aware shift +1 u0": lambda m: search.projector_shift(
            m, search.attention_aware(m, v[0], 0), 1.0
        ),
        "attention-aware shift +8 sum(u0..u3)": lambda m: search.projector_shift(m, summed(m), 8.0),
        "projector shift +8 V0": lambda m: search.projector_shift(m, v[0], 8.0),
    }
    for name, edit in edits.items():
        subject = ev.Subject(root / "vlm", "cpu", "auto")
        if edit is not None:
            with torch.no_grad():
                edit(subject.model)
        print(f"{name:40s} caption accuracy {accuracy(subject):.2f}", flush=True)


if __name__ == "__main__":
    main()
