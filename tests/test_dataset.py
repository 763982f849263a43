"""D's schema and assignment space, the derived reward, SFT labels and static baselines on a hand-made D."""

import csv
import io
import random

import pyarrow as pa
import pytest

from haps_ray import dataset as D
from haps_ray.config import DecodingConfig, RewardConfig, config_from_dict
from haps_ray.dataset_labels import baselines_csv, baselines_markdown, sft_labels, static_baselines, write_baselines
from haps_ray.rl.cost import CostNormalizer

ROLES = ["teacher", "student"]
NAMES = ["a", "b"]


def make_row(split: str, pid: str, z_index: int, perf: float, cost: float, batch: str = "part-0") -> dict:
    z = D.assignments(2, 2)[z_index]
    return {
        "problem_id": pid, "split": split, "task": "mmlu", "roles": ROLES, "z": list(z),
        "z_names": [NAMES[i] for i in z], "z_index": z_index, "perf": perf, "cost": cost, "answer": "A",
        "gold": "A", "n_input_tokens": 10, "n_output_tokens": 5, "role_input_tokens": [6, 4],
        "role_output_tokens": [3, 2], "engine_input_tokens": [10, 0], "engine_output_tokens": [5, 0],
        "n_calls": 2, "n_malformed": 0, "error": None, "trajectory": "[]", "engine_names": NAMES, "engine_checksums": ["c1", "c2"],
        "max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": D.batch_seed(0, batch), "batch_id": batch,
    }


# perf and cost per z_index (z0 = a/a, z1 = a/b, z2 = b/a, z3 = b/b)
TRAIN = {"p1": ([1, 0, 0, 1], [1, 2, 3, 4]), "p2": ([0, 0, 1, 0], [2, 2, 2, 2]), "p3": ([0, 0, 0, 0], [1, 1, 1, 1])}
VALID = {"q1": ([0, 1, 1, 0], [7, 1, 1, 0.5])}


def hand_made_d(incomplete: bool = True) -> pa.Table:
    rows = []
    for split, problems in (("train", TRAIN), ("valid", VALID)):
        for pid, (perfs, costs) in problems.items():
            rows += [make_row(split, pid, i, float(p), float(c)) for i, (p, c) in enumerate(zip(perfs, costs))]
    if incomplete:  # a problem still being built: only 3 of its 4 z
        rows += [make_row("valid", "q2", i, 1.0, 1.0) for i in range(3)]
    return D.rows_to_table(rows)


def test_assignment_space_matches_product_order():
    zs = D.assignments(3, 2)
    assert len(zs) == 9 and zs[0] == (0, 0) and zs[1] == (0, 1) and zs[3] == (1, 0)
    assert [D.assignment_index(z, 3) for z in zs] == list(range(9))
    assert D.assignment_index((1, 0, 1), 2) == 5
    with pytest.raises(ValueError, match="outside"):
        D.assignment_index((0, 2), 2)
    assert D.assignment_label(ROLES, ["a", "b"]) == "teacher=a, student=b"


def test_seed_and_batch_id_are_deterministic():
    assert D.batch_seed(0, "part-1") == D.batch_seed(0, "part-1")
    assert len({D.batch_seed(s, b) for s in (0, 1) for b in ("part-1", "part-2", "part-3")}) == 6
    assert D.batch_id("train", [("p1", 0), ("p2", 1)]) == D.batch_id("train", [("p2", 1), ("p1", 0)])
    assert D.batch_id("train", [("p1", 0)]) != D.batch_id("valid", [("p1", 0)])


def test_schema_is_documented_and_rows_validate():
    assert all(b"doc" in field.metadata for field in D.D_SCHEMA)
    text = D.describe_schema()
    assert "| `problem_id` |" in text and "| `reward` |" in text and "derived on read" in text
    table = hand_made_d()
    assert table.schema.equals(D.D_SCHEMA, check_metadata=False) and table.num_rows == 19
    bad = make_row("train", "p9", 0, 1.0, 1.0)
    del bad["gold"]
    with pytest.raises(ValueError, match="p9.*gold"):
        D.rows_to_table([bad])
    wrong = make_row("train", "p9", 0, 1.0, 1.0)
    wrong["z"] = "not a list"
    with pytest.raises(ValueError, match="D_SCHEMA"):
        D.rows_to_table([wrong])


def test_dedupe_keeps_one_copy_per_key():
    rows = [make_row("train", "p1", 0, 1.0, 1.0, "part-b"), make_row("train", "p1", 0, 0.0, 1.0, "part-a"),
            make_row("train", "p1", 1, 1.0, 1.0), make_row("valid", "p1", 0, 1.0, 1.0)]
    table, dropped = D.dedupe(D.rows_to_table(rows))
    assert dropped == 1 and table.num_rows == 3
    kept = [r for r in table.to_pylist() if r["split"] == "train" and r["z_index"] == 0]
    assert [r["batch_id"] for r in kept] == ["part-a"]
    assert D.present_keys(table) == {("train", "p1", 0), ("train", "p1", 1), ("valid", "p1", 0)}


def test_resume_refuses_other_weights_or_decoding():
    table = hand_made_d()
    D.check_compatible(table, NAMES, ["c1", "c2"], DecodingConfig(max_new_tokens=8), "D")
    with pytest.raises(ValueError, match="other engines"):
        D.check_compatible(table, NAMES, ["c1", "changed"], DecodingConfig(max_new_tokens=8), "D")
    with pytest.raises(ValueError, match="max_new_tokens.*8"):
        D.check_compatible(table, NAMES, ["c1", "c2"], DecodingConfig(max_new_tokens=16), "D")


def test_with_reward_uses_train_bounds_and_shaping():
    table = D.with_reward(hand_made_d(), RewardConfig(lam=0.5, shaping=True))
    rows = {(r["split"], r["problem_id"], r["z_index"]): r for r in table.to_pylist()}
    # train costs span [1, 4]: Ĉ = (cost - 1) / 3
    assert rows["train", "p1", 3]["cost_norm"] == pytest.approx(1.0)
    assert rows["train", "p1", 3]["reward"] == pytest.approx(0.5 * 1 - 0.5 * 1)
    assert rows["train", "p1", 1]["reward"] == pytest.approx(0.5 * -1 - 0.5 * (1 / 3))
    assert rows["train", "p3", 0]["reward"] == pytest.approx(-0.5)
    # valid costs outside the train range are clipped, not refitted
    assert rows["valid", "q1", 0]["cost_norm"] == 1.0 and rows["valid", "q1", 3]["cost_norm"] == 0.0
    frozen = D.with_reward(hand_made_d(), RewardConfig(lam=0.5), CostNormalizer(0.0, 10.0))
    assert frozen.column("cost_norm").to_pylist()[3] == pytest.approx(0.4)
    plain = D.with_reward(hand_made_d(), RewardConfig(lam=0.0))
    assert plain.column("reward").to_pylist() == plain.column("perf").to_pylist()
    valid_only = hand_made_d().filter(pa.compute.equal(hand_made_d().column("split"), "valid"))
    with pytest.raises(ValueError, match="no 'train' rows"):
        D.with_reward(valid_only, RewardConfig(lam=0.2))


def test_reward_clip_cost_decides_whether_costs_above_the_train_range_are_clipped():
    # q1 z0 costs 7, above the train maximum 4: Ĉ = (7 - 1) / 3 = 2 unclipped
    def valid_c_hat(reward: RewardConfig, normalizer: CostNormalizer | None = None) -> float:
        rows = {(r["split"], r["problem_id"], r["z_index"]): r for r in D.with_reward(hand_made_d(), reward, normalizer).to_pylist()}
        return rows["valid", "q1", 0]["cost_norm"]

    assert valid_c_hat(RewardConfig(clip_cost=False)) == pytest.approx(2.0)
    assert valid_c_hat(RewardConfig(clip_cost=True)) == 1.0
    # a given (frozen) normaliser brings its bounds; the reward config decides the clipping
    assert valid_c_hat(RewardConfig(clip_cost=False), CostNormalizer(1.0, 4.0, clip=True)) == pytest.approx(2.0)
    assert valid_c_hat(RewardConfig(clip_cost=True), CostNormalizer(1.0, 4.0, clip=False)) == 1.0


def test_pipelines_fit_and_load_the_normaliser_with_reward_clip_cost(tmp_path):
    from pipelines.build_dataset import frozen_normalizer
    from pipelines.common import load_normalizer

    d = hand_made_d()
    fitted = frozen_normalizer(d, str(tmp_path), clip=False)
    assert (fitted.low, fitted.high, fitted.clip) == (1.0, 4.0, False) and fitted(7.0) == pytest.approx(2.0)
    valid_only = d.filter(pa.compute.equal(d.column("split"), "valid"))
    assert frozen_normalizer(valid_only, str(tmp_path), clip=True).clip is True  # loaded, then set by the config
    cfg = config_from_dict({"candidates": [{"name": "a", "model": "x"}], "task": {"train_path": "t", "valid_path": "v"},
                            "dataset": {"output": str(tmp_path)}, "reward": {"clip_cost": False}})
    loaded = load_normalizer(cfg)
    assert loaded.clip is False and loaded(7.0) == pytest.approx(2.0)
    cfg.reward.clip_cost = True
    assert load_normalizer(cfg)(7.0) == 1.0


def labels_of(table: pa.Table, split: str = "train") -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for row in table.to_pylist():
        if row["split"] == split:
            out.setdefault(row["problem_id"], []).append(row["z_index"])
    return out


def test_sft_tie_policies():
    d = D.with_reward(hand_made_d(), RewardConfig())
    first, summary = sft_labels(d, tie_policy="first")
    assert labels_of(first) == {"p1": [0], "p2": [2], "p3": [0]}
    assert labels_of(first, "valid") == {"q1": [1]}
    assert summary["train"]["ties"] == 2 and summary["valid"]["incomplete"] == 1 and summary["valid"]["problems"] == 1
    assert summary["train"]["labels"] == {"teacher=a, student=a": 2, "teacher=b, student=a": 1}
    every, _ = sft_labels(d, tie_policy="all")
    assert labels_of(every) == {"p1": [0, 3], "p2": [2], "p3": [0, 1, 2, 3]}
    assert {r["n_best"] for r in every.to_pylist() if r["problem_id"] == "p3"} == {4}
    dropped, summary = sft_labels(d, tie_policy="all", drop_all_zero=True)
    assert labels_of(dropped) == {"p1": [0, 3], "p2": [2]} and summary["train"]["dropped_all_zero"] == 1


def test_sft_random_ties_are_seeded_and_order_free():
    d = D.with_reward(hand_made_d(), RewardConfig())
    picks = {seed: labels_of(sft_labels(d, tie_policy="random", seed=seed)[0]) for seed in range(12)}
    assert all(p["p2"] == [2] for p in picks.values())  # no tie, no choice
    assert {p["p1"][0] for p in picks.values()} == {0, 3}  # both tied z get drawn across seeds
    assert {p["p3"][0] for p in picks.values()} <= {0, 1, 2, 3}
    order = list(range(d.num_rows))
    random.Random(1).shuffle(order)
    shuffled = d.take(pa.array(order))
    assert all(labels_of(sft_labels(shuffled, tie_policy="random", seed=s)[0]) == picks[s] for s in (0, 5))


def test_sft_balancing():
    d = D.with_reward(hand_made_d(), RewardConfig())
    # tie_policy=all on train gives labels z0: 2 (p1, p3), z1: 1 (p3), z2: 2 (p2, p3), z3: 2 (p1, p3)
    over, summary = sft_labels(d, tie_policy="all", balance="oversample", seed=3)
    counts = summary["train"]["labels"]
    assert summary["train"]["labels_before_balance"] == {
        "teacher=a, student=a": 2, "teacher=a, student=b": 1, "teacher=b, student=a": 2, "teacher=b, student=b": 2}
    assert set(counts.values()) == {2} and summary["train"]["rows"] == 8
    z1 = [r["problem_id"] for r in over.to_pylist() if r["split"] == "train" and r["z_index"] == 1]
    assert z1 == ["p3", "p3"]  # copies of the only z1 label
    under, summary = sft_labels(d, tie_policy="all", balance="undersample", seed=3)
    assert set(summary["train"]["labels"].values()) == {1} and summary["train"]["rows"] == 4
    z0 = [r["problem_id"] for r in under.to_pylist() if r["split"] == "train" and r["z_index"] == 0]
    assert len(z0) == 1 and z0[0] in {"p1", "p3"}
    with pytest.raises(ValueError, match="tie_policy"):
        sft_labels(d, tie_policy="best")


def test_static_baselines_are_exact(tmp_path):
    d = D.with_reward(hand_made_d(), RewardConfig())
    rows, headroom = static_baselines(d)
    got = {(r.split, r.method, r.assignment): r for r in rows}
    fixed = [got["train", "fixed", f"teacher={t}, student={s}"] for t in NAMES for s in NAMES]
    assert [r.reward for r in fixed] == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])
    assert [r.cost for r in fixed] == pytest.approx([4 / 3, 5 / 3, 2, 7 / 3])
    assert got["train", "random", "uniform over Z"].reward == pytest.approx(0.25)
    oracle = got["train", "oracle", "best z per problem"]
    assert (oracle.reward, oracle.cost, oracle.problems) == (pytest.approx(2 / 3), pytest.approx(4 / 3), 3)
    assert headroom["train"]["best_fixed"] == "teacher=a, student=a"
    assert headroom["train"]["share_best_differs"] == pytest.approx(1 / 3)
    # valid: q2 is incomplete and left out; q1 alone
    assert got["valid", "oracle", "best z per problem"].reward == 1.0
    assert got["valid", "oracle", "best z per problem"].cost == 1.0  # cheaper of the two tied z
    assert headroom["valid"] == {"best_fixed": "teacher=a, student=b", "best_fixed_reward": 1.0,
                                 "share_best_differs": 0.0, "problems": 1, "incomplete": 1}
    parsed = list(csv.DictReader(io.StringIO(baselines_csv(rows))))
    assert len(parsed) == 2 * 6 and float(parsed[4]["reward"]) == pytest.approx(0.25)
    text = baselines_markdown(rows, headroom)
    assert "| train | oracle | best z per problem | 0.6667 |" in text and "33.3%" in text
    write_baselines(rows, headroom, str(tmp_path))
    assert (tmp_path / "baselines.csv").read_text() == baselines_csv(rows)
    assert (tmp_path / "baselines.md").exists() and (tmp_path / "baselines_headroom.json").exists()


def test_labels_refuse_missing_reward():
    with pytest.raises(ValueError, match="with_reward"):
        static_baselines(hand_made_d())


def test_d_written_before_the_typed_records_still_reads(tmp_path):
    """Rows committed by the code before CallRecord/ErrorKind (the demo's D, commit 4767535) read as D and their
    trajectories as typed records, whose serialisation is the stored JSON again."""
    import json
    import shutil

    from tests.helpers import FIXTURES

    split = tmp_path / "D" / "split=valid"
    split.mkdir(parents=True)
    shutil.copy(FIXTURES / "d_written_before_typed_records.parquet", split / "part-old.parquet")
    d, dropped = D.read_d(str(tmp_path / "D"))
    assert d.num_rows == 2 and dropped == 0 and d.schema.equals(D.D_SCHEMA, check_metadata=False)
    for row in d.to_pylist():
        calls, retrievals, steps = D.trajectory(row)
        assert len(calls) == row["n_calls"] > 0 and retrievals == [] and steps >= 1
        assert sum(c.n_input_tokens for c in calls) == row["n_input_tokens"]
        assert [c.engine for c in calls] == [row["z_names"][row["roles"].index(c.role)] for c in calls]
        assert [c.to_dict() for c in calls] == json.loads(row["trajectory"])["calls"]
