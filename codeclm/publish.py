"""Publishing an output folder exactly once: every output (dataset, baseline, evaluation report, tuned model) is
written aside, validated, then made visible at OUT by one atomic rename.

Layout beside OUT:
  OUT -> .OUT.versions/<id>         a relative symlink to the one complete, published version
  .OUT.versions/.staging-<id>/      a version being written; its writer holds a shared flock on the folder
  .OUT.versions/.lock               serialises the flip and the clean-up among publishers of one OUT

Why a symlink flip and not a directory exchange: the flip is `symlink(tmp) + os.replace(tmp, OUT)`, one POSIX
rename that every file system and Python has, so a crash leaves OUT pointing at the old or at the new complete
version and never at nothing (publishing was two renames before, and a kill between them left OUT missing). An
exchange needs Linux's renameat2(RENAME_EXCHANGE), which not every file system supports, and it cannot tell
readers which version they hold. The link is relative, so a folder holding OUT may itself be renamed (a refresh
version is built in a staging folder and renamed into `versions/`). Readers need nothing: paths through OUT
resolve to the current version; a reader that has a file open keeps it even after that version is removed.

An OUT that is a plain directory (written by an older codeclm, or an empty folder a user made) is migrated on
its first publish: the new link is exchanged with the directory in one renameat2(RENAME_EXCHANGE) call where the
kernel supports it, else by two renames (old directory aside as `.OUT.legacy-*`, then the link), and the next
publish puts a legacy folder back if a crash fell between them.

Promise: at-least-once work, exactly-once publish, for process crashes (kill -9 at any point) and, on a file
system that honours fsync (ext4, xfs, btrfs; not a disk that lies about its write cache), for a power loss: every
file and folder of the version is fsynced before the rename that names it, the versions folder after that
rename, and OUT's folder after the flip, so whichever link the disk holds after a power cut points at a complete
version. Once `publishing` returns, the new version is on the disk; the previous one is removed only after.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from codeclm.errors import CodecError

CRASH_ENV = "CODECLM_PUBLISH_CRASH_AT"
"""Test hook: the point at which `publishing` SIGKILLs its own process (the crash-point drill)."""
CRASH_POINTS = ("staged", "renamed", "linked", "flipped", "cleaned")


class PublishError(CodecError):
    """Publishing failed (disk full, no permission); the previous output at OUT is intact."""


def store_of(out: Path) -> Path:
    """The hidden sibling folder that holds OUT's versions."""
    return out.parent / f".{out.name}.versions"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released by the kernel when the holder dies, even by SIGKILL
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def publishing(out: Path | str) -> Iterator[Path]:
    """Yield a fresh, uniquely named staging folder; when the block ends normally (the caller has written and
    validated its files in it), publish it as OUT in one atomic flip and remove older versions. If the block
    raises, the staging folder is removed and OUT is untouched. Two publishers of one OUT never share a folder;
    the later flip wins and both versions were complete."""
    out = Path(out).expanduser().absolute()
    store = store_of(out)
    try:
        _restore_legacy(out)
        store.mkdir(parents=True, exist_ok=True)
        version = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        staging = store / f".staging-{version}"
        with _locked(store / ".lock"):  # a cleaner holds this lock, so it never sees our folder unlocked
            staging.mkdir()
            alive = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(alive, fcntl.LOCK_SH)
    except OSError as exc:
        raise _failed(out, exc) from None
    final = store / version
    try:
        yield staging
        sync_tree(staging)  # the files' data before any name that makes them visible
        _crash_point("staged")
        os.rename(staging, final)  # complete, still invisible: nothing points at it yet
        sync_dir(store)
        _crash_point("renamed")
        with _locked(store / ".lock"):
            point(out, Path(store.name) / version)
            _crash_point("flipped")
            _clean(out, keep=version)
            _crash_point("cleaned")
    except BaseException as exc:
        for left in (staging, final):
            if left.exists() and not _points_at(out, left):
                shutil.rmtree(left, ignore_errors=True)
        if isinstance(exc, OSError) and _is_write_failure(exc):
            raise _failed(out, exc) from None
        raise
    finally:
        os.close(alive)


def point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (relative to the link's folder) in one rename; a plain directory at
    `link` is exchanged for the new link (see the module docstring) and then removed."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp, target_is_directory=True)
    try:
        _crash_point("linked")
        if link.is_dir() and not link.is_symlink():
            _migrate(tmp, link)
        else:
            os.replace(tmp, link)
    except BaseException:
        if tmp.is_symlink():
            tmp.unlink()
        raise
    sync_dir(link.parent)  # the flip itself reaches the disk


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder` and every folder (itself included), so what a later rename makes visible
    is on the disk first (a power cut otherwise can keep the rename and lose the data)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                continue  # its entry is synced with its folder; its target is not ours to sync
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(parent))


def sync_dir(folder: Path) -> None:
    """fsync a folder: the names created, renamed or removed in it reach the disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the kernel or libc lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _migrate(tmp_link: Path, plain: Path) -> None:
    """Replace the plain directory `plain` by the symlink `tmp_link`; the old directory is removed after."""
    if _exchange(tmp_link, plain):
        shutil.rmtree(tmp_link)  # after the exchange, the temporary name holds the old directory
        return
    legacy = plain.with_name(f".{plain.name}.legacy-{uuid.uuid4().hex[:8]}")
    os.rename(plain, legacy)
    os.replace(tmp_link, plain)
    shutil.rmtree(legacy, ignore_errors=True)


def _restore_legacy(out: Path) -> None:
    """A crash inside the two-rename migration left OUT missing and the old directory aside: put it back."""
    if out.exists() or out.is_symlink():
        return
    for legacy in sorted(out.parent.glob(f".{out.name}.legacy-*")):
        os.rename(legacy, out)
        return


def _points_at(link: Path, folder: Path) -> bool:
    return link.is_symlink() and os.path.realpath(link) == os.path.realpath(folder)


def _clean(out: Path, keep: str) -> None:
    """Remove every version but `keep` whose writer is gone (a finished old version, or the staging folder of a
    killed run); a folder another publisher is still writing holds its flock and stays. Called under the lock."""
    for child in store_of(out).iterdir():
        if child.name in (keep, ".lock") or not child.is_dir():
            continue
        try:
            fd = os.open(child, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live publisher's folder
        finally:
            os.close(fd)
        shutil.rmtree(child, ignore_errors=True)
    for stray in out.parent.glob(f".{out.name}.link-*"):  # a killed flip's link, or a migrated old directory
        if stray.is_symlink():
            stray.unlink(missing_ok=True)
        else:
            shutil.rmtree(stray, ignore_errors=True)


_WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _is_write_failure(exc: OSError) -> bool:
    """A failure of the place we write to, which the user fixes; pyarrow reports ENOSPC in its message only."""
    return exc.errno in _WRITE_FAILURES or "No space left" in str(exc)


def _failed(out: Path, exc: OSError) -> PublishError:
    """One line: what failed, that the previous output is intact, what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or "No space left" in str(exc):
        return PublishError(f"{out}: disk full while writing the output (No space left on device); the previous "
                            "output is intact; free space and rerun (completed calls are cached)")
    return PublishError(f"{out}: cannot publish ({reason}); the previous output is intact")


def leftovers(out: Path) -> list[str]:
    """What lies beside OUT besides its current version: staging folders, old versions, temporary links. Empty
    after every completed publish with no other publisher running."""
    out = Path(out).absolute()
    current = os.path.realpath(out) if out.is_symlink() else None
    store = store_of(out)
    found = [p.name for p in out.parent.glob(f".{out.name}.*") if p != store]
    if store.is_dir():
        found += [f"{store.name}/{p.name}" for p in store.iterdir()
                  if p.name != ".lock" and os.path.realpath(p) != current]
    return sorted(found)
