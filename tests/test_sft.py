"""SFT of the router: schedule and shuffling, D_SFT joins (malformed rows), the offline valid score on a
hand-made D, exact checkpoint round trips, adapter shapes from configs, and learning a keyword rule end to end."""

import json
import math
import random

import pyarrow as pa
import pytest
import torch

from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import CandidateConfig, ConfigError, ExperimentConfig, RewardConfig, RouterConfig, SFTConfig, TaskConfig
from haps_ray.config import config_from_dict, load_config, to_dict
from haps_ray.dataset_labels import SFT_SCHEMA, sft_labels
from haps_ray.lora import adapter_shapes, attach_lora
from haps_ray.metrics import read_metrics
from haps_ray.models import load_model, model_config
from haps_ray.routing import HAPSPolicy, RoutingSpec
from haps_ray.checkpoint import CONFIG_FILE, METRICS_FILE, save_checkpoint, write_policy
from haps_ray.routing.sft import SFTExample, SFTTrainer, ValidSet, evaluate_router, join_examples, score_choices
from haps_ray.training import epoch_order
from haps_ray.tasks import Problem

ROLES = ["teacher", "student"]
NAMES = ["astro", "chef"]
SPEC = RoutingSpec("mmlu", tuple(ROLES), tuple(NAMES))


def problem(pid: str, question: str, subject: str = "astronomy") -> Problem:
    return Problem(id=pid, task="mmlu", question=question, answer="A", choices=["one", "two", "three", "four"], subject=subject)


def d_row(split: str, pid: str, z_index: int, perf: float, cost: float) -> dict:
    z = D.assignments(2, 2)[z_index]
    return {
        "problem_id": pid, "split": split, "task": "mmlu", "roles": ROLES, "z": list(z), "z_names": [NAMES[i] for i in z],
        "z_index": z_index, "perf": perf, "cost": cost, "answer": "A", "gold": "A", "n_input_tokens": 10,
        "n_output_tokens": 5, "role_input_tokens": [6, 4], "role_output_tokens": [3, 2], "engine_input_tokens": [5, 5],
        "engine_output_tokens": [2, 3], "n_calls": 2, "n_malformed": 0, "error": None, "trajectory": "{}",
        "engine_names": NAMES, "engine_checksums": ["c1", "c2"], "max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0,
        "seed": 0, "batch_id": "part-0",
    }


def d_table(problems: dict[str, dict[str, tuple[list[float], list[float]]]]) -> pa.Table:
    """split -> problem -> (perf per z_index, cost per z_index); a short list leaves the problem incomplete."""
    return D.rows_to_table([d_row(split, pid, i, float(p), float(c))
                            for split, by_pid in problems.items() for pid, (perfs, costs) in by_pid.items()
                            for i, (p, c) in enumerate(zip(perfs, costs))])


def tiny_policy(seed: int = 0, **router) -> HAPSPolicy:
    cfg = ExperimentConfig(
        seed=seed,
        candidates=[CandidateConfig(name="astro", model="tiny-llama"), CandidateConfig(name="chef", model="tiny-qwen2", open_source=False)],
        router=RouterConfig(backbone="tiny-llama", device="cpu", max_prompt_tokens=256, hidden=16, lora_rank=2, **router),
    )
    return HAPSPolicy.from_config(cfg, adapter_shapes={"astro": [(64, 64)]})


# ------------------------------------------------------------------ schedule, shuffling, config


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    trainer = SFTTrainer(tiny_policy(), SFTConfig(lr=1.0, warmup_ratio=0.2), total_steps=10)
    lrs = []
    for _ in range(11):  # 2 warm-up updates (transformers' schedule: the first one at lr 0), then a cosine over 8
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs[:3] == [0.0, 0.5, 1.0]
    assert lrs[6] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lrs[10] == pytest.approx(0.0)
    flat = SFTTrainer(tiny_policy(), SFTConfig(lr=1.0, warmup_ratio=0.0), total_steps=4)
    assert flat.optimizer.param_groups[0]["lr"] == 1.0


def test_epoch_order_is_a_seeded_permutation():
    orders = [epoch_order(50, seed=3, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] == epoch_order(50, seed=3, epoch=0) and orders[0] != orders[1] != orders[2]
    assert epoch_order(50, seed=4, epoch=0) != orders[0]


def test_sft_config_fields_are_validated():
    with pytest.raises(ConfigError, match=r"sft\.eval_every"):
        config_from_dict({"candidates": [{"name": "a", "model": "tiny-llama"}], "sft": {"eval_every": -1}})
    with pytest.raises(ConfigError, match=r"sft\.grad_clip"):
        config_from_dict({"candidates": [{"name": "a", "model": "tiny-llama"}], "sft": {"grad_clip": 0}})


# ------------------------------------------------------------------ D_SFT rows and the valid score


def test_malformed_sft_rows_are_reported_and_skipped(caplog):
    problems = {"p1": problem("p1", "Which star?"), "p2": problem("p2", "Which pot?", "cooking")}
    good = {"split": "train", "problem_id": "p1", "z_index": 1, "z": [0, 1], "z_names": ["astro", "chef"]}
    rows = [
        good,
        {**good, "problem_id": "ghost"},                                   # 1: unknown problem
        {**good, "problem_id": "p2", "z": [0, 5], "z_index": 1},           # 2: candidate id out of range
        {**good, "problem_id": "p2", "z_index": 3},                        # 3: z_index contradicts z
        {**good, "problem_id": "p2", "z": None},                           # 4: no z
        {**good, "problem_id": "p2", "z": [1]},                            # 5: one role only
        {**good, "problem_id": "p2", "z_names": ["chef", "astro"]},        # 6: names of another pool
        {**good, "split": "valid", "problem_id": "elsewhere"},             # 7: other split: not read here
        {**good, "problem_id": "p2", "z": [1, 0], "z_index": 2, "z_names": ["chef", "astro"]},
    ]
    table = pa.Table.from_pylist([{**r, "roles": ROLES, "reward": 1.0, "n_best": 1} for r in rows], schema=SFT_SCHEMA)
    with caplog.at_level("WARNING"):
        examples, skipped = join_examples(table, problems, SPEC, "train", "D_sft.parquet")
    assert [(e.problem_id, e.z) for e in examples] == [("p1", (0, 1)), ("p2", (1, 0))]
    assert [s.split(":")[0] for s in skipped] == [f"D_sft.parquet row {i} (split train, problem {p!r})"
                                                  for i, p in [(1, "ghost"), (2, "p2"), (3, "p2"), (4, "p2"), (5, "p2"), (6, "p2")]]
    for number, reason in [(1, "unknown problem id 'ghost'"), (2, "z [0, 5] is not 2 candidate ids"),
                           (3, "z_index 3 does not match z [0, 1] (index 1)"), (4, "z None is not"),
                           (5, "z [1] is not 2 candidate ids"), (6, "z_names ['chef', 'astro'] do not match")]:
        assert reason in skipped[number - 1]
        assert any(f"row {number} " in rec.getMessage() and reason in rec.getMessage() for rec in caplog.records)
    assert any("6 of 8 train rows skipped" in rec.getMessage() for rec in caplog.records)


# perf, cost per z_index (z0 = astro/astro, z1 = astro/chef, z2 = chef/astro, z3 = chef/chef). λ = 0.5 and the
# train costs span [0, 8], so reward = 0.5·perf − 0.5·min(cost/8, 1) = 0.5·perf − min(cost, 8)/16.
HAND_D = {
    "train": {"t1": ([1, 0, 0, 1], [0, 4, 2, 8]), "t2": ([0, 1, 1, 0], [1, 2, 3, 4])},
    "valid": {
        "v1": ([0, 1, 0, 0], [0, 0, 0, 0]),       # rewards 0, .5, 0, 0             label z1
        "v2": ([1, 1, 0, 0], [8, 0, 0, 0]),       # rewards 0, .5, 0, 0             label z1
        "v3": ([1, 0, 0, 1], [4, 4, 12, 4]),      # rewards .25, -.25, -.5, .25     labels z0, z3 (a tie)
        "v4": ([1, 1, 1], [0, 0, 0]),             # incomplete: left out
        "v5": ([1, 0, 0, 0], [0, 0, 0, 0]),       # no loaded problem text: left out
    },
}
# Train mean rewards per z: .21875, .0625, .09375, -.125 -> the best fixed assignment is z0.


def hand_valid_set(caplog=None) -> tuple[ValidSet, list[Problem]]:
    d = D.with_reward(d_table(HAND_D), RewardConfig(lam=0.5))
    labels, _ = sft_labels(d, tie_policy="all")
    texts = [problem("v1", "Which star is brightest?"), problem("v2", "Which pot boils fastest?", "cooking"),
             problem("v3", "Name a red planet."), problem("v4", "Unused.")]
    return ValidSet.from_tables(d, labels, {p.id: p for p in texts}, SPEC), texts


def test_valid_score_equals_a_hand_computation_on_a_hand_made_d():
    valid, texts = hand_valid_set()
    assert [p.id for p in valid.problems] == ["v1", "v2", "v3"]
    assert valid.rewards == [pytest.approx(r) for r in ([0, .5, 0, 0], [0, .5, 0, 0], [.25, -.25, -.5, .25])]
    assert valid.labels == [{1}, {1}, {0, 3}] and valid.best_fixed == 0 and valid.best_fixed_split == "train"
    assert valid.skipped == {"incomplete": 1, "unknown_problem": 1, "label_rows": 1}  # v5's label row is skipped too
    m = score_choices(valid, [1, 0, 3], ["aa", "ac", "ca", "cc"])
    assert m["valid/score"] == pytest.approx(0.5 + 0 + 0.25)
    assert m["valid/reward_mean"] == pytest.approx(0.75 / 3)
    assert m["valid/best_acc"] == pytest.approx(2 / 3) and m["valid/label_acc"] == pytest.approx(2 / 3)
    assert m["valid/best_fixed_score"] == pytest.approx(0.25) and m["valid/best_fixed_reward_mean"] == pytest.approx(0.25 / 3)
    assert m["valid/best_fixed_label_acc"] == pytest.approx(1 / 3) and m["valid/best_fixed_best_acc"] == pytest.approx(1 / 3)
    assert m["valid/agree_best_fixed"] == pytest.approx(1 / 3)
    assert m["valid/oracle_reward_mean"] == pytest.approx(1.25 / 3)
    assert m["valid/choices"] == {"aa": 1, "ac": 1, "cc": 1} and m["valid/best_fixed"] == "aa"
    with pytest.raises(ValueError, match="2 choices for 3 valid problems"):
        score_choices(valid, [1, 0])


def test_router_valid_score_is_the_d_reward_of_its_greedy_choices():
    valid, _ = hand_valid_set()
    policy = tiny_policy()
    with torch.no_grad():
        picks = policy.router.log_probs(valid.problems).argmax(-1).tolist()  # the exact π over Z, read directly
    metrics = evaluate_router(policy, valid, batch_size=2)
    assert metrics["valid/score"] == pytest.approx(sum(valid.rewards[i][c] for i, c in enumerate(picks)))
    assert sum(metrics["valid/choices"].values()) == 3


def test_valid_set_refuses_a_d_built_for_another_pool():
    d = D.with_reward(d_table(HAND_D), RewardConfig())
    other = RoutingSpec("mmlu", tuple(ROLES), ("astro", "gpt"))
    with pytest.raises(ValueError, match="D was built for"):
        ValidSet.from_tables(d, sft_labels(d)[0], {}, other)


# ------------------------------------------------------------------ updates and checkpoints


def test_updates_move_the_backbone_only_and_checkpoints_round_trip_exactly(tmp_path):
    policy = tiny_policy(seed=1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    examples = [SFTExample("a", problem("a", "Which star?"), (0, 1)), SFTExample("b", problem("b", "Which pot?"), (1, 0))]
    trainer = SFTTrainer(policy, SFTConfig(lr=1e-3, warmup_ratio=0.0), total_steps=2)
    with torch.no_grad():
        first = trainer.loss(examples).item()
    stats = [trainer.update(examples) for _ in range(2)]
    assert stats[0]["sft/loss"] == pytest.approx(first) and stats[1]["sft/loss"] < first
    assert stats[0]["sft/lr"] == 1e-3 and stats[1]["sft/lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    after = policy.state_dict()
    for name, tensor in after.items():
        moved = not torch.equal(tensor, before[name])
        assert moved == name.startswith("router."), f"{name} moved={moved}"  # heads get no gradient from SFT

    cfg = ExperimentConfig(candidates=[CandidateConfig(name="astro", model="tiny-llama")], sft=SFTConfig(lr=1e-3))
    path = save_checkpoint(tmp_path / "best", lambda p: write_policy(policy, p), cfg, {"step": 2, "valid/score": 1.5})
    assert not (tmp_path / "best.tmp").exists()
    loaded = HAPSPolicy.load(path, device="cpu")
    reloaded = loaded.state_dict()
    assert sorted(reloaded) == sorted(after)
    assert all(torch.equal(reloaded[k], after[k]) and reloaded[k].dtype == after[k].dtype for k in after)
    questions = [e.problem for e in examples]
    with torch.no_grad():
        assert torch.equal(loaded.router.log_probs(questions), policy.router.log_probs(questions))
    assert to_dict(load_config(path / CONFIG_FILE)) == to_dict(cfg)
    assert json.loads((path / METRICS_FILE).read_text()) == {"step": 2, "valid/score": 1.5}
    save_checkpoint(tmp_path / "best", lambda p: write_policy(loaded, p), cfg, {"step": 3})  # replacing keeps one directory
    assert json.loads((path / METRICS_FILE).read_text()) == {"step": 3}


@pytest.mark.parametrize("source", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_adapter_shapes_from_the_config_alone_match_the_loaded_model(source):
    from pipelines.sft import candidate_adapter_shapes

    cfg = ExperimentConfig(candidates=[CandidateConfig(name="m", model=source)])
    cfg.router.lora_layers = 2
    model, _ = load_model(source, device="cpu")
    config = model_config(source)
    assert {k: v for k, v in config.to_dict().items() if k != "dtype"} == {k: v for k, v in model.config.to_dict().items() if k != "dtype"}
    attach_lora(model, 2)
    assert candidate_adapter_shapes(cfg) == {"m": adapter_shapes(model)}


# ------------------------------------------------------------------ end to end: the pipeline learns a keyword rule

TOPIC_WORDS = {"astronomy": ["stars", "planets", "comets", "moons"], "cooking": ["pots", "ovens", "spices", "soups"]}
BEST_Z = {"astronomy": (0, 1), "cooking": (1, 0)}  # the expert of the topic as Student, the other as Teacher
TOY_REWARD = {"astronomy": [0.5, 1.0, 0.0, 0.0], "cooking": [0.0, 0.0, 1.0, 0.5]}  # per z_index


# A random 2-layer backbone attends almost uniformly, so the topic must dominate the long routing prompt;
# with these settings held-out accuracy reached 1.0 by epoch 4 of 20 in every seed tried.
WORDS, LR, EPOCHS, BATCH, N_TRAIN = 40, 1e-3, 20, 4, 48
STEPS_PER_EPOCH = N_TRAIN // BATCH


def keyword_problems(n: int, seed: int, prefix: str, repeats: int) -> list[Problem]:
    """Problems alternating between two topics; the text repeats the topic and one of its keywords."""
    rng = random.Random(seed)
    topics = sorted(TOPIC_WORDS)
    problems = []
    for i in range(n):
        topic = topics[i % 2]
        text = f"Question {i}: " + f"{topic} {rng.choice(TOPIC_WORDS[topic])} " * repeats + "- which option is right?"
        problems.append(problem(f"{prefix}{i}", text, topic))
    return problems


@pytest.mark.slow
def test_sft_pipeline_learns_a_keyword_rule_and_keeps_the_best_checkpoint(tmp_path):
    from pipelines.build_dataset import write_tables
    from pipelines.sft import main

    train, valid = keyword_problems(N_TRAIN, 1, "tr", WORDS), keyword_problems(20, 2, "va", WORDS)
    for split, problems in (("train", train), ("valid", valid)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(p.to_row()) + "\n" for p in problems))
    run_dir, data_dir = tmp_path / "run", tmp_path / "run" / "dataset"
    config = {
        "seed": 0, "run_dir": str(run_dir),
        "task": {"name": "mmlu", "train_path": str(tmp_path / "train.jsonl"), "valid_path": str(tmp_path / "valid.jsonl"),
                 "n_train": 0, "n_valid": 0},
        "candidates": [{"name": "astro", "model": "tiny-llama"}, {"name": "chef", "model": "tiny-qwen2"}],
        "router": {"backbone": "tiny-llama", "device": "cpu", "max_prompt_tokens": 512, "hidden": 16, "lora_rank": 2},
        "dataset": {"tie_policy": "first"},
        "sft": {"lr": LR, "epochs": EPOCHS, "batch_size": BATCH, "warmup_ratio": 0.0},
    }
    cfg_path = tmp_path / "sft.yaml"
    cfg_path.write_text(json.dumps(config))  # JSON is YAML
    cfg = load_config(cfg_path)
    for split, problems in (("train", train), ("valid", valid)):
        rows = [d_row(split, p.id, i, TOY_REWARD[p.subject][i], 0.0) for p in problems for i in range(4)]
        storage.write_table(D.rows_to_table(rows).drop_columns(["split"]), str(data_dir / "D" / f"split={split}" / "part-0.parquet"))
    write_tables(cfg, str(data_dir))  # D_SFT and the cost normaliser, as build_dataset writes them
    labels = storage.read_table(str(data_dir / "D_sft.parquet"))
    ghost = {**labels.slice(0, 1).to_pylist()[0], "problem_id": "ghost"}
    storage.write_table(pa.concat_tables([labels, pa.Table.from_pylist([ghost], schema=labels.schema)]), str(data_dir / "D_sft.parquet"))

    assert main(["--config", str(cfg_path)]) == 0

    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert summary["examples"] == N_TRAIN and summary["skipped_rows"] == 1 and "unknown problem id 'ghost'" in summary["skipped"][0]
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH and summary["best_policy"] == str(run_dir / "sft" / "best")
    records = read_metrics(run_dir / "sft" / "metrics" / "metrics.jsonl")
    scores = [r["valid/score"] for r in records if "valid/score" in r]
    losses = [r["sft/loss"] for r in records if "sft/loss" in r]
    assert len(scores) == EPOCHS + 1 and len(losses) == EPOCHS * STEPS_PER_EPOCH and losses[-1] < losses[0] / 4
    best = json.loads((run_dir / "sft" / "best" / METRICS_FILE).read_text())
    assert best["valid/score"] == max(scores) == summary["best"]["valid/score"] and best["selection"] == "best valid score"
    assert json.loads((run_dir / "sft" / "last" / METRICS_FILE).read_text())["step"] == EPOCHS * STEPS_PER_EPOCH

    # Independent of the pipeline's own metrics: reload the selected checkpoint and read its exact π over Z.
    policy = HAPSPolicy.load(summary["best_policy"], device="cpu")
    assert policy.hypernet.names == ["astro", "chef"]
    with torch.no_grad():
        picks = policy.router.log_probs(valid).argmax(-1).tolist()
    accuracy = sum(pick == SPEC.index(BEST_Z[p.subject]) for pick, p in zip(picks, valid)) / len(valid)
    assert accuracy >= 0.95, f"held-out label accuracy {accuracy:.2f}"
    assert best["valid/label_acc"] == accuracy
    assert best["valid/score"] == pytest.approx(sum(TOY_REWARD[p.subject][pick] for pick, p in zip(picks, valid)))
    assert best["valid/best_fixed_label_acc"] == 0.5


def test_micro_batches_make_the_same_update_as_the_whole_batch():
    examples = [SFTExample(f"p{i}", problem(f"p{i}", f"Which star is number {i}?"), (i % 2, 1 - i % 2)) for i in range(6)]
    whole, split = tiny_policy(seed=4), tiny_policy(seed=4)
    cfg = SFTConfig(lr=1e-3, warmup_ratio=0.0)
    a = SFTTrainer(whole, cfg, total_steps=1).update(examples)
    b = SFTTrainer(split, SFTConfig(lr=1e-3, warmup_ratio=0.0, micro_batch_size=4), total_steps=1).update(examples)
    assert a["sft/loss"] == pytest.approx(b["sft/loss"], abs=1e-6) and a["sft/grad_norm"] == pytest.approx(b["sft/grad_norm"], rel=1e-5)
    moved = [not torch.equal(p, q) for p, q in zip(whole.parameters(), tiny_policy(seed=4).parameters())]
    assert any(moved)
    for (name, p), q in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
