"""Search foldable edits on the shipped organism; prints one table row per edit.

Each edit is applied in memory with vlmguard_edit.fold.apply_map (the same math convert folds
into the checkpoint), then evaluated against the unedited VLM. Reproduce:

    python bench/organism_search.py [--limit 48] [--out docs/organism_search.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from vlmguard_edit import evaluate as ev
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.direction import compute_direction
from vlmguard_edit.fold import apply_map, attention_direction
from vlmguard_edit.runtime import SteerHooks, text_layers, writer_modules

ROOT = Path(__file__).resolve().parent.parent
ORGANISM = ROOT / "examples" / "organism"


def writers(model, layers, vectors, beta):
    modules = writer_modules(model)
    for layer in layers:
        for module in modules[layer]:
            module.weight.data = apply_map(module.weight.data, vectors[layer], beta)


def stream(model, vectors, layer_of_v, beta):
    """Fold one subspace into every writer of the residual stream (embeddings, projector, all
    layers). For the projection this equals projecting the stream at every layer."""
    v = vectors[layer_of_v]
    embed = model.get_input_embeddings()
    embed.weight.data = apply_map(embed.weight.data.T, v, beta).T.contiguous()  # rows are d-vectors
    projector(model, v, beta)
    writers(
        model,
        range(len(text_layers(model))),
        dict.fromkeys(range(len(text_layers(model))), v),
        beta,
    )


def projector(model, v, beta):
    out = model.model.multi_modal_projector.linear_2
    out.weight.data = apply_map(out.weight.data, v, beta)
    out.bias.data = apply_map(out.bias.data, v, beta)


def projector_shift(model, v, gamma):
    model.model.multi_modal_projector.linear_2.bias.data += gamma * v[0]


def attention_aware(model, v, layer: int):
    """u ∝ g ⊙ (Σ_h W_o^h W_v^h)^T v: the image-token state that layer's attention maps most
    strongly onto v at the reading token (vlmguard_edit.fold.attention_direction)."""
    block = text_layers(model)[layer]
    config = model.config.text_config
    return attention_direction(
        block.self_attn.o_proj.weight,
        block.self_attn.v_proj.weight,
        block.input_layernorm.weight,
        v[0],
        config.num_attention_heads,
        config.num_key_value_heads,
    )[None]


def markdown(rows: dict, settings=("text", "blank", "typographic", "noise")) -> str:
    """The README table: harmful refusal per setting, worst benign compliance, worst KL."""
    head = ["edit", *[f"refusal {s}" for s in settings], "benign compliance (min)", "KL (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, metrics in rows.items():
        refusal = [f"{100 * metrics[s]['harmful_refusal']:.0f}%" for s in settings]
        benign = min(metrics[s]["benign_compliance"] for s in settings)
        kl = max(metrics[s].get("kl", 0.0) for s in settings)
        lines.append(f"| {name} | " + " | ".join(refusal) + f" | {100 * benign:.0f}% | {kl:.3f} |")
    return "\n".join(lines)


def attention_shift(v, gamma: float):
    """The projector-shift edit along layer 0's attention-aware direction, strength gamma."""
    return lambda m: projector_shift(m, attention_aware(m, v, 0), gamma)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=240)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="print the markdown table of a saved run")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    direction = compute_direction(
        resolve_model(str(ORGANISM / "llm")),
        load_anchors(ORGANISM / "anchors.jsonl"),
        [0, 1, 2, 3],
        2,
        progress=False,
    )
    v1 = direction.select([0, 1, 2, 3], 1)
    midpoint = {layer: direction.midpoint(layer) for layer in range(4)}
    opts = ev.EvalOptions(
        settings=("text", "blank", "typographic", "noise"),
        harmful=ev.load_prompts(ORGANISM / "eval_harmful.jsonl", "harmful")[: args.limit],
        benign=ev.load_prompts(ORGANISM / "eval_benign.jsonl", "benign")[: args.limit],
        max_new_tokens=24,
        batch_size=16,
        progress=False,
    )
    original = ev.Subject(ORGANISM / "vlm", "cpu", "auto")
    self_direction = compute_direction(
        resolve_model(str(ORGANISM / "vlm")),
        load_anchors(ORGANISM / "anchors.jsonl"),
        [0],
        1,
        is_vlm=True,
        progress=False,
    ).select([0], 1)[0]
    random_unit = torch.nn.functional.normalize(torch.randn(1, v1[0].shape[1]), dim=1)
    v0 = v1[0]

    def summed(m):
        total = sum(attention_aware(m, v1[i], i)[0] for i in range(4))
        return torch.nn.functional.normalize(total, dim=0)[None]

    edits = {
        "none": None,
        "writers beta=-1 L2-3": lambda m: writers(m, [2, 3], v1, -1.0),
        "writers beta=-1 L0-3": lambda m: writers(m, [0, 1, 2, 3], v1, -1.0),
        "writers beta=2 L2-3": lambda m: writers(m, [2, 3], v1, 2.0),
        "writers beta=4 L0-3": lambda m: writers(m, [0, 1, 2, 3], v1, 4.0),
        "stream projection (V of L0)": lambda m: stream(m, v1, 0, -1.0),
        "projector beta=-1 (V of L0)": lambda m: projector(m, v0, -1.0),
        "projector beta=-2 (flip, V of L0)": lambda m: projector(m, v0, -2.0),
        "projector shift +4 V0": lambda m: projector_shift(m, v0, 4.0),
        "projector shift +8 V0": lambda m: projector_shift(m, v0, 8.0),
        "control: shift -8 V0": lambda m: projector_shift(m, v0, -8.0),
        "control: shift +8 random unit": lambda m: projector_shift(m, random_unit, 8.0),
        "shift +8 V0 (self direction)": lambda m: projector_shift(m, self_direction, 8.0),
        **{
            f"attention-aware shift +{gamma:g} u0": attention_shift(v0, gamma)
            for gamma in (0.25, 0.35, 0.5, 1.0, 2.0)
        },
        "attention-aware shift +8 sum(u0..u3)": lambda m: projector_shift(m, summed(m), 8.0),
        "shift +8 V0 + writers beta=2 L1-3": lambda m: (
            projector_shift(m, v0, 8.0),
            writers(m, [1, 2, 3], v1, 2.0),
        ),
        "shift +8 V0 + writers beta=2 L0-3": lambda m: (
            projector_shift(m, v0, 8.0),
            writers(m, [0, 1, 2, 3], v1, 2.0),
        ),
    }
    runtime = {
        "runtime steer alpha=2 L2-3 (paper, midpoint gate)": (
            lambda m: SteerHooks(m, {i: v1[i] for i in (2, 3)}, "steer", 2.0, midpoint, "prompt")
        ),
        "runtime steer alpha=4 L0-3 (paper, midpoint gate)": (
            lambda m: SteerHooks(m, v1, "steer", 4.0, midpoint, "prompt")
        ),
        "runtime project L2-3": lambda m: SteerHooks(m, {i: v1[i] for i in (2, 3)}, "project"),
    }
    rows = {}
    for name, edit in list(edits.items()) + list(runtime.items()):
        subject = ev.Subject(ORGANISM / "vlm", "cpu", "auto")
        if name in runtime:
            subject.hooks = runtime[name]
        elif edit is not None:
            with torch.no_grad():
                edit(subject.model)
        report = ev.run_eval({"model": subject}, original, opts)
        metrics = report["systems"]["model"]["settings"]
        rows[name] = metrics
        cells = [
            f"{metrics[s]['harmful_refusal']:.2f}/{metrics[s]['benign_compliance']:.2f}/{metrics[s]['kl']:.3f}"
            for s in opts.settings
        ]
        print(f"{name:52s} " + "  ".join(cells), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
