"""Every write vlmguard-edit makes: locked, beside the target, then renamed into place.

- ``output_lock(target)``: an exclusive lock (``.NAME.vlmguard-lock`` beside the target, held
  with ``flock``) from the output check to the final rename; a second run for the same target
  fails at once naming the process that holds it.
- ``remove_stale(target)``: with the lock held, temporary files or folders of earlier runs for
  the same target (``.NAME.vlmguard-tmp-PID``, ``-old-PID``) can only come from a run that died
  without cleaning up (SIGKILL, power loss); they are removed with a line saying so.
- ``replace_file(path, data)``: write beside, then ``os.replace``. A symlink (a Hugging Face
  cache snapshot) or a hard link (``cp -al``) at ``path`` is replaced by a new file; the file
  it pointed to, and every other link to it, is never written through.
- ``atomic_output_dir(output)``: a whole output folder, built beside and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

TAG = ".vlmguard-"


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """The hidden name beside ``target`` that this process builds it under."""
    return target.parent / f".{target.name}{TAG}{kind}-{os.getpid()}"


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{TAG}lock"


def _describe_holder(handle) -> str:
    handle.seek(0)
    text = handle.read().decode("utf-8", "replace").strip()
    return text or "pid unknown"


def _try_lock(path: Path):
    """Open and flock ``path``; None when another process holds it. Retries when the file
    was removed by its previous holder between our open and our lock (then it is not ours)."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        handle = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _Held(_describe_holder(handle)) from None
        except BaseException:
            handle.close()
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


class _Held(Exception):
    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def output_lock(target: Path, what: str = "output") -> Iterator[None]:
    """Hold the exclusive lock for ``target`` (a file or folder path) while the block runs."""
    target = Path(target).expanduser().absolute()
    ensure_parent(target, what)
    lock = _lock_path(target)
    try:
        handle = _try_lock(lock)
    except _Held as held:
        raise InputError(
            f"{what} {target} is being written by another vlmguard-edit run ({held.holder}); "
            "wait for it to finish or choose another path"
        ) from None
    except OSError as exc:  # e.g. a read-only or special file system
        raise InputError(
            f"cannot write in {target.parent} (for {what} {target.name}): "
            f"{exc.strerror or exc}; choose a folder you can write to"
        ) from exc
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: {' '.join(sys.argv[:3])}".encode())
        handle.flush()
        remove_stale(target)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still locked: the next run creates its own
        handle.close()


def ensure_parent(target: Path, what: str = "output") -> None:
    """The folder that will hold ``target`` exists and is writable: one line if not."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the folder {parent} for {what} {target.name}: {exc.strerror or exc}"
        ) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot write in {parent} (permission denied): choose a {what} path in a folder "
            "you can write to"
        )


_STALE = re.compile(r"(tmp|old)-(\d+)")


def remove_stale(target: Path) -> list[Path]:
    """Remove what runs that died left beside ``target`` (call with the lock held)."""
    prefix = f".{target.name}{TAG}"
    removed = []
    for entry in sorted(target.parent.glob(f"{glob_escape(prefix)}*")):
        match = _STALE.fullmatch(entry.name[len(prefix) :])
        if not match or int(match.group(2)) == os.getpid():
            continue
        state = "its process is gone" if not _alive(int(match.group(2))) else "not ours"
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.warning("removed %s, left by an interrupted run (pid %s, %s)", entry, match[2], state)
        removed.append(entry)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_file(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` by writing beside it and renaming over it."""
    path = Path(path)
    partial = temp_path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with io_errors(path), open(partial, "xb") as handle:
            handle.write(raw)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def io_errors(target: Path) -> Iterator[None]:
    """OSErrors while writing ``target`` become one line (a full disk says so)."""
    from .errors import CheckpointError

    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(
                f"the disk filled up while writing {target.name}; free space where the output "
                "goes (it needs about the size of the source checkpoint) and run again"
            ) from exc
        raise CheckpointError(f"could not write {target}: {exc.strerror or exc}") from exc


def check_output_free(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite, never replace a foreign folder, and never
    a mount point (it cannot be renamed away: the run would fail at its very end)."""
    out = output.expanduser().absolute()
    if not out.exists():
        return
    if not overwrite:
        raise InputError(f"output {output} already exists; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"output {output} exists and is not a folder; refusing to replace it")
    if os.path.ismount(out):
        raise InputError(
            f"output {output} is a mount point, which cannot be replaced; write to a folder "
            "inside it instead"
        )
    if any(out.iterdir()) and not (out / "vlmguard.json").is_file():
        raise InputError(
            f"output {output} exists and is not a vlmguard-edit output (no vlmguard.json); "
            "refusing to replace it even with --overwrite. Remove it yourself or pick another"
        )


@contextlib.contextmanager
def atomic_output_dir(output: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; rename it into place only on success.

    Any failure, Ctrl-C or SIGTERM included, removes the temporary folder, so an interrupted
    run never leaves something that looks like a checkpoint. An existing output (already
    checked by check_output_free) is replaced only after the new one is complete.
    """
    out = output.expanduser().absolute()
    ensure_parent(out)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    with io_errors(tmp):
        tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = temp_path(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
