"""Flow `baseline`: the paper's baselines (§5.1, A.2) in this engine, with the same gateway, call cache,
budgets and output layout as `generate`. Orchestration only; every step is a batch task:

self_instruct: self_instruct -> pairs, topped up while answers fail
evol_instruct: evol (every seed) -> pairs
wizardlm_plus: encode -> augment -> decode (-> dedup) -> evol (every basic instruction) -> pairs, or with `basic`
               (a published CodecLM dataset): basic (its round-1 candidates, no call) -> evol -> pairs
alpagasus:     self_instruct -> pairs -> alpagasus (the judge rates), topped up while fewer than the budget pass
tree_instruct: tree_instruct (one rewrite per seed) -> pairs
then publish_baseline.
"""

from __future__ import annotations

import math
from collections import defaultdict

from prefect import flow, unmapped
from prefect.runtime import flow_run

from codeclm.baseline_records import ABLATIONS, METHODS, baseline_roles, basic_instructions_file
from codeclm.checks import check_generate
from codeclm.errors import ConfigError
from codeclm.llm.embedded import models_ready
from codeclm.ops.batch_runner import BatchRunner
from codeclm.ops.cancellation import watch_cancellation
from codeclm.ops.monitor import profile_artifact, stage_table
from codeclm.results import BaselineResult, DatasetResult
from codeclm.settings import Settings
from tasks._base import Outputs, Ref, ref_to
from tasks.alpagasus import alpagasus
from tasks.augment import augment
from tasks.decode import decode
from tasks.dedup import dedup
from tasks.encode import encode
from tasks.evol import evol, published_basic
from tasks.pairs import answer_pairs
from tasks.publish_baseline import publish_baseline
from tasks.seeds import prepare_seeds

Refs = dict[str, list[Ref]]


def _add(refs: Refs, outputs: Outputs, skip: tuple[str, ...] = ()) -> None:
    for kind, ref in outputs.items():
        if kind not in skip:
            refs[kind].append(ref)


def _self_instruct_pairs(seeds: list[Ref], settings: Settings, refs: Refs) -> str | None:
    """Instructions, then answers; answers that failed for good are replaced by more instructions (the rerun
    replays the earlier rounds from the call cache), at most `answer_topups` times."""
    from tasks.self_instruct import self_instruct

    cfg, budget, want = settings.baselines, settings.budget, settings.budget
    for attempt in range(cfg.answer_topups + 1):
        made = self_instruct(seeds, settings.for_stage("self_instruct"), want)
        answered = answer_pairs(made["instructions"], settings.for_stage("pairs"), None, "self_instruct",
                               check=False)
        have = answered["pairs"]["rows"]
        if have >= budget or made["instructions"]["rows"] < want or attempt == cfg.answer_topups:
            break
        want += budget - have
    _add(refs, made)
    _add(refs, answered)
    if have >= budget:
        return None
    if made["instructions"]["rows"] < want:
        return f"max_generation_calls ({cfg.max_generation_calls}) reached"
    return f"answer_topups ({cfg.answer_topups}) used"


def _alpagasus_pairs(seeds: list[Ref], settings: Settings, refs: Refs) -> str | None:
    """Self-Instruct pairs rated by the strong model; while fewer than the budget pass, more are made, the next
    pool sized by the pass rate so far, up to budget x alpagasus_max_oversample."""
    from tasks.self_instruct import self_instruct

    cfg, budget = settings.baselines, settings.budget
    limit = math.ceil(budget * cfg.alpagasus_max_oversample)
    want = min(limit, math.ceil(budget * cfg.alpagasus_oversample))
    while True:
        made = self_instruct(seeds, settings.for_stage("self_instruct"), want)
        answered = answer_pairs(made["instructions"], settings.for_stage("pairs"), None, "alpagasus", check=False)
        rated = alpagasus(answered["pairs"], settings.for_stage("alpagasus"), "alpagasus")
        passed = rated["pairs"]["rows"]
        print(f"alpagasus: {passed} of {answered['pairs']['rows']} pairs rated >= {cfg.alpagasus_threshold}")
        if passed >= budget or want >= limit or made["instructions"]["rows"] < want:
            break
        want = min(limit, max(want + 1, math.ceil(want * budget / max(passed, 1) * 1.1)))
    _add(refs, made)
    _add(refs, answered, skip=("pairs",))
    _add(refs, rated)
    if passed >= budget:
        return None
    if made["instructions"]["rows"] < want:
        return f"max_generation_calls ({cfg.max_generation_calls}) reached"
    return f"alpagasus_max_oversample ({cfg.alpagasus_max_oversample}: {limit} pairs rated)"


def _basic_instructions(seeds: list[Ref], settings: Settings, roots: int, refs: Refs) -> list[Ref]:
    """CodecLM's encode and decode (and dedup), asked for `roots` basic instructions: WizardLM+'s seeds."""
    front = settings.model_copy(update={"budget": roots, "oversample": 1.0, "instructions_per_metadata": None})
    labels = [f"{i:03d}" for i in range(len(seeds))]
    encoded = [f.result() for f in encode.map(seeds, unmapped(front.for_stage("encode")), batch=labels)]
    for out in encoded:
        _add(refs, out, skip=("metadata",))
    metas = augment([e["metadata"] for e in encoded], front.for_stage("augment"), len(labels))
    refs["metadata"] += metas
    per_metadata = front.per_metadata(sum(r["rows"] for r in metas))
    decoded = [f.result() for f in decode.map(metas, unmapped(seeds), unmapped(front.for_stage("decode")), per_metadata,
                                                batch=labels)]
    for out in decoded:
        _add(refs, out, skip=("candidates", "rejected"))
    basic = [out["candidates"] for out in decoded]
    if front.drop_duplicates:
        basic = dedup(basic, front.for_stage("dedup"), len(basic))["candidates"]
    refs["candidates"] += basic
    return basic


def _evol_pairs(method: str, seeds: list[Ref], settings: Settings, refs: Refs, basic_file: Ref | None
                ) -> str | None:
    """Evolve every root (seeds; WizardLM+: CodecLM's basic instructions, its own or a published dataset's)."""
    cfg = settings.baselines
    want = math.ceil(settings.budget * cfg.evol_oversample)
    basic: list[Ref] = []
    if basic_file is not None:
        basic = [published_basic(basic_file, settings.for_stage("basic"), method)["candidates"]]
        refs["candidates"] += basic
    elif method == "wizardlm_plus":
        basic = _basic_instructions(seeds, settings, math.ceil(want / cfg.evol_rounds), refs)
    made = evol(seeds, basic, settings.for_stage("evol"), want, method)
    answered = answer_pairs(made["instructions"], settings.for_stage("pairs"), settings.budget, method,
                           check=True)
    _add(refs, made)
    _add(refs, answered)
    if answered["pairs"]["rows"] >= settings.budget:
        return None
    return (f"the evolved pool ({made['instructions']['rows']} instructions from evol_rounds={cfg.evol_rounds}, "
            f"evol_oversample={cfg.evol_oversample}) ran out")


def _tree_pairs(seeds: list[Ref], settings: Settings, refs: Refs) -> str | None:
    """One Tree-Instruct rewrite per pair wanted (`tasks.tree_instruct` states the seed rule), then answers."""
    from tasks.tree_instruct import tree_instruct

    made = tree_instruct(seeds, settings.for_stage("tree_instruct"), settings.budget)
    answered = answer_pairs(made["instructions"], settings.for_stage("pairs"), settings.budget, "tree_instruct",
                           check=False)
    _add(refs, made)
    _add(refs, answered)
    if answered["pairs"]["rows"] >= settings.budget:
        return None
    return (f"the Tree-Instruct pool ({made['instructions']['rows']} instructions, each seed rewritten at most "
            f"ceil(budget / seeds) times) ran out")


def ablation_settings(settings: Settings, method: str) -> Settings:
    """The settings of one of Table 3's ablations: the CodecLM flow with `ABLATIONS[method]` on top."""
    return settings.model_copy(update=ABLATIONS[method])


@flow(name="codeclm-baseline", flow_run_name="baseline {method} · {seeds} → {out}", log_prints=True,
      task_runner=BatchRunner(), on_running=[watch_cancellation])
def baseline(method: str, seeds: str, out: str, settings: Settings | None = None, basic: str | None = None
             ) -> BaselineResult:
    """Make a baseline dataset (`METHODS`, or a Table 3 ablation: `ABLATIONS`, made by `generate`) from a
    seed file into `out`, at the settings' budget. `basic`: a published CodecLM dataset folder whose basic
    instructions WizardLM+ evolves (no encode or decode call then)."""
    settings = settings or Settings()
    if method not in (*METHODS, *ABLATIONS):
        raise ConfigError(f"unknown baseline {method!r}; choose one of {', '.join((*METHODS, *ABLATIONS))}")
    if basic is not None and method != "wizardlm_plus":
        raise ConfigError(f"--basic is for wizardlm_plus only, not {method}")
    basic_file = ref_to(basic_instructions_file(basic)) if basic is not None else None
    if method in ABLATIONS:
        from flows.generate import generate

        return BaselineResult.model_validate(
            generate(seeds, out, ablation_settings(settings, method), method=method).model_dump())
    roles = baseline_roles(method)
    checked = check_generate(seeds, out, settings, roles)  # already done when the CLI started this flow
    with models_ready(settings, roles):
        seed_refs = prepare_seeds(seeds, checked.sha, settings.for_stage("seeds"))
        refs: Refs = defaultdict(list)
        refs["seeds"] = seed_refs
        if method == "self_instruct":
            limit = _self_instruct_pairs(seed_refs, settings, refs)
        elif method == "alpagasus":
            limit = _alpagasus_pairs(seed_refs, settings, refs)
        elif method == "tree_instruct":
            limit = _tree_pairs(seed_refs, settings, refs)
        else:
            limit = _evol_pairs(method, seed_refs, settings, refs, basic_file)
        run = {"flow_run_id": str(flow_run.get_id() or ""), "seeds": seeds, "seeds_sha": checked.sha}
        if basic_file is not None:
            run |= {"basic": str(basic), "basic_candidates_sha": basic_file["sha"]}
        summary = BaselineResult.model_validate(
            publish_baseline(method, dict(refs), settings.for_stage("publish_baseline"), out, run, limit))
    stage_table("baseline-stages", summary.stages, f"calls, tokens, cost and seconds per {method} step")
    profile_artifact(out, method)
    budget = summary.budget
    if budget.shortfall:
        print(f"WARNING: {method} published {budget.published} of {budget.wanted} pairs (shortfall "
              f"{budget.shortfall}): {budget.limit}")
    print(f"published {summary.train} {method} pairs to {summary.out}")
    return summary


def method_dataset(method: str, seeds: str, out: str, settings: Settings, basic: str | None = None
                   ) -> DatasetResult:
    """Any compared method's dataset: CodecLM by `generate`, a baseline or ablation by `baseline` (WizardLM+
    evolves `basic`, a codeclm dataset's basic instructions, when given)."""
    if method == "codeclm":
        from flows.generate import generate

        return generate(seeds, out, settings)
    return baseline(method, seeds, out, settings, basic=basic if method == "wizardlm_plus" else None)
