"""Tasks: loading HotpotQA / MMLU problems and their Teacher–Student protocols.

    problems, report = load_problems("mmlu", "../shared/data/mmlu/train.jsonl")
    train = sample_problems(problems, 300, seed=0, stratify=True)
    episode = make_episode(cfg.task, train[0], {"teacher": "qwen", "student": "llama"}, adapters={})
"""

from __future__ import annotations

from typing import Any

from haps_ray.config import TaskConfig
from haps_ray.tasks.hotpotqa import HotpotQAEpisode
from haps_ray.tasks.loaders import load_problems
from haps_ray.tasks.mmlu import MMLUEpisode
from haps_ray.tasks.problem import (
    LoaderError, LoadReport, Problem, RecordError, problems_to_table, sample_problems, select_levels,
)
from haps_ray.tasks.protocol import CallRecord, Episode, ErrorKind, PendingCall, Retrieval

__all__ = [
    "CallRecord", "Episode", "ErrorKind", "HotpotQAEpisode", "LoadReport", "LoaderError", "MMLUEpisode", "PendingCall", "Problem",
    "RecordError", "Retrieval", "load_problems", "make_episode", "problems_to_table", "sample_problems", "select_levels",
]


def make_episode(task: TaskConfig, problem: Problem, assignment: dict[str, str],
                 adapters: dict[str, Any] | None = None) -> Episode:
    """A fresh episode of `task.name`'s protocol for one problem, assignment z and per-engine adapters."""
    if problem.task != task.name:
        raise ValueError(f"problem {problem.id} is a {problem.task} problem, the task is {task.name}")
    if task.name == "hotpotqa":
        return HotpotQAEpisode(problem, assignment, adapters, search_budget=task.search_budget,
                               passage_titles=task.passage_titles, order=task.protocol_order)
    return MMLUEpisode(problem, assignment, adapters, max_rounds=task.max_rounds)
