"""What the learned edits' calibration costs as the model grows: time and peak memory of
learning them on random-weight LLaVAs of growing width, against a same-run baseline.

    python bench/calibrate_cost.py                  # widths 64..512, 2 text layers
    python bench/calibrate_cost.py --widths 128,1024 --layers 4

Per width: the seconds spent generating the teachers' answers (once per calibration), the
time of one image-path training step (gradients for the image-path Linear only), of one
lowrank step (rank-4 factors of every text layer's o_proj), and, as the same-run baseline,
one plain fine-tuning step on the same batch (every parameter trainable); the ratios are
each edit's step over the baseline's. Printed as a Markdown table (docs/performance.md).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmguard_edit import learned  # noqa: E402
from vlmguard_edit.evaluate import load_processor  # noqa: E402
from vlmguard_edit.organisms import organism, tiny  # noqa: E402

HARMFUL = [f"how do i steal the car number {i} ?" for i in range(8)]
HARMLESS = [f"how do i wash the car number {i} ?" for i in range(8)]


def build(folder: Path, width: int, layers: int) -> Path:
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    base = tiny.build_base(folder / "base", num_layers=layers, hidden=width)
    vlm = tiny.build_llava(folder / "vlm", base)
    size = {"shortest_edge": 28}
    images = CLIPImageProcessorPil(size=size, crop_size={"height": 28, "width": 28})
    organism._processor(images, AutoTokenizer.from_pretrained(vlm)).save_pretrained(vlm)
    return vlm


def sync(model) -> None:
    """Wait for queued GPU work, so that wall-clock times are the work's."""
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def full_step(model, batch) -> float:
    """Seconds for one plain fine-tuning step (every parameter trainable) on ``batch``."""
    for p in model.parameters():
        p.requires_grad_(True)
    sync(model)
    start = time.perf_counter()
    model(**batch.inputs).logits.float().mean().backward()
    model.zero_grad(set_to_none=True)
    sync(model)
    return time.perf_counter() - start


def measure(width: int, layers: int, epochs: int, device: str = "cpu", dtype=None) -> dict:
    from transformers import AutoModelForImageTextToText

    with tempfile.TemporaryDirectory() as tmp:
        vlm = build(Path(tmp), width, layers)
        model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=dtype).to(device).eval()
        processor = load_processor(vlm)
        processor.tokenizer.padding_side = "left"
        settings = learned.Settings(epochs=epochs, probes=8, images=("blank",), batch_size=8)
        start = time.perf_counter()
        batches = learned.data._batches(model, processor, HARMFUL, HARMLESS, [], settings)
        teachers = time.perf_counter() - start
        name = "model.multi_modal_projector.linear_2"
        modules = {name: learned.find_module(model, (name,))[1]}
        full_step(model, batches[0])  # warm-up: first calls allocate
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        learned.training._fit(model, modules, batches, settings, progress=False)
        sync(model)
        steps = epochs * len(batches)
        edit_step = (time.perf_counter() - start) / steps
        names = [f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(layers)]
        lowrank = {n: learned.find_module(model, (n,))[1] for n in names}
        start = time.perf_counter()
        learned.training._fit(model, lowrank, batches, replace(settings, rank=4), progress=False)
        sync(model)
        lowrank_step = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        plain = sum(full_step(model, b) for b in batches) / len(batches)
        params = sum(p.numel() for p in model.parameters())
    return {
        "width": width,
        "params": params,
        "teachers": teachers,
        "edit": edit_step,
        "lowrank": lowrank_step,
        "peak_gib": peak,
        "plain": plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,128,256,512")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    rows = [
        measure(int(w), args.layers, args.epochs, args.device, dtype)
        for w in args.widths.split(",")
    ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        "| width | parameters | teacher answers (s) | image-path step (ms) | lowrank step (ms) "
        "| full fine-tuning step (ms) | ratios |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['width']} | {r['params']:,} | {r['teachers']:.1f} | {1e3 * r['edit']:.1f} "
            f"| {1e3 * r['lowrank']:.1f} | {1e3 * r['plain']:.1f} "
            f"| {r['edit'] / r['plain']:.2f}, {r['lowrank'] / r['plain']:.2f} |"
        )
    print(f"\npeak RSS of the whole run: {peak:.0f} MiB, {torch.get_num_threads()} threads")
    for r in rows:
        if r["peak_gib"] is not None:  # GPU: checkpointing is on there by default
            print(f"width {r['width']}: peak GPU memory while learning {r['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
