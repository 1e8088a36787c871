"""Why the paper's gated steer does nothing on the organism: where prompts project on V_l[0].

Prints, per layer, the mean projection of the last prompt token's residual on the base LLM's
direction for harmful and benign prompts, text-only and with a blank image, the gate's
midpoint threshold, and the share of prompts that would open the gate. Reproduce:

    python bench/organism_gate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import organism_search as search

from vlmguard_edit import evaluate as ev
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.direction import compute_direction
from vlmguard_edit.runtime import text_layers


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = search.ORGANISM
    layers = [0, 1, 2, 3]
    direction = compute_direction(
        resolve_model(str(root / "llm")),
        load_anchors(root / "anchors.jsonl"),
        layers,
        1,
        progress=False,
    )
    subject = ev.Subject(root / "vlm", "cpu", "auto")
    captured: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, _inputs, output):
            captured[layer] = (output[0] if isinstance(output, tuple) else output)[:, -1].detach()

        return hook

    handles = [text_layers(subject.model)[i].register_forward_hook(keep(i)) for i in layers]
    prompts = {
        "harmful": ev.load_prompts(root / "eval_harmful.jsonl", "harmful")[:48],
        "benign": ev.load_prompts(root / "eval_benign.jsonl", "benign")[:48],
    }
    for setting in ("text", "blank"):
        for kind, texts in prompts.items():
            words, pictures = ev.setting_inputs(setting, texts, None)
            with torch.no_grad():
                subject.model(**subject.inputs(words, pictures))
            cells = []
            for i in layers:
                projection = captured[i] @ direction.vectors[i][0]
                threshold = direction.midpoint(i)
                opened = (projection > threshold).float().mean()
                cells.append(
                    f"L{i} {projection.mean():7.2f} (gate {threshold:5.2f}, open {opened:.2f})"
                )
            print(f"{setting:5s} {kind:7s} " + " | ".join(cells))
    for handle in handles:
        handle.remove()


if __name__ == "__main__":
    main()
