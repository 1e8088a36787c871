"""Peak memory of `vlmguard-edit convert` at two checkpoint sizes (streaming check).

Builds synthetic LLaVA-1.5-7B-shaped checkpoints (hidden 4096, intermediate 11008, bf16, one
shard per layer), edits half of the layers with a random unit direction, and reports peak
RSS (from /usr/bin/time) and wall time next to a plain `cp -r` of the same folder. Reproduce
the README numbers (4 and 8 layers: 0.8 and 1.6 GB) with:

    python bench/convert_memory.py --layers 4 8 --work /tmp/vlmguard-mem
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmguard_edit.direction import Direction

HIDDEN, INTERMEDIATE = 4096, 11008


def build(folder: Path, layers: int) -> Path:
    """A LLaVA-layout checkpoint with o_proj, down_proj and up_proj per layer; its direction."""
    folder.mkdir(parents=True, exist_ok=True)
    text = {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
    }
    config = {"model_type": "llava", "text_config": text, "vision_config": {}}
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for layer in range(layers):
        prefix = f"language_model.model.layers.{layer}"
        tensors = {
            f"{prefix}.self_attn.o_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=generator),
            f"{prefix}.mlp.down_proj.weight": torch.randn(
                HIDDEN, INTERMEDIATE, generator=generator
            ),
            f"{prefix}.mlp.up_proj.weight": torch.randn(INTERMEDIATE, HIDDEN, generator=generator),
        }
        name = f"model-{layer:05d}.safetensors"
        save_file(
            {k: v.bfloat16() for k, v in tensors.items()}, folder / name, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    unit = {
        layer: torch.nn.functional.normalize(torch.randn(1, HIDDEN, generator=generator), dim=1)
        for layer in range(layers)
    }
    direction = folder.parent / f"direction-{layers}.safetensors"
    Direction(unit, meta={"rank": 1}).save(direction)
    return direction


def measure(command: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, int(done.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmguard-mem"))
    args = parser.parse_args()
    for layers in args.layers:
        source = args.work / f"ckpt-{layers}"
        direction = build(source, layers)
        for target in (args.work / "out", args.work / "copy"):
            shutil.rmtree(target, ignore_errors=True)
        edited = f"{layers // 2}-{layers - 1}"
        wall, rss = measure(
            [
                "vlmguard-edit",
                "convert",
                str(source),
                "-o",
                str(args.work / "out"),
                "--direction",
                str(direction),
                "--layers",
                edited,
                "-q",
            ]
        )
        copy_wall, _ = measure(["cp", "-r", str(source), str(args.work / "copy")])
        size = sum(p.stat().st_size for p in source.iterdir()) / 2**30
        print(
            f"{layers} layers ({size:.2f} GiB): convert peak RSS {rss / 1024:.0f} MB, "
            f"{wall:.1f} s; cp -r {copy_wall:.1f} s"
        )


if __name__ == "__main__":
    main()
