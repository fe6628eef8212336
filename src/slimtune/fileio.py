"""Crash-safe writes: a reader sees the old file or the new one, never half of one.

Every file slimtune writes goes through here: write to a temporary sibling, fsync it,
rename it over the target, fsync the folder. Folders (checkpoints, deltas) are built the
same way and swapped in with renames.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserInputError

if TYPE_CHECKING:
    import torch


class FolderExists(FileExistsError, UserInputError):
    """A new folder's target exists, or appeared while it was written (another process):
    nothing of either is lost. The CLI names it as a user error (exit code 2)."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share_as_umask_allows(path: Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0666/0777 less the umask).

    Writers such as safetensors (0.8+) create files ``-rw-------`` whatever the umask, and
    ``mkstemp`` does too: a model cache or a delta store shared with a server running as
    another user would then be unreadable. Executable files keep their x bits.
    """
    full = 0o777 if path.is_dir() or path.stat().st_mode & 0o111 else 0o666
    os.chmod(path, full & ~_umask())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _raise_if_disk_full(e: BaseException, target: Path) -> None:
    """A full disk, however the writer (OS, safetensors, torch) said it, as ``OSError``
    ENOSPC naming ``target``: the CLI reports that as one line with exit code 2."""
    text = str(e)
    full = (
        e.errno == errno.ENOSPC
        if isinstance(e, OSError)
        else any(s in text for s in ("No space left on device", "StorageFull", "os error 28"))
        or ("write failed" in text and shutil.disk_usage(target.parent).free < 2**24)
    )
    if full:
        raise OSError(errno.ENOSPC, "No space left on device", str(target)) from e


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` atomically.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _share_as_umask_allows(tmp)  # after the writer: it may have recreated the file 0600
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(e, target)
        raise


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_safetensors(
    target: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def append_line(target: str | Path, line: str) -> None:
    """Append one line and flush it; a torn last line is the worst a crash can leave."""
    with open(target, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes ``target``.

    With ``replace=True`` an existing ``target`` is swapped out (kept as ``<target>.old``
    until the new one is in place, so a crash between the two renames leaves a complete
    copy that :func:`recover_dir` finds). Without it an existing target is an error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise FolderExists(f"{target} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        # Third-party writers (save_pretrained, safetensors, shutil.copy2 of such files)
        # chose their own modes: every entry gets the umask's, as if written by open().
        _share_as_umask_allows(tmp)
        for f in tmp.rglob("*"):
            if f.is_symlink():
                continue
            _share_as_umask_allows(f)
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)
        if not replace:
            _rename_new(tmp, target)
            fsync_dir(target.parent)
            return
        old = target.with_name(target.name + ".old")
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, target)
        raise


def _rename_new(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to a ``target`` that did not exist when the write began. A folder
    another process put there meanwhile (a second ``apply --out`` to the same place) is
    not replaced: the kernel refuses a rename over a non-empty folder or a file."""
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FolderExists(
                f"{target} appeared while this one was written (another process?); "
                "it was left as it is"
            ) from e
        raise


def recover_dir(target: str | Path) -> Path | None:
    """Return ``target`` if it exists, else a complete ``<target>.old`` left by a crash."""
    target = Path(target)
    if target.exists():
        return target
    old = target.with_name(target.name + ".old")
    return old if old.exists() else None


class LockHeld(OSError):
    """Another process holds the lock (raised only by ``file_lock(..., wait=False)``)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(errno.EWOULDBLOCK, "locked by another process", str(path))


@contextlib.contextmanager
def file_lock(path: str | Path, *, shared: bool = False, wait: bool = True) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``path`` (created if missing) for the block.

    The kernel drops the lock when the process dies, so a ``kill -9`` never leaves a stale
    lock behind and nothing has to be cleaned up by hand. ``shared`` locks coexist with each
    other and exclude an exclusive one; ``wait=False`` raises :class:`LockHeld` at once.
    """
    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(path) from None
        except BaseException:
            os.close(fd)
            raise
        # A holder may unlink its lock file (the store's gc and adds do) between our open
        # and our flock: the lock is then on a file nobody else can find; take the new one.
        try:
            st = os.stat(str(path))
            same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)
