"""The dataset version store behind the `refresh` flow: append-only versions, one atomic commit point.

Layout under ROOT:
  versions/v0001/        one finished version (seeds.parquet, dataset/, eval/, version.json); never rewritten
  registry.json          the commit point: `latest` and the version history, replaced with os.replace
  latest -> versions/vN  a convenience symlink that follows registry.json (repaired if a crash left it behind),
                         flipped by `codeclm.publish.point`, the one symlink flip every output uses
  .refresh.lock          flock held by the running refresh, so two refreshes of one root never interleave

A version is built in `versions/.vNNNN.partial-*`, renamed into place, and only then registered. A refresh
killed at any point therefore leaves `registry.json`, `latest` and every older version as they were; the
leftovers (a partial or an unregistered directory) are removed by the next refresh under the lock. Inside a
version, dataset/, model/ and eval/ are published by `codeclm.publish` (relative links, so the version folder
can be renamed); versions are kept, since later versions' datasets are read together with earlier ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from codeclm.errors import CodecError, SeedFileError
from codeclm.profile import diff_lines, load_profile, profile_diff
from codeclm.publish import point, sync_dir, sync_tree
from codeclm.records import Seed
from codeclm.storage import load_seeds, write_json

VERSION_RE = re.compile(r"^v(\d{4,})$")
SEED_SCHEMA = pa.schema([("seed_id", pa.string()), ("instruction", pa.string()), ("content_sha", pa.string()),
                         ("source_file", pa.string())])


class RefreshBusy(CodecError):
    """Another refresh holds the lock of this version root."""


def content_sha(instruction: str) -> str:
    """What makes a seed 'the same seed' across drops: its instruction text, whitespace-trimmed."""
    return hashlib.sha256(instruction.strip().encode()).hexdigest()


def slot_of(when: datetime) -> str:
    """The idempotency key of a scheduled run: its scheduled start, to the minute, in UTC."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


@dataclass(frozen=True)
class NewSeed:
    """A seed no version has processed, with its content hash and the drop file it came from."""

    seed: Seed
    sha: str
    source: str


class VersionStore:
    """Reads and appends versions under one root; every mutating call must run inside `lock()`."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.versions = self.root / "versions"
        self.registry_path = self.root / "registry.json"
        self.latest_link = self.root / "latest"

    # -- reading -------------------------------------------------------------------------------------
    def registry(self) -> dict[str, Any]:
        """`{"latest": "v0002" | None, "history": [entry, ...]}`; a missing file is an empty store."""
        try:
            return json.loads(self.registry_path.read_text())
        except FileNotFoundError:
            return {"latest": None, "history": []}

    def history(self) -> list[dict[str, Any]]:
        return list(self.registry()["history"])

    def latest(self) -> str | None:
        return self.registry()["latest"]

    def entry(self, version: str) -> dict[str, Any] | None:
        return next((e for e in self.history() if e["version"] == version), None)

    def version_for_slot(self, slot: str) -> str | None:
        return next((e["version"] for e in self.history() if e.get("slot") == slot), None)

    def path(self, version: str) -> Path:
        return self.versions / version

    def train_files(self, version: str | None = None) -> list[Path]:
        """The training files that make up a version's full dataset: its own and every earlier version's."""
        history = self.history()
        version = version or self.latest()
        ids = [e["version"] for e in history]
        if version not in ids:
            return []
        return [self.path(v) / "dataset" / "train.parquet" for v in ids[: ids.index(version) + 1]]

    def processed(self) -> set[str]:
        """Content hashes of every seed a registered version has processed."""
        hashes: set[str] = set()
        for e in self.history():
            table = pq.read_table(self.path(e["version"]) / "seeds.parquet", columns=["content_sha"])
            hashes.update(table.column("content_sha").to_pylist())
        return hashes

    def new_seeds(self, seeds_dir: Path) -> list[NewSeed]:
        """Seeds in the drop directory that no version has processed, first occurrence wins, file order by name."""
        if not seeds_dir.is_dir():
            raise SeedFileError(f"{seeds_dir}: not a directory; refresh reads a directory of *.parquet seed drops")
        done = self.processed()
        found: dict[str, NewSeed] = {}
        ids: dict[str, str] = {}
        for file in sorted(p for p in seeds_dir.glob("*.parquet") if not p.name.startswith((".", "_"))):
            for seed in load_seeds(file):
                sha = content_sha(seed.instruction)
                if sha in done or sha in found:
                    continue
                if seed.seed_id in ids:
                    raise SeedFileError(f"{file}: seed id {seed.seed_id!r} is also used by a different new seed in "
                                        f"{ids[seed.seed_id]}; make seed ids unique across drops")
                ids[seed.seed_id] = file.name
                found[sha] = NewSeed(seed, sha, file.name)
        return list(found.values())

    # -- writing (under the lock) -----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive, non-blocking flock: the kernel drops it when the holder dies, even by SIGKILL."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".refresh.lock").open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RefreshBusy(f"{self.root}: another refresh is running on this root; wait for it to finish "
                                  "(the refresh deployment has concurrency_limit 1 for this reason)") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def recover(self) -> list[str]:
        """Remove what a killed refresh left behind (partial or unregistered version dirs); fix `latest`."""
        registered = {e["version"] for e in self.history()}
        removed = []
        if self.versions.is_dir():
            for child in sorted(self.versions.iterdir()):
                orphan = VERSION_RE.match(child.name) and child.name not in registered
                if child.name.startswith(".") or orphan:
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child.name)
        self._point_latest(self.latest())
        return removed

    def next_version(self) -> str:
        numbers = [int(m.group(1)) for e in self.history() if (m := VERSION_RE.match(e["version"]))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def stage(self, version: str) -> Path:
        """A fresh private directory to build `version` in; invisible to readers until `commit`."""
        staging = self.versions / f".{version}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        return staging

    @staticmethod
    def write_seeds(staging: Path, seeds: list[NewSeed]) -> Path:
        """The version's input: one Parquet file that `generate` reads and later refreshes hash."""
        path = staging / "seeds.parquet"
        rows = [{"seed_id": s.seed.seed_id, "instruction": s.seed.instruction, "content_sha": s.sha,
                 "source_file": s.source} for s in seeds]
        pq.write_table(pa.Table.from_pylist(rows, schema=SEED_SCHEMA), path)
        return path

    def commit(self, staging: Path, entry: dict[str, Any]) -> Path:
        """Publish a finished version: rename it into place, then register it with one atomic replace."""
        version = entry["version"]
        if self.entry(version) is not None:
            raise CodecError(f"{self.root}: version {version} is already registered; refusing to overwrite it")
        write_json(staging / "version.json", entry)
        final = self.path(version)
        sync_tree(staging)  # on the disk before its name and the registry say it exists (power loss)
        os.replace(staging, final)
        sync_dir(final.parent)
        registry = self.registry()
        registry["history"].append(entry)
        registry["latest"] = version
        write_json(self.registry_path, registry, sync=True)
        self._point_latest(version)
        return final

    def _point_latest(self, version: str | None) -> None:
        if version is None:
            return
        point(self.latest_link, Path("versions") / version)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


EVAL_KEYS = ("benchmark", "target", "crr", "ci_low", "ci_high", "wins", "ties", "losses", "failures", "total")


def eval_rows(results: list[dict[str, Any]], specs: dict[str, str]) -> list[dict[str, Any]]:
    """The evaluation rows a version keeps; `target_spec` is the target as asked for (before `{version}` was
    filled in), so the next version compares against the same spec even when the model name changes."""
    return [{**{k: r.get(k) for k in EVAL_KEYS}, "target_spec": specs.get(r["target"], r["target"])}
            for r in results]


def crr_deltas(previous: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CRR change in percentage points against the previous version, per benchmark and target spec."""
    before = {(r["benchmark"], r["target_spec"]): r for r in (previous or {}).get("eval", [])}
    deltas = []
    for r in rows:
        old = before.get((r["benchmark"], r["target_spec"]))
        deltas.append({"benchmark": r["benchmark"], "target_spec": r["target_spec"], "target": r["target"],
                       "crr": r["crr"], "previous_version": (previous or {}).get("version") if old else None,
                       "previous_crr": old["crr"] if old else None,
                       "delta_pp": r["crr"] - old["crr"] if old else None})
    return deltas


def _pair_texts(files: list[Path]) -> tuple[set[str], set[str]]:
    """Pair ids and instruction texts across training files (missing files read as empty)."""
    ids: set[str] = set()
    texts: set[str] = set()
    for f in files:
        if f.exists():
            table = pq.read_table(f, columns=["pair_id", "instruction"])
            ids.update(table.column("pair_id").to_pylist())
            texts.update(t.strip() for t in table.column("instruction").to_pylist())
    return ids, texts


def version_changes(store: VersionStore, previous: str | None, dataset: Path) -> dict[str, Any] | None:
    """What the version in `dataset` changes against `previous`: its profile against the previous version's
    (use cases, skills, lengths, gaps, rounds) and the full dataset's pairs: added, removed (earlier pairs no
    longer readable: versions are append-only, so anything here is damage), repeated instructions."""
    if previous is None:
        return None
    changes = profile_diff(load_profile(store.path(previous) / "dataset"), load_profile(dataset))
    earlier_ids, earlier_texts = _pair_texts(store.train_files(previous))
    history = store.history()
    expected = sum(e["train"] for e in history[: [e["version"] for e in history].index(previous) + 1])
    table = pq.read_table(dataset / "train.parquet", columns=["pair_id", "instruction"])
    new_ids = set(table.column("pair_id").to_pylist()) - earlier_ids
    repeats = sum(t.strip() in earlier_texts for t in table.column("instruction").to_pylist())
    changes["pairs"] = {"before": expected, "added": len(new_ids), "removed": expected - len(earlier_ids),
                        "after": len(earlier_ids) + len(new_ids), "repeats": repeats}
    return changes


def report_markdown(entry: dict[str, Any]) -> str:
    """The refresh report a user reads in the UI: what was added, what it cost, whether CRR moved."""
    totals = entry.get("totals") or {}
    lines = [f"# Refresh {entry['version']} · slot {entry['slot']}", "",
             f"* **{entry['seeds_new']} new seeds** from {', '.join(entry['seed_files']) or '-'}; "
             f"**{entry['train']} training pairs** added (previous version: {entry.get('parent') or 'none'})",
             f"* calls {totals.get('calls', 0)} ({totals.get('cached', 0)} cached, {totals.get('failed', 0)} failed), "
             f"tokens {totals.get('prompt_tokens', 0)} in / {totals.get('completion_tokens', 0)} out, "
             f"cost ${totals.get('cost_usd', 0.0):.4f}", ""]
    if changes := diff_lines(entry.get("changes")):
        lines += [f"## What changed against {entry.get('parent')}", "", *[f"* {c}" for c in changes], ""]
    if not entry.get("crr_delta"):
        return "\n".join([*lines, "Evaluation was not run for this version."]) + "\n"
    if entry.get("model"):
        lines += [f"The target was tuned on this version's pairs ({entry['model']['trainer']}, "
                  f"{entry['model']['steps']} steps); `tuned` is compared with the previous version's tuned model, "
                  "`base` is the untuned target on the same questions.", ""]
    elif not any(d["target_spec"] != d["target"] for d in entry["crr_delta"]):
        lines += ["> **Note:** no model was trained on this version's data (training off, or no tuned target "
                  "named with `{version}`): the CRR is of the base target and measures no data.", ""]
    lines += ["| benchmark | target | CRR % | previous | Δ pp |", "|---|---|---:|---:|---:|"]
    for d in entry["crr_delta"]:
        prev = f"{d['previous_crr']:.2f} ({d['previous_version']})" if d["previous_crr"] is not None else "-"
        delta = f"{d['delta_pp']:+.2f}" if d["delta_pp"] is not None else "new"
        lines.append(f"| {d['benchmark']} | {d['target']} | {d['crr']:.2f} | {prev} | {delta} |")
    return "\n".join(lines) + "\n"


def history_table(history: list[dict[str, Any]], last: int = 20) -> list[dict[str, Any]]:
    """One row per version for the UI table artifact (the newest `last`)."""
    rows = []
    for e in history[-last:]:
        totals = e.get("totals") or {}
        crr = "; ".join(f"{d['benchmark']}/{d['target']}: {d['crr']:.2f}" for d in e.get("crr_delta", []))
        rows.append({"version": e["version"], "slot": e["slot"], "created_at": e["created_at"],
                     "new_seeds": e["seeds_new"], "train": e["train"], "calls": totals.get("calls", 0),
                     "tokens": totals.get("prompt_tokens", 0) + totals.get("completion_tokens", 0),
                     "cost_usd": round(totals.get("cost_usd", 0.0), 6), "crr": crr or "-"})
    return rows
