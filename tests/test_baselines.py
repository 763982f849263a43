"""Baseline routers (RouteLLM MF, GraphRouter, IRT-Router) on a synthetic D whose best team depends on a topic word
(and on cost when λ > 0); the HierRouter environment; the query encoder and its cache; errors naming a candidate.

Real MiniLM embeddings (the offline pack), real training; no Ray here (HierRouter's PPO: test_baselines_ppo.py).
"""

from __future__ import annotations

import pytest
import torch

from haps_ray import dataset as D
from haps_ray.baselines import ROUTERS, RouterSpec, load, routing_data
from haps_ray.baselines.embeddings import QueryEncoder
from haps_ray.baselines.hierrouter import HierRouter, RoutingEnv, env_config
from haps_ray.config import BaselinesConfig, ConfigError, RewardConfig, config_from_dict

from tests.baselines_synthetic import CANDIDATES, ROLES, d_table, make_problems

SUPERVISED = ("routellm", "irt", "graphrouter")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The fits are tiny full-batch steps: one torch thread, as pipelines.baselines runs them (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder() -> QueryEncoder:
    return QueryEncoder("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def splits():
    return {"train": make_problems(120, 0), "valid": make_problems(40, 1, 1000), "test": make_problems(80, 2, 2000)}


def synthetic(encoder, splits, lam: float, candidates=CANDIDATES, drop=None, spec_candidates=None):
    table = D.with_reward(d_table(splits, candidates, drop), RewardConfig(lam=lam))
    spec = RouterSpec(spec_candidates or list(candidates), ROLES, "mmlu", lam, False)
    problems = [p for items in splits.values() for p, _ in items]
    embeddings = dict(zip([p.id for p in problems], encoder.encode(problems)))
    z_embeddings = encoder.encode_texts([spec.assignment_text(z) for z in spec.assignments])
    return spec, table, {s: routing_data(table, s, spec, embeddings, z_embeddings) for s in splits}


@pytest.fixture(scope="module", params=[0.0, 0.2], ids=["lam0", "lam0.2"])
def data(request, encoder, splits):
    return synthetic(encoder, splits, request.param)


def test_the_synthetic_d_needs_the_topic_and_at_lambda_the_cost(encoder, splits):
    """The task is what it claims: no fixed team is near the oracle, and λ changes which team is best on geometry."""
    for lam in (0.0, 0.2):
        _, _, data = synthetic(encoder, splits, lam)
        test = data["test"]
        best_fixed = max(test.routed_reward(torch.full((len(test),), j)) for j in range(4))
        assert best_fixed < 0.7 * test.oracle_reward()
    _, _, cheap = synthetic(encoder, splits, 0.2)
    geometry = [i for i, (p, t) in enumerate(splits["test"]) if t == "geometry"]
    assert (cheap["test"].reward[geometry].argmax(dim=1) == 0).all()  # (small, small) beats (large, large) on cost


@pytest.mark.parametrize("name", SUPERVISED)
def test_baseline_beats_random_and_reaches_08_of_oracle_on_held_out_problems(name, data):
    spec, _, d = data
    router = ROUTERS[name](spec, BaselinesConfig(), seed=0)
    summary = router.fit(d["train"], d["valid"])
    test = d["test"]
    chosen = torch.tensor([spec.assignments.index(z) for z in router.route_embeddings(test.embeddings)])
    reward, random_reward = test.routed_reward(chosen), float(test.reward.mean())
    assert reward > random_reward
    assert reward >= 0.8 * test.oracle_reward(), (name, reward, test.oracle_reward(), summary["best_epoch"])


@pytest.mark.parametrize("name", SUPERVISED)
def test_save_load_round_trip_routes_the_same(name, encoder, splits, tmp_path):
    spec, _, d = synthetic(encoder, splits, 0.2)
    router = ROUTERS[name](spec, BaselinesConfig(epochs=30, hidden=8), seed=1)
    router.fit(d["train"], d["valid"])
    router.save(str(tmp_path / name))
    again = load(str(tmp_path / name))
    assert type(again) is type(router) and again.spec == spec
    problems = [p for p, _ in splits["test"]]
    assert again.route(problems, encoder) == router.route(problems, encoder)
    torch.testing.assert_close(again.scores(d["test"].embeddings), router.scores(d["test"].embeddings), rtol=0, atol=0)
    assert again.summary["best_epoch"] == router.summary["best_epoch"]


def test_a_d_without_a_candidate_fails_naming_it(encoder, splits):
    with pytest.raises(ValueError, match=r"D was built without candidate\(s\) \['huge'\]"):
        synthetic(encoder, splits, 0.0, spec_candidates=CANDIDATES + ["huge"])
    # D's pool lists 'large' but no row ever used it: nothing to learn about it
    never_large = {(p.id, j) for items in splits.values() for p, _ in items for j in (1, 2, 3)}
    with pytest.raises(ValueError, match=r"no row in which candidate\(s\) \['large'\] play any role"):
        synthetic(encoder, splits, 0.0, drop=never_large)


def test_routing_data_needs_the_reward_and_every_embedding(encoder, splits):
    spec, table, d = synthetic(encoder, splits, 0.0)
    with pytest.raises(ValueError, match="lacks the derived 'reward'"):
        routing_data(d_table(splits), "train", spec, {}, d["train"].z_embeddings)
    with pytest.raises(ValueError, match=r"train: no query embedding for D's problems \['p0'"):
        routing_data(table, "train", spec, {}, d["train"].z_embeddings)


# ----------------------------------------------------------------------------------------------
# Config fields, each seen to take effect
# ----------------------------------------------------------------------------------------------


def test_routellm_threshold_sends_more_queries_to_the_cheapest_team(encoder, splits):
    spec, _, d = synthetic(encoder, splits, 0.0)
    routes = {}
    for threshold in (0.5, 0.95):
        router = ROUTERS["routellm"](spec, BaselinesConfig(routellm_threshold=threshold, epochs=60), seed=0)
        router.fit(d["train"], d["valid"])
        scores = router.scores(d["test"].embeddings)
        routes[threshold] = router.choose(d["test"].embeddings)
        if threshold == 0.5:  # at 0.5 the best-scoring team always wins over the weak one
            assert torch.equal(routes[0.5], scores.argmax(dim=1))
    weak = router.weak
    assert weak == 0  # (small, small) has the lowest train cost
    assert (routes[0.95] == weak).sum() > (routes[0.5] == weak).sum()
    with pytest.raises(ConfigError, match="routellm_threshold"):
        BaselinesConfig(routellm_threshold=1.0)


def test_epochs_and_hidden_shape_the_fit(encoder, splits):
    spec, _, d = synthetic(encoder, splits, 0.0)
    for name, param, axis in (("routellm", "z_embed.weight", 1), ("irt", "discrimination.weight", 0),
                              ("graphrouter", "query_in.weight", 0)):
        router = ROUTERS[name](spec, BaselinesConfig(epochs=7, hidden=12), seed=0)
        summary = router.fit(d["train"], d["valid"])
        assert summary["epochs"] == len(summary["history"]) == 7 and 1 <= summary["best_epoch"] <= 7
        assert router.model.state_dict()[param].shape[axis] == 12


def test_irt_warmup_mixes_in_the_nearest_train_queries(encoder, splits):
    spec, _, d = synthetic(encoder, splits, 0.0)
    x = d["test"].embeddings[:5]
    off = ROUTERS["irt"](spec, BaselinesConfig(irt_warmup_k=0, epochs=2), seed=0)
    off.fit(d["train"], d["valid"])
    assert torch.equal(off.warm_up(x), x)
    on = ROUTERS["irt"](spec, BaselinesConfig(irt_warmup_k=1, irt_warmup_weight=0.25, epochs=2), seed=0)
    on.fit(d["train"], d["valid"])
    bank = d["train"].embeddings
    nearest = bank[(x @ bank.T).argmax(dim=1)]  # unit vectors: cosine = dot product
    torch.testing.assert_close(on.warm_up(x), 0.75 * x + 0.25 * nearest)
    wide = ROUTERS["irt"](spec, BaselinesConfig(irt_warmup_k=3, irt_warmup_weight=0.25, epochs=2), seed=0)
    wide.fit(d["train"], d["valid"])
    assert not torch.allclose(wide.warm_up(x), on.warm_up(x))


def test_query_encoder_caches_on_disk_and_the_router_encoder_reads_the_backbone(encoder, splits, tmp_path):
    problems = [p for p, _ in splits["valid"][:6]]
    cached = QueryEncoder("all-minilm-l6-v2", cache_dir=str(tmp_path))
    first = cached.encode(problems)
    assert cached.texts_encoded == 6 and first.shape == (6, 384)
    torch.testing.assert_close(first, encoder.encode(problems))
    again = QueryEncoder("all-minilm-l6-v2", cache_dir=str(tmp_path))  # a new process reads the file
    assert torch.equal(again.encode(problems), first) and again.texts_encoded == 0
    backbone = QueryEncoder("router", router_backbone="tiny-llama", cache_dir=str(tmp_path))
    states = backbone.encode(problems)
    assert backbone.texts_encoded == 6 and states.shape == (6, backbone.model.config.hidden_size) != first.shape
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_baselines_encoder_field_picks_the_encoder():
    base = {"candidates": [{"name": "a", "model": "tiny-llama"}], "router": {"backbone": "tiny-llama"}}
    backbone = QueryEncoder.from_config(config_from_dict({**base, "baselines": {"encoder": "router"}}))
    minilm = QueryEncoder.from_config(config_from_dict(base))
    assert backbone.label == "router:tiny-llama" and backbone.dim == backbone.model.config.hidden_size
    assert minilm.label == "all-minilm-l6-v2" and minilm.dim == 384
    with pytest.raises(ConfigError, match="baselines.routers"):
        config_from_dict({**base, "baselines": {"routers": ["routellm", "knn"]}})


# ----------------------------------------------------------------------------------------------
# HierRouter's environment (PPO itself: test_baselines_ppo.py)
# ----------------------------------------------------------------------------------------------


def test_routing_env_masks_unavailable_choices_with_the_penalty(encoder, splits):
    # problem p0 lacks (large, *) rows: choosing 'large' for the teacher leaves nothing D holds
    spec, _, d = synthetic(encoder, splits, 0.0, drop={("p0", 2), ("p0", 3)})
    env = RoutingEnv(env_config(d["train"], spec, BaselinesConfig(invalid_penalty=-3.5)))
    obs, _ = env.reset(options={"problem": 0})
    assert obs.shape == env.observation_space.shape == (384 + 2 * 2 + 2,)
    assert env.allowed().tolist() == [True, False]
    _, reward, terminated, _, info = env.step(1)
    assert (reward, terminated, info) == (-3.5, True, {"invalid": True})
    env.reset(options={"problem": 0})
    _, reward, terminated, _, _ = env.step(0)
    assert (reward, terminated) == (0.0, False)
    obs, reward, terminated, _, info = env.step(1)
    assert terminated and info["z_index"] == 1 and reward == float(d["train"].reward[0, 1])
    assert obs[384:388].tolist() == [1.0, 0.0, 0.0, 1.0]  # one-hot choices: teacher=small, student=large


def test_hierrouter_fit_without_a_ppo_trainer_says_so(encoder, splits):
    spec, _, d = synthetic(encoder, splits, 0.0)
    with pytest.raises(ValueError, match="needs a PPO trainer"):
        HierRouter(spec, BaselinesConfig(), 0).fit(d["train"], d["valid"])
