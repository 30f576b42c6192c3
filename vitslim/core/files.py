"""Atomic file writes and digests, the one implementation every package uses.

A reader never sees a half-written file: each writer writes a temporary file beside the target
and renames it onto the target only on success. Depends on the standard library only, so that
deploy/ can use it where only numpy and TensorRT are installed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from vitslim.core.errors import VitslimError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    The temporary file keeps `path`'s suffix so that libraries which look at the extension
    (safetensors, onnx, PNG writers) behave the same.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise VitslimError(
            f"cannot write {target}: a part of {target.parent} is a file, not a directory; choose another path"
        ) from None
    if target.is_dir():
        raise VitslimError(f"cannot write {target}: it is a directory; choose a file name")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # the old file, if any, is still there
            raise VitslimError(
                f"no space left to write {target}: free some space (or choose another path) and rerun"
            ) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, what: str, fix: str, error: type[VitslimError] = VitslimError):
    """The JSON value in `path`; a file that is missing or cannot be read or parsed (bad bytes,
    bad JSON, nesting deeper than Python's recursion limit) is one line of `error`: "`what`
    PATH is unreadable (WHY): `fix`", PATH resolved so the user sees which file was tried."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} {path.resolve()} does not exist: {fix}") from None
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as problem:
        raise error(f"{what} {path.resolve()} is unreadable ({type(problem).__name__}): {fix}") from None


@contextlib.contextmanager
def _exclusive(lock: Path, create: bool, output: Path, option: str) -> Iterator[None]:
    """Hold an advisory lock (flock) on `lock` (a directory, or a file made if `create`): the
    kernel releases it when the process ends, however it ends, so a crash never leaves a stale
    lock. A second holder is refused in one line naming `output`."""
    import fcntl

    handle = os.open(lock, os.O_RDONLY | (os.O_CREAT if create else 0), 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VitslimError(
                f"{option} {output.resolve()} is being written by another vitslim process: wait for it to finish, "
                f"or choose another {option}"
            ) from None
        yield
    finally:
        os.close(handle)


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, option: str = "--out", swapped: bool = False) -> Iterator[None]:
    """Hold `directory`'s write lock while writing it: a second vitslim process writing the same
    output is refused in one line instead of racing the first (the last writer would win). The
    lock is taken on the directory itself (a directory made here and still empty at the end, the
    work refused, is removed again), or, for a directory replaced whole (`swapped`:
    directory_swap gives it a new inode), on its lock file (_lock_file)."""
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise VitslimError(f"{option} {directory} is a file: give a directory") from None
    lock = _lock_file(directory) if swapped else directory
    try:
        with _exclusive(lock, swapped, directory, option):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty


def _lock_file(output: Path) -> Path:
    """The lock file of an output path: in the user's folder of the system's temporary folder,
    named by a digest of the resolved path, so that nothing is left beside the output (the
    processes of one user on one machine share it)."""
    folder = Path(tempfile.gettempdir()) / f"vitslim-locks-{os.getuid()}"  # per user: no one else's folder
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / (hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:32] + ".lock")


@contextlib.contextmanager
def file_output_lock(target: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """The write lock of an output written as several files named after `target` (an engine and
    its manifest, an ONNX and its reports): a second vitslim process writing it is refused."""
    target = Path(target)
    with _exclusive(_lock_file(target), True, target, option):
        yield


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


@contextlib.contextmanager
def directory_swap(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling of `target` to write a whole new version of the directory
    into; on success it replaces `target` in one step, so a reader sees the old set of files or
    the new one, never a mix (where the system cannot swap two directories atomically, two
    renames: `target` is briefly absent, never mixed). On error the sibling is deleted."""
    import shutil

    target = Path(os.path.realpath(target))  # a link to the directory: replace what it points to
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp makes 0700: keep the directory's own permissions (others may read baselines)
    os.chmod(staging, (target.stat().st_mode & 0o7777) if target.is_dir() else 0o777 & ~umask)
    try:
        yield staging
        if not target.exists():
            os.rename(staging, target)
        elif not _exchange(staging, target):  # after an exchange, staging holds the old version
            aside = staging.with_name(staging.name + ".old")
            os.rename(target, aside)
            os.rename(staging, target)
            staging = aside
    finally:
        if staging.exists():
            shutil.rmtree(staging)
