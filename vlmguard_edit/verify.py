"""Check a guarded folder against its vlmguard.json, and optionally against its source.

Without a source: every file's size and hash, the direction file's hash, every edited
tensor's hash (BLAKE3, see checkpoint.HASH), and that the edited set is exactly the plan the
recorded recipe implies for this checkpoint. With ``source``: also every untouched tensor
equals the source's, and every edited tensor equals the fold recomputed from the source and
the direction file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import (
    HASH,
    Checkpoint,
    digest_bytes,
    digest_file,
    open_checkpoint,
    tensor_buffer,
)
from .errors import VlmguardError
from .kinds import get_kind
from .layout import find_layout
from .plan import Plan, build_plan
from .recipe_data import Recipe
from .record import RECORD, load_record

# The recorded recipe's fields a plan depends on.
PLAN_FIELDS = ("mode", "layers", "rank", "beta", "gamma", "shift_direction")


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)  # what was checked, one line each
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        return self.checked[0] if self.checked else "nothing checked"


def verify(folder: Path, source: Path | None = None, progress: bool = False) -> VerifyReport:
    folder = Path(folder)
    record = load_record(folder)
    report = VerifyReport()
    if "files" not in record:
        report.problems.append(f"{RECORD} lists no file hashes (written by an older version)")
        return report
    _check_files(folder, record, report, progress)
    _check_direction(folder, record, report)
    try:
        _check_edits(folder, record, report)
        if source is not None and report.ok:
            _check_against_source(folder, Path(source), record, report, progress)
    except VlmguardError as exc:  # e.g. a damaged config or header: one more problem
        report.problems.append(str(exc))
    return report


def recorded_plan(checkpoint: Checkpoint, recipe: dict[str, Any]) -> Plan:
    """The plan a recorded (fully resolved) recipe implies for ``checkpoint``."""
    planned = Recipe(**{key: recipe[key] for key in PLAN_FIELDS})
    layout = find_layout(checkpoint.config, checkpoint.keys)
    return build_plan(checkpoint, layout, get_kind(recipe["mode"]), planned)


def recorded_edit(folder: Path, record: dict[str, Any], source: Checkpoint) -> tuple[Plan, Any]:
    """The recorded plan for the source checkpoint, and the fold's parameters read back from
    the file the guarded ``folder`` ships beside its weights."""
    plan = recorded_plan(source, record["recipe"])
    return plan, plan.kind.load(Path(folder) / record["direction"]["file"], plan)


# What `hf download --local-dir` (and git) add to a downloaded repository: the Hub's own
# bookkeeping, not part of the checkpoint. Ignored, and the report says so.
_DOWNLOAD_ARTEFACTS = re.compile(r"\.gitattributes|\.cache/huggingface/.*|\.git/.*")


def _present(folder: Path, recorded: dict[str, Any], report: VerifyReport) -> set[str]:
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    ignored = sorted(f for f in files if _DOWNLOAD_ARTEFACTS.fullmatch(f) and f not in recorded)
    if ignored:
        report.checked.append(
            f"ignored {len(ignored)} Hub download file(s) ({', '.join(ignored[:3])}"
            + (", ..." if len(ignored) > 3 else "")
            + ")"
        )
    return files - set(ignored) - {RECORD}


def _check_files(folder: Path, record: dict, report: VerifyReport, progress: bool) -> None:
    files: dict[str, dict] = record["files"]
    present = _present(folder, files, report)
    for rel in sorted(present - set(files)):
        report.problems.append(f"{rel}: not in {RECORD} (added after the conversion?)")
    for rel in sorted(set(files) - present):
        report.problems.append(f"{rel}: missing")
    size = sum(entry["size"] for entry in files.values())
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="hashing", disable=not progress)
    bad = 0
    for rel in sorted(set(files) & present):
        expected = files[rel]
        path = folder / rel
        if path.stat().st_size != expected["size"]:
            report.problems.append(
                f"{rel}: size {path.stat().st_size}, recorded {expected['size']}"
            )
            bad += 1
        elif digest_file(path) != expected.get(HASH):
            report.problems.append(f"{rel}: {HASH} hash differs from {RECORD}")
            bad += 1
        bar.update(expected["size"])
    bar.close()
    report.checked.insert(0, f"{len(files) - bad}/{len(files)} files match their {HASH} hash")


def _check_direction(folder: Path, record: dict, report: VerifyReport) -> None:
    direction = record["direction"]
    path = folder / direction["file"]
    if not path.is_file():
        report.problems.append(f"{direction['file']}: the direction file is missing")
    elif digest_file(path) != direction.get(HASH):
        report.problems.append(f"{direction['file']}: {HASH} hash differs from the record's")
    else:
        report.checked.append(f"direction file matches its recorded {HASH} hash")


def _check_edits(folder: Path, record: dict, report: VerifyReport) -> None:
    checkpoint = open_checkpoint(folder)
    plan = recorded_plan(checkpoint, record["recipe"])
    planned = {edit.key for edit in plan.edits}
    recorded = {edit["key"]: edit for edit in record["edits"]}
    for key in sorted(planned - set(recorded)):
        report.problems.append(f"{key}: the recipe implies an edit, {RECORD} has none")
    for key in sorted(set(recorded) - planned):
        report.problems.append(f"{key}: recorded as edited, the recipe implies no edit")
    for key in sorted(planned & set(recorded)):
        if key not in checkpoint.keys:
            report.problems.append(f"{key}: missing from the checkpoint")
        elif digest_bytes(tensor_buffer(checkpoint.read(key))) != recorded[key].get(
            f"{HASH}_after"
        ):
            report.problems.append(f"{key}: edited tensor's {HASH} hash differs from {RECORD}")
    report.checked.append(
        f"{len(recorded)} edited tensors, exactly the plan of the recorded recipe ({plan.map_text})"
    )


def _check_against_source(
    folder: Path, source: Path, record: dict, report: VerifyReport, progress: bool
) -> None:
    guarded, original = open_checkpoint(folder), open_checkpoint(source)
    plan, vectors = recorded_edit(folder, record, original)
    u = plan.kind.prepare(original, plan, vectors)
    edits = {edit.key: edit for edit in plan.edits}
    if set(guarded.keys) != set(original.keys):
        report.problems.append("the tensor names differ from the source's")
        return
    bad = 0
    for key in tqdm(sorted(original.keys), desc="tensors", disable=not progress):
        before = original.read(key)
        expected = (
            plan.kind.fold(original, plan, edits[key], before, vectors, u)
            if key in edits
            else before
        )
        if not torch.equal(guarded.read(key), expected):
            what = "the fold recomputed from the source" if key in edits else "the source"
            report.problems.append(f"{key}: differs from {what}")
            bad += 1
    report.checked.append(
        f"{len(original.keys) - len(edits)} untouched tensors equal the source and "
        f"{len(edits)} edited tensors equal the recomputed fold ({bad} mismatches)"
    )
