"""Scripted runs of both protocols: turn order, search budget, forced finish, Submit, memories and prompt slots.

Episodes are driven by hand here (the runner has its own tests): each step feeds a fixed completion to the
pending call, and retrieval is answered with a chosen paragraph of the problem.
"""

import re

import pytest

from haps_ray.config import TaskConfig
from haps_ray.tasks import HotpotQAEpisode, MMLUEpisode, Problem, load_problems, make_episode
from haps_ray.tasks.protocol import load_template

FIXTURES = "tests/fixtures"
Z = {"teacher": "big", "student": "small"}


@pytest.fixture(scope="module")
def hotpot() -> Problem:
    problems, _ = load_problems("hotpotqa", f"{FIXTURES}/hotpotqa_small.json")
    return problems[0]  # tower in Dravik, river Vesna


@pytest.fixture(scope="module")
def mmlu() -> Problem:
    problems, _ = load_problems("mmlu", f"{FIXTURES}/mmlu_small.jsonl")
    return problems[0]  # closest planet, key B


def user_prompt(episode) -> str:
    return episode.pending_call().messages[-1]["content"]


def assert_filled(episode) -> None:
    for message in episode.pending_call().messages:
        assert not re.search(r"\{[a-z_]+\}", message["content"]), message["content"]


def paragraph(problem: Problem, title: str) -> tuple[str, str]:
    return next(p for p in problem.paragraphs if p[0] == title)


def drive(episode, script: list[str], passages: dict[str, str] | None = None) -> list[str]:
    """Feed `script` to the episode in order; returns the roles that were called."""
    roles = []
    for text in script:
        if episode.pending_retrieval() is not None:
            query = episode.pending_retrieval()
            episode.receive_retrieval([paragraph(episode.problem, passages[query])])
        call = episode.pending_call()
        assert call is not None, f"episode ended before the script did (roles so far {roles})"
        assert_filled(episode)
        roles.append(call.role)
        episode.advance(text)
    return roles


def test_budget_then_forced_finish_without_review(hotpot):
    ep = HotpotQAEpisode(hotpot, Z, search_budget=3)
    searches_left = []
    script = []
    for entity in ("Arlen Clock Tower", "Dravik", "Lake Morrow"):
        script += [f"Thought: look up {entity}\nSummary: s\nAction: Search[{entity}]", "Thought: ok\nDecision: [Continue]"]
    roles = []
    for text in script:
        if ep.pending_retrieval():
            q = ep.pending_retrieval()
            ep.receive_retrieval([paragraph(hotpot, q)])
        if ep.pending_call().role == "student":
            searches_left.append(re.search(r"Searches left: (\d+)", user_prompt(ep)).group(1))
        roles.append(ep.pending_call().role)
        ep.advance(text)
    assert roles == ["student", "teacher"] * 3
    assert searches_left == ["3", "2", "1"]
    forced = load_template("hotpotqa_student")["forced"]
    assert forced in user_prompt(ep) and "Searches left: 0" in user_prompt(ep)
    ep.advance("Thought: it is the Vesna\nAction: Finish[the Vesna River]")
    assert ep.done and ep.final_answer == "the Vesna River"
    assert [c.role for c in ep.calls] == ["student", "teacher"] * 3 + ["student"]
    assert ep.searches == 3 and [r.query for r in ep.retrieved] == ["Arlen Clock Tower", "Dravik", "Lake Morrow"]


def test_finish_is_reviewed_and_rethink_sends_student_back(hotpot):
    ep = HotpotQAEpisode(hotpot, Z, search_budget=3)
    roles = drive(ep, [
        "Thought: guess\nSummary: nothing yet\nAction: Finish[Lake Morrow]",
        "Thought: unsupported\nDecision: [Rethink] Find which city the tower stands in first.",
    ])
    assert roles == ["student", "teacher"] and not ep.done
    teacher_prompt = ep.calls[1].messages[-1]["content"]
    assert "Finish[Lake Morrow]" in teacher_prompt and load_template("hotpotqa_teacher")["review_finish"] in teacher_prompt
    assert "Find which city the tower stands in first." in user_prompt(ep)
    drive(ep, ["Thought: ok\nAction: Finish[the Vesna River]", "Decision: [Continue]"])
    assert ep.done and ep.final_answer == "the Vesna River" and len(ep.calls) == 4


def test_passage_titles_false_shows_the_sentences_alone(hotpot):
    ep = make_episode(TaskConfig(name="hotpotqa", passage_titles=False), hotpot, Z)
    ep.advance("Thought: where is the tower?\nAction: Search[Arlen Clock Tower]")
    title, text = paragraph(hotpot, "Arlen Clock Tower")
    ep.receive_retrieval([(title, text)])
    teacher = user_prompt(ep)
    assert f"returned:\n{text}" in teacher and f"[{title}] {text}" not in teacher
    titled = make_episode(TaskConfig(name="hotpotqa"), hotpot, Z)
    titled.advance("Thought: where is the tower?\nAction: Search[Arlen Clock Tower]")
    titled.receive_retrieval([(title, text)])
    assert f"[{title}] {text}" in user_prompt(titled)


def test_memories_hold_summary_and_latest_retrieval(hotpot):
    ep = HotpotQAEpisode(hotpot, Z, search_budget=3)
    ep.advance("Thought: where is the tower?\nSummary: Need the tower's city.\nAction: Search[Arlen Clock Tower]")
    assert ep.pending_call() is None and ep.pending_retrieval() == "Arlen Clock Tower"
    title, text = paragraph(hotpot, "Arlen Clock Tower")
    ep.receive_retrieval([(title, text)])
    teacher = user_prompt(ep)
    assert ep.pending_call().role == "teacher"
    assert f"[{title}] {text}" in teacher and "Search[Arlen Clock Tower]" in teacher
    assert "where is the tower?" in teacher  # the Student's reasoning is shown to the Teacher
    ep.advance("Thought: good\nSummary: Tower stands in Dravik.\nDecision: [Continue] Now find the river.")
    student = user_prompt(ep)
    # the Student's memory = its own last summary + what its search just returned
    assert "Need the tower's city." in student and f"[{title}] {text}" in student
    assert "Now find the river." in student
    ep.advance("Thought: need river\nSummary: Tower in Dravik; river unknown.\nAction: Search[Dravik]")
    ep.receive_retrieval([paragraph(hotpot, "Dravik")])
    teacher = user_prompt(ep)
    assert "Tower stands in Dravik." in teacher  # the Teacher's own rolling summary
    assert "The Vesna River flows through the city centre" in teacher
    ep.advance("Decision: [Continue]")
    student = user_prompt(ep)
    assert "Tower in Dravik; river unknown." in student and "The Vesna River flows" in student
    assert f"[{title}] {text}" not in student  # folded into the newer summary, no longer repeated


def test_malformed_student_turn_costs_a_turn_and_gets_a_reminder(hotpot):
    ep = HotpotQAEpisode(hotpot, Z, search_budget=1)
    ep.advance("I have no idea what format to use.")
    assert ep.calls[-1].malformed and ep.pending_call().role == "student"
    assert load_template("hotpotqa_student")["malformed"] in user_prompt(ep)
    assert ep.student_turns == 1 and ep.searches == 0


def test_forced_turn_with_search_ends_without_answer(hotpot):
    ep = HotpotQAEpisode(hotpot, Z, search_budget=0)
    assert load_template("hotpotqa_student")["forced"] in user_prompt(ep)
    ep.advance("Action: Search[Dravik]")
    assert ep.done and ep.final_answer is None
    assert ep.calls[-1].malformed and "budget" in ep.calls[-1].action["error"]


def test_endless_rethinks_stop_at_the_turn_cap(hotpot):
    ep = HotpotQAEpisode(hotpot, Z, search_budget=3)
    calls = 0
    while not ep.done:
        call = ep.pending_call()
        ep.advance("Action: Finish[guess]" if call.role == "student" else "Decision: [Rethink] try again")
        calls += 1
    # 5 student turns (budget + 2): four reviewed and rejected, the fifth forced and final
    assert [c.role for c in ep.calls] == ["student", "teacher"] * 4 + ["student"]
    assert calls == 9 <= ep.max_calls and ep.final_answer == "guess" and ep.error is None


def test_malformed_teacher_accepts_finish(hotpot):
    ep = HotpotQAEpisode(hotpot, Z, search_budget=3)
    drive(ep, ["Action: Finish[Dravik]", "hmm, not sure"])
    assert ep.done and ep.final_answer == "Dravik" and ep.calls[-1].malformed


def test_mmlu_submit_ends_the_episode(mmlu):
    ep = MMLUEpisode(mmlu, Z, max_rounds=3)
    prompt = user_prompt(ep)
    assert mmlu.question in prompt and "A. Venus\nB. Mercury\nC. Earth\nD. Mars" in prompt and "Round 1 of 3" in prompt
    roles = drive(ep, ["Solution: Mercury is closest.\nAnswer: B", "Feedback: right.\nDecision: Submit"])
    assert roles == ["student", "teacher"] and ep.done and ep.final_answer == "B"
    teacher_prompt = ep.calls[1].messages[-1]["content"]
    assert "Mercury is closest." in teacher_prompt and "The Student's answer: B" in teacher_prompt


def test_mmlu_revisions_until_last_round(mmlu):
    ep = MMLUEpisode(mmlu, Z, max_rounds=3)
    drive(ep, ["Solution: Venus is hot.\nAnswer: A", "Feedback: hot is not close.\nDecision: Continue"])
    revision = user_prompt(ep)
    assert "Venus is hot." in revision and "Your previous answer: A" in revision
    assert "hot is not close." in revision and "Round 2 of 3" in revision
    drive(ep, ["Solution: maybe Earth.\nAnswer: C", "Feedback: no.\nDecision: Continue", "Solution: Mercury.\nAnswer: B"])
    # round 3 is the last: the Student's answer is final without a Teacher call
    assert ep.done and ep.final_answer == "B"
    assert [c.role for c in ep.calls] == ["student", "teacher", "student", "teacher", "student"] and len(ep.calls) == ep.max_calls


def test_mmlu_malformed_turns(mmlu):
    ep = MMLUEpisode(mmlu, Z, max_rounds=2)
    drive(ep, ["Answer: D", "I cannot decide."])  # unreadable Teacher counts as Continue
    assert ep.decisions == ["continue"] and ep.calls[-1].malformed
    ep.advance("no idea at all")  # unreadable last answer keeps the previous one
    assert ep.done and ep.final_answer == "D" and ep.calls[-1].malformed
    single = MMLUEpisode(mmlu, Z, max_rounds=1)
    drive(single, ["Answer: B"])
    assert single.done and [c.role for c in single.calls] == ["student"]


def test_make_episode_and_bad_arguments(hotpot, mmlu):
    assert isinstance(make_episode(TaskConfig(name="hotpotqa", search_budget=2), hotpot, Z), HotpotQAEpisode)
    ep = make_episode(TaskConfig(name="mmlu", max_rounds=2), mmlu, Z)
    assert isinstance(ep, MMLUEpisode) and ep.max_rounds == 2
    with pytest.raises(ValueError, match="is a hotpotqa problem"):
        make_episode(TaskConfig(name="mmlu"), hotpot, Z)
    with pytest.raises(KeyError, match="role 'teacher' has no engine"):
        MMLUEpisode(mmlu, {"student": "small"})
    with pytest.raises(RuntimeError, match="without a pending call"):
        done = MMLUEpisode(mmlu, Z, max_rounds=1)
        done.advance("Answer: B")
        done.advance("Answer: B")
