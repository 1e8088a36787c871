"""The one function that wires direction -> plan -> checkpoint -> card."""

from __future__ import annotations

import logging
import re
import shlex
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from . import __version__
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
    is_hub_id,
    open_checkpoint,
    resolve_model,
    tensor_buffer,
)
from .errors import InputError, PlanError
from .kinds import LEARNED, Context, get_kind
from .layout import find_layout
from .plan import Plan, PlannedEdit, build_plan, resolve_layers
from .public import public_name, runnable_path, scrub
from .recipes import SELF, Recipe, mode_problems, strength_warnings
from .record import CARD, write_record
from .writes import atomic_output_dir, check_output_free, output_lock

if TYPE_CHECKING:  # torch is imported only once the byte copies are under way
    import torch

    from .direction import Direction

log = logging.getLogger(__name__)


@dataclass
class ConvertOptions:
    source: str
    output: Path
    recipe: Recipe
    direction_file: Path | None = None
    direction_format: str = "native"  # formats.FORMATS: a file another tool wrote
    revision: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device: str | None = None
    dtype: str = "auto"
    base_model: str | None = None  # the Hub id the card names as base_model (local sources)
    progress: bool = True
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class ConvertResult:
    plan: Plan
    output: Path | None  # None for a dry run
    record: dict[str, Any] | None


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
    if recipe.family and recipe.family != layout.family.model_type:
        log.warning(
            "the recipe is for %s models, this is %s", recipe.family, layout.family.model_type
        )
    kind = get_kind(recipe.mode)
    # From here on the recipe is fully resolved, so the record and card show what was used.
    recipe = replace(recipe, layers=resolve_layers(kind, recipe, layout))
    problems = mode_problems(recipe, explicit=set())  # API callers get the CLI's checks
    if problems:
        raise InputError("; ".join(problems))
    for warning in strength_warnings(recipe):
        log.warning(warning)
    opts = replace(opts, recipe=recipe)
    plan = build_plan(checkpoint, layout, kind, recipe)
    if opts.dry_run:
        kind.check_request(Context(opts, source, checkpoint, layout, plan))
        return ConvertResult(plan, None, None)
    with (
        atomic_output_dir(opts.output) as tmp,
        GuardedWriter(checkpoint, plan, tmp, opts.progress) as writer,
    ):
        # Worker threads copy the untouched bytes in the kernel while torch is imported and
        # the edit's parameters are loaded, computed or learned here.
        params = kind.parameters(Context(opts, source, checkpoint, layout, plan))
        edits = writer.fold(params.value)
        name = kind.file_name
        params.saved.save(tmp / name)  # the shipped copy names sources without the user's paths
        record = _record(opts, source, plan, params.saved, edits, tmp / name)
        if params.base_check is not None:
            record["base_llm_check"] = params.base_check
        from .card import source_license, write_card

        text = (*kind.card_text(record), kind.held)
        write_card(tmp, record, source_license(source.path), text)
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
        kind = get_kind(recipe.mode)
        if not kind.learned:
            raise InputError(f"the mode is {recipe.mode}; calibrate learns {' or '.join(LEARNED)}")
        plan = build_plan(checkpoint, layout, kind, recipe)  # refuses early
        opts = replace(opts, direction_file=None)  # learned here, never read back
        public = kind.parameters(Context(opts, source, checkpoint, layout, plan)).saved
        public.save(output)  # written beside and renamed
    return public


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
        u = plan.kind.prepare(checkpoint, plan, vectors)
        records = []
        for name, edits in sorted(self.by_file.items()):
            target = self.out / name
            with ShardPatcher(target) as patcher:
                for edit in edits:
                    before = checkpoint.read(edit.key)
                    before_hash = digest_bytes(tensor_buffer(before))
                    after = plan.kind.fold(checkpoint, plan, edit, before, vectors, u)
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
    hub_id, revision = hub_identity(opts, source)
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
            "revision": revision,
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
                    "imported_from",
                    "layer_convention",
                )
            },
            **plan.kind.record_fields(direction, plan),
        },
        "edits": edits,
        "copied_files": plan.copied,
        "dropped_files": plan.dropped,
        "command": reproduce_command(opts),
    }


_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{7,64})$")


def hub_identity(opts: ConvertOptions, source: ModelSource) -> tuple[str | None, str | None]:
    """The source's Hub id and revision, for the card's base_model: the Hub download itself,
    else --base-model, else a Hugging Face cache snapshot's folder name
    (models--ORG--NAME/snapshots/REV), else the recipe's model when it is a Hub id."""
    if source.from_hub:
        return source.id, source.revision
    if opts.base_model:
        return opts.base_model, None
    snapshot = _SNAPSHOT.search(source.path.as_posix())
    if snapshot:
        return f"{snapshot.group(1)}/{snapshot.group(2)}", snapshot.group(3)
    model = opts.recipe.model
    return (model, None) if model and is_hub_id(model) else (None, None)


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
    if opts.base_model:
        parts += ["--base-model", opts.base_model]
    if opts.direction_file:
        parts += ["--direction", path(str(opts.direction_file))]
        if opts.direction_format != "native":
            parts += ["--direction-format", opts.direction_format]
    else:
        kind = get_kind(recipe.mode)
        teacher = recipe.base_llm.id not in (None, SELF)
        if kind.steered or teacher:
            parts += ["--base-llm", path(str(recipe.base_llm.id))]
            if recipe.base_llm.revision:
                parts += ["--base-revision", recipe.base_llm.revision]
            if recipe.base_llm.template:
                parts += ["--template", recipe.base_llm.template]
        parts += ["--anchors", path(recipe.anchors), "--batch-size", str(recipe.batch_size)]
        parts += ["--dtype", opts.dtype]
    parts += ["--mode", recipe.mode, *get_kind(recipe.mode).command_args(recipe)]
    return shlex.join(parts)
