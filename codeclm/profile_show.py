"""`codeclm show`: a dataset's profile and sample pairs with their lineage in the terminal (rich, 80 columns)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from codeclm.profile import load_profile, sample_pairs

WIDTH = 80


def _counts(counts: dict[str, int], label: str = "") -> str:
    return ", ".join(f"{label}{k}: {v}" for k, v in counts.items()) or "none"


def _lengths(stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return "-"
    return f"median {stats['median']:g}, p25 {stats['p25']:g}, p75 {stats['p75']:g}, max {stats['max']:g}"


def summary_table(p: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    cost = p["cost"]["total"]
    rows = [("pairs", f"{p['pairs']} ({p['method']}) from {p['seeds']} seeds"),
            ("metadata", _counts(p["metadata"])),
            ("answered by", _counts(p["answered_by"])),
            ("kept by round", _counts(p["rounds"]["kept"], "round ")),
            ("rounds reached", _counts(p["rounds"]["reached"], "round ")),
            ("rejected", f"{_counts(p['rejected'])} ({p['duplicates_dropped']} duplicates)"),
            ("failed calls", _counts(p["failed_calls"])),
            ("instructions", _lengths(p["lengths"]["instruction"]) + " chars"),
            ("responses", _lengths(p["lengths"]["response"]) + " chars")]
    if p["gap"].get("n"):
        rows.append(("gap G", f"{_lengths(p['gap'])}; theta {p['theta']}"))
    rows.append(("per kept pair", f"{cost['calls_per_pair']} calls, {cost['tokens_per_pair']} tokens, "
                                  f"${cost['cost_per_pair']:.6f}"))
    skills = p["skills"]
    if skills["known"]:
        rows.append(("skills", f"{skills['in_seeds']} in seeds, {skills['in_data']} in data, "
                               f"{len(skills['unreached'])} never reached"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def use_case_table(p: dict[str, Any], limit: int = 10) -> Table:
    table = Table(title="use cases", title_justify="left", expand=True)
    table.add_column("use case", overflow="fold", ratio=1)
    table.add_column("seeds", justify="right", no_wrap=True)
    table.add_column("metadata", justify="right", no_wrap=True)
    table.add_column("pairs", justify="right", no_wrap=True)
    for u in p["use_cases"][:limit]:
        table.add_row(u["use_case"], str(u["seed_metadata"]), str(u["metadata"]), str(u["pairs"]))
    if len(p["use_cases"]) > limit:
        table.add_row(f"… {len(p['use_cases']) - limit} more", "", "", "")
    return table


def lineage_tree(s: dict[str, Any]) -> Tree:
    """seed -> metadata -> basic instruction -> actions -> pair, one branch inside the next."""
    tree = Tree(Text(f"{s['pair_id']} · {s['use_case'] or 'no use case'}", style="bold"))
    node = tree
    for seed in s["seeds"]:
        node.add(Text(f"seed {seed['seed_id']}: {seed['instruction']}"))
    if s["metadata"]:
        node = node.add(Text(f"metadata ({s['metadata']['origin']}): {s['use_case']}; skills "
                             + ", ".join(s["metadata"]["skills"])))
    node = node.add(Text(f"basic instruction: {s['basic_instruction']}"))
    if s["actions"]:
        node = node.add(Text("actions: " + " → ".join(s["actions"])))
    gap = f", G {s['gap']:+g}" if s["gap"] is not None else ""
    pair = node.add(Text(f"pair (round {s['round']}, answered by {s['answered_by']}{gap})", style="green"))
    pair.add(Text(f"instruction: {s['instruction']}"))
    pair.add(Text(f"response: {s['response']}"))
    return tree


def show(folder: Path, samples: int, console: Console, title: str = "", changes: list[str] | None = None) -> None:
    """Print the profile of the dataset in `folder`, the changes a version made, and `samples` pairs."""
    p = load_profile(folder)
    head = Group(summary_table(p))
    console.print(Panel(head, title=title or str(folder), title_align="left", width=WIDTH))
    if changes:
        console.print(Panel("\n".join(changes), title="changes against the previous version", title_align="left",
                            width=WIDTH))
    if p["use_cases"]:
        console.print(use_case_table(p), width=WIDTH)
    if p["skills"]["unreached"]:
        unreached = p["skills"]["unreached"]
        console.print(Text("seed skills the data never reached: " + ", ".join(unreached[:20])
                           + (" …" if len(unreached) > 20 else "")), width=WIDTH)
    for s in sample_pairs(folder, samples):
        console.print(lineage_tree(s), width=WIDTH)
