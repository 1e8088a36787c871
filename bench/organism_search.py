"""Search foldable edits on the shipped organism; prints one table row per edit.

Each edit is applied in memory with vlmguard_edit.fold.apply_map (the same math convert folds
into the checkpoint), then evaluated against the unedited VLM. Reproduce:

    python bench/organism_search.py [--limit 48] [--out docs/organism_search.json]
    python bench/organism_search.py --limit 48 --only image-gap --out docs/organism_search.json
                                    (re-runs only those rows and updates them in the file)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoProcessor
from transformers.utils import logging as hf_logging

from vlmguard_edit import evaluate as ev
from vlmguard_edit import images as imgs
from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.direction import compute_direction
from vlmguard_edit.fold import apply_map, attention_direction
from vlmguard_edit.gap import attention_outputs, gap_vector
from vlmguard_edit.organisms import organism
from vlmguard_edit.runtime import SteerHooks, text_layers, writer_modules

ROOT = Path(__file__).resolve().parent.parent
ORGANISM = ROOT / "examples" / "organism"
ANCHORS = load_anchors(ORGANISM / "anchors.jsonl")


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


def shapes(count: int, seed: int) -> list:
    """(image, colour, shape) triples drawn like the organism's caption data."""
    rng = random.Random(seed)
    return [organism.draw_shape(rng) for _ in range(count)]


def caption_accuracy(subject: ev.Subject, count: int = 96) -> float:
    """Image understanding: the organism learnt to answer "describe the image ." with "the
    image shows a {colour} {shape} ."; an answer is correct when it names both."""
    drawn = shapes(count, 123)
    correct = 0
    for start in range(0, count, 16):
        chunk = drawn[start : start + 16]
        batch = subject.inputs(["describe the image ."] * len(chunk), [img for img, _, _ in chunk])
        out = subject.generate(("caption", "benign", start), batch, 12)
        answers = subject.processor.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        correct += sum(
            color in a and shape in a for a, (_, color, shape) in zip(answers, chunk, strict=True)
        )
    return correct / count


def image_subspace(subject: ev.Subject, k: int) -> torch.Tensor:
    """The top-k principal directions of the projector's outputs over 64 shape images (rows):
    the subspace the image content uses."""
    drawn = shapes(64, 7)
    captured = {}
    module = subject.model.model.multi_modal_projector
    handle = module.register_forward_hook(lambda _m, _i, out: captured.update(x=out.detach()))
    with torch.no_grad():
        subject.model(**subject.inputs(["describe the image ."] * 64, [i for i, _, _ in drawn]))
    handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1])
    return torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:k]


def confined_shift(v, gamma: float, subspace: torch.Tensor):
    """The attention-aware shift with the image-content subspace removed from u."""

    def edit(m):
        u = attention_aware(m, v, 0)[0]
        u = u - subspace.T @ (subspace @ u)
        projector_shift(m, (u / u.norm())[None], gamma)

    return edit


def markdown(rows: dict, settings=("text", "blank", "typographic", "noise")) -> str:
    """The README table: harmful refusal per setting, worst benign compliance, worst KL and
    caption accuracy."""
    head = [
        "edit",
        *[f"refusal {s}" for s in settings],
        "benign compliance (min)",
        "KL (max)",
        "captions",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, metrics in rows.items():
        refusal = [f"{100 * metrics[s]['harmful_refusal']:.0f}%" for s in settings]
        benign = min(metrics[s]["benign_compliance"] for s in settings)
        kl = max(metrics[s].get("kl", 0.0) for s in settings)
        captions = metrics.get("captions")
        cells = [*refusal, f"{100 * benign:.0f}%", f"{kl:.3f}", f"{captions:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attention_shift(v, gamma: float):
    """The projector-shift edit along layer 0's attention-aware direction, strength gamma."""
    return lambda m: projector_shift(m, attention_aware(m, v, 0), gamma)


def image_gap(layers: list[int], orthogonal: bool = True):
    """The image-gap projection folded into the layers' attention o_proj (vlmguard_edit.gap);
    ``orthogonal=False``: the raw mean push delta_l, text-only mean not removed (control)."""

    def edit(m):
        processor = AutoProcessor.from_pretrained(ORGANISM / "vlm")
        prompts = list(ANCHORS.harmful) + list(ANCHORS.harmless)
        text = attention_outputs(m, processor, prompts, None, layers, 16, False)
        image = attention_outputs(m, processor, prompts, imgs.blank(), layers, 16, False)
        for layer in layers:
            if orthogonal:
                v = gap_vector(text[layer], image[layer])[0]
            else:
                delta = image[layer].mean(0) - text[layer].mean(0)
                v = (delta / delta.norm())[None]
            o_proj = text_layers(m)[layer].self_attn.o_proj
            o_proj.weight.data = apply_map(o_proj.weight.data, v, -1.0)

    return edit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=240)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="print the markdown table of a saved run")
    parser.add_argument(
        "--only", help="run only the edits whose name contains this; --out then updates its rows"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    direction = compute_direction(
        resolve_model(str(ORGANISM / "llm")),
        ANCHORS,
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
        ANCHORS,
        [0],
        1,
        is_vlm=True,
        progress=False,
    ).select([0], 1)[0]
    random_unit = torch.nn.functional.normalize(torch.randn(1, v1[0].shape[1]), dim=1)
    v0 = v1[0]
    subspace = image_subspace(original, 16)
    # The gate moved to the image setting: midpoint of blank-image harmful and benign
    # projections per layer (python bench/organism_gate.py prints them).
    image_gate = {0: -3.34, 1: -2.73, 2: -3.21, 3: -3.18}

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
        "stream amplification beta=1 (V of L0)": lambda m: stream(m, v1, 0, 1.0),
        "stream amplification beta=2 (V of L0)": lambda m: stream(m, v1, 0, 2.0),
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
        **{
            f"confined shift +{gamma:g} u0 (image top-16 PCs removed)": confined_shift(
                v0, gamma, subspace
            )
            for gamma in (0.5, 0.7, 1.0)
        },
        "shift +8 V0 + writers beta=2 L1-3": lambda m: (
            projector_shift(m, v0, 8.0),
            writers(m, [1, 2, 3], v1, 2.0),
        ),
        "shift +8 V0 + writers beta=2 L0-3": lambda m: (
            projector_shift(m, v0, 8.0),
            writers(m, [0, 1, 2, 3], v1, 2.0),
        ),
        "control: raw image push delta projected, o_proj L0": image_gap([0], orthogonal=False),
        "image-gap projection, o_proj L0": image_gap([0]),
        "image-gap projection, o_proj L0-1 (default)": image_gap([0, 1]),
        "image-gap projection, o_proj L0-3": image_gap([0, 1, 2, 3]),
        "image-gap projection, o_proj L2": image_gap([2]),
    }
    runtime = {
        "runtime steer alpha=2 L2-3 (paper, midpoint gate)": (
            lambda m: SteerHooks(m, {i: v1[i] for i in (2, 3)}, "steer", 2.0, midpoint, "prompt")
        ),
        "runtime steer alpha=4 L0-3 (paper, midpoint gate)": (
            lambda m: SteerHooks(m, v1, "steer", 4.0, midpoint, "prompt")
        ),
        "runtime steer alpha=2 L0-3 (gate at the blank-image midpoint)": (
            lambda m: SteerHooks(m, v1, "steer", 2.0, image_gate, "prompt")
        ),
        "runtime project L2-3": lambda m: SteerHooks(m, {i: v1[i] for i in (2, 3)}, "project"),
    }
    rows = json.loads(args.out.read_text()) if args.only and args.out and args.out.exists() else {}
    for name, edit in list(edits.items()) + list(runtime.items()):
        if args.only and args.only not in name:
            continue
        subject = ev.Subject(ORGANISM / "vlm", "cpu", "auto")
        if name in runtime:
            subject.hooks = runtime[name]
        elif edit is not None:
            with torch.no_grad():
                edit(subject.model)
        report = ev.run_eval({"model": subject}, original, opts)
        metrics = report["systems"]["model"]["settings"]
        metrics["captions"] = caption_accuracy(subject)  # generate applies the runtime hooks
        rows[name] = metrics
        cells = [
            f"{metrics[s]['harmful_refusal']:.2f}/{metrics[s]['benign_compliance']:.2f}/{metrics[s]['kl']:.3f}"
            for s in opts.settings
        ]
        print(
            f"{name:52s} " + "  ".join(cells) + f"  captions {metrics['captions']:.2f}", flush=True
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
