"""The routing prompt and the assignment format of the high-level router.

The router reads a four-part prompt (role definitions, task description, the problem, the candidate
list with ids 0..M-1) and answers with one JSON object assigning a candidate id to every role, e.g.

    {"teacher":0,"student":2}

`RoutingSpec.canonical_json(z)` is the one spelling of an assignment (compact, keys in role order):
the exact-probability scorer teacher-forces it and SFT trains on it. `parse_assignment` reads what a
router actually generated, tolerating markdown fences, spaces, quoted ids, candidate names and key
case; anything it cannot read comes back as an error string, never an exception.

    spec = RoutingSpec.from_config(cfg)
    messages = routing_messages(spec, problem_text(problem))
    z, error = parse_assignment(generated_text, spec)
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from haps_ray.config import ConfigError, ExperimentConfig

# Our own wording of the two protocols (DESIGN.md, "Protocols"); unknown roles get a generic line.
ROLE_DEFINITIONS: dict[str, dict[str, str]] = {
    "mmlu": {
        "teacher": "reviews each proposed solution, points out mistakes, and decides whether the Student "
        "should revise it (Continue) or hand in the answer (Submit).",
        "student": "works through the multiple-choice question step by step and proposes an answer letter, "
        "revising it when the Teacher asks.",
    },
    "hotpotqa": {
        "teacher": "checks every reasoning step and action of the Student, replying [Continue] when it is on "
        "track or [Rethink] with concrete advice when it is not.",
        "student": "answers the question by looking up paragraphs with Search[entity] and ends with "
        "Finish[answer], explaining its reasoning before each action.",
    },
}

TASK_DESCRIPTIONS: dict[str, str] = {
    "mmlu": "The team answers a multiple-choice question with options A-D. The Student proposes, the Teacher "
    "reviews, for a few rounds at most; the final letter is graded against the key.",
    "hotpotqa": "The team answers a multi-hop question whose answer needs facts from more than one Wikipedia "
    "paragraph, found by search over a small paragraph collection; the answer is graded by token F1.",
}

_GENERIC_ROLE = "is a member of the team with the role '{role}'."
_GENERIC_TASK = "The team solves the problem below together."


@dataclass(frozen=True)
class RoutingSpec:
    """Who can be routed where: task, roles (K), candidate names (M) and optional one-line descriptions."""

    task: str
    roles: tuple[str, ...]
    candidates: tuple[str, ...]
    candidate_descriptions: Mapping[str, str] = field(default_factory=dict)
    role_descriptions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"roles must be non-empty and unique, got {list(self.roles)}")
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidate names must be non-empty and unique, got {list(self.candidates)}")

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> RoutingSpec:
        names = [c.name for c in cfg.candidates]
        for key in cfg.router.candidate_descriptions:
            if key not in names:
                raise ConfigError(f"router.candidate_descriptions.{key}: no candidate of that name (have {names})")
        for key in cfg.router.role_descriptions:
            if key not in cfg.task.roles:
                raise ConfigError(f"router.role_descriptions.{key}: not one of task.roles {cfg.task.roles}")
        return cls(
            task=cfg.task.name,
            roles=tuple(cfg.task.roles),
            candidates=tuple(names),
            candidate_descriptions=dict(cfg.router.candidate_descriptions),
            role_descriptions=dict(cfg.router.role_descriptions),
        )

    @property
    def num_roles(self) -> int:
        return len(self.roles)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    @property
    def num_assignments(self) -> int:
        """|Z| = M^K."""
        return self.num_candidates**self.num_roles

    def assignments(self) -> list[tuple[int, ...]]:
        """Every z in Z, in lexicographic order (the column order of exact log-prob tables)."""
        return list(itertools.product(range(self.num_candidates), repeat=self.num_roles))

    def index(self, z: Sequence[int]) -> int:
        """Position of z in `assignments()`."""
        self.check(z)
        flat = 0
        for i in z:
            flat = flat * self.num_candidates + i
        return flat

    def check(self, z: Sequence[int]) -> None:
        if len(z) != self.num_roles or any(not 0 <= int(i) < self.num_candidates for i in z):
            raise ValueError(f"assignment {tuple(z)} is not K={self.num_roles} ids in [0, {self.num_candidates})")

    def canonical_json(self, z: Sequence[int]) -> str:
        """The one spelling of z the router is trained on and scored with: compact, keys in role order."""
        self.check(z)
        return json.dumps({role: int(i) for role, i in zip(self.roles, z)}, separators=(",", ":"))

    def as_dict(self, z: Sequence[int]) -> dict[str, int]:
        self.check(z)
        return {role: int(i) for role, i in zip(self.roles, z)}

    def from_dict(self, assignment: Mapping[str, int]) -> tuple[int, ...]:
        missing = [r for r in self.roles if r not in assignment]
        if missing:
            raise ValueError(f"assignment {dict(assignment)} lacks roles {missing}")
        z = tuple(int(assignment[r]) for r in self.roles)
        self.check(z)
        return z


def problem_text(problem: Any) -> str:
    """The problem as the router sees it: a string as is, else `problem.render()`, else question + choices."""
    if isinstance(problem, str):
        return problem
    render = getattr(problem, "render", None)
    if callable(render):
        return str(render())
    question = getattr(problem, "question", None)
    if question is None:
        raise TypeError(f"cannot route a {type(problem).__name__}: expected a str or an object with .question")
    choices = getattr(problem, "choices", None) or []
    lines = [str(question)] + [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def problem_id(problem: Any, fallback: int) -> str:
    """A name for log lines: `problem.id` when there is one, else the batch position."""
    return str(getattr(problem, "id", f"#{fallback}"))


def routing_messages(spec: RoutingSpec, text: str) -> list[dict[str, str]]:
    """Chat messages of the routing prompt for one problem (system + a four-part user turn)."""
    defaults = ROLE_DEFINITIONS.get(spec.task, {})
    role_lines = []
    for role in spec.roles:
        definition = spec.role_descriptions.get(role) or defaults.get(role) or _GENERIC_ROLE.format(role=role)
        role_lines.append(f"- {role}: {definition}")
    candidate_lines = []
    for i, name in enumerate(spec.candidates):
        description = spec.candidate_descriptions.get(name, "")
        candidate_lines.append(f"{i}: {name}" + (f" ({description})" if description else ""))
    example = spec.canonical_json([0] * spec.num_roles).replace("0", "<id>")
    user = "\n\n".join(
        [
            "## Roles\n" + "\n".join(role_lines),
            "## Task\n" + TASK_DESCRIPTIONS.get(spec.task, _GENERIC_TASK),
            "## Problem\n" + text.strip(),
            "## Candidate models\n" + "\n".join(candidate_lines),
            f"Assign one candidate id to every role (a model may take several roles). Reply with JSON only: {example}",
        ]
    )
    system = "You route work in a team of language models: pick the model that should play each role."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def _candidate_id(value: Any, spec: RoutingSpec) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < spec.num_candidates else None
    if isinstance(value, float) and value.is_integer():
        return _candidate_id(int(value), spec)
    if isinstance(value, str):
        text = value.strip().strip("'\"").strip()
        if re.fullmatch(r"\d+", text):
            return _candidate_id(int(text), spec)
        lowered = [c.lower() for c in spec.candidates]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    return None


def _from_mapping(obj: Mapping[Any, Any], spec: RoutingSpec) -> tuple[tuple[int, ...] | None, str | None]:
    keyed = {str(k).strip().lower(): v for k, v in obj.items()}
    z = []
    for role in spec.roles:
        if role.lower() not in keyed:
            return None, f"no key {role!r}"
        cid = _candidate_id(keyed[role.lower()], spec)
        if cid is None:
            return None, f"{role!r} -> {keyed[role.lower()]!r} is not a candidate id in [0, {spec.num_candidates})"
        z.append(cid)
    return tuple(z), None


def parse_assignment(text: str, spec: RoutingSpec) -> tuple[tuple[int, ...] | None, str | None]:
    """Read an assignment from generated text: (z, None) on success, (None, reason) otherwise."""
    last_error = "no JSON object found"
    for match in _OBJECT.finditer(text):
        blob = match.group(0)
        for candidate in (blob, blob.replace("'", '"'), re.sub(r",\s*}", "}", blob.replace("'", '"'))):
            try:
                obj = json.loads(candidate)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                z, error = _from_mapping(obj, spec)
                if z is not None:
                    return z, None
                last_error = error
                break
        else:
            # Not JSON at all: fall back to `role: value` pairs inside the braces.
            pairs = dict(re.findall(r"[\"']?(\w+)[\"']?\s*[:=]\s*[\"']?([\w.\-]+)[\"']?", blob))
            z, error = _from_mapping(pairs, spec)
            if z is not None:
                return z, None
            last_error = error
    return None, last_error
