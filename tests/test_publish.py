"""codeclm.publish: every output is published exactly once. A crash (SIGKILL) at each point inside `publishing`
leaves OUT holding the old or the new complete version, never nothing and never a mix; the next publish
cleans what the crash left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from codeclm.publish import CRASH_ENV, CRASH_POINTS, PublishError, leftovers, publishing, store_of

REPO = Path(__file__).resolve().parents[1]
FILES = ("manifest.json", "train.parquet", "stages/seeds.parquet")

# A child process that publishes version `tag` of a three-file output into OUT (argv: out, tag).
CHILD = f"""
import sys
from pathlib import Path
from codeclm.publish import publishing
out, tag = Path(sys.argv[1]), sys.argv[2]
with publishing(out) as staging:
    for name in {FILES!r}:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(tag + " " + name)
"""


def _publish_in_child(out: Path, tag: str, crash_at: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-c", CHILD, str(out), tag], env=env, timeout=60).returncode


def _version(out: Path) -> str:
    """The tag of the complete version at OUT; fails on a missing OUT or a mix of versions."""
    tags = {(out / name).read_text().split()[0] for name in FILES}
    assert len(tags) == 1, f"{out} mixes versions: {tags}"
    return tags.pop()


def _write(staging: Path, tag: str) -> None:
    for name in FILES:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(f"{tag} {name}")


@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("before", ["link", "plain directory"])
def test_a_kill_at_any_point_of_publishing_leaves_the_old_or_the_new_output(point: str, before: str,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    if before == "link":
        assert _publish_in_child(out, "old") == 0
    else:  # an output written by an older codeclm: published by the first flip, in one step (migration)
        _write(out, "old")
    rc = _publish_in_child(out, "new", crash_at=point)
    assert rc == -9, f"the crash hook at {point!r} did not fire"
    expected = "old" if point in ("staged", "renamed", "linked") else "new"
    assert _version(out) == expected
    assert _publish_in_child(out, "next") == 0  # the next publish works and clears what the crash left
    assert _version(out) == "next" and out.is_symlink()
    assert leftovers(out) == []


def test_publishing_flips_a_link_and_keeps_only_the_current_version(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "out"
    for tag in ("v1", "v2"):
        with publishing(out) as staging:
            assert staging.parent == store_of(out) and staging.name.startswith(".staging-")
            _write(staging, tag)
    assert out.is_symlink() and not os.readlink(out).startswith("/")  # relative: the parent may move
    assert _version(out) == "v2" and leftovers(out) == []
    moved = tmp_path / "moved"
    (tmp_path / "runs").rename(moved)
    assert _version(moved / "out") == "v2"


def test_a_failure_while_writing_leaves_the_previous_output_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with publishing(out) as staging:
        _write(staging, "v1")
    with pytest.raises(ValueError, match="validation"), publishing(out) as staging:
        _write(staging, "v2")
        raise ValueError("validation failed")
    assert _version(out) == "v1" and leftovers(out) == []


def test_two_publishers_of_one_out_never_share_or_delete_each_others_folder(tmp_path: Path) -> None:
    """A is still writing when B publishes and cleans up: A's folder survives, A's flip wins later."""
    out = tmp_path / "out"
    a_started, b_done = threading.Event(), threading.Event()

    def publisher_a() -> None:
        with publishing(out) as staging:
            a_started.set()
            b_done.wait(30)
            _write(staging, "a")

    thread = threading.Thread(target=publisher_a)
    thread.start()
    assert a_started.wait(30)
    with publishing(out) as staging:
        _write(staging, "b")
    assert _version(out) == "b"
    b_done.set()
    thread.join(30)
    assert _version(out) == "a" and leftovers(out) == []


def test_a_write_failure_is_one_clear_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with publishing(out) as staging:
        _write(staging, "v1")
    with pytest.raises(PublishError, match=r"cannot publish .*the previous output is intact"), \
            publishing(out) as staging:
        raise PermissionError(13, "Permission denied", str(staging / "x"))
    assert _version(out) == "v1"


def test_a_plain_directory_is_migrated_where_the_kernel_cannot_exchange(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import codeclm.publish

    monkeypatch.setattr(codeclm.publish, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    _write(out, "old")
    with publishing(out) as staging:
        _write(staging, "new")
    assert out.is_symlink() and _version(out) == "new" and leftovers(out) == []


def test_every_file_and_folder_reaches_the_disk_before_the_name_that_makes_it_visible(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power loss: the version's files and folders are fsynced before its rename, the versions folder after
    it, and OUT's folder after the flip (a power cut can keep a rename and lose unsynced data)."""
    import codeclm.publish as publish

    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(publish.os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(publish.os, "replace",
                        lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    out = tmp_path / "out"
    with publishing(out) as staging:
        _write(staging, "v1")
    final = os.path.realpath(out)
    synced = [path for kind, path in events if kind == "fsync"]
    rename = events.index(("rename", final))
    flip = events.index(("replace", str(out)))
    before = {path for kind, path in events[:rename] if kind == "fsync"}
    staged = str(store_of(out) / f".staging-{Path(final).name}")
    assert {f"{staged}/{name}" for name in FILES} | {staged, f"{staged}/stages"} <= before
    assert str(store_of(out)) in synced[len(before):] and ("fsync", str(store_of(out))) in events[rename:flip]
    assert ("fsync", str(tmp_path)) in events[flip:]  # the flip itself
    assert _version(out) == "v1"
