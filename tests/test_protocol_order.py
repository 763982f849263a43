"""HotpotQA turn order: the project's (summaries inside action turns, a Finish reviewed by the Teacher) against the
paper's Algorithm 1 (`task.protocol_order: paper`: a Finish ends the episode; after each reviewed Search both agents
summarise in calls of their own). The same scripted decisions give different call sequences and call counts."""

import pytest

from haps_ray.config import ConfigError, TaskConfig
from haps_ray.tasks import load_problems, make_episode
from haps_ray.tasks.protocol import load_template
from tests.test_tasks_protocols import FIXTURES, Z, drive, paragraph, user_prompt

SEARCH = "Thought: where is the tower?\nSummary: Need the tower's city.\nAction: Search[Arlen Clock Tower]"
REVIEW = "Thought: good\nSummary: Tower stands in Dravik.\nDecision: [Continue] Now find the river."
FINISH = "Thought: it is the Vesna\nAction: Finish[the Vesna River]"
PASSAGES = {"Arlen Clock Tower": "Arlen Clock Tower"}


@pytest.fixture(scope="module")
def hotpot():
    problems, _ = load_problems("hotpotqa", f"{FIXTURES}/hotpotqa_small.json")
    return problems[0]


def episode(hotpot, order: str):
    return make_episode(TaskConfig(name="hotpotqa", protocol_order=order), hotpot, Z)


def test_one_search_then_finish_calls_differ_as_specified(hotpot):
    project = episode(hotpot, "project")
    roles = drive(project, [SEARCH, REVIEW, FINISH, "Decision: [Continue]"], PASSAGES)
    assert roles == ["student", "teacher", "student", "teacher"]  # the Finish is reviewed
    assert project.done and project.final_answer == "the Vesna River"

    paper = episode(hotpot, "paper")
    roles = drive(paper, [SEARCH, REVIEW, "The tower is in Dravik.", "Tower stands in Dravik, on the Vesna.", FINISH],
                  PASSAGES)
    assert roles == ["student", "teacher", "student", "teacher", "student"]  # act, review, 2 summaries, Finish
    assert [c.action["kind"] for c in paper.calls] == ["search", "continue", "summary", "summary", "finish"]
    assert paper.done and paper.final_answer == "the Vesna River"  # no review of the Finish
    assert project.max_calls == 10 and paper.max_calls == 20  # search budget 3: 5 Student turns at most


def test_paper_order_cannot_veto_a_finish(hotpot):
    project, paper = episode(hotpot, "project"), episode(hotpot, "paper")
    project.advance(FINISH)
    assert not project.done and project.pending_call().role == "teacher"
    assert load_template("hotpotqa_teacher")["review_finish"] in user_prompt(project)
    paper.advance(FINISH)
    assert paper.done and paper.final_answer == "the Vesna River" and len(paper.calls) == 1


def test_paper_order_memory_is_the_buffer_of_summary_calls(hotpot):
    ep = episode(hotpot, "paper")
    assert "Summary:" not in ep.pending_call().messages[0]["content"]  # action turns write no summary
    ep.advance(SEARCH)
    title, text = paragraph(hotpot, "Arlen Clock Tower")
    ep.receive_retrieval([(title, text)])
    ep.advance(REVIEW)
    summary_prompt = user_prompt(ep)
    assert ep.pending_call().role == "student" and "Search[Arlen Clock Tower]" in summary_prompt
    assert text in summary_prompt and "[Continue] Now find the river." in summary_prompt
    ep.advance("The tower is in Dravik.")
    assert ep.pending_call().role == "teacher"
    ep.advance("Summary: Tower stands in Dravik.")
    student = user_prompt(ep)
    assert ep.buffer == {"student": ["The tower is in Dravik."], "teacher": ["Tower stands in Dravik."]}
    assert "The tower is in Dravik." in student and "Need the tower's city." not in student  # an action's notes are not memory
    assert text not in student  # summarised, no longer repeated
    assert "Now find the river." in student  # the Teacher's advice still reaches the Student
    ep.advance("Thought: river?\nAction: Search[Dravik]")
    ep.receive_retrieval([paragraph(hotpot, "Dravik")])
    ep.advance("Decision: [Rethink] Check the river's name.")
    ep.advance("")  # an empty summary is malformed, and the retrieval it failed to record stays in memory
    assert ep.calls[-1].malformed and ep.buffer["student"] == ["The tower is in Dravik."]
    ep.advance("The Vesna flows through Dravik.")
    assert "The Vesna River flows through the city centre" in user_prompt(ep)
    assert ep.buffer["teacher"] == ["Tower stands in Dravik.", "The Vesna flows through Dravik."]


def test_forced_finish_and_budget_are_the_same_in_both_orders(hotpot):
    ep = make_episode(TaskConfig(name="hotpotqa", protocol_order="paper", search_budget=1), hotpot, Z)
    drive(ep, [SEARCH, REVIEW, "s", "t"], PASSAGES)
    assert load_template("hotpotqa_student_paper")["forced"] in user_prompt(ep)
    ep.advance("Thought: more\nAction: Search[Dravik]")
    assert ep.done and ep.final_answer is None and ep.calls[-1].malformed


def test_bad_order_fails_naming_the_field():
    with pytest.raises(ConfigError, match=r"^protocol_order:"):
        TaskConfig(name="hotpotqa", protocol_order="algorithm1")
