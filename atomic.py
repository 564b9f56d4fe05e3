"""Writing files and directories safely: a reader (or a crash, or Ctrl-C) never sees half of one.

The one rule of this project for everything it writes (checkpoints, tokenizers, indexes, PNGs,
benchmark results):

1. Write under a temporary name *in the target's own directory* (the same file system, so the
   final rename is atomic): ``.NAME.tmp-<random>``.
2. Give it the permissions a plain ``open()`` would: ``0o666 & ~umask`` for files, ``0o777 &
   ~umask`` for directories (``mkstemp`` / ``mkdtemp`` make private 0600 / 0700 entries).
3. Rename it onto the final name. If anything fails before that, the temporary is removed and the
   target is as it was.

Replace or refuse: the caller says which. ``replace=True`` swaps an existing target for the new one
(a file atomically with ``os.replace``; a directory is renamed aside, the new one renamed in, then
the old one deleted). ``replace=False`` refuses, before anything is written, with a
``FileExistsError`` naming the path.

    with atomic_path("out.png") as tmp:        # any writer that takes a path
        fig.savefig(tmp)
    write_text_atomically("results.json", text)
    with atomic_dir("converted/") as tmp_dir:  # a directory filled file by file
        torch.save(state, tmp_dir / "consolidated.00.pth")
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

FILE_MODE = 0o666  # before the umask, as open() creates files
DIR_MODE = 0o777  # before the umask, as mkdir() creates directories


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_parent(path: Path) -> None:
    """A clear error when the directory to write into does not exist (or is a file)."""
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write {path}: its directory {path.parent} {what}")


def check_may_write(path: Path, replace: bool) -> None:
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists already; refusing to replace it")


@contextmanager
def atomic_path(path: Union[str, Path], replace: bool = True) -> Iterator[Path]:
    """A temporary file path to write to; on success it becomes `path`, on error it is removed."""
    path = Path(path)
    check_parent(path)
    check_may_write(path, replace)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
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
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    check_parent(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
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
    so that at every moment `path` is either the old directory or the new one."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.rename(path, old / path.name)
    os.rename(tmp_dir, path)
    if old is not None:
        shutil.rmtree(old)
