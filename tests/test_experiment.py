"""pipelines.experiment: every paper experiment resolves to loadable runs, its tables put our rows beside the paper's,
and (slow) one experiment runs end to end on tiny models and reuses its run when called again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from haps_ray import paper_tables as paper
from haps_ray.config import load_config
from haps_ray.report import ResultRow
from haps_ray.rl.cost import CostNormalizer
from pipelines import experiment as E

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "run_tiny.yaml"


def every_run(run_root: Path):
    for name in E.NAMES:
        for offline in (False, True):
            tasks = ("mmlu",) if offline and name == "rq6" else E.DEFAULT_TASKS[name]
            for task in tasks:
                for pair in E.default_pairs(name, offline):
                    yield name, task, pair, E.plan(name, task, pair, run_root)


def test_every_experiment_plans_runs_whose_configs_load(tmp_path) -> None:
    seen = set()
    for name, task, pair, runs in every_run(tmp_path):
        assert runs, (name, task, pair)
        for run in runs:
            cfg = E.load_run_config(run)
            assert Path(cfg.run_dir) == run.run_dir
            seen.add((name, run.variant))
            if run.sweep:
                assert [s.grid for s in cfg.sweep.space.values()] == [list(E.RQ4_DEPTHS)]
                assert list(cfg.sweep.space) == ["router.lora_layers"]
    assert ("rq2", "w/o low-level") in seen and ("rq3", "w/o parameter sharing") in seen
    assert {("rq5", f"lambda={lam}") for lam in paper.COST_LAMBDAS} <= seen


def test_variants_of_a_pair_share_its_d_and_the_haps_run(tmp_path) -> None:
    rq2 = E.plan("rq2", "mmlu", "L-Q", tmp_path)
    rq3 = E.plan("rq3", "mmlu", "L-Q", tmp_path)
    assert rq2[0] == rq3[0] == E.plan("rq1", "mmlu", "L-Q", tmp_path)[0]  # HAPS trained once for rq1-rq3
    haps_d = E.load_run_config(rq2[0]).dataset
    for variant in (rq2[1], rq3[1]):
        cfg = E.load_run_config(variant)
        assert Path(cfg.dataset.output) == rq2[0].run_dir / "dataset" and haps_d.output == ""
    lams = [E.load_run_config(r).reward.lam for r in E.plan("rq5", "hotpotqa", E.OFFLINE_PAIR, tmp_path)]
    assert lams == list(paper.COST_LAMBDAS)


def test_d_covers_the_reported_split(tmp_path) -> None:
    cfg = E.load_run_config(E.plan("rq1", "mmlu", "L-Q", tmp_path)[0])
    assert E.table_split(cfg) == "test" and "test" in cfg.dataset.splits
    offline = E.load_run_config(E.plan("rq1", "mmlu", E.OFFLINE_PAIR, tmp_path)[0])
    assert E.table_split(offline) == "valid" and "test" not in offline.dataset.splits


def rows(split: str, **perf: float) -> list[ResultRow]:
    return [ResultRow(method, split, reward=value - 0.1, perf=value, cost=1e-4, problems=10, source="rollouts")
            for method, value in perf.items()]


def test_rq1_table_has_ours_beside_the_papers_and_marks_what_did_not_run(tmp_path) -> None:
    results = {"L-Q": {"HAPS": rows("test", HAPS=0.45, RouteLLM=0.40, **{"random z, no adapters (D)": 0.30})}}
    table = E.table_rq1("hotpotqa", results)
    assert table.rows["HAPS"]["L-Q"] == (pytest.approx(45.0), 43.16)
    assert table.rows["RouteLLM"]["L-Q"] == (pytest.approx(40.0), 40.67)
    assert table.rows["Random"]["L-Q"] == (pytest.approx(30.0), 38.94)
    assert table.rows["GraphRouter"]["L-Q"] == (None, 41.31)
    text = table.markdown()
    assert "| GraphRouter | not run | 41.31 |" in text
    paths = E.write_outputs(table, tmp_path / "out")
    assert paths["plot"].stat().st_size > 0 and "RouteLLM,L-Q,40.0" in paths["csv"].read_text()


def test_rq2_maps_left_and_right_to_the_pairs_first_and_second_candidate(tmp_path) -> None:
    cfg = E.load_run_config(E.plan("rq2", "mmlu", "L-Q", tmp_path)[0])
    first, second = (c.name for c in cfg.candidates)
    haps = rows("test", HAPS=0.8, **{f"w/o high-level router (teacher={second}, student={first})": 0.5})
    table = E.table_rq2("mmlu", {"L-Q": {"HAPS": haps, "w/o low-level": rows("test", HAPS=0.6)}}, {"L-Q": cfg})
    assert table.rows["w/o High-Level (Fixed): Teacher=Right, Student=Left"]["L-Q"] == (pytest.approx(50.0), 69)
    assert table.rows["w/o High-Level (Fixed): Teacher=Left, Student=Right"]["L-Q"] == (None, 70)
    assert table.rows["w/o Low-Level Router"]["L-Q"] == (pytest.approx(60.0), 70)


def test_rq5_reports_cost_normalised_with_the_frozen_train_bounds(tmp_path) -> None:
    run = E.plan("rq5", "hotpotqa", E.OFFLINE_PAIR, tmp_path)[0]
    cfg = E.load_run_config(run)
    CostNormalizer(1e-4, 3e-4).save(Path(cfg.dataset.output) / "cost_normalizer.json")
    weak, strong = E.cheapest_and_dearest(cfg)
    assert weak.endswith(f"={cfg.candidates[0].name}") and strong.endswith(f"={cfg.candidates[1].name}")
    haps = [ResultRow("HAPS", "valid", 0.3, 0.35, 2e-4, 10, "rollouts"),
            ResultRow(f"fixed {strong} (D)", "valid", 0.1, 0.4, 5e-4, 10, "D")]
    table = E.table_rq5("hotpotqa", {"offline": {"lambda=0.2": haps}}, {"offline/lambda=0.2": cfg})
    assert table.rows["HAPS"]["cost at lambda=0.2"] == (pytest.approx(0.5), 0.0886)
    assert table.rows["All Strong"]["cost at lambda=0.2"][0] == pytest.approx(2.0)  # above the train range: not clipped
    assert table.rows["All Weak"]["perf at lambda=0.2"] == (None, 0.3458)


def test_rq4_reads_the_sweep_results_per_depth(tmp_path) -> None:
    tune = tmp_path / "tune"
    tune.mkdir()
    (tune / "results.csv").write_text("k,status,perf\n1,finished,0.31\n2,failed,nan\n4,stopped,0.35\n")
    table = E.table_rq4("hotpotqa", {"L-Q": E.sweep_rows(tmp_path)})
    assert table.rows["HAPS, k=1"]["L-Q"][0] == pytest.approx(31.0)
    assert table.rows["HAPS, k=2"]["L-Q"][0] is None
    assert table.rows["HAPS, k=4"]["L-Q"][0] == pytest.approx(35.0)


def test_a_bad_override_fails_before_anything_runs(tmp_path, capsys) -> None:
    code = E.main(["--name", "rq1", "--offline", "--task", "mmlu", "--run-root", str(tmp_path),
                   "--set", "rl.batch_size=-1"])
    assert code == 2
    assert "rl.batch_size" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_rq1_on_tiny_models_writes_the_table_and_reuses_the_run(tmp_path, ray_session, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    out = E.run_experiment("rq1", ["mmlu"], ["L-Q"], tmp_path, config=TINY)
    text = out[0]["markdown"].read_text()
    haps_row = next(line for line in text.splitlines() if line.startswith("| HAPS |"))
    assert "not run" not in haps_row and "79.00" in haps_row  # ours, then the paper's MMLU L-Q number
    assert "[split: test]" in text
    stages = json.loads((tmp_path / "mmlu_L-Q" / "haps" / "stages.json").read_text())
    assert set(stages) >= {"data", "dataset", "sft", "rl", "evaluate"}
    assert load_config(tmp_path / "mmlu_L-Q" / "haps" / "config.yaml").evaluation.fixed_assignments
    before = (tmp_path / "mmlu_L-Q" / "haps" / "stages.json").stat().st_mtime_ns
    E.run_experiment("rq1", ["mmlu"], ["L-Q"], tmp_path, config=TINY)
    assert (tmp_path / "mmlu_L-Q" / "haps" / "stages.json").stat().st_mtime_ns == before  # every stage skipped
