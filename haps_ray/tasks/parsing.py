"""Tolerant parsing of agent turns: actions, decisions, answers and the sections around them.

Small models rarely follow a format exactly, so every parser here accepts the usual drift — any case,
markdown emphasis (`**Finish**[x]`), `Finish: x` for `Finish[x]`, a missing closing bracket, text after
the action — and reports a turn it cannot read as `malformed` with a reason instead of raising.

Where the model writes more than one action (it hallucinates later turns), the first one after the first
`Action:`/`Decision:` marker wins: it is the one the model committed to for this turn.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_SECTION_NAMES = r"thought|reasoning|summary|memory|action|decision|answer|final answer|feedback|advice|solution|observation"
_SECTION_START = re.compile(rf"^[ \t>#\-]*(?:{_SECTION_NAMES})[ \t]*:", re.I | re.M)

_HOTPOT_ACTION = re.compile(
    r"\b(search|finish)\b[ \t]*(?:\[[ \t]*(?P<closed>.*)\]|\([ \t]*(?P<paren>.*)\)|\[[ \t]*(?P<open>.*)|:[ \t]*(?P<colon>.+))",
    re.I,
)
_TEACHER_HOTPOT = re.compile(r"\[?[ \t]*\b(continue|rethink)\b[ \t]*\]?", re.I)
_TEACHER_MMLU = re.compile(r"\[?[ \t]*\b(submit|continue)\b[ \t]*\]?", re.I)
# A committed letter: a commitment phrase ("answer", "final", "I choose", "I'll go with", "the correct option is",
# "my answer would be", ...), optional hedges ("I think", "it's", "so"), optional "option"/"choice"/"letter", then the
# letter: in parentheses (any case), upper-case, or lower-case closing its clause. A lower-case letter inside prose
# ("the answer is a bit unclear") is not one.
_COMMIT = (r"(?i:final(?:[ \t]+answer)?|answer|i[ \t]+(?:choose|pick|select)|i(?:'ll|[ \t]+will)[ \t]+(?:go[ \t]+with|choose|pick)"
           r"|(?:correct|right|best)[ \t]+(?:answer|option|choice)|my[ \t]+(?:answer|choice|pick))")
_HEDGES = r"(?i:(?:i[ \t]+think|i[ \t]+believe|probably|likely|definitely|it'?s|it[ \t]+is|therefore|so|then)[ \t,]*)*"
_ANSWER_LETTER = re.compile(
    _COMMIT + r"[ \t]*(?:(?i:is|would[ \t]+be|will[ \t]+be|should[ \t]+be)[ \t]*)?(?:[:\-=][ \t]*)?" + _HEDGES
    + r"(?:(?i:option|choice|letter)[ \t]*)?"
    r"(?:\([ \t]*(?P<par>[A-Da-d])[ \t]*\)|(?P<up>[A-D])\b|(?P<low>[a-d])(?=[ \t]*[).,;!]?[ \t]*$))",
    re.M,
)
_LONE_LETTER = re.compile(r"^[ \t]*\(?(?P<letter>[A-D])\)?[.)]?[ \t]*$", re.M)


@dataclass
class Parsed:
    """One parsed turn. `kind` is the action or decision; `arg` its argument (entity, answer, advice, letter)."""

    kind: str | None
    arg: str = ""
    thought: str = ""
    summary: str | None = None
    malformed: bool = False
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def clean_markdown(text: str) -> str:
    """Drop emphasis and code markers, which models sprinkle around keywords."""
    return re.sub(r"\*\*|__|`|\*", "", text)


def section(text: str, *names: str) -> str | None:
    """The body of the first `Name:` section among `names`, up to the next known section header."""
    pattern = re.compile(rf"^[ \t>#\-]*(?:{'|'.join(re.escape(n) for n in names)})[ \t]*:", re.I | re.M)
    match = pattern.search(text)
    if match is None:
        return None
    rest = text[match.end():]
    nxt = _SECTION_START.search(rest)
    body = rest[: nxt.start()] if nxt else rest
    return body.strip()


def _marker_end(text: str, marker: str) -> int:
    """Offset just after the first `marker:` header (0 when there is none)."""
    match = re.search(rf"^[ \t>#\-]*{marker}[ \t]*:", text, re.I | re.M)
    return match.end() if match else 0


def _thought(text: str, end: int | None = None) -> str:
    """The `Thought:` section, or without one whatever precedes the first section header and `end`."""
    found = section(text, "thought", "reasoning")
    if found is not None:
        return found
    first = _SECTION_START.search(text)
    stop = min(first.start() if first else len(text), len(text) if end is None else end)
    return text[:stop].strip()


def _strip_arg(arg: str) -> str:
    arg = arg.strip()
    arg = re.sub(r"[ \t]*[.;,]+$", "", arg)
    return arg.strip().strip("\"'“”‘’").strip()


def parse_hotpot_student(text: str) -> Parsed:
    """Student turn of HotpotQA: `Search[entity]` or `Finish[answer]` plus thought and summary."""
    clean = clean_markdown(text)
    summary = section(clean, "summary", "memory")
    start = _marker_end(clean, "action")
    offset = start
    for line in clean[start:].splitlines(keepends=True):
        match = _HOTPOT_ACTION.search(line.rstrip("\n"))
        if match is None:
            offset += len(line)
            continue
        thought = _thought(clean, offset + match.start())
        arg = _strip_arg(next(g for g in (match["closed"], match["paren"], match["open"], match["colon"]) if g is not None))
        kind = match.group(1).lower()
        if not arg:
            return Parsed(kind, "", thought, summary, True, f"empty {kind} argument")
        return Parsed(kind, arg, thought, summary)
    return Parsed(None, "", _thought(clean), summary, True, "no Search[...] or Finish[...] action found")


def parse_hotpot_teacher(text: str) -> Parsed:
    """Teacher turn of HotpotQA: `[Continue]` or `[Rethink]`, advice after it or under `Advice:`."""
    clean = clean_markdown(text)
    summary = section(clean, "summary", "memory")
    marker = re.search(r"^[ \t>#\-]*decision[ \t]*:", clean, re.I | re.M)
    if marker is not None:
        scope = clean[marker.end():]
        match = _TEACHER_HOTPOT.search(scope)
    else:
        # without a header, only a bracketed decision or one opening a line counts, not a word in prose
        scope = clean
        match = re.search(r"\[[ \t]*(continue|rethink)[ \t]*\]", clean, re.I) or re.search(
            r"^[ \t]*(continue|rethink)\b", clean, re.I | re.M)
    if match is None:
        return Parsed(None, "", _thought(clean), summary, True, "no [Continue] or [Rethink] decision found")
    thought = _thought(clean, match.start() if marker is None else marker.start())
    advice = section(clean, "advice", "feedback")
    if advice is None:
        advice = scope[match.end():].split("\n\n")[0]
        advice = re.sub(r"^[ \t]*[:\-–]+", "", advice).strip()
    return Parsed(match.group(1).lower(), advice, thought, summary)


def parse_mmlu_student(text: str, choices: list[str] | None = None) -> Parsed:
    """Student turn of MMLU: a solution and a letter A-D (`Answer: C`, `answer is (c)`, a lone `C`, or a choice's text)."""
    clean = clean_markdown(text)
    solution = section(clean, "solution", "reasoning", "thought")
    if solution is None:
        first = re.search(r"^[ \t>#\-]*(?:final answer|answer)[ \t]*:", clean, re.I | re.M)
        solution = (clean[: first.start()] if first else clean).strip()
    matches = list(_ANSWER_LETTER.finditer(clean))
    if matches:
        last = matches[-1]
        letter = (last["par"] or last["up"] or last["low"]).upper()
        return Parsed("answer", letter, solution)
    lone = list(_LONE_LETTER.finditer(clean))
    if lone:
        return Parsed("answer", lone[-1]["letter"], solution)
    stated = section(clean, "final answer", "answer")
    if stated and choices:
        wanted = stated.splitlines()[0].strip().rstrip(".").lower()
        for i, choice in enumerate(choices):
            if wanted and wanted == choice.strip().rstrip(".").lower():
                return Parsed("answer", "ABCD"[i], solution)
    return Parsed(None, "", solution, None, True, "no answer letter A-D found")


def parse_mmlu_teacher(text: str) -> Parsed:
    """Teacher turn of MMLU: feedback and a `Continue` (revise) or `Submit` decision."""
    clean = clean_markdown(text)
    feedback = section(clean, "feedback", "advice")
    marker = re.search(r"^[ \t>#\-]*decision[ \t]*:", clean, re.I | re.M)
    if marker is not None:
        match = _TEACHER_MMLU.search(clean, marker.end())
        if feedback is None:
            feedback = clean[: marker.start()].strip()
    else:
        # without a header only a decision standing on its own line counts, not one inside prose
        match = None
        for found in re.finditer(r"^[ \t]*\[?[ \t]*(submit|continue)[ \t]*\]?[ \t.!]*$", clean, re.I | re.M):
            match = found
        if feedback is None:
            feedback = (clean[: match.start()] if match else clean).strip()
    if match is None:
        return Parsed(None, "", feedback or "", None, True, "no Continue or Submit decision found")
    return Parsed(match.group(1).lower(), feedback or "", feedback or "")
