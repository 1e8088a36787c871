"""What a guarded checkpoint says about where things came from, without the user's paths.

Cards and records are pushed to the Hub. They name a source by its Hub id, or by the local
folder's (or file's) own name, never by an absolute path; the reproduce command names local
paths relative to the folder that holds the output (the place to run it from).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import is_hub_id

_KEEP = (None, "", "default", "self")
PATH_KEYS = (
    "teacher",
    "source",
    "base_model",
    "source_model",
    "anchors",
    "model",
    "id",
    "from_file",
)
_MAX_UP = 2  # a relative path that climbs further would spell out the user's tree


def _local(text: str) -> bool:
    return Path(text).expanduser().exists() or not is_hub_id(text)


def public_name(value: Any) -> Any:
    """A Hub id as it is; a local path as its own name (``/home/me/models/x`` -> ``x``)."""
    if not isinstance(value, str) or value in _KEEP or not _local(value):
        return value
    return Path(value).expanduser().name or value


def runnable_path(value: str, output: Path) -> str:
    """A path for the reproduce command, run from the folder that holds ``output``."""
    if value in _KEEP or not _local(value):
        return value
    base = Path(output).expanduser().absolute().parent
    relative = os.path.relpath(Path(value).expanduser().absolute(), base)
    if relative.split(os.sep).count("..") > _MAX_UP:
        return Path(value).name  # assumed beside the output: no tree spelled out
    return relative


def scrub(meta: dict[str, Any]) -> dict[str, Any]:
    """Provenance with every path-valued field replaced by its public name."""
    return {k: public_name(v) if k in PATH_KEYS else v for k, v in meta.items()}
