"""Checks that run before the first LLM call, so a run that cannot publish never pays for its calls: where a
command writes (`check_output`) and what it reads (`check_generate`, `check_evaluate`, `check_run`,
`check_refresh`)."""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from codeclm.errors import ConfigError, SeedFileError

if TYPE_CHECKING:  # `codeclm --help` stays instant: no pyarrow or settings import here
    from codeclm.eval.evaluation import EvalPlan, Target
    from codeclm.records import Seed
    from codeclm.results import GenerateResult
    from codeclm.settings import Settings

T = TypeVar("T")

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


# ---------------------------------------------------------------------------------------------------------------
# Input checks: each command's inputs are loaded and validated once per process. The CLI runs a command's check
# before Prefect starts (bad input fails in a second); the flow it then starts runs the same check and gets the
# result already made (flows started without the CLI check for themselves). The loaded seeds are handed on to
# the flow's seed task, so one run reads and hashes the seed file once.

_DONE: dict[str, Any] = {}  # check results by request, in this process (the latest REMEMBERED)
REMEMBERED = 16  # a long-lived worker process keeps no more
_SEEDS: dict[str, list[Seed]] = {}  # the seeds last checked, by content hash, for `loaded_seeds`
ENCODE_OVERHEAD_TOKENS = 600
GENERATION_ROLES = ("strong", "target")


@dataclass(frozen=True)
class SeedCheck:
    """A seed file that passed every check: where it is, its content hash (cache keys follow it) and size."""

    path: str
    sha: str
    count: int


def _once(kind: str, request: dict[str, Any], check: Callable[[], T]) -> T:
    """`check()` the first time this request is made in this process; its result after that."""
    key = kind + ":" + json.dumps(request, sort_keys=True, default=str)
    if key not in _DONE:
        _DONE[key] = check()
        while len(_DONE) > REMEMBERED:
            del _DONE[next(iter(_DONE))]
    result: T = _DONE[key]
    return result


def _stamp(path: Path) -> list[tuple[str, int, int]] | None:
    """What changes when a file (or a directory's Parquet files) changes; None when it cannot be read."""
    try:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        return [(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
    except OSError:
        return None


def source_sha(source: Path) -> str:
    """Content hash of a seed file or of every Parquet file in a seed directory."""
    if not source.exists():
        raise SeedFileError(f"{source}: no such file or directory; pass a Parquet, JSONL or CSV file of seeds")
    digest = hashlib.sha256()
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def loaded_seeds(source: Path, sha: str) -> list[Seed]:
    """The seeds of a checked file (read once, by its check); read again only in another process."""
    from codeclm.storage import load_seeds

    return _SEEDS[sha] if sha in _SEEDS else load_seeds(source)


def generation_roles(settings: Settings) -> tuple[str, ...]:
    """The roles `generate` calls: strong and target, and the judge when it scores; only the strong model in
    Table 3's ablations without Contrastive Filtering."""
    if not settings.contrastive_filtering:
        return ("strong",)
    return (*GENERATION_ROLES, "judge") if settings.scorer == "judge" else GENERATION_ROLES


def check_generate(seeds: Path | str, out: Path | str, settings: Settings, roles: Sequence[str] | None = None, *,
                   loaded: Callable[[SeedCheck], object] | None = None) -> SeedCheck:
    """Everything `generate` (or `baseline`, with its `roles`) can check before a call: the output folder, the
    seed file (read and hashed once), every seed fitting the strong model's context, and the models (preflight).
    `loaded` runs between the file checks and the model checks (the CLI boots Prefect's API server there)."""
    source, roles = Path(seeds), tuple(roles or generation_roles(settings))
    request = {"seeds": str(source.absolute()), "stamp": _stamp(source), "roles": roles,
               "settings": settings.model_dump(mode="json")}
    check_output(out, "--out")  # every time: cheap, and the folder may have changed since

    def check() -> SeedCheck:
        from codeclm.llm.endpoints import check_context, preflight
        from codeclm.storage import load_seeds

        rows = load_seeds(source)
        checked = SeedCheck(path=str(source), sha=source_sha(source), count=len(rows))
        _SEEDS.clear()
        _SEEDS[checked.sha] = rows
        if loaded is not None:
            loaded(checked)
        check_context([(f"seed {s.seed_id}", s.instruction) for s in rows], settings, "strong",
                      ENCODE_OVERHEAD_TOKENS, str(source))
        preflight(settings, roles)
        return checked

    return _once("generate", request, check) if request["stamp"] is not None else check()


RECIPE_PACKAGES = ("codeclm", "tasks", "flows")


@functools.cache
def recipe_digest() -> str:
    """Hash of the code and prompts that make a dataset (every Python file of codeclm, tasks and flows, every
    prompt file): a manifest records it, and a published run is only taken as made again by the same recipe."""
    from codeclm.llm.prompts import PROMPTS_DIR

    folders = [Path(spec.submodule_search_locations[0]) for spec in map(importlib.util.find_spec, RECIPE_PACKAGES)
               if spec is not None and spec.submodule_search_locations]
    digest = hashlib.sha256()
    for folder, pattern in [*((f, "*.py") for f in folders), (PROMPTS_DIR, "*.md")]:
        for path in sorted(folder.rglob(pattern)):
            digest.update(f"{path.relative_to(folder.parent)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def published_run(seeds: SeedCheck, out: Path | str, settings: Settings, method: str = "codeclm"
                  ) -> GenerateResult | None:
    """What `out` holds when it is this very run already: made from these seeds (by content) with these settings
    by the same recipe (code and prompts) and `method`, with no failed call a rerun would ask again (none, or only
    kept ones), and every file as the manifest
    hashed it. A rerun would make no call and publish the same files, so `generate` returns this instead of
    running its steps again. None when anything differs or cannot be read."""
    from codeclm.results import GenerateResult

    folder = Path(out)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        same = (manifest.get("recipe") == recipe_digest() and manifest["method"] == method
                and manifest["run"]["seeds_sha"] == seeds.sha
                and manifest["settings"] == settings.for_stage("export").dump() and _intact(folder, manifest["files"])
                and _only_kept_failures(folder, manifest["totals"]["failed"], settings))
        if not same:
            return None
        return GenerateResult(out=str(folder), method=method, train=manifest["counts"]["train"],
                              budget=manifest["budget"], counts=manifest["counts"], stages=manifest["stages"],
                              totals=manifest["totals"], concurrency=manifest.get("concurrency", []), reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _only_kept_failures(folder: Path, failed: int, settings: Settings) -> bool:
    """No failed call a rerun would ask again: none at all, or only failures the call cache keeps (the same
    unusable answer twice at temperature 0, `codeclm.llm.cache.kept_failure`) and no `retry_failed`."""
    if failed == 0:
        return True
    if settings.retry_failed:
        return False
    import pyarrow.parquet as pq

    from codeclm.llm.cache import CallCache, kept_failure

    keys = pq.read_table(folder / "failed_calls.parquet", columns=["call_key"]).column("call_key").to_pylist()
    cache = CallCache(settings.cache_dir)
    entries = [cache.get(key).entry if key else None for key in keys]
    return len(keys) == failed and all(entry is not None and kept_failure(entry) for entry in entries)


def _intact(folder: Path, files: dict[str, str]) -> bool:
    """Every file as the manifest hashed it; hashed once per process while the files stay as they are (the CLI
    asks before Prefect starts, the flow it starts asks again)."""
    from codeclm.storage import file_sha256

    request = {"folder": str(folder.resolve()), "files": files, "stamps": [_stamp(folder / name) for name in files]}
    return _once("intact", request, lambda: all(file_sha256(folder / name) == sha for name, sha in files.items()))


def check_evaluate(benchmarks: Sequence[str], out: Path | str | None, settings: Settings,
                   targets: Sequence[Target] | None = None, limit: int | None = None, rule: str | None = None,
                   prompt_column: str | None = None) -> EvalPlan:
    """Everything `evaluate` can check before a call: the output folder (unless None: a caller that has not
    made it yet), the request and its benchmarks (each loaded once per process), and every model it calls that
    is not embedded (preflight)."""
    request = {"benchmarks": list(benchmarks), "settings": settings.model_dump(mode="json"),
               "targets": [t if isinstance(t, str) else t.model_dump(mode="json") for t in targets or []],
               "limit": limit, "rule": rule, "prompt_column": prompt_column}

    if out is not None:
        check_output(out, "--out")

    def check() -> EvalPlan:
        from codeclm.eval.evaluation import plan_evaluation
        from codeclm.llm.endpoints import preflight

        plan = plan_evaluation(benchmarks, settings, targets, limit, rule, prompt_column)
        for endpoint, roles in plan.endpoints():
            preflight(endpoint, roles)
        return plan

    return _once("evaluate", request, check)


def check_refresh(settings: Settings, benchmarks: Sequence[str], targets: Sequence[str], limit: int | None, *,
                  evaluate: bool, train: bool) -> None:
    """`refresh`, before the night's first generation call: the evaluation it will run (`check_evaluate`: its
    benchmarks and targets, the strong model and the judge reachable) and the training setup."""
    if evaluate:
        check_evaluate(benchmarks, None, settings, list(targets) or None, limit)  # the version's eval/ is made later
    if train:
        from codeclm.train.finetune import check_trainer

        check_trainer(settings)


def check_run(seeds: Path | str, out: Path | str, settings: Settings, benchmarks: Sequence[str],
              limit: int | None) -> Path:
    """`run`: its output folders, the seeds and models of `generate`, the benchmarks of `evaluate` and the
    training setup, before any call; a run that cannot train must not pay for its dataset first."""
    root = check_run_output(out)
    check_generate(seeds, root / "dataset", settings)
    check_evaluate(benchmarks, root / "eval", settings, limit=limit)
    if settings.finetune.trainer != "off":
        from codeclm.train.finetune import check_trainer

        check_trainer(settings)
    return root
