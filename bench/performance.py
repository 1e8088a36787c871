"""Convert speed and memory against the physical floor and the load/edit/save_pretrained way,
and direction-extraction cost. Every figure of docs/performance.md:

    python bench/performance.py --work /tmp/vlmguard-perf

Convert: a LLaVA checkpoint with LLaVA-1.5-7B text shapes (hidden 4096, intermediate 11008,
32 heads, vocabulary 32064; a small CLIP tower), bf16, Hub key layout, 500 MB shards, with
--layers text layers (default 4 and 8: 2.2 and 3.8 GB). Half of the layers are edited with a
precomputed random rank-1 direction. Each run times, in separate processes:

- floor:    `cp -r` of the folder + a Python process that imports torch and safetensors;
- convert:  `vlmguard-edit convert SRC --direction D --layers HALF -o OUT -q`;
- baseline: what most tools do: from_pretrained (bf16), fold the same edit into the loaded
            modules, save_pretrained (same shard size).

Wall time is the median of --runs (default 5), peak RSS the maximum (/usr/bin/time). The
page cache is warm for all three (the source was just read or written), and each command
starts after a sync. vlmguard-edit's time includes hashing every file it writes (sha256, for
vlmguard.json and `verify`); the other two hash nothing.

Direction: a deep random Llama base LLM (32 layers x 512) and the shipped anchors; time of
`compute_direction` for the deepest selected layer 3 vs 31 (cost grows with the deepest
layer, not the model's depth), and prompts/s batched (batch 16) vs unbatched (batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 32064
SHARD = "500MB"


def build_checkpoint(folder: Path, layers: int) -> Path:
    """A loadable LLaVA with 7B text shapes (random bf16 weights, Hub key layout); returns the
    path of a random rank-1 direction for its layers."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    direction = folder.parent / f"{folder.name}-direction.safetensors"
    if (folder / "config.json").is_file() and direction.is_file():
        return direction
    shutil.rmtree(folder, ignore_errors=True)
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # Random weights without a float32 init pass: fill each tensor in bf16 directly.
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=SHARD, save_original_format=True)
    del model
    from vlmguard_edit.direction import Direction

    unit = {
        layer: torch.nn.functional.normalize(torch.randn(1, HIDDEN, generator=generator), dim=1)
        for layer in range(layers)
    }
    Direction(unit, meta={"rank": 1}).save(direction)
    return direction


def baseline(source: Path, out: Path, direction_path: Path, layers: list[int]) -> None:
    """The load / edit / save_pretrained approach, with the same fold as convert."""
    from transformers import AutoModelForImageTextToText

    from vlmguard_edit.direction import Direction
    from vlmguard_edit.fold import apply_map

    direction = Direction.load(direction_path)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16)
    blocks = model.model.language_model.layers
    with torch.no_grad():
        for layer in layers:
            v = direction.vectors[layer][:1]
            for module in (blocks[layer].self_attn.o_proj, blocks[layer].mlp.down_proj):
                module.weight.copy_(apply_map(module.weight, v, -1.0))
    model.save_pretrained(out, max_shard_size=SHARD, save_original_format=True)


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr}")
    return wall, int(done.stderr.strip().splitlines()[-1])


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_convert(work: Path, layers: int, runs: int) -> dict:
    source = work / f"llava7b-shapes-{layers}L"
    direction = build_checkpoint(source, layers)
    half = f"{layers // 2}-{layers - 1}"
    out = work / "out"
    python = sys.executable
    commands = {
        "floor: cp -r": ["cp", "-r", str(source), str(out)],
        "floor: python import": [python, "-c", "import torch, safetensors"],
        "vlmguard-edit convert": [
            *[str(Path(python).parent / "vlmguard-edit"), "convert", str(source), "-o", str(out)],
            *["--direction", str(direction), "--layers", half, "-q"],
        ],
        "load + edit + save_pretrained": [
            *[python, __file__, "--baseline", str(source), str(out), str(direction), half],
        ],
    }
    walls: dict[str, list[float]] = {name: [] for name in commands}
    rss: dict[str, int] = dict.fromkeys(commands, 0)
    for _ in range(runs):
        for name, command in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # every command starts with no dirty pages to write back
            wall, peak = timed(command)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
    shutil.rmtree(out, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in walls.items()}
    floor = median["floor: cp -r"] + median["floor: python import"]
    largest = max(HIDDEN * INTERMEDIATE, HIDDEN * HIDDEN) * 2  # bf16 bytes
    return {
        "layers": layers,
        "size_gb": folder_size(source) / 1e9,
        "runs": runs,
        "wall_s": median,
        "walls_s": walls,
        "peak_rss_mb": {name: kib / 1024 for name, kib in rss.items()},
        "floor_s": floor,
        "convert_over_floor": median["vlmguard-edit convert"] / floor,
        "baseline_over_floor": median["load + edit + save_pretrained"] / floor,
        "largest_edited_tensor_mb": largest / 2**20,
    }


def bench_direction(work: Path) -> dict:
    from vlmguard_edit.anchors import load_anchors
    from vlmguard_edit.checkpoint import resolve_model
    from vlmguard_edit.direction import compute_direction
    from vlmguard_edit.organisms.tiny import build_base

    base = work / "deep-base"
    if not (base / "config.json").is_file():
        build_base(base, num_layers=32, hidden=512, num_attention_heads=8, head_dim=64)
    source = resolve_model(str(base))
    anchors = load_anchors()
    prompts = 2 * len(anchors)

    def run(layer: int, batch: int) -> float:
        compute_direction(source, anchors, [layer], 1, batch_size=batch, progress=False)  # warm
        start = time.perf_counter()
        compute_direction(source, anchors, [layer], 1, batch_size=batch, progress=False)
        return time.perf_counter() - start

    shallow, deep = run(3, 16), run(31, 16)
    unbatched = run(31, 1)
    return {
        "model": "Llama 32 layers x 512, random",
        "prompts": prompts,
        "deepest_3_s": shallow,
        "deepest_31_s": deep,
        "batched_prompts_per_s": prompts / deep,
        "unbatched_prompts_per_s": prompts / unbatched,
    }


def table(result: dict) -> str:
    lines = [
        "| checkpoint | approach | wall (median) | x floor | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for c in result["convert"]:
        for name, wall in c["wall_s"].items():
            if name.startswith("floor"):
                continue
            ratio = wall / c["floor_s"]
            lines.append(
                f"| {c['layers']} layers, {c['size_gb']:.1f} GB | {name} | {wall:.1f} s | "
                f"{ratio:.2f} | {c['peak_rss_mb'][name]:.0f} MB |"
            )
        lines.append(
            f"| {c['layers']} layers, {c['size_gb']:.1f} GB | floor (cp -r + python import) | "
            f"{c['floor_s']:.1f} s | 1.00 | - |"
        )
    d = result["direction"]
    lines += [
        "",
        f"Direction ({d['model']}, {d['prompts']} anchor prompts): deepest layer 3 "
        f"{d['deepest_3_s']:.2f} s vs deepest layer 31 {d['deepest_31_s']:.2f} s; "
        f"batched (16) {d['batched_prompts_per_s']:.0f} prompts/s vs unbatched "
        f"{d['unbatched_prompts_per_s']:.0f} prompts/s.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmguard-perf"))
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--table", type=Path, help="print the markdown table of a saved run")
    parser.add_argument("--baseline", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        source, out, direction, half = args.baseline
        first, last = map(int, half.split("-"))
        baseline(Path(source), Path(out), Path(direction), list(range(first, last + 1)))
        return
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # this process and the timed ones
    args.work.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().machine}",
        "convert": [bench_convert(args.work, layers, args.runs) for layers in args.layers],
        "direction": bench_direction(args.work),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
