"""One exception hierarchy. Every error says what, where, what was expected and how to fix it.

The CLI prints ``str(error)`` on one line and exits non-zero; the traceback only with ``-v``.
"""

from __future__ import annotations


class VlmguardError(Exception):
    """Base class of every error vlmguard-edit raises on purpose."""

    exit_code = 1


class InputError(VlmguardError):
    """A path, model id or option given by the user cannot be used."""


class RecipeError(VlmguardError):
    """A recipe file is invalid. Holds every problem found, each with its YAML path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        joined = "; ".join(problems)
        super().__init__(f"recipe {source} is invalid ({len(problems)} problem(s)): {joined}")


class CheckpointError(VlmguardError):
    """A checkpoint on disk is missing pieces, corrupt or of a kind we refuse to edit."""


class UnsupportedModelError(VlmguardError):
    """The model family or layout is not one vlmguard-edit can edit exactly."""


class PlanError(VlmguardError):
    """The edit plan cannot be built (layer out of range, missing writer, empty plan...)."""


class DirectionError(VlmguardError):
    """The steering direction cannot be computed or does not fit the model."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (timeout, job schedulers, a closed terminal), raised in the main thread
    like Ctrl-C, so every cleanup path that handles Ctrl-C handles these the same way."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise Terminated in the main thread (the CLI calls this)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)
