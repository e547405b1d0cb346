"""Writing files and folders so that a failure leaves nothing half-written and nothing is overwritten unasked.

Each helper builds its result beside the target (same file system) and moves it into place in one step, so a
reader sees either the old state or the complete new one. Without `overwrite` the move is create-if-absent and
atomic (a hard link for a file; a folder's name is claimed with `mkdir`, which fails if it exists), so two
processes writing one target cannot both win, and neither clobbers the other. SIGTERM and SIGHUP are turned into
`SystemExit` while a helper works, so its temporary files are removed when the process is asked to stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def cleanup_on_signal():
    """While the block runs, SIGTERM / SIGHUP raise SystemExit(128 + signal) instead of killing the process at once
    (Python's default), so `finally` and `except` clauses run. Handlers that are not the default are left alone;
    outside the main thread (where signals cannot be handled) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for s in installed:  # a second signal must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    installed = {}
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is signal.SIG_DFL:
            installed[s] = signal.signal(s, stop)
    try:
        yield
    finally:
        for s, previous in installed.items():
            signal.signal(s, previous)


def exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} exists; choose another name or pass --overwrite (overwrite=True) to replace it")


def place_new_file(tmp: Path, path: Path) -> None:
    """Move the finished file `tmp` to `path` only if nothing is there, atomically: a hard link fails if `path`
    exists. Where links are not supported, `path` is claimed with O_EXCL, then replaced by `tmp`."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists_error(path) from None
    except OSError:  # no hard links on this file system
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise exists_error(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    """Write bytes to `path` via a temp file in the same folder; no partial file on failure. An existing `path`
    is replaced (`overwrite`) or refused with FileExistsError (checked in the same step as the write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with cleanup_on_signal():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            if overwrite:
                os.replace(tmp, path)
            else:
                place_new_file(Path(tmp), path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


@contextlib.contextmanager
def atomic_folder(folder: str | Path, *, overwrite: bool = False):
    """Yield a temp folder beside `folder` to fill; on success it becomes `folder`, on failure (or SIGTERM) it is
    removed.

    An existing `folder` is refused unless `overwrite`, in which case it is replaced only once the new one is
    complete (the old one is moved aside first and put back if the swap fails).
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise exists_error(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with cleanup_on_signal():
        tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            yield tmp
            if overwrite and folder.exists():
                _swap_in(tmp, folder)
            else:
                try:
                    folder.mkdir()  # claims the name: fails if another process made it meanwhile
                except FileExistsError:
                    raise exists_error(folder) from None
                try:
                    os.replace(tmp, folder)  # onto the empty folder just made
                except BaseException:
                    folder.rmdir()
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(new: Path, folder: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, old / folder.name)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old / folder.name, folder)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def check_output(path: str | Path, *, folder: bool = False, overwrite: bool = False) -> Path:
    """Refuse an output target before any work is done: a file where a folder is wanted or the reverse, an
    existing file without `overwrite`, or a place that cannot be written (its nearest existing parent is not a
    writable folder)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; expected a folder (or a new path) to write into")
    if not folder and path.is_dir():
        raise ValueError(f"{path} is a folder; expected a file path")
    if not folder and path.exists() and not overwrite:
        raise exists_error(path)
    parent = path if folder else path.parent
    parent = Path(os.path.abspath(parent))
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be written: no write permission in {parent}")
    return path
