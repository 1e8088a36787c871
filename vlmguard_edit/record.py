"""The guarded folder's record (vlmguard.json: provenance and file hashes): read and write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import file_entry
from .errors import InputError
from .writes import remove_stale, replace_file

CARD = "README.md"  # the model card, in the guarded folder
RECORD = "vlmguard.json"  # provenance and file hashes, in the guarded folder


def load_record(folder: Path) -> dict[str, Any]:
    path = folder / RECORD
    if not path.is_file():
        raise InputError(f"{folder} has no {RECORD}: it is not a vlmguard-edit output")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc


def record_files(folder: Path, names: list[str]) -> None:
    """Re-hash ``names`` (relative paths) into the record after our own later changes
    (`eval --update-card`), so that `verify` still accounts for every file."""
    record = load_record(folder)
    record["files"] = dict(
        sorted({**record.get("files", {}), **{n: file_entry(folder / n) for n in names}}.items())
    )
    write_record(folder, record)


def write_record(out: Path, record: dict[str, Any]) -> None:
    remove_stale(out / RECORD)
    replace_file(out / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
