"""Tolerant parsers for the plain-text outputs of the CodecLM prompts (paper App. A.9, Figs. 7-12).

Used when a model cannot be held to a JSON schema. Models decorate their answers (bold labels, bullets,
preambles, "Task:" where the prompt said "Use case:"), so each parser accepts those variants and raises
`ParseError` with a short reason only when nothing usable is left; the gateway then retries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from codeclm.errors import ParseError

_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "«": "»"}
_LEAD = re.compile(r"^(?:\#{1,6}\s+|[-*•+]\s+|\d{1,2}[.)]\s+)+")
_USE_CASE = re.compile(r"^(?:use[\s_-]*case|task)\b[^:]{0,40}:\s*(?P<value>.*)$", re.IGNORECASE)
_SKILLS = re.compile(r"^skills?\b[^:]{0,40}:\s*(?P<value>.*)$", re.IGNORECASE)
_MARKER = re.compile(
    r"""^(?:\#{1,6}\s+)?(?:
        (?P<num>\d{1,3})[.):](?=\s|$)
      | \((?P<paren>\d{1,3})\)
      | \#(?P<hash>\d{1,3})[.:)]?(?=\s|$)
      | instruction\s*\#?(?P<label>\d{1,3})\s*[:.)-]?
      | [-*•+](?=\s)
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)
_SEPARATOR = re.compile(r"^(?:[-*_=]{3,}|```.*)$")
_INSTRUCTION_LABEL = re.compile(r"^instruction\s*:\s*", re.IGNORECASE)
_KIND_LABEL = re.compile(r"^(?P<kind>rubric|action)s?\s*\#?(?P<num>\d{1,3})?\s*:\s*(?P<rest>.*)$", re.IGNORECASE)
_INLINE_ACTION = re.compile(r"\baction\s*\#?\d*\s*:", re.IGNORECASE)
_KIND_WORD = re.compile(r"\b(rubric|action)s?\b", re.IGNORECASE)
_IMPROVED = re.compile(r"improved\s+instruction\s*\**\s*:", re.IGNORECASE)
_TAGS = re.compile(r"^<instruction>\s*(?P<body>.*?)\s*</instruction>$", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_SCORE_NOISE = re.compile(r"assistant\s*[12]|/\s*\d+(?:\.\d+)?|out\s+of\s+\d+|\b(?:scores?|and|vs)\b", re.I)
_LETTER = re.compile(r"[^\W\d_]")

Kind = Literal["rubric", "action"]


def _unquote(text: str) -> str:
    """Drop matching surrounding quotes; a lone leading quote is part of the text and stays."""
    text = text.strip()
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _clean_value(text: str) -> str:
    """A metadata value without decoration: quotes, trailing periods and bold markers."""
    previous = None
    text = text.replace("**", "").strip()
    while text != previous:
        previous = text
        text = _unquote(text.rstrip(".").strip())
    return text


def _split_skills(value: str) -> list[str]:
    skills: list[str] = []
    for part in re.split(r"[,;]", value):
        skill = _clean_value(re.sub(r"^and\s+", "", part.strip(), flags=re.IGNORECASE))
        if skill and skill.lower() not in (s.lower() for s in skills):
            skills.append(skill)
    return skills


def parse_metadata(text: str) -> tuple[str, list[str]]:
    """Fig. 7 output -> (use case, every skill listed); the paper's own demos mix `Use case:` and `Task:`.
    How many skills to keep is the caller's setting (`max_skills`), so the parser cuts none."""
    lines = [_LEAD.sub("", line.replace("**", "").strip()) for line in text.splitlines()]
    use_case: str | None = None
    skills: list[str] | None = None
    for index, line in enumerate(lines):
        if use_case is None and (match := _USE_CASE.match(line)):
            use_case = _clean_value(match["value"])
        elif skills is None and (match := _SKILLS.match(line)):
            value = match["value"] or ", ".join(_bulleted_after(text.splitlines()[index + 1 :]))
            skills = _split_skills(value)
    if not use_case:
        raise ParseError("no use case: expected a line 'Use case: ...' or 'Task: ...'")
    if not skills:
        raise ParseError("no skills: expected a line 'Skills: a, b' or a bulleted list after 'Skills:'")
    return use_case, skills


def _bulleted_after(lines: list[str]) -> list[str]:
    """The bulleted items right after a bare `Skills:` label, up to the first line that is not one."""
    items: list[str] = []
    for raw in lines:
        line = raw.replace("**", "").strip()
        if not line:
            if items:
                break
            continue
        bullet = re.match(r"^(?:[-*•+]|\d{1,2}[.)])\s+(?P<item>.+)$", line)
        if bullet is None:
            break
        items.append(bullet["item"])
    return items


def _marker(line: str) -> tuple[int | None, str] | None:
    """(item number or None for a bullet, text after the marker) when the line starts a list item."""
    match = _MARKER.match(line)
    if match is None:
        return None
    number = match["num"] or match["paren"] or match["hash"] or match["label"]
    return (int(number) if number else None), line[match.end() :]


@dataclass
class _Item:
    """A list item being collected: its marker number, indentation and text lines."""

    number: int | None
    indent: int
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return _unquote(_INSTRUCTION_LABEL.sub("", "\n".join(line for line in self.lines if line).strip()))


@dataclass
class _Lines:
    """Attaches continuation lines to the current item.

    A paragraph that follows a blank line at the item's own indentation is held back and only attached when
    another item follows: between items it belongs to the previous one, after the last one it is a closing
    remark ("Let me know if you need more!") that must not end up inside an instruction.
    """

    current: _Item | None = None
    pending: list[str] = field(default_factory=list)
    gap: bool = False

    def start(self, item: _Item) -> None:
        if self.current is not None:
            self.current.lines.extend(self.pending)
        self.current, self.pending, self.gap = item, [], False

    def stop(self) -> None:
        self.current, self.pending, self.gap = None, [], False

    def blank(self) -> None:
        self.gap = True

    def nests(self, indent: int) -> bool:
        """A marker indented deeper than the current item is a sub-point of it, not a new item."""
        return self.current is not None and indent > self.current.indent

    def add(self, indent: int, line: str) -> None:
        if self.current is None:
            return
        if self.pending or (self.gap and indent <= self.current.indent):
            self.pending.append(line)
        else:
            self.current.lines.append(line)
        self.gap = False


def _split_lines(text: str) -> list[tuple[int, str]]:
    """(indent, stripped line) with bold markers removed; blank lines and rules/fences become ''."""
    result: list[tuple[int, str]] = []
    for raw in text.splitlines():
        line = raw.replace("**", "").rstrip()
        stripped = "" if _SEPARATOR.match(raw.strip()) else line.strip()
        result.append((len(line) - len(line.lstrip()), stripped))
    return result


def parse_numbered_list(text: str) -> list[str]:
    """Fig. 8 output -> instructions; preamble lines before the first item are dropped."""
    items: list[_Item] = []
    lines = _Lines()
    for indent, line in _split_lines(text):
        if not line:
            lines.blank()
        elif (marker := _marker(line)) is not None and not lines.nests(indent):
            items.append(_Item(marker[0], indent, [marker[1]]))
            lines.start(items[-1])
        else:
            lines.add(indent, line)
    result = [text for item in items if (text := item.text())]
    if not result:
        raise ParseError("no list items: expected a numbered or bulleted list of instructions")
    return result


def _heading_kind(body: str, has_marker: bool) -> Kind | Literal["both"] | None:
    """The section a heading opens ('Rubrics:', '### Actions', 'Here are the rubrics and actions:'), if any."""
    body = body.lstrip("#").strip()
    kinds = {word.lower() for word in _KIND_WORD.findall(body)}
    words = len(body.rstrip(":").split())
    if not kinds or words > (4 if has_marker else 12):
        return None
    if not body.endswith(":") and (has_marker or words > 3):
        return None
    if len(kinds) == 2:
        return "both"
    return "rubric" if "rubric" in kinds else "action"


def parse_rubrics_actions(text: str, n: int) -> tuple[list[str], list[str]]:
    """Fig. 9 output -> (rubrics, actions), at most n each.

    Accepts a 'Rubrics:' list then an 'Actions:' list, interleaved 'Rubric: ... / Action: ...' pairs, two
    numbered lists without headings, or one list of 2n items (first half rubrics).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    labelled: dict[Kind, list[_Item]] = {"rubric": [], "action": []}
    blocks: list[tuple[Kind | None, list[_Item]]] = [(None, [])]
    lines = _Lines()
    for indent, line in _split_lines(text):
        if not line:
            lines.blank()
            continue
        marker = _marker(line)
        body = marker[1] if marker else line
        label = _KIND_LABEL.match(body)
        if label and (label["rest"] or label["num"]):
            lines.start(_add_labelled(labelled, label["kind"], label["rest"], indent))
        elif heading := _heading_kind(body, marker is not None):
            blocks.append((None if heading == "both" else heading, []))
            lines.stop()
        elif marker is not None and not lines.nests(indent):
            numbers = [item.number for item in blocks[-1][1] if item.number is not None]
            if marker[0] is not None and numbers and marker[0] <= numbers[-1]:
                blocks.append((None, []))  # numbering restarted: a second list without a heading
            blocks[-1][1].append(_Item(marker[0], indent, [marker[1]]))
            lines.start(blocks[-1][1][-1])
        else:
            lines.add(indent, line)
    rubrics, actions = _assign(blocks, labelled)
    rubric_texts = [text for item in rubrics if (text := item.text())]
    action_texts = [text for item in actions if (text := item.text())]
    if not action_texts:
        raise ParseError("no actions: expected an 'Actions:' list, 'Action: ...' lines or 2n numbered items")
    return rubric_texts[:n], action_texts[:n]


def _add_labelled(labelled: dict[Kind, list[_Item]], label: str, rest: str, indent: int) -> _Item:
    """Record a 'Rubric: ...' or 'Action: ...' line (both may share one line); returns the item to extend."""
    kind: Kind = "rubric" if label.lower() == "rubric" else "action"
    rest, *inline_action = _INLINE_ACTION.split(rest, maxsplit=1)
    labelled[kind].append(_Item(None, indent, [rest.strip().rstrip("|;-").strip()]))
    if inline_action:
        labelled["action"].append(_Item(None, indent, [inline_action[0].strip()]))
        return labelled["action"][-1]
    return labelled[kind][-1]


def _assign(
    blocks: list[tuple[Kind | None, list[_Item]]], labelled: dict[Kind, list[_Item]]
) -> tuple[list[_Item], list[_Item]]:
    """Give unheaded lists to whichever of rubrics/actions is missing; a lone list is split in half."""
    rubrics = [item for kind, items in blocks if kind == "rubric" for item in items] + labelled["rubric"]
    actions = [item for kind, items in blocks if kind == "action" for item in items] + labelled["action"]
    unheaded = [items for kind, items in blocks if kind is None and items]
    flat = [item for items in unheaded for item in items]
    if rubrics and not actions:
        actions = flat
    elif actions and not rubrics:
        rubrics = flat
    elif not rubrics and not actions:
        if len(unheaded) == 2:
            rubrics, actions = unheaded
        else:
            half = len(flat) // 2
            rubrics, actions = flat[:half], flat[half:] if half else []
    return rubrics, actions


def parse_improved_instruction(text: str) -> str:
    """Fig. 10 output -> the new instruction: what follows 'Improved instruction:', else the whole text."""
    match = _IMPROVED.search(text)
    body = text[match.end() :] if match else text
    body = body.strip().lstrip("*").strip()
    if body.startswith("**") and body.endswith("**"):
        body = body[2:-2]
    if tagged := _TAGS.match(body.strip()):
        body = tagged["body"]
    body = _unquote(body)
    if not body:
        raise ParseError("empty improved instruction")
    return body


def parse_two_scores(text: str, low: float = 1.0, high: float = 10.0) -> tuple[float, float]:
    """Judge output (Figs. 11-12) -> (Assistant 1 score, Assistant 2 score), read from the first line only.

    Like Alpagasus' parse_score: commas become spaces. Labels ('Scores:', 'Assistant 1:', '/10') are
    allowed around the numbers, other words are not, and nothing after the first line counts, so an
    explanation cannot smuggle in a verdict.
    """
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        raise ParseError("empty judge output")
    cleaned = _SCORE_NOISE.sub(" ", first.replace(",", " ").replace("*", " "))
    if _LETTER.search(_NUMBER.sub(" ", cleaned)):
        raise ParseError(f"first line is not two scores: {first[:80]!r}")
    numbers = [float(value) for value in _NUMBER.findall(cleaned)]
    if len(numbers) < 2:
        raise ParseError(f"expected two scores on the first line, found {len(numbers)}: {first[:80]!r}")
    return scores_on_scale(numbers[0], numbers[1], low, high)


SCALE_SLACK = 1.0  # how far outside the scale a score may be and still be read (as the nearest end)


def scores_on_scale(first: float, second: float, low: float = 1.0, high: float = 10.0) -> tuple[float, float]:
    """Two judge scores held to the scale low-high by one stated rule (docs/evaluation.md, "Scores just outside
    the scale"), so a near miss is read instead of thrown away, and no reading changes who won:

    * a score less than `SCALE_SLACK` (1 point) outside the scale reads as the nearest end: 0 or 0.9 as 1,
      10.5 or 11 as 10, when the other score is on the scale;
    * both scores off the scale ('0.9 0.7': another scale, 0-1 most likely), a score further out, or a near miss
      whose reading would turn two different scores into a draw ('0.9 1') stay errors: any reading there
      would be a guess that decides the verdict.
    """
    off = [not low <= score <= high for score in (first, second)]
    where = f"scores {first:g} {second:g}"
    if not any(off):
        return first, second
    if all(off):
        raise ParseError(f"{where} are both outside {low:g}-{high:g} (another scale?)")
    if not all(low - SCALE_SLACK <= score <= high + SCALE_SLACK for score in (first, second)):
        raise ParseError(f"{where}: one is more than {SCALE_SLACK:g} outside {low:g}-{high:g}")
    read = min(high, max(low, first)), min(high, max(low, second))
    if read[0] == read[1]:
        raise ParseError(f"{where}: reading the one outside {low:g}-{high:g} as {read[0]:g} would make a draw")
    return read
