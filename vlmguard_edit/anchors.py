"""Anchor prompt pairs (harmful q-, harmless q+) used to compute the steering direction.

The default set ships with the package (``data/anchors.jsonl``, written for this project).
Users can pass their own JSONL or CSV file with ``harmful`` and ``harmless`` columns.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import InputError

DEFAULT_ANCHORS = "default"


@dataclass(frozen=True)
class AnchorSet:
    name: str  # "default" or the file path as given
    harmful: tuple[str, ...]
    harmless: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.harmful)

    @property
    def sha256(self) -> str:
        """Hash of the pairs themselves (not the file), so format changes do not change it."""
        canonical = json.dumps([list(self.harmful), list(self.harmless)], ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_anchors(source: str | Path = DEFAULT_ANCHORS) -> AnchorSet:
    """Load the shipped set (``"default"``) or a user's JSONL / CSV file."""
    if str(source) == DEFAULT_ANCHORS:
        text = resources.files("vlmguard_edit").joinpath("data/anchors.jsonl").read_text("utf-8")
        return _from_rows(DEFAULT_ANCHORS, _jsonl_rows(text, "default anchors"))
    path = Path(source)
    if not path.is_file():
        raise InputError(f"anchor file {path} does not exist; pass a JSONL or CSV file")
    text = path.read_text("utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = _jsonl_rows(text, str(path))
    return _from_rows(str(path), rows)


def _jsonl_rows(text: str, where: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}, line {number}: not valid JSON ({exc.msg})") from exc
    return rows


def _from_rows(name: str, rows: list[dict]) -> AnchorSet:
    harmful, harmless = [], []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise InputError(f"{name}, row {number}: expected an object with harmful and harmless")
        pair = [row.get("harmful"), row.get("harmless")]
        if not all(isinstance(p, str) and p.strip() for p in pair):
            raise InputError(
                f"{name}, row {number}: needs non-empty 'harmful' and 'harmless' text fields"
            )
        harmful.append(pair[0].strip())
        harmless.append(pair[1].strip())
    if len(harmful) < 2:
        raise InputError(f"{name}: holds {len(harmful)} pair(s); at least 2 are needed for an SVD")
    return AnchorSet(name, tuple(harmful), tuple(harmless))
