"""HotpotQA: records in the distractor format, and the Teacher–Student search protocol.

Record forms accepted (`problem_from_record`): the official distractor JSON
(`_id, question, answer, context[[title, [sentences]]], supporting_facts[[title, i]], type, level`), our
Parquet rows (context as `{title, sentences}` structs) and HF `hotpot_qa` rows (context as
`{title: [...], sentences: [[...]]}`, id under `id`).

Protocol (one episode), `order="project"` (the default):
- Student turn: Thought, Summary (its rolling memory), then `Search[entity]` or `Finish[answer]`.
- A Search retrieves the top passage(s) of the problem's own paragraphs (the runner batches this across
  episodes); the Teacher then reviews the step, seeing the retrieved paragraph, and answers `[Continue]`
  or `[Rethink]` with advice, keeping its own rolling summary.
- A Finish is reviewed by the Teacher: `[Continue]` accepts it; `[Rethink]` sends the Student back.
- After `budget` searches, or on the Student's last allowed turn (budget + 2 turns in all), the Student
  must Finish; that answer is final without review. A forced turn without a Finish ends with no answer.
- Each agent's memory = its latest written summary plus the passage retrieved since it wrote it, so what
  was just retrieved is always in memory. An unreadable Student turn costs a turn and brings a format
  reminder; an unreadable Teacher turn counts as `[Continue]` without advice.

`order="paper"` (the paper's Appendix B / Algorithm 1): action turns carry no summary; a Finish ends the episode at
once (the Teacher never reviews an answer); after every Search, once the Teacher has judged it, each agent writes a
summary of the new information in a call of its own (Student first, on its own engine and adapter), appended to its
memory buffer. A search round therefore costs 4 calls instead of 2, and an answer 1 call instead of 2. Budget,
forced finish and malformed turns are as above.
"""

from __future__ import annotations

import json
from typing import Any

from haps_ray.tasks.parsing import Parsed, clean_markdown, parse_hotpot_student, parse_hotpot_teacher, section
from haps_ray.tasks.problem import Problem, RecordError
from haps_ray.tasks.protocol import Episode, Retrieval, chat, load_template

NONE = "(none yet)"
ORDERS = ("project", "paper")


def _context(raw: Any) -> list[tuple[str, list[str]]]:
    if isinstance(raw, str):  # CSV cells hold the context as JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise RecordError(f"context is not valid JSON ({err.msg})") from None
    if isinstance(raw, dict) and "title" in raw and "sentences" in raw:  # HF: columns of titles and sentences
        raw = list(zip(raw["title"], raw["sentences"]))
    if not isinstance(raw, (list, tuple)) or not raw:
        raise RecordError("empty context")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            item = (item.get("title"), item.get("sentences"))
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise RecordError(f"context[{i}] is not [title, sentences]")
        title, sentences = item
        if not isinstance(title, str) or not isinstance(sentences, (list, tuple)) or not all(isinstance(s, str) for s in sentences):
            raise RecordError(f"context[{i}] is not [title, [sentences]]")
        if not "".join(sentences).strip():
            raise RecordError(f"context[{i}] ({title!r}) has no text")
        out.append((title, list(sentences)))
    return out


def _facts(raw: Any) -> list[tuple[str, int]]:
    if raw is None:
        return []
    if isinstance(raw, dict) and "title" in raw:
        raw = list(zip(raw["title"], raw.get("sent_id", [])))
    facts = []
    for item in raw:
        if isinstance(item, dict):
            item = (item.get("title"), item.get("sent_id"))
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], int)):
            raise RecordError(f"supporting fact {item!r} is not [title, sentence index]")
        facts.append((str(item[0]), int(item[1])))
    return facts


def problem_from_record(record: dict, where: str, counters: dict[str, int] | None = None) -> Problem:
    """A HotpotQA Problem from one record; raises RecordError naming the first problem found."""
    pid = record.get("_id", record.get("id"))
    for key, value in (("_id", pid), ("question", record.get("question")), ("answer", record.get("answer"))):
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"missing or empty field {key!r}")
    return Problem(
        id=pid.strip(), task="hotpotqa", question=record["question"].strip(), answer=record["answer"].strip(),
        context=_context(record.get("context")), supporting_facts=_facts(record.get("supporting_facts")),
        qtype=str(record.get("type") or ""), level=str(record.get("level") or ""), source=where,
    )


class HotpotQAEpisode(Episode):
    """Student searches and answers, Teacher reviews; see the module docstring for the rules."""

    task = "hotpotqa"
    stop = ("\nObservation:",)  # the model must not invent what the retriever returns

    def __init__(self, problem: Problem, assignment: dict[str, str], adapters: dict[str, Any] | None = None,
                 search_budget: int = 3, passage_titles: bool = True, order: str = "project") -> None:
        super().__init__(problem, assignment, adapters)
        for role in ("student", "teacher"):
            self.engine_for(role)
        if search_budget < 0:
            raise ValueError(f"search_budget must be >= 0, got {search_budget}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order = order
        self.buffer: dict[str, list[str]] = {"student": [], "teacher": []}  # paper order: appended summaries
        self._summaries_due: list[str] = []  # paper order: roles still to summarise this round
        self._phase = "act"  # what the pending call is: an action turn or (paper order) a summary
        self._round = ""  # paper order: the search round being summarised
        self._decision = "Continue"  # the Teacher's last decision (paper order: shown to the summary calls)
        self.budget = search_budget
        self.passage_titles = passage_titles
        self.max_student_turns = search_budget + 2
        self.searches = 0
        self.student_turns = 0
        self.memory = {"student": NONE, "teacher": NONE}
        self.unseen = {"student": "", "teacher": ""}  # retrieval since each agent last wrote its summary
        self.advice = NONE
        self.last_student: Parsed | None = None
        self.query: str | None = None
        self._forced = False
        self._ask_student()

    @property
    def max_calls(self) -> int:
        # project: a Student turn and its review; paper: a search round is 4 calls (act, review, two summaries)
        return (4 if self.order == "paper" else 2) * self.max_student_turns

    def pending_retrieval(self) -> str | None:
        return None if self.done else self.query

    def receive_retrieval(self, passages: list[tuple[str, str]]) -> None:
        if self.query is None:
            raise RuntimeError(f"episode {self.problem.id}: no search is waiting for passages")
        text = "\n".join(f"[{title}] {body}" if self.passage_titles else body for title, body in passages) or "(nothing found)"
        note = f"Search[{self.query}] returned:\n{text}"
        self.retrieved.append(Retrieval(self.query, list(passages)))
        self.unseen = {"student": note, "teacher": note}
        self.query = None
        self._ask_teacher(f"Search[{self.last_student.arg}]", note, reviewing_finish=False)

    # ---- prompts --------------------------------------------------------------------------------

    def _memory(self, role: str) -> str:
        kept = ("\n".join(self.buffer[role]) or NONE) if self.order == "paper" else self.memory[role]
        parts = [kept] + ([f"Latest retrieval: {self.unseen[role]}"] if self.unseen[role] else [])
        return "\n".join(parts)

    def _ask_student(self) -> None:
        self._forced = self.searches >= self.budget or self.student_turns >= self.max_student_turns - 1
        template = "hotpotqa_student_paper" if self.order == "paper" else "hotpotqa_student"
        reminders = load_template(template)
        self._phase = "act"
        self._ask("student", chat(
            template, question=self.problem.question, memory=self._memory("student"), advice=self.advice,
            searches_left=self.budget - self.searches,
            instruction=reminders["forced" if self._forced else "free"],
        ))

    def _ask_teacher(self, action: str, observation: str, reviewing_finish: bool) -> None:
        self._phase = "act"
        if self.order == "paper":  # the Teacher judges searches only: one instruction, in the template
            self._round = f"{action}\n{observation}"
            self._ask("teacher", chat(
                "hotpotqa_teacher_paper", question=self.problem.question, memory=self._memory("teacher"),
                student_thought=self.last_student.thought or NONE, student_action=action, observation=observation,
                searches_left=self.budget - self.searches,
            ))
            return
        sections = load_template("hotpotqa_teacher")
        self._ask("teacher", chat(
            "hotpotqa_teacher", question=self.problem.question, memory=self._memory("teacher"),
            student_thought=self.last_student.thought or NONE, student_action=action, observation=observation,
            searches_left=self.budget - self.searches,
            instruction=sections["review_finish" if reviewing_finish else "review_search"],
        ))

    def _ask_summary(self, role: str) -> None:
        """Paper order: `role` writes down what this search round brought, in a call of its own."""
        self._phase = "summary"
        decision = f"Teacher's decision: [{self._decision}] {self.advice if self.advice != NONE else ''}".strip()
        self._ask(role, chat("hotpotqa_summary", question=self.problem.question, memory=self._memory(role),
                             round=f"{self._round}\n{decision}"))

    # ---- transitions ----------------------------------------------------------------------------

    def _parse(self, role: str, text: str) -> Parsed:
        if self._phase == "summary":
            clean = (section(clean_markdown(text), "summary", "memory", "new facts") or text).strip()
            return Parsed("summary", clean, summary=clean) if clean else Parsed("summary", malformed=True,
                                                                                 error="empty summary")
        return parse_hotpot_student(text) if role == "student" else parse_hotpot_teacher(text)

    def _remember(self, role: str, parsed: Parsed) -> None:
        if self.order == "paper":
            if parsed.kind == "summary" and parsed.summary:
                self.buffer[role].append(parsed.summary)
                self.unseen[role] = ""  # the summary was written with the latest retrieval in view
            return  # paper order: an action turn's own notes are not memory
        if parsed.summary:
            self.memory[role] = parsed.summary
            self.unseen[role] = ""  # the new summary was written with the latest retrieval in view

    def _on_turn(self, role: str, parsed: Parsed) -> None:
        self._remember(role, parsed)
        if self._phase == "summary":
            self._on_summary()
        elif role == "student":
            self._on_student(parsed)
        else:
            self._on_teacher(parsed)

    def _on_student(self, parsed: Parsed) -> None:
        self.student_turns += 1
        self.last_student = parsed
        if parsed.kind == "finish" and not parsed.malformed:
            if self._forced or self.order == "paper":  # paper order: Finish ends the episode, never reviewed
                self._finish(parsed.arg)
            else:
                self._ask_teacher(f"Finish[{parsed.arg}]", load_template("hotpotqa_teacher")["no_observation"], True)
            return
        if self._forced:
            if not parsed.malformed:  # a Search after the budget is spent breaks the protocol
                record = self.calls[-1]
                record.malformed = True
                record.action["error"] = "Search after the search budget was spent"
            self._finish(None)
            return
        if parsed.kind == "search" and not parsed.malformed:
            self.searches += 1
            self.query = parsed.arg
            return
        self.advice = load_template("hotpotqa_student")["malformed"]
        self._ask_student()

    def _on_teacher(self, parsed: Parsed) -> None:
        reviewing_finish = self.last_student is not None and self.last_student.kind == "finish"
        self._decision = "Rethink" if parsed.kind == "rethink" else "Continue"
        if parsed.kind == "rethink":
            self.advice = parsed.arg or load_template("hotpotqa_teacher")["rethink_without_advice"]
        else:
            self.advice = parsed.arg or NONE
            if reviewing_finish:
                self._finish(self.last_student.arg)
                return
        if self.order == "paper":
            self._summaries_due = ["student", "teacher"]
            self._ask_summary(self._summaries_due.pop(0))
            return
        self._ask_student()

    def _on_summary(self) -> None:
        if self._summaries_due:
            self._ask_summary(self._summaries_due.pop(0))
        else:
            self._ask_student()
