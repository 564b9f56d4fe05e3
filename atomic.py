"""Writing files and directories safely: a reader (or a crash, or Ctrl-C) never sees half of one.

The one rule of this project for everything it writes (checkpoints, tokenizers, indexes, PNGs,
benchmark results):

1. Write under a temporary name *in the target's own directory* (the same file system, so the
   final rename is atomic): ``.NAME.tmp-<pid>-<random>``, where <pid> is the writing process's id
   and <random> is the 8 characters ``tempfile`` adds to make the name unique.
2. Give it the permissions a plain ``open()`` would: ``0o666 & ~umask`` for files, ``0o777 &
   ~umask`` for directories (``mkstemp`` / ``mkdtemp`` make private 0600 / 0700 entries).
3. Rename it onto the final name. If anything fails before that, the temporary is removed and the
   target is as it was.

Replace or refuse: the caller says which. ``replace=True`` swaps an existing target for the new one
(a file atomically with ``os.replace``; a directory is renamed aside, the new one renamed in, then
the old one deleted). ``replace=False`` refuses, before anything is written, with a
``FileExistsError`` naming the path.

Interruptions. Ctrl-C raises KeyboardInterrupt, an exception like any other: the temporary is
removed on the way out. SIGTERM (``kill PID``) and SIGHUP would end the process on the spot, so
while a temporary is open they are turned into ``SystemExit(128 + signal number)``, which also
unwinds and cleans up; the handler is installed only where the signal still has its default
action, only in the main thread, and the previous one is restored afterwards. Nothing can run on
``kill -9`` (SIGKILL): its temporary stays behind. So every atomic write first removes, from the
directory it writes into, the temporaries of this naming whose process no longer exists, and says
so on stderr in one line.

    with atomic_path("out.png") as tmp:        # any writer that takes a path
        fig.savefig(tmp)
    write_text_atomically("results.json", text)
    with atomic_dir("converted/") as tmp_dir:  # a directory filled file by file
        torch.save(state, tmp_dir / "consolidated.00.pth")
"""

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

FILE_MODE = 0o666  # before the umask, as open() creates files
DIR_MODE = 0o777  # before the umask, as mkdir() creates directories

# .NAME.tmp-<pid>-<random> (being written) and .NAME.old-<pid>-<random> (an old directory renamed
# aside by publish_dir); tempfile's random part is 8 characters of [a-z0-9_], never a '-'.
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[a-z0-9_]+")

# Signals that end a process politely; turned into SystemExit while a temporary is open.
POLITE_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
SIGNAL_EXIT_BASE = 128  # a shell reports death by signal N as status 128 + N (143 for SIGTERM)


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_parent(path: Path, parents: bool = False) -> None:
    """A clear error when the directory to write into does not exist (or is a file). With
    parents=True missing directories are fine (they will be made); a file on the way is not."""
    if parents:
        ancestor = next((p for p in path.parents if p.exists()), None)  # "." or "/" at the latest
        if ancestor is not None and not ancestor.is_dir():
            raise NotADirectoryError(f"cannot write {path}: {ancestor} is a file, not a directory")
        return
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write {path}: its directory {path.parent} {what}")


def check_may_write(path: Path, replace: bool) -> None:
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists already; refusing to replace it")


# --------------------------------------------------------------------------------------------
# Temporaries: named after the process, removed on SIGTERM, and after a kill -9 by the next writer
# --------------------------------------------------------------------------------------------


def temporary_prefix(path: Path, kind: str = "tmp") -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def process_is_gone(pid: int) -> bool:
    """True when no process `pid` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporaries in `directory` that a killed process left (its pid no longer exists).

    A stale `.NAME.old-*` (an old directory renamed aside) is removed only when NAME exists, i.e.
    the new directory made it in; otherwise it is the only copy left, and is kept.
    """
    if os.name != "posix":  # os.kill(pid, 0) is a liveness check only on POSIX
        return
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        match = TEMPORARY_NAME.fullmatch(entry.name)
        if match is None or not process_is_gone(int(match["pid"])):
            continue
        if match["kind"] == "old" and not (directory / match["name"]).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        print(f"note: removed {entry}, left by process {match['pid']}, which ended without finishing it",
              file=sys.stderr)


def raise_system_exit(signum: int, frame) -> None:
    raise SystemExit(SIGNAL_EXIT_BASE + signum)


@contextmanager
def polite_signals_unwind() -> Iterator[None]:
    """While inside, SIGTERM/SIGHUP raise SystemExit, so `except`/`finally` clean-up runs.

    Only for signals that still have their default action (a program that installed its own
    handler keeps it), only in the main thread (Python allows no other), restored afterwards.
    """
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in POLITE_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                installed[signum] = signal.signal(signum, raise_system_exit)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: Union[str, Path], replace: bool = True) -> Iterator[Path]:
    """A temporary file path to write to; on success it becomes `path`, on error it is removed."""
    path = Path(path)
    check_parent(path)
    check_may_write(path, replace)
    remove_stale_temporaries(path.parent)
    with polite_signals_unwind():
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            os.chmod(tmp, FILE_MODE & ~current_umask())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_bytes_atomically(path: Union[str, Path], data: bytes, replace: bool = True) -> None:
    with atomic_path(path, replace) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them


def write_text_atomically(path: Union[str, Path], text: str, replace: bool = True) -> None:
    write_bytes_atomically(path, text.encode("utf-8"), replace)


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


@contextmanager
def atomic_dir(path: Union[str, Path], replace: bool = False, parents: bool = False) -> Iterator[Path]:
    """A temporary directory to fill; on success it becomes `path`, on error it is deleted.

    replace=False refuses an existing non-empty `path` (an empty one is simply taken over).
    parents=True creates missing parent directories first.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not replace and path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; refusing to replace it")
    check_parent(path, parents)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    with polite_signals_unwind():
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_prefix(path)))
        try:
            yield tmp
            make_readable(tmp)
            publish_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def make_readable(tmp_dir: Path) -> None:
    """Give a finished temporary directory and everything in it the usual permissions."""
    umask = current_umask()
    for root, dirs, files in os.walk(tmp_dir):
        os.chmod(root, DIR_MODE & ~umask)
        for name in files:
            os.chmod(Path(root) / name, FILE_MODE & ~umask)


def publish_dir(tmp_dir: Path, path: Path) -> None:
    """Move the finished `tmp_dir` to `path`; an existing `path` is renamed aside first, then deleted,
    so that at every moment `path` is either the old directory or the new one (if the second rename
    fails, the old one is put back)."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_prefix(path, "old")))
        os.rename(path, old / path.name)
    try:
        os.rename(tmp_dir, path)
    except BaseException:
        if old is not None:
            os.rename(old / path.name, path)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)
