"""Tolerant parsers on tables of well-formed, drifting and malformed agent outputs."""

import pytest

from haps_ray.tasks.parsing import (
    parse_hotpot_student,
    parse_hotpot_teacher,
    parse_mmlu_student,
    parse_mmlu_teacher,
    section,
)

STUDENT_CASES = [
    ("Thought: need the city\nSummary: tower is in Dravik\nAction: Search[Dravik]", "search", "Dravik"),
    ("Thought: done\nAction: Finish[the Vesna River]", "finish", "the Vesna River"),
    ("thought: x\naction: finish[Yes]", "finish", "Yes"),
    ("**Thought:** x\n**Action:** **Search**[Arlen Clock Tower]", "search", "Arlen Clock Tower"),
    ("Thought: x\nAction: Finish: 1872.", "finish", "1872"),
    ("Thought: x\nAction: Search: Lake Morrow", "search", "Lake Morrow"),
    ("Action: Finish[The [Remastered] Album] and some trailing words", "finish", "The [Remastered] Album"),
    ("Action: Finish[no", "finish", "no"),  # unclosed bracket: the rest of the line
    ("Action: Finish(\"Paris\")", "finish", "Paris"),
    ("Thought: x\nAction: Search[A]\nObservation: made up\nThought: y\nAction: Finish[B]", "search", "A"),
    ("I think I should Search[Violin] next.", "search", "Violin"),  # no headers at all
    ("Thought: I could Search[X] but\nAction: Finish[Y]", "finish", "Y"),  # the committed action wins
]


@pytest.mark.parametrize("text, kind, arg", STUDENT_CASES)
def test_hotpot_student_actions(text, kind, arg):
    parsed = parse_hotpot_student(text)
    assert (parsed.kind, parsed.arg, parsed.malformed) == (kind, arg, False)


@pytest.mark.parametrize("text, reason", [
    ("", "no Search"),
    ("Thought: I am not sure what to do.", "no Search"),
    ("Action: Lookup[Paris]", "no Search"),
    ("Action: Finish[]", "empty finish"),
    ("Action: Search[   ]", "empty search"),
    ("Let me search for the director first.", "no Search"),  # prose mention without [ ] or :
])
def test_hotpot_student_malformed(text, reason):
    parsed = parse_hotpot_student(text)
    assert parsed.malformed and reason in parsed.error


def test_hotpot_student_sections():
    parsed = parse_hotpot_student("Thought: the tower is in Dravik.\nSummary: Tower -> Dravik; river unknown.\nAction: Search[Dravik]")
    assert parsed.thought == "the tower is in Dravik."
    assert parsed.summary == "Tower -> Dravik; river unknown."
    no_header = parse_hotpot_student("Need the river next.\nFinish: Vesna")
    assert no_header.thought == "Need the river next." and no_header.summary is None


TEACHER_CASES = [
    ("Thought: ok\nSummary: s\nDecision: [Continue]", "continue", ""),
    ("Thought: wrong city\nDecision: [Rethink] Search for the river of Dravik instead.", "rethink",
     "Search for the river of Dravik instead."),
    ("Decision: rethink - check the birth years", "rethink", "check the birth years"),
    ("Decision: **Rethink**\nAdvice: look up Ines Abbot", "rethink", "look up Ines Abbot"),
    ("The step looks fine.\n[Continue]", "continue", ""),
    ("Continue", "continue", ""),
    ("Thought: we should continue\nDecision: [Rethink] wrong entity", "rethink", "wrong entity"),
]


@pytest.mark.parametrize("text, kind, advice", TEACHER_CASES)
def test_hotpot_teacher(text, kind, advice):
    parsed = parse_hotpot_teacher(text)
    assert (parsed.kind, parsed.arg, parsed.malformed) == (kind, advice, False)


@pytest.mark.parametrize("text", ["", "Looks good to me, we can continue later.", "Decision: maybe"])
def test_hotpot_teacher_malformed(text):
    parsed = parse_hotpot_teacher(text)
    assert parsed.malformed and parsed.kind is None


CHOICES = ["Venus", "Mercury", "Earth", "Mars"]
MMLU_STUDENT_CASES = [
    ("Solution: Mercury is closest.\nAnswer: B", "B"),
    ("Solution: ...\nAnswer: b", "B"),
    ("the answer is (c).", "C"),
    ("**Answer:** **D**", "D"),
    ("Final answer: A) Venus", "A"),
    ("Answer: option C", "C"),
    ("I first thought the answer is A, but on reflection the answer is B.", "B"),  # the last statement wins
    ("Reasoning about orbits...\nB", "B"),  # a lone letter line
    ("Solution: closest planet\nAnswer: Mercury", "B"),  # the text of a choice
    # final-answer forms an independent check found missed
    ("Mercury is nearest.\nFinal: B", "B"),
    ("After weighing them, I choose B.", "B"),
    ("answer: I think c", "C"),
    ("The correct option is D, since Mars is red.", "D"),
    ("I'll go with (a)", "A"),
    ("My answer would be C.", "C"),
    ("So the answer is b.", "B"),
    ("Answer: it's probably A", "A"),
    ("Option B looks tempting, but I pick C", "C"),  # the last commitment wins
]


@pytest.mark.parametrize("text, letter", MMLU_STUDENT_CASES)
def test_mmlu_student(text, letter):
    parsed = parse_mmlu_student(text, CHOICES)
    assert (parsed.kind, parsed.arg, parsed.malformed) == ("answer", letter, False)


@pytest.mark.parametrize("text", [
    "",
    "Answer: E",
    "the answer is a bit unclear to me",  # lower-case 'a' inside prose is not a letter
    "I choose a path through the options and give up.",  # nor after a commitment phrase
    "My answer would be different if I knew more.",
    "Answer: Pluto",
    "I cannot decide.",
])
def test_mmlu_student_malformed(text):
    parsed = parse_mmlu_student(text, CHOICES)
    assert parsed.malformed and parsed.kind is None


def test_mmlu_student_solution_text():
    parsed = parse_mmlu_student("Solution: Mercury orbits at 0.39 AU.\nAnswer: B", CHOICES)
    assert parsed.thought == "Mercury orbits at 0.39 AU."
    assert parse_mmlu_student("Mercury is closest.\nAnswer: B", CHOICES).thought == "Mercury is closest."


@pytest.mark.parametrize("text, kind, feedback", [
    ("Feedback: correct reasoning.\nDecision: Submit", "submit", "correct reasoning."),
    ("Feedback: wrong planet.\nDecision: **continue**", "continue", "wrong planet."),
    ("Feedback: fine\nDecision: [Submit] right away", "submit", "fine"),
    ("The reasoning is right.\nSubmit", "submit", "The reasoning is right."),
    ("Check Venus again.\n[Continue]", "continue", "Check Venus again."),
])
def test_mmlu_teacher(text, kind, feedback):
    parsed = parse_mmlu_teacher(text)
    assert (parsed.kind, parsed.arg, parsed.malformed) == (kind, feedback, False)


@pytest.mark.parametrize("text", ["", "I would not submit this yet, continue thinking about it", "Decision: maybe"])
def test_mmlu_teacher_malformed(text):
    assert parse_mmlu_teacher(text).malformed


def test_section_stops_at_next_header():
    text = "Thought: a\nb\nSummary: c\nAction: Search[d]"
    assert section(text, "thought") == "a\nb"
    assert section(text, "summary") == "c"
    assert section(text, "advice") is None
