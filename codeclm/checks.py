"""Checks that run before the first LLM call, so a run that cannot publish never pays for its calls."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from codeclm.errors import ConfigError

# Files that mark a directory as one codeclm published (a dataset, an evaluation report), so it may be replaced.
OUTPUT_MARKERS = ("manifest.json", "summary.json")


def check_output(path: Path | str, option: str = "--out", *, replaced: bool = True) -> Path:
    """Refuse an output location that cannot take the result: a file, a path under a file, a folder we
    cannot write in, or (when the run replaces it) a folder of someone else's files. Writes nothing."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {path}: is an existing file, not a directory; choose another path")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {path}: {ancestor} is a file, so nothing can be written under it")
    if replaced and out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in OUTPUT_MARKERS):
        raise ConfigError(f"{option} {path}: holds files that codeclm did not write and would replace them; "
                          "choose a new or empty directory")
    _probe_writable(ancestor, option, path)
    return out


def _probe_writable(folder: Path, option: str, path: Path | str) -> None:
    """Make and remove a probe folder: permission bits say nothing to root, read-only mounts only tell on write."""
    try:
        probe = tempfile.mkdtemp(prefix=".codeclm-probe-", dir=folder)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            reason = "cannot create directories there"
        raise ConfigError(f"{option} {path}: cannot write in {folder} ({reason}); choose another path") from None
    os.rmdir(probe)


def check_run_output(out: Path | str) -> Path:
    """`run --out OUT` keeps OUT and replaces OUT/dataset, OUT/model and OUT/eval."""
    root = check_output(out, replaced=False)
    for part in ("dataset", "model", "eval"):
        check_output(root / part, f"--out {out}:")
    return root
