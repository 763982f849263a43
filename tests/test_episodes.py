"""Lock-step runner: batching per engine, call counts, scoring, failures, and equivalence with one-at-a-time runs.

Protocol-level checks use `ScriptedEngine` (tests/helpers.py), a test double with LLMEngine's `generate` signature
that answers from a script; the equivalence test runs two real tiny random-weight engines (Llama and Qwen2).
"""

import json
import re

import pytest
import torch

from haps_ray.config import DecodingConfig, RewardConfig, TaskConfig
from haps_ray.engine import LLMEngine, LocalEngineClient, LocalRetrieverClient
from haps_ray.episodes import EpisodeResult, EpisodeRunner, score
from haps_ray.lora import Adapter
from haps_ray.rl.cost import CostNormalizer, PriceTable
from haps_ray.rl.rewards import combine_reward
from haps_ray.tasks import ErrorKind, load_problems, make_episode
from tests.helpers import FIXTURES, ScriptedEngine
PRICES = PriceTable({"small": (0.2, 0.4), "large": (0.8, 1.6)})
GREEDY = DecodingConfig(max_new_tokens=8, temperature=0.0)


def mmlu_script(keys: dict[str, str]):
    """Student: wrong 'A' in round 1, the key in round 2; Teacher: Continue in round 1, Submit in round 2."""

    def respond(chat):
        system, user = chat[0]["content"], chat[1]["content"]
        round_no = int(re.search(r"Round (\d+) of", user).group(1))
        if "You are the Student" in system:
            question = re.search(r"Question: (.*)", user).group(1)
            return f"Solution: thinking.\nAnswer: {'A' if round_no == 1 else keys[question]}"
        return "Feedback: ok.\nDecision: " + ("Continue" if round_no == 1 else "Submit")

    return respond


@pytest.fixture(scope="module")
def mmlu():
    problems, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    return problems


@pytest.fixture(scope="module")
def hotpot():
    problems, _ = load_problems("hotpotqa", str(FIXTURES / "hotpotqa_small.json"))
    return problems


def clients(engines: dict) -> dict[str, LocalEngineClient]:
    return {name: LocalEngineClient(engine) for name, engine in engines.items()}


def assignments(n: int) -> list[dict[str, str]]:
    pool = [{"teacher": t, "student": s} for t in ("small", "large") for s in ("small", "large")]
    return [pool[i % len(pool)] for i in range(n)]


def test_lock_step_batches_per_engine_and_scores(mmlu):
    keys = {p.question: p.answer for p in mmlu}
    engines = {"small": ScriptedEngine(mmlu_script(keys)), "large": ScriptedEngine(mmlu_script(keys))}
    reward = RewardConfig(lam=0.2)
    norm = CostNormalizer(0.0, 1e-4)
    runner = EpisodeRunner(clients(engines), GREEDY, PRICES, reward, normalizer=norm, seed=7)
    task = TaskConfig(name="mmlu", max_rounds=3)
    zs = assignments(6)
    results = runner.run([make_episode(task, p, z) for p, z in zip(mmlu[:6], zs)])
    stats = runner.last_run
    # every episode: S T S T (Submit in round 2) -> 4 steps; each step one call per engine at most
    assert stats.steps == 4 and stats.generate_calls <= stats.steps * len(engines)
    assert stats.generate_calls == sum(len(e.calls) for e in engines.values())
    assert sum(c["n"] for e in engines.values() for c in e.calls) == 6 * 4  # every LLM call of every episode
    for result, problem, z in zip(results, mmlu, zs):
        assert result.problem_id == problem.id and result.assignment == z
        assert [c.role for c in result.calls] == ["student", "teacher", "student", "teacher"]
        assert [c.engine for c in result.calls] == [z["student"], z["teacher"]] * 2
        assert result.final_answer == problem.answer and result.perf == 1.0 and result.error is None
        # token counts and cost from the recorded prompts, independently of the runner's bookkeeping
        words = [sum(len(m["content"].split()) for m in c.messages) for c in result.calls]
        outs = [len(c.completion.split()) for c in result.calls]
        cost = sum(PRICES.call_cost(c.engine, w, o) for c, w, o in zip(result.calls, words, outs))
        assert result.cost == pytest.approx(cost)
        assert result.tokens.by_role["student"] == {"in": words[0] + words[2], "out": outs[0] + outs[2]}
        assert result.reward == pytest.approx(0.8 * 1.0 - 0.2 * norm(cost))
        assert result.n_steps == 4 and result.n_calls == 4 and result.n_malformed == 0
    back = EpisodeResult.from_dict(json.loads(json.dumps(results[0].to_dict())))
    assert back == results[0]


def test_seeds_are_per_step_and_engine_and_reproducible(mmlu):
    keys = {p.question: p.answer for p in mmlu}
    seeds = []
    for _ in range(2):
        engines = {"small": ScriptedEngine(mmlu_script(keys)), "large": ScriptedEngine(mmlu_script(keys))}
        runner = EpisodeRunner(clients(engines), DecodingConfig(temperature=1.0, top_p=0.9), PRICES, seed=3)
        results = runner.run([make_episode(TaskConfig(name="mmlu"), p, z) for p, z in zip(mmlu[:4], assignments(4))])
        seeds.append([[c["seed"] for c in e.calls] for e in engines.values()])
        assert all(c["temperature"] == 1.0 for e in engines.values() for c in e.calls)
    assert seeds[0] == seeds[1]
    flat = [s for per_engine in seeds[0] for s in per_engine]
    assert len(set(flat)) == len(flat)  # no two calls of a run share a seed
    assert results[0].calls[0].seed == runner.call_seed(3, 0, results[0].assignment["student"])


def test_adapters_follow_their_samples(mmlu):
    keys = {p.question: p.answer for p in mmlu}
    engines = {"small": ScriptedEngine(mmlu_script(keys)), "large": ScriptedEngine(mmlu_script(keys))}
    marks = [Adapter(torch.full((1, 2, 4), float(i)), torch.zeros(1, 4, 2), 1.0) for i in range(3)]
    z = {"teacher": "large", "student": "small"}
    episodes = [make_episode(TaskConfig(name="mmlu"), p, z, adapters={"small": m}) for p, m in zip(mmlu, marks)]
    episodes.append(make_episode(TaskConfig(name="mmlu"), mmlu[3], z, adapters={}))
    EpisodeRunner(clients(engines), GREEDY, PRICES).run(episodes)
    first = engines["small"].calls[0]
    assert [None if a is None else float(a.A[0, 0, 0]) for a in first["adapters"]] == [0.0, 1.0, 2.0, None]
    assert engines["large"].calls[0]["adapters"] is None  # nobody has an adapter for 'large'


def test_failures_stay_inside_their_episodes(mmlu):
    keys = {p.question: p.answer for p in mmlu}
    engines = {"small": ScriptedEngine(mmlu_script(keys)), "large": ScriptedEngine(mmlu_script(keys), fail=True)}
    zs = [{"teacher": "small", "student": "small"}, {"teacher": "large", "student": "small"},
          {"teacher": "small", "student": "large"}]
    results = EpisodeRunner(clients(engines), GREEDY, PRICES).run([make_episode(TaskConfig(name="mmlu"), p, z) for p, z in zip(mmlu, zs)])
    assert results[0].error is None and results[0].perf == 1.0
    assert "engine large failed: engine exploded" in results[1].error and results[1].n_calls == 1
    assert results[1].final_answer == "A"  # the answer reached before the failure is kept
    assert results[2].error and results[2].n_calls == 0 and results[2].perf == 0.0
    assert results[1].error_kind is ErrorKind.ENGINE and results[1].infrastructure_failure

    class Garbage(ScriptedEngine):
        def generate(self, messages, *args, **kwargs):
            return [object()] * len(messages)  # not Generations: advance() fails on them

    results = EpisodeRunner(clients({"small": Garbage(None), "large": Garbage(None)}), GREEDY, PRICES).run(
        [make_episode(TaskConfig(name="mmlu"), mmlu[0], zs[0])])
    assert results[0].error.startswith("advance failed: AttributeError") and results[0].error_kind is ErrorKind.INTERNAL
    assert not results[0].infrastructure_failure


def test_bad_setups_are_refused_before_running(mmlu, hotpot):
    engines = clients({"small": ScriptedEngine(lambda chat: "")})
    with pytest.raises(ValueError, match="no price for engines"):
        EpisodeRunner({"other": engines["small"]}, GREEDY, PRICES)
    with pytest.raises(TypeError, match="'small': str is not an EngineClient"):
        EpisodeRunner({"small": "an engine"}, GREEDY, PRICES)
    unwrapped = EpisodeRunner({"small": ScriptedEngine(lambda chat: "")}, GREEDY, PRICES)
    with pytest.raises(TypeError, match="generate returned a list, not a pending result; wrap a local engine"):
        unwrapped.run([make_episode(TaskConfig(name="mmlu"), mmlu[0], {"teacher": "small", "student": "small"})])
    runner = EpisodeRunner(engines, GREEDY, PRICES)
    with pytest.raises(ValueError, match=r"names engines \['large'\]"):
        runner.run([make_episode(TaskConfig(name="mmlu"), mmlu[0], {"teacher": "large", "student": "small"})])
    with pytest.raises(ValueError, match="need a retriever"):
        runner.run([make_episode(TaskConfig(name="hotpotqa"), hotpot[0], {"teacher": "small", "student": "small"})])


def test_reward_without_normalizer_and_rescoring(mmlu):
    keys = {p.question: p.answer for p in mmlu}
    engines = {"small": ScriptedEngine(mmlu_script(keys)), "large": ScriptedEngine(mmlu_script(keys))}
    reward = RewardConfig(lam=0.5, shaping=True)
    (result,) = EpisodeRunner(clients(engines), GREEDY, PRICES, reward).run(
        [make_episode(TaskConfig(name="mmlu", max_rounds=1), mmlu[0], {"teacher": "small", "student": "small"})])
    assert result.final_answer == "A" and result.perf == 0.0 and result.reward is None  # λ > 0 needs the normaliser
    norm = CostNormalizer.fit([0.0, 2 * result.cost])
    score(result, reward, norm)
    assert result.cost_norm == pytest.approx(0.5)
    assert result.reward == pytest.approx(combine_reward(0.0, 0.5, 0.5, shaping=True)) == pytest.approx(-0.75)


def test_hotpot_search_is_retrieved_in_batches(hotpot):
    from haps_ray.retrieval import Retriever

    def respond(chat):
        system, user = chat[0]["content"], chat[1]["content"]
        if "You are the Teacher" in system:
            return "Thought: fine\nSummary: noted\nDecision: [Continue]"
        left = int(re.search(r"Searches left: (\d+)", user).group(1))
        if left == 3:
            return "Thought: look it up\nSummary: nothing yet\nAction: Search[Dravik river]"
        return "Thought: found it\nAction: Finish[the Vesna River]"

    retriever = Retriever(device="cpu")
    calls = []
    original = retriever.retrieve
    retriever.retrieve = lambda problems, queries, top_k=None: calls.append(len(queries)) or original(problems, queries)
    scripted = ScriptedEngine(respond)
    runner = EpisodeRunner(clients({"small": scripted}), GREEDY, PRICES, retriever=LocalRetrieverClient(retriever))
    z = {"teacher": "small", "student": "small"}
    results = runner.run([make_episode(TaskConfig(name="hotpotqa"), p, z) for p in hotpot])
    assert calls == [3] and runner.last_run.retrieve_calls == 1  # one batched retrieval for all three searches
    first = results[0]
    assert [c.role for c in first.calls] == ["student", "teacher", "student", "teacher"]
    assert first.retrievals[0].passages[0][0] == "Dravik"
    assert "The Vesna River flows through the city centre" in first.calls[1].messages[1]["content"]
    assert first.final_answer == "the Vesna River" and first.perf == 1.0
    assert all(c["stop"] == ["\nObservation:"] for c in scripted.calls)


@pytest.fixture(scope="module")
def tiny_engines(make_tiny):
    return {"llama": LLMEngine(*make_tiny("llama"), name="llama"), "qwen": LLMEngine(*make_tiny("qwen2"), name="qwen")}


def tiny_adapter(engine: LLMEngine, seed: int) -> Adapter:
    (d_in, d_out), = engine.info()["adapter_shapes"]
    g = torch.Generator().manual_seed(seed)
    return Adapter(torch.randn(1, 4, d_in, generator=g), torch.randn(1, d_out, 4, generator=g), 0.5)


def trajectories(results):
    return [[(c.role, c.engine, c.token_ids, c.completion) for c in r.calls] + [r.final_answer] for r in results]


def test_lock_step_equals_one_at_a_time_on_real_tiny_engines(tiny_engines, mmlu):
    prices = PriceTable({"llama": (0.2, 0.2), "qwen": (0.8, 0.8)})
    decoding = DecodingConfig(max_new_tokens=6, temperature=0.0)
    pool = [{"teacher": t, "student": s} for t in ("llama", "qwen") for s in ("llama", "qwen")]
    specs = []
    for i, problem in enumerate(mmlu[:8]):
        z = pool[i % 4]
        adapters = {"llama": tiny_adapter(tiny_engines["llama"], i)} if i % 3 == 0 else {}
        specs.append((problem, z, adapters))
    task = TaskConfig(name="mmlu", max_rounds=2)

    def fresh():
        return [make_episode(task, p, z, a) for p, z, a in specs]

    runner = EpisodeRunner(clients(tiny_engines), decoding, prices)
    together = runner.run(fresh())
    stats = runner.last_run
    assert stats.generate_calls <= stats.steps * len(tiny_engines)
    assert sum(r.n_calls for r in together) > stats.generate_calls  # batching actually merged calls
    alone = [EpisodeRunner(clients(tiny_engines), decoding, prices).run([ep])[0] for ep in fresh()]
    assert trajectories(together) == trajectories(alone)
    for a, b in zip(together, alone):
        for ca, cb in zip(a.calls, b.calls):
            assert ca.n_input_tokens == cb.n_input_tokens
            assert ca.logprobs == pytest.approx(cb.logprobs, abs=1e-4)
    assert all(len(c.token_ids) == c.n_output_tokens > 0 for r in together for c in r.calls)


@pytest.mark.slow
def test_engine_actor_handles_give_the_local_trajectories(ray_session, tiny_engines, mmlu):
    import ray

    from actors.engine import EngineActor, EngineActorClient
    from haps_ray.config import CandidateConfig

    prices = PriceTable({"llama": (0.2, 0.2), "qwen": (0.8, 0.8)})
    decoding = DecodingConfig(max_new_tokens=4, temperature=0.0)
    task = TaskConfig(name="mmlu", max_rounds=2)
    zs = [{"teacher": "llama", "student": "qwen"}, {"teacher": "qwen", "student": "llama"}]
    specs = [(p, z) for p, z in zip(mmlu[:4], zs * 2)]
    local = EpisodeRunner(clients(tiny_engines), decoding, prices).run([make_episode(task, p, z) for p, z in specs])
    handles = {name: EngineActor.options(num_cpus=0.5).remote(CandidateConfig(name=name, model=f"tiny-{arch}"))
               for name, arch in (("llama", "llama"), ("qwen", "qwen2"))}
    try:
        runner = EpisodeRunner({name: EngineActorClient(h) for name, h in handles.items()}, decoding, prices)
        remote = runner.run([make_episode(task, p, z) for p, z in specs])
        assert trajectories(remote) == trajectories(local)
        assert runner.last_run.generate_calls <= runner.last_run.steps * 2
        assert all(r.error is None for r in remote)
    finally:
        for handle in handles.values():
            ray.kill(handle)
