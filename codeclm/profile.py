"""What a published dataset holds, read from its own Parquet tables: use cases and skills against the seeds,
lengths, rounds, the gap G against theta, who answered, why instructions were dropped, what each kept pair cost,
and a few pairs per use case with their lineage. Pure (files in, dict, markdown and SVG out): the export steps
write it beside the dataset, the flows show it as an artifact, `codeclm show` prints it, refresh diffs it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from codeclm.profile_charts import bars_svg, data_uri, histogram_svg
from codeclm.storage import file_sha256, write_json, write_text

PROFILE_FILE = "profile.json"
MARKDOWN_FILE = "profile.md"
CHARTS = {"lengths": "profile-lengths.svg", "gaps": "profile-gaps.svg", "use_cases": "profile-use-cases.svg"}
SAMPLES = 12  # pairs kept in the profile, round-robin over use cases
SAMPLE_CHARS = 600  # responses and instructions are cut to this in samples (the full text is in train.parquet)
BINS = 12


def _table(folder: Path, name: str) -> pd.DataFrame:
    path = folder / name
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _counts(values: Any) -> dict[str, int]:
    return {str(k): int(n) for k, n in Counter(values).most_common()}


def _stats(values: pd.Series) -> dict[str, Any]:
    """Quantiles and a histogram of a numeric column (NaN left out)."""
    clean = values.dropna().astype(float)
    if clean.empty:
        return {"n": 0}
    q = clean.quantile([0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
    low, high = q[0], q[4]
    width = (high - low) / BINS or 1.0
    edges = [low + i * width for i in range(BINS + 1)]
    index = ((clean - low) / width).clip(0, BINS - 1).astype(int)
    hist = [int((index == i).sum()) for i in range(BINS)]
    return {"n": len(clean), "mean": round(float(clean.mean()), 2), "min": q[0], "p25": q[1],
            "median": q[2], "p75": q[3], "max": q[4], "edges": [round(e, 3) for e in edges], "histogram": hist}


def _use_cases(meta: pd.DataFrame, train: pd.DataFrame) -> list[dict[str, Any]]:
    seeded = meta[meta["origin"] == "seed"] if not meta.empty else meta
    in_seeds = Counter(seeded["use_case"]) if not seeded.empty else Counter()
    in_meta = Counter(meta["use_case"]) if not meta.empty else Counter()
    in_data = Counter(u for u in train.get("use_case", pd.Series(dtype=str)) if u)
    names = sorted(set(in_meta) | set(in_data), key=lambda u: (-in_data[u], -in_meta[u], u))
    return [{"use_case": u, "seed_metadata": in_seeds[u], "metadata": in_meta[u], "pairs": in_data[u]} for u in names]


def _skills(meta: pd.DataFrame, train: pd.DataFrame) -> dict[str, Any]:
    seeded = meta[meta["origin"] == "seed"] if not meta.empty else meta
    in_seeds = Counter(s for skills in seeded.get("skills", []) for s in skills)
    in_data = Counter(s for skills in train.get("skills", []) for s in skills)
    names = sorted(set(in_seeds) | set(in_data), key=lambda s: (-in_data[s], -in_seeds[s], s))
    return {"known": not meta.empty, "in_seeds": len(in_seeds), "in_data": len(in_data),
            "unreached": sorted(set(in_seeds) - set(in_data)),
            "counts": [{"skill": s, "seeds": in_seeds[s], "pairs": in_data[s]} for s in names]}


def _rounds(train: pd.DataFrame, decisions: pd.DataFrame) -> dict[str, Any]:
    """Kept pairs by round, and how far each basic instruction went (its last judged round)."""
    reached = decisions.groupby("instruction_id")["round"].max() if not decisions.empty else pd.Series(dtype=int)
    return {"kept": {str(k): int(v) for k, v in sorted(Counter(train.get("round", [])).items())},
            "reached": {str(k): int(v) for k, v in sorted(Counter(reached).items())}}


def _cost(manifest: dict[str, Any], pairs: int) -> dict[str, Any]:
    per = max(pairs, 1)
    rows = []
    for s in manifest.get("stages", []):
        tokens = int(s.get("prompt_tokens", 0)) + int(s.get("completion_tokens", 0))
        calls, cost = int(s.get("calls", 0)), float(s.get("cost_usd", 0.0))
        rows.append({"stage": s["stage"], "calls": calls, "tokens": tokens, "cost_usd": cost,
                     "calls_per_pair": round(calls / per, 3), "tokens_per_pair": round(tokens / per, 1),
                     "cost_per_pair": round(cost / per, 6)})
    total = {k: sum(r[k] for r in rows) for k in ("calls", "tokens", "cost_usd")}
    total |= {"calls_per_pair": round(total["calls"] / per, 3), "tokens_per_pair": round(total["tokens"] / per, 1),
              "cost_per_pair": round(total["cost_usd"] / per, 6),
              "unpriced_calls": int(manifest.get("totals", {}).get("unpriced_calls", 0))}
    return {"stages": rows, "total": total}


def _cut(text: str, limit: int = SAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _samples(train: pd.DataFrame, seeds: pd.DataFrame, meta: pd.DataFrame, n: int) -> list[dict[str, Any]]:
    """`n` pairs taken round-robin over the use cases (the most frequent first, pairs by id), each with its
    lineage back to the seeds: a few pairs per use case, and every use case before any gets a second."""
    if train.empty:
        return []
    seed_text = dict(zip(seeds.get("seed_id", []), seeds.get("instruction", []), strict=True))
    origin = dict(zip(meta.get("metadata_id", []), meta.get("origin", []), strict=True))
    ordered = train.sort_values("pair_id")
    groups = [ordered[ordered["use_case"] == u].to_dict(orient="records")
              for u, _ in Counter(ordered["use_case"]).most_common()]
    picked = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)][:n]
    out = []
    for row in picked:
        gap = row.get("gap")
        out.append({
            "pair_id": row["pair_id"], "use_case": row["use_case"],
            "seeds": [{"seed_id": s, "instruction": _cut(seed_text.get(s, "?"), 300)} for s in row["seed_ids"]],
            "metadata": {"metadata_id": row["metadata_id"], "origin": origin.get(row["metadata_id"], ""),
                         "skills": list(row["skills"])} if row["metadata_id"] else None,
            "basic_instruction": _cut(row["basic_instruction"]), "actions": list(row["actions_applied"]),
            "round": int(row["round"]), "instruction": _cut(row["instruction"]), "response": _cut(row["response"]),
            "answered_by": row["response_source"],
            "gap": None if gap is None or (isinstance(gap, float) and math.isnan(gap)) else float(gap)})
    return out


def sample_pairs(folder: Path, n: int) -> list[dict[str, Any]]:
    """`n` pairs of a published dataset with their lineage (what `codeclm show --samples N` prints)."""
    return _samples(_table(folder, "train.parquet"), _table(folder, "stages/seeds.parquet"),
                    _table(folder, "stages/metadata.parquet"), n)


def dataset_profile(folder: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The profile of the dataset in `folder` (a published one, or its staging folder with `manifest` given)."""
    manifest = manifest if manifest is not None else json.loads((folder / "manifest.json").read_text())
    train = _table(folder, "train.parquet")
    rejected = _table(folder, "rejected.parquet")
    failed = _table(folder, "failed_calls.parquet")
    seeds = _table(folder, "stages/seeds.parquet")
    meta = _table(folder, "stages/metadata.parquet")
    decisions = _table(folder, "stages/decisions.parquet")
    settings = manifest.get("settings", {})
    gaps = decisions["gap"] if not decisions.empty else train.get("gap", pd.Series(dtype=float))
    reasons = _counts(rejected.get("reason", []))
    return {
        "method": manifest.get("method", "codeclm"), "pairs": len(train), "seeds": len(seeds),
        "metadata": _counts(meta.get("origin", [])),
        "theta": settings.get("threshold") if not decisions.empty else None,  # only contrastive filtering has one
        "use_cases": _use_cases(meta, train), "skills": _skills(meta, train),
        "lengths": {"instruction": _stats(train.get("instruction", pd.Series(dtype=str)).str.len()),
                    "response": _stats(train.get("response", pd.Series(dtype=str)).str.len())},
        "rounds": _rounds(train, decisions),
        "gap": _stats(gaps), "gap_kept": _stats(train.get("gap", pd.Series(dtype=float))),
        "answered_by": _counts(train.get("response_source", [])),
        "rejected": reasons, "duplicates_dropped": reasons.get("duplicate", 0) + reasons.get("seed_overlap", 0),
        "failed_calls": _counts(failed.get("stage", [])),
        "cost": _cost(manifest, len(train)),
        "samples": _samples(train, seeds, meta, SAMPLES),
    }


def charts(profile: dict[str, Any]) -> dict[str, str]:
    """The profile's SVG charts by name (CHARTS): lengths, the gap G with theta marked, use cases seeds vs data."""
    lengths = profile["lengths"]
    out = {"lengths": histogram_svg([("instruction length (characters)", lengths["instruction"]),
                                     ("response length (characters)", lengths["response"])])}
    theta = profile.get("theta")
    out["gaps"] = histogram_svg([("score gap G = strong − target, every judged candidate", profile["gap"])],
                                marks=[-theta, theta] if theta is not None else [])
    top = profile["use_cases"][:12]
    out["use_cases"] = bars_svg("use cases: metadata from seeds vs kept pairs",
                                [(u["use_case"], u["seed_metadata"], u["pairs"]) for u in top],
                                ("seed metadata", "pairs"))
    return out


def _fmt(stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return "-"
    return f"median {stats['median']:g} (p25 {stats['p25']:g}, p75 {stats['p75']:g}, max {stats['max']:g})"


def _inline(counts: dict[str, int], label: str = "") -> str:
    return ", ".join(f"{label}{k}: {v}" for k, v in counts.items()) or "none"


def profile_markdown(profile: dict[str, Any], images: dict[str, str], title: str = "") -> str:
    """The profile a person reads: `images` maps chart names to where the chart is (a file or a data URI)."""
    p = profile
    cost = p["cost"]["total"]
    skills = p["skills"]
    lines = [f"# Dataset profile{' · ' + title if title else ''}", "",
             f"**{p['pairs']} pairs** ({p['method']}) from {p['seeds']} seeds"
             + (f" and metadata {_inline(p['metadata'])}" if p["metadata"] else "") + ".", "",
             f"* answered by: {_inline(p['answered_by'])}",
             f"* rounds: kept {_inline(p['rounds']['kept'], 'round ')}"
             + (f"; last round each basic instruction reached: {_inline(p['rounds']['reached'], 'round ')}"
                if p["rounds"]["reached"] else ""),
             f"* rejected: {_inline(p['rejected'])} ({p['duplicates_dropped']} duplicates or seed copies dropped)",
             f"* failed calls by stage: {_inline(p['failed_calls'])}",
             f"* instruction length: {_fmt(p['lengths']['instruction'])}",
             f"* response length: {_fmt(p['lengths']['response'])}"]
    if p["gap"].get("n"):
        lines.append(f"* gap G over {p['gap']['n']} judged candidates: {_fmt(p['gap'])}; theta = {p['theta']}")
    lines += ["", f"![lengths]({images['lengths']})", ""]
    if p["gap"].get("n"):
        lines += [f"![gap G with theta marked]({images['gaps']})", ""]
    if p["use_cases"]:
        lines += ["## Use cases and skills", "", f"![use cases]({images['use_cases']})", "",
                  "| use case | seed metadata | all metadata | pairs |", "|---|---:|---:|---:|"]
        lines += [f"| {_cell(u['use_case'])} | {u['seed_metadata']} | {u['metadata']} | {u['pairs']} |"
                  for u in p["use_cases"][:20]]
        if len(p["use_cases"]) > 20:
            lines.append(f"| … {len(p['use_cases']) - 20} more | | | |")
        lines.append("")
    if skills["known"]:
        unreached = skills["unreached"]
        lines += [f"{skills['in_seeds']} skills in the seeds' metadata, {skills['in_data']} in the data; "
                  f"**{len(unreached)} seed skills the data never reached**"
                  + (": " + ", ".join(_cell(s) for s in unreached[:15]) + (" …" if len(unreached) > 15 else "")
                     if unreached else "") + ".", ""]
    lines += ["## Calls, tokens and cost per kept pair", "",
              "| stage | calls | tokens | cost $ | calls / pair | tokens / pair | $ / pair |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in [*p["cost"]["stages"], {"stage": "**total**", **cost}]:
        lines.append(f"| {r['stage']} | {r['calls']} | {r['tokens']} | {r['cost_usd']:.4f} | {r['calls_per_pair']} "
                     f"| {r['tokens_per_pair']} | {r['cost_per_pair']:.6f} |")
    if cost["unpriced_calls"]:
        lines.append(f"\n{cost['unpriced_calls']} calls had no known price and count as $0.")
    lines += ["", "## Samples with lineage", ""]
    lines += [_sample_markdown(s) for s in p["samples"]] or ["No pair was kept."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _quote(text: str) -> str:
    return "> " + text.replace("\n", "\n> ")


def _sample_markdown(s: dict[str, Any]) -> str:
    seeds = "; ".join(f"`{x['seed_id']}` {x['instruction']}" for x in s["seeds"])
    lines = [f"### {_cell(s['use_case']) or s['pair_id']} · `{s['pair_id']}`", "", f"* **seed**: {_cell(seeds)}"]
    if s["metadata"]:
        lines.append(f"* **metadata** ({s['metadata']['origin']}): use case *{_cell(s['use_case'])}*; skills "
                     + ", ".join(s["metadata"]["skills"]))
    lines.append(f"* **basic instruction**: {_cell(s['basic_instruction'])}")
    if s["actions"]:
        lines.append("* **actions**: " + " → ".join(_cell(a) for a in s["actions"]))
    gap = f", G = {s['gap']:+g}" if s["gap"] is not None else ""
    lines += [f"* **pair** (round {s['round']}, answered by {s['answered_by']}{gap}):", "", _quote(s["instruction"]),
              "", _quote(s["response"]), ""]
    return "\n".join(lines)


def write_profile(folder: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Write profile.json, the charts and profile.md into `folder` (a staging folder before publishing);
    returns their names and SHA-256, for the manifest's `files`."""
    profile = dataset_profile(folder, manifest)
    written = [write_json(folder / PROFILE_FILE, profile)]
    svgs = charts(profile)
    written += [write_text(folder / CHARTS[name], svg) for name, svg in svgs.items()]
    written.append(write_text(folder / MARKDOWN_FILE, profile_markdown(profile, CHARTS)))
    return {p.name: file_sha256(p) for p in written}


def load_profile(folder: Path) -> dict[str, Any]:
    """The profile written beside a dataset; computed now when the dataset predates profiles."""
    path = folder / PROFILE_FILE
    return json.loads(path.read_text()) if path.exists() else dataset_profile(folder)


def artifact_markdown(folder: Path, title: str = "") -> str:
    """The profile with its charts inline, for a Prefect markdown artifact (which cannot reference a file)."""
    profile = load_profile(folder)
    return profile_markdown(profile, {name: data_uri(svg) for name, svg in charts(profile).items()}, title)


def _mean_round(rounds: dict[str, int]) -> float | None:
    total = sum(rounds.values())
    return round(sum(int(r) * n for r, n in rounds.items()) / total, 2) if total else None


def _present(rows: list[dict[str, Any]], key: str) -> set[str]:
    return {r[key] for r in rows if r["pairs"] > 0}


def profile_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What the `new` dataset has that `old` lacked and the reverse: use cases and skills new or gone, and
    shifts of lengths, gaps and rounds (medians; mean round of kept pairs)."""
    old_uc, new_uc = _present(old["use_cases"], "use_case"), _present(new["use_cases"], "use_case")
    old_sk, new_sk = _present(old["skills"]["counts"], "skill"), _present(new["skills"]["counts"], "skill")
    pairs = [("instruction length (median chars)", old["lengths"]["instruction"].get("median"),
              new["lengths"]["instruction"].get("median")),
             ("response length (median chars)", old["lengths"]["response"].get("median"),
              new["lengths"]["response"].get("median")),
             ("gap G (median, judged candidates)", old["gap"].get("median"), new["gap"].get("median")),
             ("round of kept pairs (mean)", _mean_round(old["rounds"]["kept"]), _mean_round(new["rounds"]["kept"])),
             ("pairs", old["pairs"], new["pairs"])]
    return {"use_cases": {"new": sorted(new_uc - old_uc), "gone": sorted(old_uc - new_uc)},
            "skills": {"new": sorted(new_sk - old_sk), "gone": sorted(old_sk - new_sk)},
            "shifts": [{"what": what, "before": a, "after": b,
                        "change": round(b - a, 2) if a is not None and b is not None else None}
                       for what, a, b in pairs]}


def _listed(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")


def diff_lines(changes: dict[str, Any] | None) -> list[str]:
    """The changes of a version, one line each (the refresh report's bullets, `codeclm show`'s panel)."""
    if not changes:
        return []
    lines = []
    if pairs := changes.get("pairs"):
        lines.append(f"pairs: {pairs['added']} added, {pairs['removed']} removed from the full dataset "
                     f"({pairs['before']} → {pairs['after']}); {pairs['repeats']} of the new pairs repeat an "
                     "instruction an earlier version has")
    for kind in ("use_cases", "skills"):
        label = kind.replace("_", " ")
        new, gone = changes[kind]["new"], changes[kind]["gone"]
        lines.append(f"{label}: {len(new)} new" + (f" ({_listed(new)})" if new else "")
                     + f", {len(gone)} gone" + (f" ({_listed(gone)})" if gone else "")
                     + " against the previous version's pairs")
    for s in changes["shifts"]:
        if s["change"] is not None:
            lines.append(f"{s['what']}: {s['before']:g} → {s['after']:g} ({s['change']:+g})")
    return lines


def metadata_markdown(rows: list[dict[str, Any]], limit: int = 300) -> str:
    """The augmented metadata for the reviewer (the metadata review gate): counts, then one row per metadata."""
    origins = Counter(r["origin"] for r in rows)
    use_cases = Counter(r["use_case"] for r in rows)
    skills = Counter(s for r in rows for s in r["skills"])
    lines = ["# Review the metadata", "",
             f"**{len(rows)} metadata** ({_inline(dict(origins))}), {len(use_cases)} use cases, {len(skills)} "
             "skills. Approve to decode instructions from them, reject with a reason to stop the run, or list "
             "metadata ids to leave out.", "",
             "Most frequent use cases: " + ", ".join(f"{_cell(u)} ({n})" for u, n in use_cases.most_common(8)), "",
             "Most frequent skills: " + ", ".join(f"{_cell(k)} ({n})" for k, n in skills.most_common(12)), "",
             "| id | origin | use case | skills | seeds |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["origin"] != "seed", r["use_case"], r["metadata_id"]))[:limit]:
        lines.append(f"| `{r['metadata_id']}` | {r['origin']} | {_cell(r['use_case'])} | "
                     f"{_cell(', '.join(r['skills']))} | {', '.join(r['seed_ids'])} |")
    if len(rows) > limit:
        lines.append(f"| … {len(rows) - limit} more | | | | |")
    return "\n".join(lines) + "\n"
