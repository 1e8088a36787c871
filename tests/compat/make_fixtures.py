"""Build tiny guarded checkpoints with this environment's transformers, for check_load.py to
load with another transformers release (CI runs it under 4.57, the last 4.x).

    python tests/compat/make_fixtures.py OUT [SOURCES]

Each OUT/<case>/ holds `source/` (Hub key layout), `guarded/` (its vlmguard-edit output) and
`expected.safetensors`: the inputs and both models' logits as computed here. SOURCES (from
make_sources.py, run under the other release) adds the models that release wrote: each is
converted here, must load here without missing or unexpected keys, and is checked there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.checkpoint import resolve_model
from vlmguard_edit.convert import ConvertOptions, convert
from vlmguard_edit.direction import Direction, compute_direction
from vlmguard_edit.organisms import tiny
from vlmguard_edit.recipes import Recipe

CASES = {
    "llava-writers": ("llava", Recipe(layers=[1, 3], rank=2, beta=-1.0)),
    "llava-projector-shift": (
        "llava",
        Recipe(layers=[0], rank=1, mode="projector-shift", gamma=1.0),
    ),
    "llava-next-writers": ("llava_next", Recipe(layers=[2], rank=1, beta=2.0)),
}


def main(out: Path) -> None:
    base = tiny.build_base(out / "base")
    direction = compute_direction(resolve_model(str(base)), load_anchors(), [0, 1, 2, 3], 2)
    direction_file = out / "direction.safetensors"
    direction.save(direction_file)
    tokenizer = AutoTokenizer.from_pretrained(base)
    for name, (family, recipe) in CASES.items():
        case = out / name
        source = tiny.build_llava(
            case / "source", base, layout="hub", family=family, max_shard_size="200KB"
        )
        guarded = case / "guarded"
        convert(
            ConvertOptions(
                str(source), guarded, recipe, direction_file=direction_file, progress=False
            )
        )
        inputs = tiny.image_inputs(tokenizer, "how to make a cake", family=family)
        logits = {}
        for name_, folder in (("logits", guarded), ("original_logits", source)):
            model = AutoModelForImageTextToText.from_pretrained(folder).eval()
            with torch.no_grad():
                logits[name_] = model(**inputs).logits.contiguous()
        tensors = {k: v.contiguous() for k, v in inputs.items() if torch.is_tensor(v)}
        save_file({**tensors, **logits}, case / "expected.safetensors")
        print(f"{name}: {guarded}")


def from_sources(out: Path, sources: Path) -> None:
    """Convert models another transformers release wrote; record inputs and logits."""
    generator = torch.Generator().manual_seed(3)
    for source in sorted(sources.glob("*/source")):
        name = source.parent.name
        case = out / f"{name}-from-other-release"
        vectors = {
            layer: torch.linalg.qr(torch.randn(64, 1, generator=generator)).Q.T.contiguous()
            for layer in (0, 1)
        }
        case.mkdir(parents=True)
        Direction(vectors, meta={"rank": 1}).save(case / "direction.safetensors")
        recipe = Recipe(layers=[0, 1], rank=1, beta=2.0)
        convert(
            ConvertOptions(
                str(source),
                case / "guarded",
                recipe,
                direction_file=case / "direction.safetensors",
                progress=False,
            )
        )
        inputs = {"input_ids": torch.tensor([[1, 10, 11, 12, 13, 14]])}
        if name == "mllama":  # image states, so that cross-attention layer 1 runs
            inputs["cross_attention_states"] = torch.randn(1, 4, 64, generator=generator)
        logits = {}
        for key, folder in (("logits", case / "guarded"), ("original_logits", source)):
            model, info = AutoModelForImageTextToText.from_pretrained(
                folder, output_loading_info=True
            )
            if info["missing_keys"] or info["unexpected_keys"]:
                raise SystemExit(f"{folder}: loading here reported {info}")
            with torch.no_grad():
                logits[key] = model.eval()(**inputs).logits.contiguous()
        save_file({**inputs, **logits}, case / "expected.safetensors")
        print(f"{case.name}: {case / 'guarded'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        from_sources(Path(sys.argv[1]), Path(sys.argv[2]))
