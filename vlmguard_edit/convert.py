"""The one function that wires direction -> plan -> checkpoint -> card."""

from __future__ import annotations

import logging
import shlex
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from . import __version__
from .anchors import load_anchors
from .checkpoint import (
    HASH,
    Checkpoint,
    ModelSource,
    ShardPatcher,
    allocate_like,
    check_not_nested,
    copy_except,
    copy_file,
    digest_bytes,
    digest_file,
    file_entry,
    import_torch,
    is_hub_id,
    open_checkpoint,
    resolve_model,
    tensor_buffer,
)
from .errors import DirectionError, InputError, PlanError
from .layout import Layout, find_layout
from .plan import Plan, PlannedEdit, build_plan
from .public import public_name, runnable_path, scrub
from .recipes import LEARNED, SELF, Recipe, mode_problems, strength_warnings
from .writes import atomic_output_dir, check_output_free, output_lock

if TYPE_CHECKING:  # torch is imported only once the byte copies are under way
    import torch

    from .direction import Direction

log = logging.getLogger(__name__)

DIRECTION_NAME = "vlmguard_direction.safetensors"
EDIT_NAME = "vlmguard_edit.safetensors"  # a learned edit (learned.Edit)
DRIFT_WARNING = 0.5  # median ||W_vlm - W_base|| / ||W_base|| above which convert warns


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


def resolve_layers(recipe: Recipe, layout: Layout) -> list[int]:
    """The recipe's layers; by default the upper half, and for lowrank every text layer (a
    cross-attention layer, which only an image reaches, is left to the image-path kind)."""
    if recipe.layers is not None:
        return recipe.layers
    if recipe.mode == "lowrank":
        return [i for i in range(layout.num_layers) if i not in layout.cross_layers]
    return default_layers(layout.num_layers)


def convert(opts: ConvertOptions) -> ConvertResult:
    """Plan, then write the guarded checkpoint; the output is locked from its check to the
    final rename, so two runs for one output cannot both write it."""
    if opts.dry_run:
        return _convert(opts)
    with output_lock(opts.output):
        return _convert(opts)


def _convert(opts: ConvertOptions) -> ConvertResult:
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
    layers = resolve_layers(recipe, layout)
    # From here on the recipe is fully resolved, so the record and card show what was used.
    recipe = replace(recipe, layers=layers)
    problems = mode_problems(recipe, explicit=set())  # API callers get the CLI's checks
    if problems:
        raise InputError("; ".join(problems))
    for warning in strength_warnings(recipe):
        log.warning(warning)
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
    if opts.dry_run:
        # a learned edit has no request to check beyond the plan
        if recipe.mode not in LEARNED:
            _direction(opts, source, checkpoint, layout, layers)  # checks the request
        return ConvertResult(plan, None, None)
    with (
        atomic_output_dir(opts.output) as tmp,
        GuardedWriter(checkpoint, plan, tmp, opts.progress) as writer,
    ):
        # Worker threads copy the untouched bytes in the kernel while torch is imported and
        # the edit's parameters are loaded, computed or learned here.
        params, saved, base_check = _parameters(opts, source, checkpoint, layout, plan)
        edits = writer.fold(params)
        name = EDIT_NAME if recipe.mode in LEARNED else DIRECTION_NAME
        saved.save(tmp / name)  # the shipped copy names sources without the user's paths
        record = _record(opts, source, plan, saved, edits, tmp / name)
        if base_check is not None:
            record["base_llm_check"] = base_check
        from .card import CARD, source_license, write_card, write_record

        write_card(tmp, record, source_license(source.path))
        files = writer.finish()
        written = (name, CARD, *_calibration_report(record, tmp))
        files.update({n: file_entry(tmp / n) for n in written})
        write_record(tmp, {**record, "files": dict(sorted(files.items()))})
    log.info("wrote %s (%d tensors edited)", opts.output, len(edits))
    return ConvertResult(plan, opts.output, record)


def _calibration_report(record: dict[str, Any], folder: Path) -> tuple[str, ...]:
    """A learned edit's calibration table and chart beside the weights (none otherwise)."""
    report = record["direction"].get("calibration")
    if not report:
        return ()
    from .calibration import write

    return write(report, folder)


def calibrate(opts: ConvertOptions) -> Any:
    """Learn the edit of ``opts.source`` (a learned kind: the recipe's mode) and write it to
    ``opts.output`` (an edit file that ``convert --direction FILE`` folds); returns it."""
    output = Path(opts.output)
    with output_lock(output, "edit file"):
        if output.exists() and not opts.overwrite:
            raise InputError(f"{output} already exists; pass --overwrite to replace it")
        source = resolve_model(opts.source, opts.revision)
        checkpoint = open_checkpoint(source.path)
        layout = find_layout(checkpoint.config, checkpoint.keys)
        recipe = opts.recipe
        plan = build_plan(  # refuses early
            checkpoint, layout, resolve_layers(recipe, layout), recipe.rank, -1.0, recipe.mode
        )
        edit = _learned_edit(opts, source, plan)
        check_edit_matches(edit, plan)
        public = replace(edit, meta=scrub(edit.meta))
        public.save(output)  # written beside and renamed
    return public


def _parameters(
    opts: ConvertOptions, source: ModelSource, checkpoint: Checkpoint, layout: Layout, plan: Plan
) -> tuple[Any, Any, dict[str, Any] | None]:
    """What the plan folds (per-layer vectors, or a learned edit), what is shipped beside the
    weights (the direction or edit file, scrubbed of local paths), the base-LLM check."""
    recipe = opts.recipe
    if recipe.mode in LEARNED:
        from .learned import Edit

        edit = (
            Edit.load(opts.direction_file)
            if opts.direction_file
            else _learned_edit(opts, source, plan)
        )
        if edit.kind != recipe.mode:
            raise InputError(
                f"the edit file {public_name(str(opts.direction_file))} is a {edit.kind} edit, "
                f"the mode is {recipe.mode}: pass --mode {edit.kind}"
            )
        check_edit_matches(edit, plan)
        return edit, replace(edit, meta=scrub(edit.meta)), None
    direction, base_check = _direction(opts, source, checkpoint, layout, plan.layers)
    vectors = direction.select(plan.layers, recipe.rank)
    from .fold import check_orthonormal

    for layer, v in vectors.items():
        check_orthonormal(v, f"direction layer {layer}")
    return vectors, replace(direction, meta=scrub(direction.meta)), base_check


def _learned_edit(opts: ConvertOptions, source: ModelSource, plan: Plan):
    """Learn the edit on the source VLM, supervised by its own text-only answers."""
    from .evaluate import Subject
    from .learned import KINDS, Edit, Settings, learn

    recipe = opts.recipe
    anchors = load_anchors(recipe.anchors)
    device = opts.device or ("cuda" if import_torch().cuda.is_available() else "cpu")
    subject = Subject(source.path, device, opts.dtype)
    settings = Settings(
        epochs=recipe.epochs,
        learning_rate=recipe.learning_rate,
        images=tuple(recipe.images),
        batch_size=recipe.batch_size,
        candidates=tuple((c["epochs"], c["learning_rate"]) for c in recipe.search),
        rank=recipe.rank if KINDS[recipe.mode].factored else 0,
        preserve_text=KINDS[recipe.mode].preserve_text,
    )
    targets = sorted({edit.key.rsplit(".", 1)[0] for edit in plan.edits})
    teacher, teacher_id = _teacher(opts, subject, device)
    from .exact import load_exact_judge

    judge = load_exact_judge(source.path)  # an organism: its own image task is preserved too
    deltas, report = learn(
        subject.model,
        subject.processor,
        targets,
        list(anchors.harmful),
        list(anchors.harmless),
        settings,
        opts.progress,
        teacher,
        judge.grammar if judge is not None else None,
    )
    meta = {
        "teacher": teacher_id,
        "source": source.id,
        "anchors": recipe.anchors,
        "anchors_sha256": anchors.sha256,
        "num_anchor_pairs": len(anchors),
        "calibration": report,
    }
    return Edit({key: d.cpu() for key, d in deltas.items()}, meta, recipe.mode)


def _teacher(opts: ConvertOptions, subject: Any, device: str) -> tuple[Any, str]:
    """The harmful rows' teacher: the base LLM text only (--base-llm ID), or the VLM itself
    without an image (no base LLM, or 'self')."""
    base = opts.recipe.base_llm
    if base.id in (None, SELF):
        return None, SELF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .learned import Teacher, check_same_tokenizer

    llm = resolve_model(base.id, base.revision, opts.allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(llm.path)
    check_same_tokenizer(subject.processor.tokenizer, tokenizer, base.id)
    dtype = next(subject.model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(llm.path, dtype=dtype).to(device).eval()
    return Teacher(model, tokenizer, base.template), llm.id


def check_edit_matches(edit: Any, plan: Plan) -> None:
    """A learned edit must hold exactly the planned tensors, with their shapes."""
    planned = {e.key: tuple(e.shape) for e in plan.edits}
    found = edit.shapes()
    if found != planned:
        raise InputError(
            f"the edit file changes {sorted(found)}, this checkpoint's plan is {sorted(planned)} "
            "(shapes must match too): it was learned for another model"
        )


def _direction(
    opts: ConvertOptions,
    source: ModelSource,
    checkpoint: Checkpoint,
    layout: Layout,
    layers: list[int],
) -> tuple[Direction, dict[str, Any] | None]:
    """The direction, and (when it comes from a separate base LLM) how that LLM compares
    with the VLM's language model: config differences and per-writer weight drift."""
    torch = import_torch()

    from .direction import (
        Direction,
        check_base_matches,
        check_direction_request,
        compute_direction,
        weight_drift,
    )

    recipe = opts.recipe
    if opts.direction_file is not None:
        direction = Direction.load(opts.direction_file)
        if direction.hidden_size != layout.hidden_size:
            raise DirectionError(
                f"direction {opts.direction_file} has hidden size {direction.hidden_size}, the "
                f"VLM's text model has {layout.hidden_size}; it was computed for another model"
            )
        is_gap = direction.meta.get("kind") == "image-gap"
        if is_gap != (recipe.mode == "image-gap"):
            raise DirectionError(
                f"direction {opts.direction_file} is "
                + ("an image-gap direction" if is_gap else "a safety steering direction")
                + f", but the mode is {recipe.mode}; "
                + ("use --mode image-gap" if is_gap else "image-gap needs an image-gap direction")
            )
        base_model = direction.meta.get("base_model")
        if (
            layout.cross_layers
            and base_model not in (None, SELF)
            and ("source_layers" not in direction.meta)
        ):
            raise DirectionError(
                f"direction {opts.direction_file} is numbered by {base_model}'s layers, but "
                f"{layout.family.model_type}'s cross-attention layers {list(layout.cross_layers)} "
                "shift the numbering; compute it for this VLM: vlmguard-edit direction "
                f"{base_model} --vlm {opts.source} ..."
            )
        return direction, None
    if recipe.mode == "image-gap":
        return _gap_direction(opts, source, layout, layers), None
    if recipe.base_llm.id is None:
        raise InputError(
            "say where the steering direction comes from: --base-llm ID (or 'self' for the "
            "VLM's own language model), --direction FILE, or a recipe with base_llm"
        )
    anchors = load_anchors(recipe.anchors)
    is_self = recipe.base_llm.id == SELF
    base, base_check = source, None
    if not is_self:
        # A dry run only checks the base LLM's config, so it downloads nothing else.
        base_id, revision = recipe.base_llm.id, recipe.base_llm.revision
        base = resolve_model(base_id, revision, opts.allow_pickle, config_only=opts.dry_run)
        base_check = {"config_warnings": check_base_matches(base, checkpoint.config)}
    layer_map = layout.direction_layers(layers, in_base=not is_self)
    check_direction_request(base, anchors, sorted(set(layer_map.values())), recipe.rank, is_self)
    if opts.dry_run:
        # A dry run reads no weights: describe the plan with a placeholder direction.
        placeholder = torch.eye(layout.hidden_size)[: recipe.rank]
        return Direction(dict.fromkeys(layers, placeholder)), base_check
    direction = compute_direction(
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
        layer_map=layer_map,
    )
    if base_check is not None:
        drift = weight_drift(base, checkpoint, layout, layers)
        base_check["weight_drift"] = drift
        if drift:
            median = sorted(d["relative_difference"] for d in drift.values())[len(drift) // 2]
            base_check["median_relative_difference"] = median
            if median > DRIFT_WARNING:
                log.warning(
                    "the VLM's language model has drifted far from %s (median relative weight "
                    "difference %.2f over the edited writers): its hidden states may not match "
                    "the base LLM's; consider --base-llm self",
                    base.id,
                    median,
                )
    return direction, base_check


def _gap_direction(
    opts: ConvertOptions, source: ModelSource, layout: Layout, layers: list[int]
) -> Direction:
    """The image-gap direction, measured on the source VLM itself (gap.py)."""
    torch = import_torch()
    from .direction import Direction
    from .gap import compute_gap_direction

    anchors = load_anchors(opts.recipe.anchors)
    if opts.dry_run:  # reads no weights: a placeholder for the plan
        return Direction(dict.fromkeys(layers, torch.eye(layout.hidden_size)[:1]))
    return compute_gap_direction(
        source,
        anchors,
        layers,
        batch_size=opts.recipe.batch_size,
        device=opts.device,
        dtype=opts.dtype,
        trust_remote_code=opts.trust_remote_code,
        progress=opts.progress,
    )


class GuardedWriter:
    """Writes the guarded shards: two worker threads copy bytes in the kernel (every byte of
    an untouched file; the bytes around the edited tensors of an edited shard) and hash each
    finished file, from the moment the plan is known; ``fold`` then reads, folds and writes
    the edited tensors into their slots, one tensor in memory at a time."""

    def __init__(self, checkpoint: Checkpoint, plan: Plan, out: Path, progress: bool):
        self.checkpoint, self.plan, self.out = checkpoint, plan, out
        self.by_file: dict[str, list[PlannedEdit]] = {}
        for edit in plan.edits:
            self.by_file.setdefault(edit.file, []).append(edit)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmguard-copy")
        self.bar = tqdm(
            total=len(checkpoint.shards), desc="shards", unit="shard", disable=not progress
        )
        self.jobs: dict[str, Future] = {}
        self.copies: dict[str, Future] = {}  # edited shards: the copy around the holes

    def _start(self) -> None:
        checkpoint, out = self.checkpoint, self.out
        # The edited shards first: their copies are done before the folding thread writes
        # into them (a copy call holds the file's inode lock), then the untouched files.
        edited = sorted(self.by_file)
        for name in edited:
            infos = [checkpoint.info(e.key) for e in self.by_file[name]]
            holes = [(info.start, info.end) for info in infos]
            allocate_like(checkpoint.path / name, out / name)
            self.copies[name] = self.pool.submit(
                copy_except, checkpoint.path / name, out / name, holes
            )
        for name in sorted(set(checkpoint.shards) - set(edited)):
            self.jobs[name] = self.pool.submit(self._copied, checkpoint.path / name, out / name)
        for rel in self.plan.copied:
            self.jobs[rel] = self.pool.submit(self._copied, checkpoint.path / rel, out / rel)

    def _copied(self, source: Path, target: Path) -> dict[str, Any]:
        copy_file(source, target)
        self.bar.update()
        return file_entry(target)

    def _patched(self, copy: Future, target: Path) -> dict[str, Any]:
        copy.result()
        self.bar.update()
        return file_entry(target)

    def fold(self, vectors: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
        """Fold every planned edit into its slot; one record per edited tensor."""
        checkpoint, plan = self.checkpoint, self.plan
        u = shift_vector(checkpoint, plan, vectors) if plan.mode == "projector-shift" else None
        records = []
        for name, edits in sorted(self.by_file.items()):
            target = self.out / name
            with ShardPatcher(target) as patcher:
                for edit in edits:
                    before = checkpoint.read(edit.key)
                    before_hash = digest_bytes(tensor_buffer(before))
                    after = fold_tensor(checkpoint, edit, before, vectors, plan, u)
                    del before
                    patcher.write(checkpoint.info(edit.key), after)
                    records.append(
                        {
                            "key": edit.key,
                            "file": name,
                            "layer": edit.layer,
                            "module": edit.module,
                            "dtype": edit.dtype,
                            "shape": list(edit.shape),
                            f"{HASH}_before": before_hash,
                            f"{HASH}_after": digest_bytes(tensor_buffer(after)),
                        }
                    )
            self.jobs[name] = self.pool.submit(self._patched, self.copies[name], target)
        if len(records) != len(plan.edits):
            raise RuntimeError(
                f"internal error: edited {len(records)} tensors, planned {len(plan.edits)}"
            )
        check_changed(records)
        return records

    def finish(self) -> dict[str, dict[str, Any]]:
        """Wait for every copy and hash: relative path -> {"size", HASH}."""
        return {rel: job.result() for rel, job in self.jobs.items()}  # re-raises a worker's error

    def __enter__(self) -> GuardedWriter:
        # The copies start here, not in __init__: a Ctrl-C between the constructor and the
        # with block would otherwise leave them running with no __exit__ to stop them.
        try:
            self._start()
        except BaseException:  # e.g. Ctrl-C while the jobs are queued: no copy may outlive us
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the queued copies and wait for the running ones, so that nothing writes
        into the output folder after this returns (it is removed next on an error)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.bar.close()


def check_changed(records: list[dict[str, Any]]) -> None:
    """An edit that leaves every planned tensor as it was is an error, not "edited"."""
    same = [r["key"] for r in records if r[f"{HASH}_before"] == r[f"{HASH}_after"]]
    if records and len(same) == len(records):
        raise PlanError(
            f"the edit changed none of the {len(records)} planned tensors (is the strength too "
            "small for the weights' dtype?); nothing was written"
        )
    for key in same:
        log.warning("%s is unchanged by the edit (rounding in its dtype)", key)


def fold_tensor(
    checkpoint: Checkpoint,
    edit: PlannedEdit,
    before: torch.Tensor,
    vectors: dict[int, torch.Tensor],
    plan: Plan,
    u: torch.Tensor | None,
) -> torch.Tensor:
    """The edited value of one planned tensor (convert writes it, verify recomputes it)."""
    from .fold import apply_map, norm_weighted, shift

    torch = import_torch()

    if edit.kind == "delta":  # a learned edit: ``vectors`` is the learned.Edit
        from .learned import fold

        return fold(before, vectors.delta(edit.key))
    if edit.kind == "shift":
        return shift(before, u, plan.gamma)
    v = vectors[edit.layer]
    if edit.kind == "experts":  # every expert's matrix, hidden axis first for apply_map
        out = torch.empty_like(before)
        for e in range(before.shape[0]):
            w = before[e] if edit.axis == 1 else before[e].T
            folded = apply_map(w, v, plan.beta)
            out[e] = folded if edit.axis == 1 else folded.T
        return out
    if edit.norm is not None:  # a norm follows the writer: project off u ∝ g ⊙ v (beta -1)
        gain = checkpoint.read(edit.norm).float() + plan.layout.family.norm_offset
        v = norm_weighted(v, gain)
    return apply_map(before, v, plan.beta)


def shift_vector(
    checkpoint: Checkpoint, plan: Plan, vectors: dict[int, torch.Tensor]
) -> torch.Tensor:
    """The unit vector the projector-shift adds: V_l[0], or its attention-aware form at layer l."""
    from .fold import attention_direction

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
    import torch

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
            "id": public_name(source.id),
            "revision": source.revision,
            "from_hub": source.from_hub,
            "hub_id": hub_id,
        },
        "recipe": _public_recipe(recipe, plan.layers),
        "map": plan.map_text,
        "family": plan.layout.family.model_type,
        "layer_prefix": plan.layout.layer_prefix,
        "direction": {
            "file": direction_path.name,
            HASH: digest_file(direction_path),
            "from_file": public_name(str(opts.direction_file)) if opts.direction_file else None,
            **{
                k: scrub(direction.meta).get(k)
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
            **(
                {"calibration": direction.meta.get("calibration")}
                if plan.mode in LEARNED
                else {"stats": {str(layer): direction.stats.get(layer) for layer in plan.layers}}
            ),
        },
        "edits": edits,
        "copied_files": plan.copied,
        "dropped_files": plan.dropped,
        "command": reproduce_command(opts),
    }


def _public_recipe(recipe: Recipe, layers: list[int]) -> dict[str, Any]:
    data = {**recipe.to_dict(), "layers": layers}
    data["base_llm"] = scrub(data["base_llm"])
    return scrub(data)


def _version(package: str) -> str | None:
    # From package metadata, so recording it does not import transformers (seconds).
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def reproduce_command(opts: ConvertOptions) -> str:
    """The command that reproduces this run, from the folder that holds the output: every
    choice that shapes the result (revisions, batch size, dtype included), local paths
    relative to that folder."""
    recipe, out = opts.recipe, opts.output

    def path(value: str) -> str:
        return runnable_path(value, out)

    parts = ["vlmguard-edit", "convert", path(opts.source), "-o", out.name]
    if opts.revision:
        parts += ["--revision", opts.revision]
    if opts.direction_file:
        parts += ["--direction", path(str(opts.direction_file))]
    else:
        teacher = recipe.mode in LEARNED and recipe.base_llm.id not in (None, SELF)
        if recipe.mode not in ("image-gap", *LEARNED) or teacher:
            parts += ["--base-llm", path(str(recipe.base_llm.id))]
            if recipe.base_llm.revision:
                parts += ["--base-revision", recipe.base_llm.revision]
            if recipe.base_llm.template:
                parts += ["--template", recipe.base_llm.template]
        parts += ["--anchors", path(recipe.anchors), "--batch-size", str(recipe.batch_size)]
        parts += ["--dtype", opts.dtype]
    parts += ["--mode", recipe.mode]
    if recipe.mode == "lowrank":
        parts += ["--layers", ",".join(map(str, recipe.layers or [])), "--rank", str(recipe.rank)]
    if recipe.mode in LEARNED:
        parts += ["--epochs", str(recipe.epochs), "--learning-rate", f"{recipe.learning_rate:g}"]
        if recipe.search:
            tried = [f"{c['epochs']}:{c['learning_rate']:g}" for c in recipe.search]
            parts += ["--search", ",".join(tried)]
        return shlex.join([*parts, "--images", ",".join(recipe.images)])
    if recipe.mode == "projector-shift":
        parts += ["--gamma", f"{recipe.gamma:g}", "--shift-direction", recipe.shift_direction]
    parts += ["--layers", ",".join(map(str, recipe.layers or []))]
    if recipe.mode != "image-gap":
        parts += ["--rank", str(recipe.rank)]
    if recipe.mode == "writers":
        parts += ["--beta", f"{recipe.beta:g}"]
    return shlex.join(parts)
