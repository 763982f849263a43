"""The `Problem` record shared by both tasks, load reports, seeded split sampling and Parquet rows.

A Problem is what an episode needs: the question, the gold answer (HotpotQA answer text or MMLU letter),
MMLU's four choices and subject, HotpotQA's context paragraphs (title, sentences) and supporting facts.
`to_row()` gives the task's canonical record (the same field names the loaders read), so prepared splits
written as Parquet load back through `load_problems` unchanged.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

logger = logging.getLogger(__name__)

LETTERS = "ABCD"
TASKS = ("hotpotqa", "mmlu")


class LoaderError(ValueError):
    """A data source cannot be read at all (missing, unsupported, unreachable); the message names it."""


class RecordError(ValueError):
    """One record is unusable (missing field, answer not in A-D, empty context, ...)."""


@dataclass
class Problem:
    """One task instance, independent of the file format it came from."""

    id: str
    task: str
    question: str
    answer: str
    choices: list[str] = field(default_factory=list)
    subject: str = ""
    context: list[tuple[str, list[str]]] = field(default_factory=list)
    supporting_facts: list[tuple[str, int]] = field(default_factory=list)
    qtype: str = ""
    level: str = ""
    source: str = ""  # file:line of the record, for error messages downstream

    @property
    def paragraphs(self) -> list[tuple[str, str]]:
        """HotpotQA context as (title, text) with the sentences joined."""
        return [(title, "".join(sentences).strip()) for title, sentences in self.context]

    def to_row(self) -> dict:
        """The task's canonical record (JSON- and Parquet-friendly)."""
        if self.task == "mmlu":
            return {"id": self.id, "subject": self.subject, "question": self.question,
                    "choices": list(self.choices), "answer": self.answer}
        return {
            "_id": self.id, "question": self.question, "answer": self.answer,
            "context": [{"title": t, "sentences": list(s)} for t, s in self.context],
            "supporting_facts": [{"title": t, "sent_id": int(i)} for t, i in self.supporting_facts],
            "type": self.qtype, "level": self.level,
        }


@dataclass
class LoadReport:
    """What one `load_problems` call read, kept and skipped (with `file:line: reason` per bad record)."""

    source: str
    task: str
    n_read: int = 0
    n_loaded: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def n_bad(self) -> int:
        return len(self.errors)

    def summary(self) -> str:
        return f"{self.source} ({self.task}): read {self.n_read} records, loaded {self.n_loaded}, skipped {self.n_bad} bad"

    def to_dict(self) -> dict:
        return {"source": self.source, "task": self.task, "n_read": self.n_read, "n_loaded": self.n_loaded,
                "n_bad": self.n_bad, "errors": list(self.errors)}


_MMLU_SCHEMA = pa.schema([("id", pa.string()), ("subject", pa.string()), ("question", pa.string()),
                          ("choices", pa.list_(pa.string())), ("answer", pa.string())])
_HOTPOT_SCHEMA = pa.schema([
    ("_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("context", pa.list_(pa.struct([("title", pa.string()), ("sentences", pa.list_(pa.string()))]))),
    ("supporting_facts", pa.list_(pa.struct([("title", pa.string()), ("sent_id", pa.int64())]))),
    ("type", pa.string()), ("level", pa.string()),
])


def problems_to_table(problems: Sequence[Problem], task: str) -> pa.Table:
    """Arrow table of canonical rows (one schema per task, so empty splits still have columns)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    wrong = [p.id for p in problems if p.task != task]
    if wrong:
        raise ValueError(f"problems {wrong[:3]} are not {task} problems")
    schema = _MMLU_SCHEMA if task == "mmlu" else _HOTPOT_SCHEMA
    return pa.Table.from_pylist([p.to_row() for p in problems], schema=schema)


def _equal_shares(sizes: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    """Split n over groups as evenly as their sizes allow; leftover units go to randomly chosen groups."""
    quota = {g: 0 for g in sizes}
    left = n
    while left > 0:
        open_groups = [g for g in sorted(sizes) if quota[g] < sizes[g]]
        if not open_groups:
            break
        each = left // len(open_groups)
        if each == 0:
            for g in rng.sample(open_groups, left):
                quota[g] += 1
            break
        for g in open_groups:
            take = min(each, sizes[g] - quota[g])
            quota[g] += take
            left -= take
    return quota


def select_levels(problems: Sequence[Problem], levels: Sequence[str]) -> list[Problem]:
    """The problems whose `level` is one of `levels` (HotpotQA easy / medium / hard); every problem when empty."""
    return [p for p in problems if p.level in levels] if levels else list(problems)


def sample_problems(problems: Sequence[Problem], n: int, seed: int, stratify: bool = False) -> list[Problem]:
    """Seeded sample of n problems (n <= 0 or n >= len keeps all, shuffled).

    With `stratify`, subjects get equal shares (±1, capped by a subject's size, the rest spread over the
    larger ones) as in the paper's 300/100 MMLU splits over 57 subjects.
    """
    rng = random.Random(seed)
    pool = list(problems)
    if n <= 0 or n >= len(pool):
        rng.shuffle(pool)
        return pool
    if not stratify:
        return rng.sample(pool, n)
    by_subject: dict[str, list[Problem]] = defaultdict(list)
    for p in pool:
        by_subject[p.subject].append(p)
    quota = _equal_shares({s: len(v) for s, v in by_subject.items()}, n, rng)
    chosen = [p for s in sorted(by_subject) for p in rng.sample(by_subject[s], quota[s])]
    rng.shuffle(chosen)
    return chosen


def question_key(problem: Problem) -> tuple:
    """Identity of a problem's content, to keep a test split disjoint from train/valid."""
    return (problem.task, " ".join(problem.question.split()).lower(), tuple(c.strip().lower() for c in problem.choices))
