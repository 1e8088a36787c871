"""The one function that wires direction -> plan -> checkpoint -> card."""

from __future__ import annotations

import logging
import shlex
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .anchors import load_anchors
from .card import CARD, source_license, write_card, write_record
from .checkpoint import (
    Checkpoint,
    ModelSource,
    ShardPatcher,
    allocate_like,
    atomic_output_dir,
    check_not_nested,
    check_output_free,
    copy_except,
    copy_file,
    file_entry,
    is_hub_id,
    open_checkpoint,
    resolve_model,
    sha256_bytes,
    sha256_file,
    tensor_buffer,
)
from .direction import Direction, check_base_matches, check_direction_request, compute_direction
from .errors import DirectionError, InputError
from .fold import apply_map, attention_direction, check_orthonormal, shift
from .layout import Layout, find_layout
from .plan import Plan, PlannedEdit, build_plan
from .recipes import SELF, Recipe

log = logging.getLogger(__name__)

DIRECTION_NAME = "vlmguard_direction.safetensors"


@dataclass
class ConvertOptions:
    source: str
    output: Path
    recipe: Recipe
    direction_file: Path | None = None
    revision: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device: str | None = None
    dtype: str = "auto"
    progress: bool = True
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class ConvertResult:
    plan: Plan
    output: Path | None  # None for a dry run
    record: dict[str, Any] | None


def default_layers(num_layers: int) -> list[int]:
    """Provisional default: the upper half of the text layers (see README, 'Defaults')."""
    return list(range(num_layers // 2, num_layers))


def convert(opts: ConvertOptions) -> ConvertResult:
    recipe = opts.recipe
    if not opts.dry_run:
        check_output_free(opts.output, opts.overwrite)  # before any download
    source = resolve_model(opts.source, opts.revision)
    if not opts.dry_run:
        check_not_nested(opts.output, source.path)
    same_folder = recipe.model and Path(recipe.model).expanduser().resolve() == source.path
    if recipe.model and recipe.model != opts.source and not same_folder:
        log.warning("the recipe is for %s, converting %s", recipe.model, opts.source)
    checkpoint = open_checkpoint(source.path)
    layout = find_layout(checkpoint.config, checkpoint.keys)
    layers = recipe.layers if recipe.layers is not None else default_layers(layout.num_layers)
    # From here on the recipe is fully resolved, so the record and card show what was used.
    recipe = replace(recipe, layers=layers)
    opts = replace(opts, recipe=recipe)
    plan = build_plan(
        checkpoint,
        layout,
        layers,
        recipe.rank,
        recipe.beta,
        recipe.mode,
        recipe.gamma,
        recipe.shift_direction,
    )
    direction = _direction(opts, source, checkpoint, layout, layers)
    vectors = direction.select(layers, recipe.rank)
    for layer, v in vectors.items():
        check_orthonormal(v, f"direction layer {layer}")
    if opts.dry_run:
        return ConvertResult(plan, None, None)
    with atomic_output_dir(opts.output) as tmp:
        written = write_guarded(checkpoint, plan, vectors, tmp, opts.progress)
        direction.save(tmp / DIRECTION_NAME)
        record = _record(opts, source, plan, direction, written.edits, tmp / DIRECTION_NAME)
        write_card(tmp, record, source_license(source.path))
        files = {**written.files, **{n: file_entry(tmp / n) for n in (DIRECTION_NAME, CARD)}}
        write_record(tmp, {**record, "files": dict(sorted(files.items()))})
    log.info("wrote %s (%d tensors edited)", opts.output, len(written.edits))
    return ConvertResult(plan, opts.output, record)


def _direction(
    opts: ConvertOptions,
    source: ModelSource,
    checkpoint: Checkpoint,
    layout: Layout,
    layers: list[int],
) -> Direction:
    recipe = opts.recipe
    if opts.direction_file is not None:
        direction = Direction.load(opts.direction_file)
        if direction.hidden_size != layout.hidden_size:
            raise DirectionError(
                f"direction {opts.direction_file} has hidden size {direction.hidden_size}, the "
                f"VLM's text model has {layout.hidden_size}; it was computed for another model"
            )
        return direction
    if recipe.base_llm.id is None:
        raise InputError(
            "say where the steering direction comes from: --base-llm ID (or 'self' for the "
            "VLM's own language model), --direction FILE, or a recipe with base_llm"
        )
    anchors = load_anchors(recipe.anchors)
    is_self = recipe.base_llm.id == SELF
    base = source
    if not is_self:
        # A dry run only checks the base LLM's config, so it downloads nothing else.
        base_id, revision = recipe.base_llm.id, recipe.base_llm.revision
        base = resolve_model(base_id, revision, opts.allow_pickle, config_only=opts.dry_run)
        check_base_matches(base, checkpoint.config)
    check_direction_request(base, anchors, layers, recipe.rank, is_self)
    if opts.dry_run:
        # A dry run reads no weights: describe the plan with a placeholder direction.
        placeholder = torch.eye(layout.hidden_size)[: recipe.rank]
        return Direction(dict.fromkeys(layers, placeholder))
    return compute_direction(
        base,
        anchors,
        layers,
        recipe.rank,
        is_vlm=is_self,
        template=recipe.base_llm.template,
        batch_size=recipe.batch_size,
        device=opts.device,
        dtype=opts.dtype,
        allow_pickle=opts.allow_pickle,
        trust_remote_code=opts.trust_remote_code,
        progress=opts.progress,
    )


@dataclass
class Written:
    edits: list[dict[str, Any]]  # one record per edited tensor
    files: dict[str, dict[str, Any]]  # relative path -> {"size", "sha256"} of what was written


def write_guarded(
    checkpoint: Checkpoint, plan: Plan, vectors: dict[int, torch.Tensor], out: Path, progress: bool
) -> Written:
    """Copy every shard and fold the edited tensors into the copies, concurrently.

    Two worker threads copy bytes in the kernel (every byte of an untouched file; the bytes
    around the edited tensors of an edited shard) and hash each finished file, while this
    thread reads, folds and writes the edited tensors into their slots, one tensor in memory
    at a time.
    """
    by_file: dict[str, list[PlannedEdit]] = {}
    for edit in plan.edits:
        by_file.setdefault(edit.file, []).append(edit)
    records = []
    u = shift_vector(checkpoint, plan, vectors) if plan.mode == "projector-shift" else None
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmguard-copy")
    bar = tqdm(total=len(checkpoint.shards), desc="shards", unit="shard", disable=not progress)
    jobs: dict[str, Future] = {}

    def copied(source: Path, target: Path) -> dict[str, Any]:
        copy_file(source, target)
        bar.update()
        return file_entry(target)

    def patched(copy: Future, target: Path) -> dict[str, Any]:
        copy.result()
        bar.update()
        return file_entry(target)

    try:
        for name in sorted(checkpoint.shards):
            source, target = checkpoint.path / name, out / name
            edits = by_file.get(name, [])
            if not edits:
                jobs[name] = pool.submit(copied, source, target)
                continue
            infos = [checkpoint.info(edit.key) for edit in edits]
            allocate_like(source, target)
            holes = [(info.start, info.end) for info in infos]
            copy = pool.submit(copy_except, source, target, holes)
            with ShardPatcher(target) as patcher:
                for edit, info in zip(edits, infos, strict=True):
                    before = checkpoint.read(edit.key)
                    sha_before = sha256_bytes(tensor_buffer(before))
                    after = fold_tensor(edit, before, vectors, plan, u)
                    del before
                    patcher.write(info, after)
                    records.append(
                        {
                            "key": edit.key,
                            "file": name,
                            "layer": edit.layer,
                            "module": edit.module,
                            "dtype": edit.dtype,
                            "shape": list(edit.shape),
                            "sha256_before": sha_before,
                            "sha256_after": sha256_bytes(tensor_buffer(after)),
                        }
                    )
            jobs[name] = pool.submit(patched, copy, target)
        for rel in plan.copied:
            jobs[rel] = pool.submit(copied, checkpoint.path / rel, out / rel)
        files = {rel: job.result() for rel, job in jobs.items()}  # re-raises a worker's error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, stop queued copies
        bar.close()
    if len(records) != len(plan.edits):
        raise RuntimeError(
            f"internal error: edited {len(records)} tensors, planned {len(plan.edits)}"
        )
    return Written(records, files)


def fold_tensor(
    edit: PlannedEdit,
    before: torch.Tensor,
    vectors: dict[int, torch.Tensor],
    plan: Plan,
    u: torch.Tensor | None,
) -> torch.Tensor:
    """The edited value of one planned tensor (convert writes it, verify recomputes it)."""
    if edit.kind == "shift":
        return shift(before, u, plan.gamma)
    return apply_map(before, vectors[edit.layer], plan.beta)


def shift_vector(
    checkpoint: Checkpoint, plan: Plan, vectors: dict[int, torch.Tensor]
) -> torch.Tensor:
    """The unit vector the projector-shift adds: V_l[0], or its attention-aware form at layer l."""
    layer = plan.layers[0]
    v = vectors[layer][0]
    if plan.shift_direction == "ssd":
        return v / v.norm()
    layout = plan.layout
    o_proj = next(w for w in layout.writers[layer] if w.module == "self_attn.o_proj")
    return attention_direction(
        checkpoint.read(o_proj.weight),
        checkpoint.read(layout.layer_key(layer, layout.family.value_proj + ".weight")),
        checkpoint.read(layout.layer_key(layer, layout.family.input_norm)),
        v,
        layout.num_heads,
        layout.num_kv_heads,
    )


def _record(
    opts: ConvertOptions,
    source: ModelSource,
    plan: Plan,
    direction: Direction,
    edits: list[dict[str, Any]],
    direction_path: Path,
) -> dict[str, Any]:
    recipe = opts.recipe
    hub_id = (
        source.id
        if source.from_hub
        else recipe.model
        if recipe.model and is_hub_id(recipe.model)
        else None
    )
    return {
        "format": "vlmguard-edit/1",
        "tool_version": __version__,
        "versions": {
            "torch": torch.__version__,
            **{name: _version(name) for name in ("transformers", "safetensors", "huggingface-hub")},
            "python": sys.version.split()[0],
        },
        "source": {
            "id": source.id,
            "revision": source.revision,
            "from_hub": source.from_hub,
            "hub_id": hub_id,
        },
        "recipe": {**recipe.to_dict(), "layers": plan.layers},
        "map": plan.map_text,
        "family": plan.layout.family.model_type,
        "layer_prefix": plan.layout.layer_prefix,
        "direction": {
            "file": DIRECTION_NAME,
            "sha256": sha256_file(direction_path),
            "from_file": str(opts.direction_file) if opts.direction_file else None,
            **{
                k: direction.meta.get(k)
                for k in (
                    "base_model",
                    "base_revision",
                    "weights_sha256",
                    "anchors",
                    "anchors_sha256",
                    "num_anchor_pairs",
                    "template",
                )
            },
            "stats": {str(layer): direction.stats.get(layer) for layer in plan.layers},
        },
        "edits": edits,
        "copied_files": plan.copied,
        "dropped_files": plan.dropped,
        "command": reproduce_command(opts),
    }


def _version(package: str) -> str | None:
    # From package metadata, so recording it does not import transformers (seconds).
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def reproduce_command(opts: ConvertOptions) -> str:
    recipe = opts.recipe
    parts = ["vlmguard-edit", "convert", opts.source, "-o", str(opts.output)]
    if opts.direction_file:
        parts += ["--direction", str(opts.direction_file)]
    else:
        parts += ["--base-llm", str(recipe.base_llm.id), "--anchors", recipe.anchors]
        if recipe.base_llm.template:
            parts += ["--template", recipe.base_llm.template]
    if recipe.mode != "writers":
        parts += ["--mode", recipe.mode, "--gamma", f"{recipe.gamma:g}"]
        parts += ["--shift-direction", recipe.shift_direction]
    parts += [
        "--layers",
        ",".join(map(str, recipe.layers or [])),
        "--rank",
        str(recipe.rank),
        "--beta",
        f"{recipe.beta:g}",
    ]
    return shlex.join(parts)
