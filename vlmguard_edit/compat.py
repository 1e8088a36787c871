"""Turn a transformers release that breaks a family's forward into one line, not a traceback.

convert never runs a model; eval, direction and the image-gap measurement do. When an error
is raised from inside transformers' own code (an upstream bug, e.g. 5.24's Llama 4 text-only
forward: ``'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'``), the user
needs to know which transformers and which family, and which version CI last passed with.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from importlib import metadata

from .errors import VlmguardError

# The transformers release the suite last passed with (.ci/constraints.txt; a test keeps the
# two equal, and `bash .ci/refresh-lock` moves both on purpose).
TESTED_TRANSFORMERS = "5.23.0"


class ForwardError(VlmguardError):
    """A model's forward failed inside transformers (an incompatibility, not a user error)."""


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:  # pragma: no cover (a dependency)
        return "unknown"


def _raised_in_transformers(exc: BaseException) -> bool:
    """True when the error passed through transformers' own code (not only ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any("/transformers/" in f.filename.replace("\\", "/") for f in frames)


def explain(exc: BaseException, family: str) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    version = transformers_version()
    hint = (
        f"vlmguard-edit is tested with transformers {TESTED_TRANSFORMERS}: "
        f'pip install "transformers=={TESTED_TRANSFORMERS}"'
        if version != TESTED_TRANSFORMERS
        else "please report it with the command you ran"
    )
    return (
        f"transformers {version} failed to run the {family} model "
        f"({type(exc).__name__}: {first}); {hint}"
    )


# What a broken release raises (not RuntimeError: out-of-memory and device errors are real).
_UPSTREAM = (AttributeError, TypeError, KeyError, IndexError, ValueError, NotImplementedError)


@contextlib.contextmanager
def forward_errors(family: str) -> Iterator[None]:
    """Around a model forward: errors raised inside transformers become one ForwardError."""
    try:
        yield
    except _UPSTREAM as exc:
        if isinstance(exc, VlmguardError) or not _raised_in_transformers(exc):
            raise
        raise ForwardError(explain(exc, family)) from exc


def family_of(model: object) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)
