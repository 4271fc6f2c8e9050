"""Plain-text parsers: every output variant models produce for the CodecLM prompts, and the failures."""

import pytest
from pydantic import ValidationError

from codeclm.errors import ParseError
from codeclm.llm.parsing import (
    parse_improved_instruction,
    parse_metadata,
    parse_numbered_list,
    parse_rubrics_actions,
    parse_two_scores,
)

# --- metadata (Fig. 7) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Use case: creative writing\nSkills: role-play, sports",
        "Task: creative writing\nSkills: role-play, sports",  # the paper's demos 2 and 3 say Task:
        "use case:   creative writing  \nSKILLS:role-play ,  sports",
        "**Use case:** creative writing\n**Skills:** role-play, sports",
        "**Use case**: creative writing\n**Skills**: role-play, sports",
        "- Use case: creative writing\n- Skills: role-play; sports",
        "* Task: creative writing.\n* Skills: \"role-play\", 'sports'.",
        'Here is the analysis:\n\nUse case: "creative writing"\nSkills: role-play, and sports.\n\nHope it helps.',
        "Skills: role-play, sports\nUse case: creative writing",
        "Use case: creative writing\nSkills:\n- role-play\n- sports\n\nThat is all.",
        "Use case: creative writing\nSkills:\n\n1. role-play\n2. sports",
    ],
)
def test_metadata_variants(text: str) -> None:
    assert parse_metadata(text) == ("creative writing", ["role-play", "sports"])


def test_metadata_keeps_every_skill_listed() -> None:
    """How many skills to keep is the `max_skills` setting, applied by the encode step, not the parser."""
    text = "Task: code generation\nSkills: python, file io, memory management, streaming"
    assert parse_metadata(text) == ("code generation", ["python", "file io", "memory management", "streaming"])


def test_metadata_bulleted_skills_stop_at_next_text() -> None:
    text = "Use case: planning\nSkills:\n* market research\n* budgeting\nNote: none"
    assert parse_metadata(text) == ("planning", ["market research", "budgeting"])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I cannot help with that.",
        "Use case:\nSkills: python",
        'Use case: ""\nSkills: python',
        "Skills: python, sql",
        "Use case: code generation",
        "Use case: code generation\nSkills:",
    ],
)
def test_metadata_failures(text: str) -> None:
    with pytest.raises(ParseError):
        parse_metadata(text)


# --- numbered list (Fig. 8) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1. alpha\n2. beta\n3. gamma",
        "1) alpha\n2) beta\n3) gamma",
        "(1) alpha\n(2) beta\n(3) gamma",
        "- alpha\n- beta\n- gamma",
        "* alpha\n* beta\n* gamma",
        "#1 alpha\n#2 beta\n#3 gamma",
        "Instruction 1: alpha\nInstruction 2: beta\nInstruction 3: gamma",
        "**Instruction 1:** alpha\n**Instruction 2:** beta\n**Instruction 3:** gamma",
        "Here are 3 instructions:\n\n1. alpha\n2. beta\n3. gamma",
        'Sure! Here are 3 diverse instructions for you.\n1. **alpha**\n2. "beta"\n3. “gamma”',
        "1. alpha\n\n2. beta\n\n3. gamma\n\nLet me know if you need more!",
        "```\n1. alpha\n2. beta\n3. gamma\n```",
        "### 1. alpha\n### 2. beta\n### 3. gamma",
        "Instructions\n***\n1. alpha\n---\n2. beta\n***\n3. gamma\n***",
    ],
)
def test_numbered_list_forms(text: str) -> None:
    assert parse_numbered_list(text) == ["alpha", "beta", "gamma"]


def test_numbered_list_joins_continuation_lines() -> None:
    text = "1. Write a story about a dragon\n   who learns to fly.\n2. Summarise this email:\nHi team, lunch at 1?"
    assert parse_numbered_list(text) == [
        "Write a story about a dragon\nwho learns to fly.",
        "Summarise this email:\nHi team, lunch at 1?",
    ]


def test_numbered_list_paragraph_between_items_belongs_to_previous_item() -> None:
    text = "1. Rewrite this note politely:\n\nGive me the report now.\n\n2. Name three rivers.\n\nHope this helps!"
    assert parse_numbered_list(text) == ["Rewrite this note politely:\nGive me the report now.", "Name three rivers."]


def test_numbered_list_nested_bullets_stay_in_their_item() -> None:
    text = "1. Plan a trip with:\n   - a budget\n   - a map\n2. Second"
    assert parse_numbered_list(text) == ["Plan a trip with:\n- a budget\n- a map", "Second"]


def test_numbered_list_text_on_the_line_after_the_marker() -> None:
    assert parse_numbered_list("Instruction 1:\nalpha\nInstruction 2:\nbeta") == ["alpha", "beta"]


def test_numbered_list_decimal_numbers_are_not_markers() -> None:
    assert parse_numbered_list("1. Convert\n2.5 litres to pints.") == ["Convert\n2.5 litres to pints."]


@pytest.mark.parametrize("text", ["", "   \n\n", "Here are some instructions:", "1.\n2.", "I'm sorry, I can't."])
def test_numbered_list_failures(text: str) -> None:
    with pytest.raises(ParseError):
        parse_numbered_list(text)


# --- rubrics and actions (Fig. 9) ----------------------------------------------------------------------

RUBRICS = ["r1", "r2", "r3", "r4"]
ACTIONS = ["a1", "a2", "a3", "a4"]


def _numbered(items: list[str]) -> str:
    return "\n".join(f"{index}. {item}" for index, item in enumerate(items, start=1))


@pytest.mark.parametrize(
    "template",
    [
        "Rubrics:\n{r}\n\nActions:\n{a}",
        "RUBRICS:\n{r}\nACTIONS:\n{a}",
        "**Rubrics:**\n{r}\n\n**Actions:**\n{a}",
        "### Rubrics\n{r}\n### Actions\n{a}",
        "## Domain-specific rubrics:\n{r}\n\n## Corresponding actions:\n{a}",
        "Here are the rubrics and actions.\n\nRubrics:\n{r}\n\nActions:\n{a}\n\nThese make it harder.",
        "Here are the rubrics and actions:\n{r}\n\n{a}",  # two lists, numbering restarts
        "{r}\n{a_cont}",  # one list of 2n items, split in half
        "Rubrics:\n{r}\n{a}",  # second list has no heading but restarts its numbering
    ],
)
def test_rubrics_actions_lists(template: str) -> None:
    actions_continued = "\n".join(f"{index}. {item}" for index, item in enumerate(ACTIONS, start=5))
    text = template.format(r=_numbered(RUBRICS), a=_numbered(ACTIONS), a_cont=actions_continued)
    assert parse_rubrics_actions(text, 4) == (RUBRICS, ACTIONS)


@pytest.mark.parametrize(
    "text",
    [
        "Rubric: r1\nAction: a1\n\nRubric: r2\nAction: a2",
        "1. Rubric: r1\n   Action: a1\n2. Rubric: r2\n   Action: a2",
        "**Rubric 1:** r1\n**Action 1:** a1\n**Rubric 2:** r2\n**Action 2:** a2",
        "- Rubric: r1 | Action: a1\n- Rubric: r2 | Action: a2",
        "Rubric 1:\nr1\nAction 1:\na1\nRubric 2:\nr2\nAction 2:\na2",
    ],
)
def test_rubrics_actions_interleaved_pairs(text: str) -> None:
    assert parse_rubrics_actions(text, 2) == (["r1", "r2"], ["a1", "a2"])


def test_rubrics_actions_truncates_to_n() -> None:
    text = f"Rubrics:\n{_numbered([*RUBRICS, 'r5'])}\nActions:\n{_numbered([*ACTIONS, 'a5', 'a6'])}"
    assert parse_rubrics_actions(text, 4) == (RUBRICS, ACTIONS)


def test_rubrics_actions_returns_what_exists_when_fewer_than_n() -> None:
    text = f"Rubrics:\n{_numbered(RUBRICS[:3])}\nActions:\n{_numbered(ACTIONS[:2])}"
    assert parse_rubrics_actions(text, 4) == (RUBRICS[:3], ACTIONS[:2])


def test_rubrics_actions_multiline_items() -> None:
    text = "Rubrics:\n1. Depth of the\n   market analysis\nActions:\n1. Add a SWOT\n   analysis"
    assert parse_rubrics_actions(text, 4) == (["Depth of the\nmarket analysis"], ["Add a SWOT\nanalysis"])


@pytest.mark.parametrize(
    "text",
    ["", "No idea.", f"Rubrics:\n{_numbered(RUBRICS)}", "Rubric: r1\nRubric: r2", "1. only one item"],
)
def test_rubrics_actions_without_actions_fail(text: str) -> None:
    with pytest.raises(ParseError):
        parse_rubrics_actions(text, 4)


# --- improved instruction (Fig. 10) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Improved instruction: Write a plan with a SWOT analysis.",
        "improved INSTRUCTION:   Write a plan with a SWOT analysis.  ",
        "**Improved instruction:** Write a plan with a SWOT analysis.",
        '**Improved Instruction**: "Write a plan with a SWOT analysis."',
        "Sure, here it is.\n\nImproved instruction:\nWrite a plan with a SWOT analysis.",
        "Improved instruction: <instruction>Write a plan with a SWOT analysis.</instruction>",
        "Write a plan with a SWOT analysis.",
        "“Write a plan with a SWOT analysis.”",
    ],
)
def test_improved_instruction(text: str) -> None:
    assert parse_improved_instruction(text) == "Write a plan with a SWOT analysis."


def test_improved_instruction_keeps_inner_lines() -> None:
    assert parse_improved_instruction("Improved instruction: Fix this code:\nprint(x)") == "Fix this code:\nprint(x)"


@pytest.mark.parametrize(
    "text", ["", "   ", "Improved instruction:", 'Improved instruction: ""', "**Improved instruction:**"]
)
def test_improved_instruction_empty_fails(text: str) -> None:
    with pytest.raises(ParseError):
        parse_improved_instruction(text)


# --- judge scores (Figs. 11-12) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8 6", (8.0, 6.0)),
        ("8.5 6", (8.5, 6.0)),
        ("8,6", (8.0, 6.0)),
        ("8, 6", (8.0, 6.0)),
        ("  10   1  ", (10.0, 1.0)),
        ("Scores: 8 6", (8.0, 6.0)),
        ("Assistant 1: 8 Assistant 2: 6", (8.0, 6.0)),
        ("Assistant 1: 8, Assistant 2: 6", (8.0, 6.0)),
        ("8/10 6/10", (8.0, 6.0)),
        ("**8 6**", (8.0, 6.0)),
        ("\n\n8 6\nAssistant 1 was more detailed; Assistant 2 missed 3 points.", (8.0, 6.0)),
        ("7 7\nBoth are equally good.", (7.0, 7.0)),
    ],
)
def test_two_scores(text: str, expected: tuple[float, float]) -> None:
    assert parse_two_scores(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n  \n",
        "garbage",
        "The first answer is clearly better.",
        "8",
        "Score: 8",
        "11.5 6",  # more than one point off the scale
        "8 -0.5",
        "-1 5",
        "0.9 0.7",  # both off the scale: a 0-1 scale, not a near miss
        "11 12",
        "0.9 1",  # reading 0.9 as 1 would turn a loss into a draw
        "11 10",
        "I think answer 1 is better for 2 reasons",
        "Assistant 1 is better.\n8 6",  # a verdict on a later line must not count
        "Let me evaluate both answers.\n\n9 4",
    ],
)
def test_two_scores_failures(text: str) -> None:
    with pytest.raises(ParseError):
        parse_two_scores(text)


def test_two_scores_custom_range() -> None:
    assert parse_two_scores("0 5", low=0.0, high=5.0) == (0.0, 5.0)
    assert parse_two_scores("6 4", low=0.0, high=5.0) == (5.0, 4.0)
    with pytest.raises(ParseError):
        parse_two_scores("6.5 4", low=0.0, high=5.0)


@pytest.mark.parametrize(("text", "expected"), [("0.9 8", (1.0, 8.0)), ("8 0", (8.0, 1.0)), ("0 8", (1.0, 8.0)),
                                                ("10.5 3", (10.0, 3.0)), ("11 6", (10.0, 6.0)),
                                                ("7 0.2", (7.0, 1.0))])
def test_a_score_just_outside_the_scale_reads_as_its_nearest_end_and_keeps_the_winner(
        text: str, expected: tuple[float, float]) -> None:
    first, second = parse_two_scores(text)
    assert (first, second) == expected
    raw = [float(v) for v in text.split()]
    assert (first > second) == (raw[0] > raw[1])  # the rule never changes who won


def test_a_structured_verdict_just_outside_the_scale_is_read_by_the_same_rule() -> None:
    from tasks.judge import Verdict, verdict_from_text
    from tasks.score import ScorePair

    assert Verdict.model_validate_json('{"score_1": 0.9, "score_2": 8, "explanation": "x"}').score_1 == 1.0
    assert ScorePair.model_validate_json('{"score_1": 7, "score_2": 10.4}').score_2 == 10.0
    assert verdict_from_text('{"score_1": 0.9, "score_2": 6, "explanation": "cut sh').score_1 == 1.0
    for bad in ('{"score_1": 0.9, "score_2": 0.4}', '{"score_1": 1, "score_2": 0.5}', '{"score_1": 12, "score_2": 5}'):
        with pytest.raises(ValidationError):
            Verdict.model_validate_json(bad)
